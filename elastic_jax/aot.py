"""Ahead-of-time compilation for accelerator targets this machine does not have (TPU pods on a
CPU host), and what the compiler says about memory and FLOPs.

With the `tpu-aot` extra (`pip install -e ".[tpu-aot]"`: libtpu next to jax) the TPU compiler runs
on any host: `tpu_mesh("v5p:2x2x2", ("fsdp",))` builds a `Mesh` of abstract TPU devices, inputs are
`jax.ShapeDtypeStruct`s carrying `NamedSharding`s over it, and `compile_report(fn, *args)` lowers and
compiles `fn` for that target (Mosaic / Pallas kernels included) without running or allocating
anything. The report holds per-chip bytes from `memory_analysis()`, FLOPs from `cost_analysis()`,
the compile time, and `fits=False` with the required bytes when the compiler runs out of HBM.

    mesh = aot.tpu_mesh("v5p:2x2x2", ("fsdp",))
    x = aot.abstract((8, 4096), jnp.bfloat16, mesh, P("fsdp", None))
    report = aot.compile_report(jax.jit(f), x)
    print(report.total_bytes / 2**30, report.fits)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .kernels import compile_target

# Several processes (pytest workers, other jobs) may load libtpu on one host; without this libtpu
# refuses with "Internal error when accessing libtpu multi-process lockfile". Compiling needs no
# exclusive device access.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 1024 ** 3
# HBM per chip as the TPU compiler reports it ("exceeds available HBM (95.74G)" on v5p).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": int(95.74 * GiB), "v6e": 32 * GiB}

_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds available HBM")
_REQUIRED = re.compile(r"required for [^(]*\(([\d.]+)\s*([KMGT])")
_AVAILABLE = re.compile(r"available HBM \(([\d.]+)\s*([KMGT])")
_UNIT = {"K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def tpu_unavailable_reason() -> str | None:
    """None when TPU targets can be compiled for here, else why not (for `pytest.skip`)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return 'libtpu is not installed (pip install -e ".[tpu-aot]")'
    try:
        tpu_devices("v5e:2x2")
    except Exception as e:  # noqa: BLE001 - any failure means: cannot compile for TPU here
        return f"TPU topology unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def _parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", name)
    if not m:
        raise ValueError(f"TPU topology must look like 'v5p:2x2x2' or 'v5e:4x4', got {name!r}")
    return m.group(1), tuple(int(d) for d in m.group(2).split("x"))


def tpu_devices(topology: str, num_slices: int = 1) -> list:
    """Abstract devices of a TPU topology (`jax.experimental.topologies`), e.g. "v5p:2x2x2"."""
    from jax.experimental import topologies

    _, dims = _parse_topology(topology)
    dims3 = (dims + (1, 1, 1))[:3]
    bounds = (min(dims3[0], 2), min(dims3[1], 2), 1)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=bounds, num_slices=num_slices)
    return list(desc.devices)


def hbm_bytes(topology: str) -> int | None:
    """HBM per chip of the topology's generation (None when unknown)."""
    return HBM_BYTES.get(_parse_topology(topology)[0])


def tpu_mesh(topology: str, axis_names: Sequence[str], axis_sizes: Sequence[int] | None = None,
             num_slices: int = 1) -> Mesh:
    """A `Mesh` over the topology's abstract devices; `axis_sizes` default: all chips on the first
    axis, 1 on the others. The axes are `Auto` (GSPMD propagates, sharding constraints apply)."""
    devices = tpu_devices(topology, num_slices)
    n = len(devices)
    sizes = tuple(axis_sizes) if axis_sizes is not None else (n,) + (1,) * (len(axis_names) - 1)
    if len(sizes) != len(axis_names) or int(np.prod(sizes)) != n:
        raise ValueError(f"mesh axes {tuple(axis_names)} x sizes {sizes} do not cover the {n} chips of {topology}")
    return Mesh(np.array(devices).reshape(sizes), tuple(axis_names))


def abstract(shape, dtype, mesh: Mesh, spec: PartitionSpec | None = None) -> jax.ShapeDtypeStruct:
    """One abstract input: shape, dtype and its sharding over `mesh` (replicated when spec is None)."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec or PartitionSpec()))


def abstract_tree(tree, shardings) -> Any:
    """A pytree of arrays / ShapeDtypeStructs -> ShapeDtypeStructs with the given shardings (a
    matching pytree of `Sharding`s, or one for all)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What the compiler says about one program, per chip. Byte fields are None when the compile
    failed; `required_bytes` is then the compiler's figure when it ran out of memory."""

    fits: bool
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None        # arguments + outputs + temporaries - aliased (donated)
    required_bytes: int | None = None     # total, or the compiler's figure when it did not fit
    available_bytes: int | None = None    # HBM per chip when known
    flops: float | None = None
    bytes_accessed: float | None = None
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    error: str | None = None
    compiled: Any = dataclasses.field(default=None, repr=False, compare=False)   # the executable (HLO: .as_text())

    def to_dict(self) -> dict:
        """The numbers (JSON-able), without the executable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compiled"}

    def gib(self, field: str) -> float | None:
        v = getattr(self, field)
        return None if v is None else v / GiB


def _cost(compiled) -> dict:
    try:
        c = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return {}
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    return dict(c or {})


def _bytes(m: re.Match | None) -> int | None:
    return None if m is None else int(float(m.group(1)) * _UNIT[m.group(2)])


def _platform_of(args) -> str | None:
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding):
            return next(iter(sharding.device_set)).platform
    return None


def compile_report(fn: Callable, *args, available_bytes: int | None = None, platform: str | None = None,
                   mesh: Mesh | None = None, **kwargs) -> CompileReport:
    """Lower and compile `fn` (a `jax.jit`-wrapped function, or a plain one: it is jitted) for the
    devices its abstract arguments are sharded over; never runs it. It is traced for that platform
    (`kernels.compile_target`: Pallas variants, attention "auto"), or for `platform` when given;
    with `mesh` it is traced under `jax.set_mesh(mesh)` (the model's shard_maps and constraints).
    An out-of-memory compile is a report with `fits=False`; any other compile error propagates."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    t0 = time.perf_counter()
    with compile_target(platform or _platform_of(args)), (jax.set_mesh(mesh) if mesh is not None
                                                           else contextlib.nullcontext()):
        lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - classified below
        msg = str(e)
        if not _OOM.search(msg):
            raise
        avail = _bytes(_AVAILABLE.search(msg)) or available_bytes
        return CompileReport(fits=False, required_bytes=_bytes(_REQUIRED.search(msg)), available_bytes=avail,
                             lower_seconds=t1 - t0, compile_seconds=time.perf_counter() - t1,
                             error=msg.strip().splitlines()[0][:500])
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    tmp, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    total = arg + out + tmp - alias
    return CompileReport(
        fits=available_bytes is None or total <= available_bytes, argument_bytes=arg, output_bytes=out,
        temp_bytes=tmp, alias_bytes=alias, code_bytes=int(mem.generated_code_size_in_bytes), total_bytes=total,
        required_bytes=total, available_bytes=available_bytes, flops=cost.get("flops"),
        bytes_accessed=cost.get("bytes accessed"), lower_seconds=t1 - t0, compile_seconds=t2 - t1,
        compiled=compiled)


__all__ = ["CompileReport", "compile_report", "compile_target", "tpu_mesh", "tpu_devices", "abstract", "abstract_tree", "hbm_bytes",
           "tpu_unavailable_reason", "HBM_BYTES", "GiB"]

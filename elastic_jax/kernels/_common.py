"""Shared plumbing for the Pallas kernels: lowering selection and the scalar-metadata call.

Every kernel in this package has one body and two *variants* that differ only in how the
small scalar metadata (active counts, group offsets, per-head skips) reaches the body and in
how tiles are addressed:

* ``"gpu"`` (Triton style): static grid, no scalar prefetch, no scratch buffers. Metadata
  arrays are ordinary full-array inputs read with scalar loads; each program owns its output
  block (or uses masked stores), reductions run in ``lax.fori_loop`` inside the program.
  Compiled with ``pltriton.CompilerParams`` on CUDA/ROCm.
* ``"tpu"`` (Mosaic style): ``pltpu.PrefetchScalarGridSpec``; metadata arrives in SMEM and
  also drives the index maps (inactive steps are clamped onto the previous block so the
  pipeline issues no DMA for them), f32 accumulators live in VMEM scratch, reductions may
  run over "arbitrary" grid axes. Compiled with ``pltpu.CompilerParams``.

On CPU both variants run with ``interpret=True`` (the generic HLO interpreter), which is how
the tests exercise the exact kernel bodies that the GPU / TPU compilers receive.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import jax
import jax.numpy as jnp

VARIANTS = ("gpu", "tpu")
HIGHEST = jax.lax.Precision.HIGHEST
f32 = jnp.float32


def cdiv(a, b):
    """Ceil division of non-negative Python ints or traced int scalars. Traced values use
    lax.div (truncating): `//` lowers through sign/floor fix-ups that kernels do not need."""
    if isinstance(a, int) and isinstance(b, int):
        return (a + b - 1) // b
    a = jnp.asarray(a, jnp.int32)
    return jax.lax.div(a + (b - 1), jnp.asarray(b, a.dtype))


def next_pow2(v: int) -> int:
    v = int(v)
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


_TARGET = contextvars.ContextVar("elastic_jax_compile_target", default=None)


def target_platform() -> str:
    """The platform programs are being traced for: the `compile_target` in force (ahead-of-time
    compiles for a TPU from a CPU host, elastic_jax/aot.py), else jax's default backend."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compile_target(platform: str | None):
    """Trace for `platform` ("tpu", "gpu", "cpu"; None: no change) inside the block: kernel
    variants, interpret mode and "auto" implementations follow it."""
    token = _TARGET.set(platform) if platform else None
    try:
        yield
    finally:
        if token is not None:
            _TARGET.reset(token)


def resolve_lowering(variant: str | None = None, interpret: bool | None = None):
    """-> (variant, interpret). Default: TPU -> "tpu" compiled; GPU -> "gpu" compiled;
    CPU (or a variant that does not match the platform) -> interpret mode.

    ``ELASTIC_JAX_PALLAS_INTERPRET=1`` forces interpret mode; ``ELASTIC_JAX_PALLAS_VARIANT``
    overrides the variant (e.g. to run the Mosaic-style kernels in interpret mode on CPU).
    """
    platform = target_platform()
    if variant is None:
        variant = os.environ.get("ELASTIC_JAX_PALLAS_VARIANT") or ("tpu" if platform == "tpu" else "gpu")
    if variant not in VARIANTS:
        raise ValueError(f"pallas variant must be one of {VARIANTS}, got {variant!r}")
    if interpret is None:
        forced = os.environ.get("ELASTIC_JAX_PALLAS_INTERPRET", "") not in ("", "0")
        native = (variant == "gpu" and platform in ("gpu", "cuda", "rocm")) or (
            variant == "tpu" and platform == "tpu")
        interpret = forced or not native
    return variant, bool(interpret)


def compiler_params(variant: str, interpret: bool, *, num_dims: int, semantics=None,
                    num_warps: int = 4, num_stages: int = 2, vmem_limit_bytes: int | None = None):
    """Backend compiler parameters (None in interpret mode)."""
    if interpret:
        return None
    if variant == "gpu":
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    from jax.experimental.pallas import tpu as pltpu
    semantics = semantics or ("parallel",) * num_dims
    return pltpu.CompilerParams(dimension_semantics=tuple(semantics),
                                vmem_limit_bytes=vmem_limit_bytes)


def meta_pallas_call(kernel, *, variant: str, interpret: bool, grid, meta, in_specs, out_specs,
                     out_shape, scratch_shapes=(), params=None, name=None, cost_estimate=None):
    """pallas_call whose kernel receives ``(*meta_refs, *in_refs, *out_refs, *scratch)``.

    ``in_specs`` / ``out_specs`` are lists of ``(block_shape, index_fn)`` (or
    ``pl.no_block_spec``) where ``index_fn(*grid_ids, *meta_refs)``. For the "gpu" variant the
    meta arrays are ordinary whole-array inputs and index functions get ``meta_refs=None``
    arguments they must not read (Triton has no scalar prefetch); for "tpu" they are
    scalar-prefetch operands (SMEM) that the index functions may read.
    """
    from jax.experimental import pallas as pl
    meta = tuple(meta)
    nmeta = len(meta)

    def make(spec, with_meta):
        if spec is pl.no_block_spec:
            return spec
        block, fn = spec
        if with_meta:
            return pl.BlockSpec(block, fn)
        ndim = len(grid)
        return pl.BlockSpec(block, lambda *ids: fn(*ids[:ndim], *([None] * nmeta)))

    single_out = not isinstance(out_shape, (list, tuple))
    out_specs_l = [out_specs] if single_out else list(out_specs)
    if variant == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=nmeta, grid=tuple(grid),
            in_specs=[make(s, True) for s in in_specs],
            out_specs=[make(s, True) for s in out_specs_l] if not single_out else make(out_specs, True),
            scratch_shapes=list(scratch_shapes))
        call = pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=interpret,
                              compiler_params=params, name=name, cost_estimate=cost_estimate)
        return lambda *args: call(*meta, *args)
    if scratch_shapes:
        raise ValueError("the gpu (Triton) variant cannot use scratch buffers")
    call = pl.pallas_call(
        kernel, out_shape=out_shape, grid=tuple(grid),
        in_specs=[pl.no_block_spec] * nmeta + [make(s, False) for s in in_specs],
        out_specs=[make(s, False) for s in out_specs_l] if not single_out else make(out_specs, False),
        interpret=interpret, compiler_params=params, name=name, cost_estimate=cost_estimate)
    return lambda *args: call(*meta, *args)


def as_i32_scalar(v, default: int, upper: int):
    """Active-count argument -> int32 scalar in [0, upper] (None -> default)."""
    if v is None:
        v = default
    return jnp.clip(jnp.asarray(v, jnp.int32).reshape(()), 0, upper)


def dot(a, b, contract=((1,), (0,))):
    """2-D dot_general with f32 accumulation. f32 operands: HIGHEST (IEEE f32 on Triton, full f32
    on TPU); narrower operands: DEFAULT (their product is exact in f32 already, and Mosaic rejects
    bf16 operands with an fp32 contract precision: "Bad lhs type")."""
    both_f32 = a.dtype == f32 and b.dtype == f32
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=f32,
                               precision=HIGHEST if both_f32 else jax.lax.Precision.DEFAULT)

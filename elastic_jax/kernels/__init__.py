"""elastic_jax.kernels: the Mamba2 SSD scan and the MoE grouped matmul, with one dispatch.

`impl="xla"` is the pure-JAX reference (`reference.py`); `impl="pallas"` is the Pallas kernel
(interpret mode on CPU, compiled on GPU / TPU). `impl=None` picks the platform default. On CPU
the XLA path runs the same algorithms laid out for that backend: the SSD group-major at a CPU
chunk (`ssd_heads.py`), the grouped matmul as a loop over tile-padded segments (`gmm_segments.py`).

Attention: `dot_product_attention.py` (`attend`: the reference einsum, query-blocked, flash-style
chunked, Pallas splash on TPU, cuDNN on GPU; `ComputePolicy.attention_impl` picks one).

Pallas kernels: `ssd_pallas.py` (SSD chunked scan, custom_vjp), `gmm_pallas.py` (megablox-style
grouped matmul + tgmm, custom_vjp); `_common.py` picks the lowering: the "gpu" (Triton) variant
on GPU, the "tpu" (Mosaic) variant on TPU, interpret mode on CPU. Environment overrides:
ELASTIC_JAX_PALLAS_VARIANT=gpu|tpu, ELASTIC_JAX_PALLAS_INTERPRET=1. `kernels/bench.py` (repository root) times both impls.
"""
from __future__ import annotations

import os

import jax

from ._common import compile_target, target_platform
from .gmm_segments import gmm_segments, segment_tile
from .reference import active_head_mask, gmm_reference, ssd_chunked, ssd_scan
from .ssd_heads import CPU_CHUNK, ssd_chunked_heads

IMPLS = ("xla", "pallas")


# Platforms where the compiled Pallas kernels have been built, checked against the references and
# timed by kernels/bench.py (BUILD_NOTES.md). Elsewhere the default stays on the XLA reference
# until a device run validates them; `impl="pallas"` / `ComputePolicy(kernel_impl="pallas")` opts in.
VALIDATED_PALLAS_PLATFORMS: tuple[str, ...] = ()


def default_impl() -> str:
    """The platform default: Pallas where validated (VALIDATED_PALLAS_PLATFORMS), else XLA.
    `ELASTIC_JAX_KERNEL_IMPL=xla|pallas` overrides it."""
    env = os.environ.get("ELASTIC_JAX_KERNEL_IMPL")
    if env:
        return env
    return "pallas" if target_platform() in VALIDATED_PALLAS_PLATFORMS else "xla"


def _resolve(impl):
    impl = default_impl() if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS} or None, got {impl!r}")
    return impl


def ssd(x, dt, A, B, C, D=None, *, chunk_size=128, initial_state=None, seq_idx=None,
        active_heads=None, impl=None, partition=None):
    """Mamba2 SSD chunked scan -> (y [b,l,h,p], final_state [b,h,p,n] f32). See reference.py.

    `partition=(batch_axes, head_axes)` (tuples of mesh axis names; needs a mesh in context,
    `jax.set_mesh`): run the kernel per shard inside `shard_map`, batch split over `batch_axes`,
    heads and groups over `head_axes` (whole groups per shard), instead of gathering the inputs."""
    impl = _resolve(impl)
    if partition is not None and _mesh() is not None:
        from .sharded import ssd_sharded
        return ssd_sharded(_ssd_local, partition, x, dt, A, B, C, D, chunk_size=chunk_size,
                           initial_state=initial_state, seq_idx=seq_idx, active_heads=active_heads, impl=impl)
    return _ssd_local(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state, seq_idx=seq_idx,
                      active_heads=active_heads, impl=impl)


def _ssd_local(x, dt, A, B, C, D, *, chunk_size, initial_state, seq_idx, active_heads, impl):
    if impl == "pallas":
        from .ssd_pallas import ssd_pallas
        return ssd_pallas(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                          seq_idx=seq_idx, active_heads=active_heads)
    if target_platform() == "cpu":
        # CPU: the group-major layout at a CPU-sized chunk (ssd_heads.py); the result does not
        # depend on the chunk beyond rounding. TPU / GPU keep the reference at cfg.chunk_size.
        return ssd_chunked_heads(x, dt, A, B, C, D, chunk_size=min(int(chunk_size), CPU_CHUNK),
                                 initial_state=initial_state, seq_idx=seq_idx, active_heads=active_heads)
    return ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                       seq_idx=seq_idx, active_heads=active_heads)


def gmm(lhs, rhs, group_sizes, *, active_groups=None, active_k=None, active_n=None, impl=None,
        preferred_element_type=None, precision=None, partition=None):
    """Grouped matmul lhs [m,k] (rows sorted by group) x rhs [g,k,n] -> [m,n]. `precision`: of the
    XLA path (`ragged_dot`, or tile-padded segments on CPU: `use_segments`; None = HIGHEST); the
    Pallas kernel always accumulates in f32.

    `partition=(row_axes, n_axes)` (tuples of mesh axis names; needs a mesh in context): run per
    shard inside `shard_map`, the rows of lhs split over `row_axes` (each shard derives its local
    group sizes from the global ones), the output columns (rhs's n) over `n_axes`."""
    impl = _resolve(impl)
    lhs, rhs = jax.numpy.asarray(lhs), jax.numpy.asarray(rhs)   # numpy operands (device_get params)
    out_dtype = preferred_element_type or jax.numpy.promote_types(lhs.dtype, rhs.dtype)
    if partition is not None and _mesh() is not None:
        from .sharded import gmm_sharded
        return gmm_sharded(_gmm_local, partition, lhs, rhs, group_sizes, active_groups=active_groups,
                           active_k=active_k, active_n=active_n, impl=impl, preferred_element_type=out_dtype,
                           precision=precision)
    return _gmm_local(lhs, rhs, group_sizes, active_groups=active_groups, active_k=active_k, active_n=active_n,
                      impl=impl, preferred_element_type=out_dtype, precision=precision)


def _gmm_local(lhs, rhs, group_sizes, *, active_groups, active_k, active_n, impl, preferred_element_type,
               precision=None):
    if impl == "pallas":
        from .gmm_pallas import gmm_pallas
        return gmm_pallas(lhs, rhs, group_sizes, active_groups=active_groups, active_k=active_k,
                          active_n=active_n, preferred_element_type=preferred_element_type)
    if use_segments(lhs.shape[0], rhs.shape[0]):
        return gmm_segments(lhs, rhs, group_sizes, active_groups=active_groups, active_k=active_k,
                            active_n=active_n, preferred_element_type=preferred_element_type, precision=precision)
    return gmm_reference(lhs, rhs, group_sizes, active_groups=active_groups, active_k=active_k,
                         active_n=active_n, preferred_element_type=preferred_element_type, precision=precision)


def use_segments(m: int, g: int) -> bool:
    """The XLA path's lowering of a grouped matmul of m rows over g groups: tile-padded segments
    (gmm_segments.py) on CPU, where `ragged_dot` lowers densely over every group, once their padded
    row count is under half the dense lowering's m·g rows (a decode step's few rows keep
    `ragged_dot`); `ragged_dot` elsewhere (TPU / GPU lower it natively)."""
    if target_platform() != "cpu":
        return False
    return (m // segment_tile(m, g) + g) * segment_tile(m, g) * 2 < m * g


def _mesh():
    """The context mesh (`jax.set_mesh`) when it has more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size <= 1 else mesh


__all__ = ["ssd", "gmm", "ssd_chunked", "ssd_chunked_heads", "ssd_scan", "gmm_reference", "gmm_segments", "use_segments", "active_head_mask",
           "default_impl", "IMPLS", "compile_target", "target_platform"]

"""Shared building blocks of the layer kinds: `Context`, `dense`, `rms_norm`, `relu2`. The mixers
live in `elastic_jax/model/kinds/` (METHOD §4.2-4.3).

Each mixer takes the normed block input `x_BLD`, its parameter dict, its kind's masks record (for
this layer, or None for the full model), a `Context` (segments / validity / decode cache) and
returns (output, new cache entry). Shapes: B batch, L new tokens, D hidden, H heads, P head dim,
G groups, N state size, K conv kernel, S cache length, E experts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ..kernels import target_platform
from ..quant.qweight import unwrap
from .policy import ComputePolicy

HIGHEST = jax.lax.Precision.HIGHEST
_DEFAULT_POLICY = ComputePolicy()


@dataclass
class Context:
    """Per-call data shared by all layers."""

    segment_ids: Any = None   # [B, L] int, 0 = padding (full-sequence mode)
    valid: Any = None         # [B, L] bool, False = padding
    positions: Any = None     # [L] absolute positions of the new tokens (cache mode)
    decoding: bool = False    # cache mode: read/write the layer caches
    policy: ComputePolicy = ComputePolicy()   # runtime knobs (dtypes, kernels, remat)
    collect: bool = False     # mixers return their intermediates (a dict) as second output


def dense(x, w, policy: ComputePolicy | None = None, *, token_major_grad: bool = False):
    """x [..., in] @ w [in, out] with f32 accumulation, operands and result in the policy's compute
    dtype (default: the parameter dtype) at its matmul precision (ComputePolicy.lax_precision). A
    quantized weight (`QWeight`) fake-quantizes x with its static input scale first, as an FP8
    kernel would. `token_major_grad`: on CPU without remat, the weight gradient contracts x and the
    output cotangent over their token axes (`_matmul_cpu`), for a stored input whose output's
    cotangent is a long elementwise chain (the Mamba in-projections)."""
    x, w = unwrap(x, w)
    pol = _DEFAULT_POLICY if policy is None else policy
    dt = pol.dtype_for(w.dtype)
    # under jax.checkpoint the plain einsum: remat policies save dot_general outputs by primitive
    cpu = token_major_grad and pol.remat == "none" and target_platform() == "cpu"
    return (_matmul_cpu if cpu else _matmul)(x.astype(dt), w.astype(dt), pol.lax_precision(dt)).astype(dt)


def _matmul(x, w, precision):
    return jnp.einsum("...i,io->...o", x, w, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_cpu(x, w, precision):
    """`_matmul` whose weight gradient is dot(x, ct) over the token axes, giving [in, out] directly.
    JAX's own transpose computes dot(ct, x) -> [out, in] and transposes it; XLA:CPU lays ct out
    transposed for that dot, fuses the copy into ct's elementwise producer and recomputes the
    producer in transposed order, once per consumer (the Mamba gate and x / B / C split). Here x is
    the operand laid out transposed, so it should be a stored array. Same products, same f32
    accumulation (BUILD_NOTES issue 30: the main job's parent step 207 -> ~145 ms)."""
    return _matmul(x, w, precision)


def _matmul_cpu_fwd(x, w, precision):
    return _matmul(x, w, precision), (x, w)


def _matmul_cpu_bwd(precision, res, ct):
    x, w = res
    tokens = tuple(range(x.ndim - 1))
    dx = jax.lax.dot_general(ct, w, (((ct.ndim - 1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(x, ct, ((tokens, tokens), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def rms_norm(x, weight, eps, eps_factor=None, out_scale=None):
    """HF RMSNorm in f32. With an elastic hidden mask: eps·ρ and ×√ρ make the full-width norm of a
    masked vector equal the norm over the active channels (METHOD §4.3)."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    e = eps if eps_factor is None else eps * eps_factor
    y = x32 * jax.lax.rsqrt(var + e)
    if out_scale is not None:
        y = y * out_scale
    return weight * y.astype(weight.dtype)


def relu2(x):
    return jnp.square(jax.nn.relu(x))


# The mixers live in their kind modules (elastic_jax/model/kinds/); old import paths still resolve.
_MOVED = {"mamba_mixer": "mamba", "attention_mixer": "attention", "mlp_mixer": "mlp", "moe_mixer": "moe",
          "route": "moe", "expert_load": "moe"}


def __getattr__(name):
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(f".kinds.{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

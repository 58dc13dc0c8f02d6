"""Compute policy: the runtime knobs of a forward pass (dtypes, precision, kernels, remat, scan).

These are not part of the architecture (`NemotronHConfig`): changing them never changes what a
checkpoint means, so they never block a resume. `ej.forward(..., policy=ComputePolicy(...))`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..config import NemotronHConfig
from ..kernels.dot_product_attention import IMPLS as ATTENTION_IMPLS

_KERNEL_IMPLS = (None, "xla", "pallas")
_PRECISIONS = ("auto", "default", "high", "highest")
_REMAT = ("none", "full", "save_dots", "minimal")


@dataclasses.dataclass(frozen=True)
class ComputePolicy:
    """How to compute (never what).

    compute_dtype: dtype of matmul operands and activations (None: the parameter dtype); softmax,
      norms, SSM state and the MoE router stay f32, matmuls accumulate in f32.
    precision: matmul precision ("auto": "highest" for f32 compute, "default" otherwise).
    kernel_impl: SSD / grouped-matmul implementation ("xla" | "pallas" | None = platform default).
    attention_impl: "auto" picks a memory-efficient kernel for the platform.
    remat: rematerialization policy of each block in the backward pass (`REMAT_POLICIES`).
    scan_layers: run the layers under `lax.scan` (constant compile time in depth).
    moe_token_chunk: route and run the routed experts this many tokens (per device) at a time, each
      chunk rematerialized, so forward and backward hold one chunk's dispatch buffers (T·k rows)
      instead of all of them (None: all tokens at once). Exact: every row's output is the same;
      the expert weight gradients accumulate over chunks in f32.
    """

    compute_dtype: str | None = None
    precision: str = "auto"
    kernel_impl: str | None = None
    attention_impl: str = "auto"
    remat: str = "none"
    scan_layers: bool = False
    moe_token_chunk: int | None = None

    def __post_init__(self):
        def check(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"ComputePolicy.{name}: must be one of {allowed}, got {value!r}")
        check("kernel_impl", _KERNEL_IMPLS)
        check("attention_impl", ATTENTION_IMPLS)
        check("precision", _PRECISIONS)
        check("remat", _REMAT)
        if self.moe_token_chunk is not None and not (isinstance(self.moe_token_chunk, int)
                                                     and not isinstance(self.moe_token_chunk, bool)
                                                     and self.moe_token_chunk >= 1):
            raise ValueError(f"ComputePolicy.moe_token_chunk: must be None or an int >= 1, got {self.moe_token_chunk!r}")
        if self.compute_dtype is not None and self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ComputePolicy.compute_dtype: must be None, 'float32', 'bfloat16' or 'float16', "
                             f"got {self.compute_dtype!r}")

    def dtype_for(self, param_dtype) -> jnp.dtype:
        """Dtype of matmul operands / activations for parameters of `param_dtype` (MaxText's
        `dtype` vs `weight_dtype`): `compute_dtype` when set, else the parameter dtype."""
        return jnp.dtype(self.compute_dtype if self.compute_dtype is not None else param_dtype)

    def lax_precision(self, compute_dtype) -> jax.lax.Precision:
        """Matmul precision for operands of `compute_dtype`. "auto": HIGHEST for f32 operands (the
        exactness tests), DEFAULT otherwise (a bf16 x bf16 product with f32 accumulation is exact on
        the MXU; HIGHEST on bf16 operands only asks for f32 passes it cannot use, and the TPU
        `ragged_dot` kernel rejects it)."""
        if self.precision == "auto":
            return _PRECISION["highest"] if jnp.dtype(compute_dtype) == jnp.float32 else _PRECISION["default"]
        return _PRECISION[self.precision]


_PRECISION = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
              "highest": jax.lax.Precision.HIGHEST}
BF16 = ComputePolicy(compute_dtype="bfloat16")
F32 = ComputePolicy(compute_dtype="float32")


# remat name -> what the backward pass keeps of each block (the rest is recomputed from its input)
REMAT_POLICIES = {
    "none": "everything (no jax.checkpoint)",
    "full": "only the block input (jax.checkpoint_policies.nothing_saveable)",
    "save_dots": "every matmul output, attention scores and SSD contractions included "
                 "(jax.checkpoint_policies.checkpoint_dots)",
    "minimal": "the weight matmul outputs (projections, experts), not the batched attention / SSD "
               "contractions nor elementwise work (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)",
}


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a remat name (None for "none": no checkpoint at all)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat: must be one of {tuple(REMAT_POLICIES)}, got {name!r}")
    return {"save_dots": jax.checkpoint_policies.checkpoint_dots,
            "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            "full": jax.checkpoint_policies.nothing_saveable}.get(name)


def resolve_policy(cfg: NemotronHConfig, policy: ComputePolicy | None) -> ComputePolicy:
    """The policy in force: the given one, else the default `ComputePolicy()` (the model config
    carries no runtime knobs: `kernel_impl` / `remat` live here only)."""
    if policy is None:
        return ComputePolicy()
    if not isinstance(policy, ComputePolicy):
        raise TypeError(f"policy must be an elastic_jax.ComputePolicy, got {type(policy).__name__}")
    return policy

"""Quantization state of a nested FP8 / NVFP4 checkpoint (METHOD §10).

The scales are fixed, non-trainable state computed once from the full parent tensors, never from
whatever (sliced, trained) tensor is being quantized, so the quantized masked model equals the
quantized sliced model and a QAD student keeps the scales its export will use:

  per tensor (per expert for routed experts [E]):  `scale`  FP8: amax / 448
                                                           NVFP4: second-level amax / (6 · 448)
  NVFP4 only: `block_scale` [..., in/16, out], E4M3 values: per 16 rows along the reduction dim
  `input_scale` (after `quant.calibrate`): activation amax over a few batches / 448 (NVFP4: / (6 · 448))
                 (NVFP4: the second-level scale of the activations' dynamic 16-element blocks)

Layout: `QuantState.layers[i] = {mixer key: {"scale", "block_scale"?, "input_scale"?}}` for the
quantized projections of layer i. The Mamba in_proj pieces (z, x, B, C, dt) share one scale, as
they are one tensor in the HF layout. Kept in high precision (as the released Nemotron FP8 / NVFP4
checkpoints): embeddings, lm_head, norms, conv1d, A_log / D / dt_bias, the MoE router and its
correction bias, and the budget router (not part of the params).
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..model.kinds import KINDS, kind_of, quantizable, scale_groups
from .formats import FORMATS, FP8_MAX, NVFP4_BLOCK, fp8_with_scale, nvfp4_scales, nvfp4_with_scales
from .qweight import QWeight



def quantizable_kinds() -> str:
    """The pattern characters of the kinds with quantizable projections (their HF `linear` rules)."""
    return "".join(c for c, kind in KINDS.items() if quantizable(kind))

# always high precision (ModelOpt exclude_modules of the released checkpoints; the rest are not Linear)
ALWAYS_EXCLUDED = ("lm_head", "backbone.layers.*.mixer.gate")


class QuantizationError(ValueError):
    """A model, width or checkpoint that cannot be quantized / sliced as asked."""


@dataclass(frozen=True)
class QuantSpec:
    """Which tensors are quantized and how.

    fmt: "fp8" (E4M3, per-tensor scales) or "nvfp4" (E2M1, 16-element E4M3 block scales + FP32 scale).
    kinds: pattern characters of the layer kinds whose projections are quantized (None: every kind
      with quantizable projections, `quantizable_kinds()`; the projections: `kinds.quantizable`).
    exclude: fnmatch patterns of HF module names kept in high precision, e.g.
      ("backbone.layers.0.*", "*.mixer.o_proj").
    activations: fake-quantize the input of every quantized matmul once the state is calibrated
      (`calibrate`; an uncalibrated state simulates the weights only), as the kernels do: FP8 per
      tensor with the static input scale; NVFP4 in 16-element blocks along the reduction axis with
      dynamic E4M3 block scales against the static FP32 input scale (ModelOpt's `input_scale`).
    """

    fmt: str
    kinds: str | None = None
    exclude: tuple[str, ...] = ()
    activations: bool = True

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise QuantizationError(f"QuantSpec.fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.kinds is None:
            object.__setattr__(self, "kinds", quantizable_kinds())
        bad = set(self.kinds) - set(quantizable_kinds())
        if bad:
            raise QuantizationError(f"QuantSpec.kinds: unknown layer kinds {sorted(bad)}; use characters of "
                                    f"{quantizable_kinds()!r}")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))

    def module(self, layer: int, key: str, kind) -> str:
        return f"backbone.layers.{layer}.{quantizable(kind)[key]}"

    def quantized_keys(self, cfg, layer: int, mixer_params) -> list[str]:
        kind = kind_of(cfg, layer)
        if kind.CHAR not in self.kinds:
            return []
        return [k for k in quantizable(kind) if k in mixer_params
                and not any(fnmatch.fnmatchcase(self.module(layer, k, kind), p) for p in self.exclude)]


@dataclass(frozen=True)
class QuantState:
    """Spec (static) + per-layer scales (arrays). A pytree; `qweight_params(params, state)` gives
    the params `forward` runs fake-quantized."""

    spec: QuantSpec
    layers: list

    @property
    def calibrated(self) -> bool:
        return all("input_scale" in e for layer in self.layers for e in layer.values())


jax.tree_util.register_dataclass(QuantState, data_fields=["layers"], meta_fields=["spec"])


def _groups(keys: list[str], kind) -> list[list[str]]:
    """Keys that share one weight scale (`kinds.scale_groups`): one HF tensor (the Mamba in_proj
    pieces) or one module of the serving stacks (vLLM / SGLang fuse q/k/v into qkv_proj, so
    ModelOpt exports them with one scale)."""
    fused = [[k for k in keys if k in g] for g in scale_groups(kind)]
    fused = [g for g in fused if g]
    done = {k for g in fused for k in g}
    return fused + [[k] for k in keys if k not in done]


def init_quant_state(params, cfg, spec: QuantSpec | str) -> QuantState:
    """Weight scales from the full parent tensors (amax); no input scales yet (see `calibrate`)."""
    spec = QuantSpec(spec) if isinstance(spec, str) else spec
    layers = []
    for i, lp in enumerate(params["layers"]):
        m = lp["mixer"]
        keys = spec.quantized_keys(cfg, i, m)
        entry = {}
        for group in _groups(keys, kind_of(cfg, i)):
            ws = [jnp.asarray(m[k], jnp.float32) for k in group]
            per_expert = ws[0].ndim == 3
            if spec.fmt == "nvfp4":
                for k, w in zip(group, ws):
                    if w.shape[-2] % NVFP4_BLOCK:
                        raise QuantizationError(
                            f"nvfp4: layers.{i}.mixer.{k} has reduction size {w.shape[-2]}, not a multiple of the "
                            f"block size {NVFP4_BLOCK}; exclude it (QuantSpec.exclude) or use fp8")
            amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(w), axis=(-2, -1)) for w in ws])
            for k, w in zip(group, ws):
                if spec.fmt == "fp8":
                    entry[k] = {"scale": jnp.where(amax > 0, amax / FP8_MAX, 1.0)}
                else:
                    a = amax[:, None, None] if per_expert else amax
                    block, scale2 = nvfp4_scales(w, axis=-2, amax=a)
                    entry[k] = {"scale": scale2.reshape(amax.shape), "block_scale": block}
        layers.append(entry)
    return QuantState(spec, layers)


def _per_expert(scale, w):
    return scale[:, None, None] if jnp.ndim(scale) == 1 and w.ndim == 3 else scale


def quantize_weight(w, entry: dict, fmt: str):
    """`w` fake-quantized with its fixed scales (straight-through gradient)."""
    s = _per_expert(jnp.asarray(entry["scale"], jnp.float32), w)
    if fmt == "fp8":
        return fp8_with_scale(w, s)
    return nvfp4_with_scales(w, entry["block_scale"], s, axis=-2)


def qweight_params(params: dict, qs: QuantState, observe: Callable | None = None) -> dict:
    """`params` with every projection `qs` quantizes replaced by a `QWeight` leaf: the weight
    fake-quantized with the state's fixed scales (straight-through gradient, so QAD differentiates
    through this call) and its static input scale (when `qs.spec.activations`). `forward` /
    `prefill` / `decode_step` consume these leaves; the layers may run scanned. `observe(layer,
    key, x)` (calibration only): record each quantized matmul's input instead of quantizing it."""
    layers = params["layers"]
    if not isinstance(layers, list):
        raise QuantizationError("qweight_params: params['layers'] must be the per-layer list (the stacked form "
                                "is what forward builds inside; unstack it with model.scan.unstack_layers)")
    if len(layers) != len(qs.layers):
        raise QuantizationError(f"qweight_params: the quantization state has {len(qs.layers)} layers, the params "
                                f"{len(layers)}")
    out = [dict(lp, mixer=_qweight_mixer(lp["mixer"], qs, i, observe)) if qs.layers[i] else lp
           for i, lp in enumerate(layers)]
    return {**params, "layers": out}


def _qweight_mixer(mixer_params: dict, qs: QuantState, layer: int, observe) -> dict:
    out = dict(mixer_params)
    for key, entry in qs.layers[layer].items():
        w = quantize_weight(mixer_params[key], entry, qs.spec.fmt)
        inp = entry.get("input_scale") if qs.spec.activations else None
        obs = None if observe is None else functools.partial(observe, layer, key)
        out[key] = QWeight(w, inp, obs, qs.spec.fmt)
    return out


def recipe_spec(cfg, fmt: str, recipe: str = "default") -> QuantSpec:
    """The QuantSpec of a named recipe (METHOD §10):
      "default": every projection but lm_head and the MoE router (embeddings, norms, conv1d and the
                 SSM vectors are never quantized);
      "nano":    as NVIDIA's Nemotron Nano FP8 / NVFP4 releases: additionally the attention layers and
                 the Mamba layer nearest on each side of every attention layer stay BF16 (export it with
                 FP8 KV-cache scales, `calibrate_kv_cache`)."""
    if recipe == "default":
        return QuantSpec(fmt)
    if recipe != "nano":
        raise QuantizationError(f"quantization recipe {recipe!r}: expected one of {RECIPES}")
    role = [getattr(kind_of(cfg, i), "NANO_HIGH_PRECISION", None) for i in range(cfg.num_hidden_layers)]
    keep = set()
    for i in range(cfg.num_hidden_layers):
        if role[i] != "self":         # the attention layers (the kinds' `NANO_HIGH_PRECISION`)
            continue
        keep.add(i)
        for step in (-1, 1):          # and the nearest Mamba layer on each side
            j = i + step
            while 0 <= j < cfg.num_hidden_layers and role[j] != "nearest":
                j += step
            if 0 <= j < cfg.num_hidden_layers:
                keep.add(j)
    return QuantSpec(fmt, exclude=tuple(f"backbone.layers.{i}.*" for i in sorted(keep)))


RECIPES = ("default", "nano")


def state_to_tree(qs: QuantState) -> list:
    """The arrays only (for a checkpoint); `tree_to_state(spec, tree)` rebuilds the state."""
    return qs.layers


def tree_to_state(spec: QuantSpec, tree: Any) -> QuantState:
    layers = tree if isinstance(tree, list) else [tree[str(i)] for i in range(len(tree))]
    return QuantState(spec, list(layers))

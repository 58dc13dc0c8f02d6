"""Quantization state of a nested FP8 / NVFP4 checkpoint (METHOD §10).

The scales are fixed, non-trainable state computed once from the full parent tensors, never from
whatever (sliced, trained) tensor is being quantized, so the quantized masked model equals the
quantized sliced model and a QAD student keeps the scales its export will use:

  per tensor (per expert for routed experts [E]):  `scale`  FP8: amax / 448
                                                           NVFP4: second-level amax / (6 · 448)
  NVFP4 only: `block_scale` [..., in/16, out], E4M3 values: per 16 rows along the reduction dim
  `input_scale` (after `calibrate`): activation amax over a few batches / 448 (NVFP4: / (6 · 448))
                 (NVFP4: the second-level scale of the activations' dynamic 16-element blocks)

Layout: `QuantState.layers[i] = {mixer key: {"scale", "block_scale"?, "input_scale"?}}` for the
quantized projections of layer i. The Mamba in_proj pieces (z, x, B, C, dt) share one scale, as
they are one tensor in the HF layout. Kept in high precision (as the released Nemotron FP8 / NVFP4
checkpoints): embeddings, lm_head, norms, conv1d, A_log / D / dt_bias, the MoE router and its
correction bias, and the budget router (not part of the params).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .formats import FORMATS, FP4_MAX, FP8_MAX, NVFP4_BLOCK, fp8_with_scale, nvfp4_scales, nvfp4_with_scales
from .qweight import QWeight

# projections of each layer kind that may be quantized, and their HF module (under layers.{i}.)
QUANTIZABLE = {
    "M": {"z_proj": "mixer.in_proj", "x_proj": "mixer.in_proj", "B_proj": "mixer.in_proj",
          "C_proj": "mixer.in_proj", "dt_proj": "mixer.in_proj", "out_proj": "mixer.out_proj"},
    "*": {"q_proj": "mixer.q_proj", "k_proj": "mixer.k_proj", "v_proj": "mixer.v_proj", "o_proj": "mixer.o_proj"},
    "-": {"up_proj": "mixer.up_proj", "down_proj": "mixer.down_proj"},
    "E": {"up_proj": "mixer.experts.*.up_proj", "down_proj": "mixer.experts.*.down_proj",
          "shared_up": "mixer.shared_experts.up_proj", "shared_down": "mixer.shared_experts.down_proj"},
}
# always high precision (ModelOpt exclude_modules of the released checkpoints; the rest are not Linear)
ALWAYS_EXCLUDED = ("lm_head", "backbone.layers.*.mixer.gate")


class QuantizationError(ValueError):
    """A model, width or checkpoint that cannot be quantized / sliced as asked."""


@dataclass(frozen=True)
class QuantSpec:
    """Which tensors are quantized and how.

    fmt: "fp8" (E4M3, per-tensor scales) or "nvfp4" (E2M1, 16-element E4M3 block scales + FP32 scale).
    kinds: layer kinds whose projections are quantized ("M" Mamba, "*" attention, "-" MLP, "E" MoE).
    exclude: fnmatch patterns of HF module names kept in high precision, e.g.
      ("backbone.layers.0.*", "*.mixer.o_proj").
    activations: fake-quantize the input of every quantized matmul once the state is calibrated
      (`calibrate`; an uncalibrated state simulates the weights only), as the kernels do: FP8 per
      tensor with the static input scale; NVFP4 in 16-element blocks along the reduction axis with
      dynamic E4M3 block scales against the static FP32 input scale (ModelOpt's `input_scale`).
    """

    fmt: str
    kinds: str = "M*-E"
    exclude: tuple[str, ...] = ()
    activations: bool = True

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise QuantizationError(f"QuantSpec.fmt must be one of {FORMATS}, got {self.fmt!r}")
        bad = set(self.kinds) - set(QUANTIZABLE)
        if bad:
            raise QuantizationError(f"QuantSpec.kinds: unknown layer kinds {sorted(bad)}; use characters of 'M*-E'")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))

    def module(self, layer: int, key: str, char: str) -> str:
        return f"backbone.layers.{layer}.{QUANTIZABLE[char][key]}"

    def quantized_keys(self, cfg, layer: int, mixer_params) -> list[str]:
        char = cfg.pattern[layer]
        if char not in self.kinds:
            return []
        return [k for k in QUANTIZABLE[char] if k in mixer_params
                and not any(fnmatch.fnmatchcase(self.module(layer, k, char), p) for p in self.exclude)]


@dataclass(frozen=True)
class QuantState:
    """Spec (static) + per-layer scales (arrays). A pytree: pass it to `forward(..., quant=)`."""

    spec: QuantSpec
    layers: list
    observer: Callable | None = None   # calibration only: observer(layer, key, x)
    output_observer: Callable | None = None   # KV-cache calibration only: (layer, key, x @ w)

    @property
    def calibrated(self) -> bool:
        return all("input_scale" in e for layer in self.layers for e in layer.values())


jax.tree_util.register_dataclass(QuantState, data_fields=["layers"],
                                 meta_fields=["spec", "observer", "output_observer"])


# keys that share one weight scale: one HF tensor (the Mamba in_proj pieces) or one module of the
# serving stacks (vLLM / SGLang fuse q/k/v into qkv_proj, so ModelOpt exports them with one scale)
_SHARED = {"M": ("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj"), "*": ("q_proj", "k_proj", "v_proj")}


def _groups(keys: list[str], char: str) -> list[list[str]]:
    """Keys that share one weight scale: the Mamba in_proj pieces, attention q/k/v."""
    fused = [k for k in keys if k in _SHARED.get(char, ())]
    return ([fused] if fused else []) + [[k] for k in keys if k not in fused]


def init_quant_state(params, cfg, spec: QuantSpec | str) -> QuantState:
    """Weight scales from the full parent tensors (amax); no input scales yet (see `calibrate`)."""
    spec = QuantSpec(spec) if isinstance(spec, str) else spec
    layers = []
    for i, lp in enumerate(params["layers"]):
        m = lp["mixer"]
        keys = spec.quantized_keys(cfg, i, m)
        entry = {}
        for group in _groups(keys, cfg.pattern[i]):
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


def apply_layer(mixer_params: dict, qs: QuantState, layer: int) -> dict:
    """The mixer params of `layer` with each quantized weight replaced by a `QWeight`."""
    entries = qs.layers[layer]
    if qs.output_observer is not None:       # KV-cache calibration: record amax of k_proj / v_proj outputs
        out = dict(mixer_params)
        for key in ("k_proj", "v_proj"):
            if key in out:
                w = out[key]
                out[key] = QWeight(w, None, functools.partial(_observe_output, qs.output_observer, layer, key, w))
        return out
    if not entries:
        return mixer_params
    spec = qs.spec
    out = dict(mixer_params)
    for key, entry in entries.items():
        w = quantize_weight(mixer_params[key], entry, spec.fmt)
        inp = entry.get("input_scale") if spec.activations else None
        obs = None if qs.observer is None else functools.partial(qs.observer, layer, key)
        out[key] = QWeight(w, inp, obs, spec.fmt)
    return out


def calibrate(params, cfg, qs: QuantState, batches, widths=(None,), policy=None) -> QuantState:
    """Static activation (input) scales: the amax of every quantized matmul's input over `batches`
    (int tokens [B, L] each) and the nested models `widths` (None = the full model; the max over
    all is kept, so one scale serves every nested model). Returns a new state with `input_scale`."""
    from ..model.decoder import forward
    from ..model.policy import ComputePolicy

    policy = ComputePolicy() if policy is None else dataclasses.replace(policy, remat="none")
    bare = QuantState(qs.spec, [{k: {n: v for n, v in e.items() if n != "input_scale"} for k, e in layer.items()}
                                for layer in qs.layers])

    @jax.jit
    def amaxes(params, layers, tokens, w):
        seen: dict = {}

        def observer(layer, key, x):
            seen.setdefault((layer, key), []).append(jnp.max(jnp.abs(x.astype(jnp.float32))))

        forward(params, tokens, cfg, w, quant=QuantState(qs.spec, layers, observer), policy=policy)
        return {f"{i}/{k}": functools.reduce(jnp.maximum, v) for (i, k), v in seen.items()}

    total: dict = {}
    n = 0
    for tokens in batches:
        for w in widths:
            got = amaxes(params, bare.layers, jnp.asarray(tokens), w)
            total = got if not total else {k: jnp.maximum(total[k], v) for k, v in got.items()}
            n += 1
    if not n:
        raise QuantizationError("calibrate: no calibration batches")
    div = FP8_MAX if qs.spec.fmt == "fp8" else FP4_MAX * FP8_MAX
    layers = []
    for i, layer in enumerate(bare.layers):
        new = {}
        for k, e in layer.items():
            amax = total.get(f"{i}/{k}")
            if amax is None:   # never reached (e.g. an expert-free path): keep the scale neutral
                amax = jnp.float32(div)
            new[k] = dict(e, input_scale=jnp.where(amax > 0, amax / div, 1.0).astype(jnp.float32))
        layers.append(new)
    return QuantState(qs.spec, layers)


def _observe_output(observer, layer, key, w, x):
    observer(layer, key, jnp.einsum("...i,io->...o", x.astype(jnp.float32), jnp.asarray(w, jnp.float32)))


def calibrate_kv_cache(params, cfg, batches, widths=(None,), policy=None) -> dict:
    """FP8 KV-cache scales per attention layer, {layer: {"k_scale", "v_scale"}} = amax / 448 of
    the keys / values (the k_proj / v_proj outputs; NemotronH attention has no RoPE) over
    `batches` and the nested models `widths` (max over all), as ModelOpt's KV-cache calibration
    writes `k_proj.k_scale` / `v_proj.v_scale`."""
    from ..model.decoder import forward
    from ..model.policy import ComputePolicy

    policy = ComputePolicy() if policy is None else dataclasses.replace(policy, remat="none")
    spec = QuantSpec("fp8", kinds="")

    @jax.jit
    def amaxes(params, tokens, w):
        seen: dict = {}

        def observer(layer, key, y):
            seen.setdefault((layer, key), []).append(jnp.max(jnp.abs(y)))

        empty = [{} for _ in range(cfg.num_hidden_layers)]
        forward(params, tokens, cfg, w, quant=QuantState(spec, empty, None, observer), policy=policy)
        return {f"{i}/{k}": functools.reduce(jnp.maximum, v) for (i, k), v in seen.items()}

    total: dict = {}
    for tokens in batches:
        for w in widths:
            got = amaxes(params, jnp.asarray(tokens), w)
            total = got if not total else {k: jnp.maximum(total[k], v) for k, v in got.items()}
    if not total and "*" in cfg.pattern:
        raise QuantizationError("calibrate_kv_cache: no calibration batches")
    out = {}
    for i, c in enumerate(cfg.pattern):
        if c != "*":
            continue
        sc = {}
        for key, name in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            amax = float(total[f"{i}/{key}"])
            sc[name] = np.float32(amax / FP8_MAX if amax > 0 else 1.0)
        out[i] = sc
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
    keep = set()
    for i, c in enumerate(cfg.pattern):
        if c != "*":
            continue
        keep.add(i)
        for step in (-1, 1):
            j = i + step
            while 0 <= j < cfg.num_hidden_layers and cfg.pattern[j] != "M":
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

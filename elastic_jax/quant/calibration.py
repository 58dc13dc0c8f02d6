"""Static activation scales (METHOD §10): `calibrate` (the input scale of every quantized matmul)
and `calibrate_kv_cache` (FP8 KV-cache scales), both measured by running the model over a few
batches with observing `QWeight` leaves (`qweight_params(..., observe=)`). The observations are
Python-side tracers collected inside one jitted function, so the layers run unrolled, no remat."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..model.decoder import forward
from ..model.kinds import kind_of
from ..model.policy import ComputePolicy
from .formats import FP4_MAX, FP8_MAX
from .qweight import QWeight
from .state import QuantizationError, QuantState, qweight_params


def _observing_policy(cfg, policy) -> ComputePolicy:
    base = ComputePolicy() if policy is None else policy
    return dataclasses.replace(base, remat="none", scan_layers=False)


def calibrate(params, cfg, qs: QuantState, batches, widths=(None,), policy=None) -> QuantState:
    """Static activation (input) scales: the amax of every quantized matmul's input over `batches`
    (int tokens [B, L] each) and the nested models `widths` (None = the full model; the max over
    all is kept, so one scale serves every nested model). Returns a new state with `input_scale`."""
    policy = _observing_policy(cfg, policy)
    bare = QuantState(qs.spec, [{k: {n: v for n, v in e.items() if n != "input_scale"} for k, e in layer.items()}
                                for layer in qs.layers])

    @jax.jit
    def amaxes(params, layers, tokens, w):
        seen: dict = {}

        def observe(layer, key, x):
            seen.setdefault((layer, key), []).append(jnp.max(jnp.abs(x.astype(jnp.float32))))

        forward(qweight_params(params, QuantState(qs.spec, layers), observe=observe), tokens, cfg, w, policy=policy)
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


def kv_cache_layers(cfg) -> tuple[int, ...]:
    """The layers whose kind declares FP8 KV-cache scales (`KV_CACHE_SCALES`: attention)."""
    return tuple(i for i in range(cfg.num_hidden_layers) if getattr(kind_of(cfg, i), "KV_CACHE_SCALES", None))


def _kv_observing_params(params, cfg, observer) -> dict:
    """params whose cached projections (their kind's `KV_CACHE_SCALES`: attention k_proj / v_proj)
    are `QWeight`s recording amax of their outputs through `observer(layer, key, y)`; nothing is
    quantized."""
    layers = []
    for i, lp in enumerate(params["layers"]):
        mixer = dict(lp["mixer"])
        for key in getattr(kind_of(cfg, i), "KV_CACHE_SCALES", {}):
            if key in mixer:
                w = mixer[key]
                mixer[key] = QWeight(w, None, functools.partial(_observe_output, observer, i, key, w))
        layers.append(dict(lp, mixer=mixer))
    return {**params, "layers": layers}


def calibrate_kv_cache(params, cfg, batches, widths=(None,), policy=None) -> dict:
    """FP8 KV-cache scales per attention layer, {layer: {"k_scale", "v_scale"}} = amax / 448 of
    the keys / values (the k_proj / v_proj outputs; NemotronH attention has no RoPE) over
    `batches` and the nested models `widths` (max over all), as ModelOpt's KV-cache calibration
    writes `k_proj.k_scale` / `v_proj.v_scale`."""
    policy = _observing_policy(cfg, policy)

    @jax.jit
    def amaxes(params, tokens, w):
        seen: dict = {}

        def observer(layer, key, y):
            seen.setdefault((layer, key), []).append(jnp.max(jnp.abs(y)))

        forward(_kv_observing_params(params, cfg, observer), tokens, cfg, w, policy=policy)
        return {f"{i}/{k}": functools.reduce(jnp.maximum, v) for (i, k), v in seen.items()}

    total: dict = {}
    for tokens in batches:
        for w in widths:
            got = amaxes(params, jnp.asarray(tokens), w)
            total = got if not total else {k: jnp.maximum(total[k], v) for k, v in got.items()}
    cached = kv_cache_layers(cfg)
    if not total and cached:
        raise QuantizationError("calibrate_kv_cache: no calibration batches")
    out = {}
    for i in cached:
        sc = {}
        for key, name in kind_of(cfg, i).KV_CACHE_SCALES.items():
            amax = float(total[f"{i}/{key}"])
            sc[name] = np.float32(amax / FP8_MAX if amax > 0 else 1.0)
        out[i] = sc
    return out

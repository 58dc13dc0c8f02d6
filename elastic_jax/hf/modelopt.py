"""FP8 / NVFP4 checkpoints in the ModelOpt Hugging Face layout (METHOD §10).

Per quantized linear `<module>` (HF `[out, in]` layout):
  FP8   : `<module>.weight` float8_e4m3fn, `<module>.weight_scale` f32 [] (per tensor),
          `<module>.input_scale` f32 [] (static activation scale);  w = fp8 · weight_scale
  NVFP4 : `<module>.weight` uint8 [out, in/2] (two E2M1 codes per byte, element 2k in the low
          nibble), `<module>.weight_scale` float8_e4m3fn [out, in/16] (block scales),
          `<module>.weight_scale_2` f32 [] (second level), `<module>.input_scale` f32 [];
          w = e2m1 · weight_scale · weight_scale_2
`config.json` gains `quantization_config` in ModelOpt's converted form (>= 0.31,
`convert_hf_quant_config_format`): {quant_method "modelopt", quant_algo "FP8" | "NVFP4" |
"W4A16_NVFP4", config_groups, ignore (the modules kept in high precision), kv_cache_scheme (FP8
KV cache), producer}; `hf_quant_config.json` beside it holds the legacy nested form
{producer, quantization: {quant_algo, kv_cache_quant_algo, group_size, exclude_modules}}, as
ModelOpt's `export_hf_checkpoint` writes both. vLLM and SGLang read the former's exclusions from
`ignore` and the latter's from `exclude_modules`; `spec_from_config` reads either (NVIDIA's
published files included). Linears the serving stacks fuse (q/k/v -> `qkv_proj`) are written with
one shared `weight_scale_2` / `weight_scale` and `input_scale`, as ModelOpt's
`preprocess_linear_fusion` does. FP8 KV-cache scales: `k_proj.k_scale`, `v_proj.v_scale`
(amax / 448 of the cached keys / values, `elastic_jax.quant.calibrate_kv_cache`).

The tensors go through `hf.io` like every other (safetensors tags float8 `F8_E4M3` and the packed
NVFP4 bytes `U8`, as ModelOpt writes them; torch's `safetensors.torch.load_file` reads them).
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .._version import __version__
from ..errors import read_json
from ..quant.formats import FP4_MAX, FP8_MAX, NVFP4_BLOCK, nvfp4_codes, nvfp4_scales, pack_e2m1, unpack_e2m1
from ..model.kinds import kind_of, quantizable
from ..quant.state import ALWAYS_EXCLUDED, QuantizationError, QuantSpec, QuantState, init_quant_state
from . import keys
from .keys import layer_dims, match, module_of, split_prefix

ALGOS = {"FP8": "fp8", "NVFP4": "nvfp4", "W4A16_NVFP4": "nvfp4"}   # ModelOpt quant_algo -> format


# ---------------------------------------------------------------------------------- export
def _quantized_rules(cfg, qs: QuantState):
    """HF weight key -> (layer, rule, expert or None) for every quantized tensor."""
    out = {}
    for i, entries in enumerate(qs.layers):
        if not entries:
            continue
        d = layer_dims(cfg, i)
        for rule in keys.RULES:
            if rule.kind != kind_of(cfg, i).CHAR or rule.experts == "stacked" or not rule.when(d):
                continue
            if rule.params and all(p in entries for p in rule.params):
                if rule.experts == "per_expert":
                    for j in range(d.E):
                        out[rule.key(i, j)] = (i, rule, j)
                else:
                    out[rule.key(i)] = (i, rule, None)
    return out


def exclude_modules(cfg, qs: QuantState) -> list[str]:
    """ModelOpt's exclusion list (`ignore` / `exclude_modules`): the always-high-precision modules
    and every quantizable projection this state leaves out, one HF module name each (vLLM maps
    `backbone.` to `model.` and matches q/k/v against its fused `qkv_proj`)."""
    names = list(ALWAYS_EXCLUDED)
    for i in range(cfg.num_hidden_layers):
        for k, mod in quantizable(kind_of(cfg, i)).items():
            name = f"backbone.layers.{i}.{mod}"
            if k not in qs.layers[i] and name not in names and _present(cfg, i, k):
                names.append(name)
    return names


def _present(cfg, i, k):
    return not (k.startswith("shared") and not cfg.moe_shared_expert_intermediate_size)


def fused_groups(kind) -> tuple[tuple[str, ...], ...]:
    """Projections that must share a precision: the linears the serving stacks load as one fused
    module (the kind's `FUSED_LINEARS`, vLLM NemotronH `packed_modules_mapping`) and those vLLM
    quantizes all-or-nothing per layer (`SAME_PRECISION`, `FusedMoE`: every routed expert's up and down)."""
    return tuple(getattr(kind, "FUSED_LINEARS", ())) + tuple(getattr(kind, "SAME_PRECISION", ()))


def _check_fused(cfg, qs: QuantState) -> None:
    problems = []
    for i in range(cfg.num_hidden_layers):
        for group in fused_groups(kind_of(cfg, i)):
            got = [k for k in group if k in qs.layers[i]]
            if got and len(got) != len(group):
                problems.append(f"layer {i}: {', '.join(got)} quantized but {', '.join(k for k in group if k not in got)} "
                                f"not; vLLM / SGLang load {'/'.join(group)} as one module, so they must share a precision")
    if problems:
        raise QuantizationError("cannot export this quantization state for vLLM / SGLang: " + "; ".join(problems))


def quant_algo(qs: QuantState) -> str:
    """ModelOpt's `quant_algo` of a state: "FP8", "NVFP4" (W4A4, calibrated input scales) or
    "W4A16_NVFP4" (NVFP4 weights, activations in BF16: an uncalibrated or weight-only state)."""
    if qs.spec.fmt == "fp8":
        return "FP8"
    return "NVFP4" if (qs.spec.activations and qs.calibrated and _any_entry(qs)) else "W4A16_NVFP4"


def _any_entry(qs):
    return any(layer for layer in qs.layers)


def _scheme(fmt: str) -> dict:
    d = {"dynamic": False, "num_bits": 8 if fmt == "fp8" else 4, "type": "float"}
    if fmt == "nvfp4":
        d["group_size"] = NVFP4_BLOCK
    return d


KV_CACHE_SCHEME = {"dynamic": False, "num_bits": 8, "type": "float"}


def quantization_config(cfg, qs: QuantState, kv_cache: bool = False) -> dict:
    """`config.json`'s `quantization_config` in ModelOpt's converted form
    (`convert_hf_quant_config_format`): config_groups, ignore, quant_algo, kv_cache_scheme, producer."""
    algo = quant_algo(qs)
    group = {"weights": _scheme(qs.spec.fmt), "targets": ["Linear"]}
    if algo != "W4A16_NVFP4":
        group["input_activations"] = _scheme(qs.spec.fmt)
    qc = {"config_groups": {"group_0": group}, "ignore": exclude_modules(cfg, qs), "quant_algo": algo,
          "producer": {"name": "elastic_jax", "version": __version__}, "quant_method": "modelopt"}
    if kv_cache:
        qc["kv_cache_scheme"] = dict(KV_CACHE_SCHEME)
    return qc


def legacy_quant_config(qconfig: dict) -> dict:
    """`hf_quant_config.json` (ModelOpt's nested form) for a converted `quantization_config`."""
    kv = qconfig.get("kv_cache_scheme")
    q = {"quant_algo": qconfig["quant_algo"],
         "kv_cache_quant_algo": "FP8" if kv == KV_CACHE_SCHEME else None,
         "group_size": NVFP4_BLOCK if "NVFP4" in qconfig["quant_algo"] else None,
         "exclude_modules": list(qconfig["ignore"])}
    if q["group_size"] is None:
        del q["group_size"]
    return {"producer": qconfig.get("producer", {}), "quantization": q}


def _unify_fused(cfg, params, qs: QuantState, log) -> QuantState:
    """q/k/v with one `weight_scale_2` (FP8: `weight_scale`) = the group max, block scales
    re-derived against it, and one `input_scale` = the group max (ModelOpt's
    `preprocess_linear_fusion`); a state that already shares them (`init_quant_state`) is unchanged."""
    layers = []
    changed = []
    for i, entries in enumerate(qs.layers):
        groups = [[k for k in g if k in entries] for g in getattr(kind_of(cfg, i), "FUSED_LINEARS", ())]
        group = max(groups, key=len, default=[])
        if len(group) < 2:
            layers.append(entries)
            continue
        scales = [float(np.asarray(entries[k]["scale"])) for k in group]
        inputs = [float(np.asarray(entries[k]["input_scale"])) for k in group if "input_scale" in entries[k]]
        new = dict(entries)
        top = max(scales)
        if len(set(scales)) > 1:
            changed.append(i)
            for k in group:
                e = dict(entries[k], scale=jnp.asarray(top, jnp.float32))
                if "block_scale" in e:
                    w = jnp.asarray(params["layers"][i]["mixer"][k], jnp.float32)
                    e["block_scale"] = nvfp4_scales(w, axis=-2, amax=jnp.float32(top * FP4_MAX * FP8_MAX))[0]
                new[k] = e
        if len(set(inputs)) > 1:
            for k in group:
                new[k] = dict(new[k], input_scale=jnp.asarray(max(inputs), jnp.float32))
        layers.append(new)
    if changed and log is not None:
        log(f"quantized export: q/k/v of layers {changed} had separate weight scales; written with the group "
            "max (vLLM / SGLang fuse them into qkv_proj), block scales re-derived")
    return QuantState(qs.spec, layers)


def _default_log(msg: str) -> None:
    logging.getLogger("elastic_jax.quant").warning(msg)


def quantize_tensors(cfg, params, tensors: list, fmt: str, qs: QuantState | None, kv_scales: dict | None = None,
                     log=_default_log):
    """The `(key, shape, thunk)` list of `hf.save.hf_tensors` with every quantized weight replaced by
    its packed weight and scales (and the FP8 KV-cache scales `kv_scales` {layer: {"k_scale",
    "v_scale"}} added). Returns (tensors, quantization_config). Uncalibrated FP8 is refused (vLLM
    would read garbage input scales); uncalibrated NVFP4 is written weight-only as `W4A16_NVFP4`
    (said through `log`)."""
    if qs is None:
        qs = init_quant_state(params, cfg, QuantSpec(fmt))
    if qs.spec.fmt != fmt:
        raise QuantizationError(f"quantization={fmt!r} but the quantization state is {qs.spec.fmt!r}")
    if fmt == "fp8" and not qs.calibrated:
        raise QuantizationError("fp8 export needs static input scales: run elastic_jax.quant.calibrate first")
    _check_fused(cfg, qs)
    qs = _unify_fused(cfg, params, qs, log)
    algo = quant_algo(qs)
    if fmt == "nvfp4" and algo == "W4A16_NVFP4" and log is not None:
        log("nvfp4 export without calibrated input scales: written as W4A16_NVFP4 (NVFP4 weights, BF16 "
            "activations); run elastic_jax.quant.calibrate first for W4A4 NVFP4")
    weight_only = algo == "W4A16_NVFP4"
    where = _quantized_rules(cfg, qs)
    out = []
    for key, shape, thunk in tensors:
        hit = where.get(key)
        if hit is None:
            out.append((key, shape, thunk))
            continue
        i, rule, j = hit
        d = layer_dims(cfg, i)
        mod = module_of(key)
        parts = _export_parts(params["layers"][i]["mixer"], qs.layers[i], rule, j, d, fmt)
        if weight_only:
            parts.pop("input_scale", None)
        for suffix, arr in parts.items():
            out.append((f"{mod}.{suffix}", arr.shape, lambda a=arr: a))
    for i, sc in sorted((kv_scales or {}).items()):
        scales = getattr(kind_of(cfg, i), "KV_CACHE_SCALES", None) if 0 <= i < cfg.num_hidden_layers else None
        if not scales:
            raise QuantizationError(f"kv_scales: layer {i} is not an attention layer")
        for proj, name in scales.items():
            arr = np.asarray(sc[name], np.float32).reshape(())
            out.append((f"backbone.layers.{i}.mixer.{proj}.{name}", (), lambda a=arr: a))
    return out, quantization_config(cfg, qs, kv_cache=bool(kv_scales))


def _export_parts(mixer, entries, rule, j, d, fmt) -> dict:
    pick = (lambda a: a) if j is None else (lambda a: a[j])
    ws = [np.asarray(jax.device_get(pick(mixer[p])), np.float32) for p in rule.params]
    es = [entries[p] for p in rule.params]
    scale = np.float32(np.asarray(pick(es[0]["scale"]) if np.ndim(es[0]["scale"]) else es[0]["scale"]))
    parts = {}
    if fmt == "fp8":
        codes = [np.clip(w / scale, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn) for w in ws]
        parts["weight"] = rule.save(tuple(codes), d)
        parts["weight_scale"] = np.asarray(scale, np.float32)
    else:
        blocks = [np.asarray(pick(e["block_scale"]), np.float32) for e in es]
        codes = [np.asarray(nvfp4_codes(jnp.asarray(w), jnp.asarray(b), scale, axis=-2)[0]) for w, b in zip(ws, blocks)]
        parts["weight"] = pack_e2m1(rule.save(tuple(codes), d))
        parts["weight_scale"] = rule.save(tuple(blocks), d).astype(ml_dtypes.float8_e4m3fn)
        parts["weight_scale_2"] = np.asarray(scale, np.float32)
    if "input_scale" in es[0]:
        parts["input_scale"] = np.asarray(es[0]["input_scale"], np.float32)
    return parts


def write_quant_config(directory: str, qconfig: dict) -> None:
    with open(os.path.join(directory, "hf_quant_config.json"), "w") as f:
        json.dump(legacy_quant_config(qconfig), f, indent=2)


# ------------------------------------------------------------------------------------ load
def read_modelopt_config(qc: dict, where: str = "quantization_config") -> dict:
    """{quant_algo, kv_cache_quant_algo, group_size, exclude_modules} of a ModelOpt quantization
    config in either form: converted (`config.json`: quant_algo, ignore, kv_cache_scheme, ...) or
    nested legacy (`hf_quant_config.json`: {"quantization": {...}}), as vLLM's
    `ModelOptQuantConfigBase.from_config` reads them."""
    if not isinstance(qc, dict):
        raise QuantizationError(f"{where}: expected an object, got {type(qc).__name__}")
    if isinstance(qc.get("quantization"), dict):
        q = qc["quantization"]
        kv = q.get("kv_cache_quant_algo")
        excl = q.get("exclude_modules") or []
    else:
        if not str(qc.get("quant_method", "")).lower().startswith("modelopt"):
            raise QuantizationError(f"{where}: quant_method {qc.get('quant_method')!r}: only ModelOpt checkpoints "
                                    "(quant_method 'modelopt') are read")
        q = qc
        scheme = qc.get("kv_cache_scheme")
        kv = "FP8" if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8 \
            else None
        excl = qc.get("ignore")
        if excl is None:            # files written before ModelOpt's converted form
            excl = qc.get("exclude_modules") or []
    algo = str(q.get("quant_algo") or "").upper()
    if algo not in ALGOS:
        raise QuantizationError(f"{where}: quant_algo {q.get('quant_algo')!r}: only ModelOpt {sorted(ALGOS)} "
                                "checkpoints are read")
    if not isinstance(excl, list):
        raise QuantizationError(f"{where}: the exclusion list must be a list, got {type(excl).__name__}")
    return {"quant_algo": algo, "kv_cache_quant_algo": None if kv is None else str(kv).upper(),
            "group_size": q.get("group_size"), "exclude_modules": [str(m) for m in excl]}


def spec_from_config(raw: dict, directory: str | None = None) -> QuantSpec | None:
    """The QuantSpec of a ModelOpt checkpoint: `config.json`'s `quantization_config` (converted or
    nested form), else the folder's `hf_quant_config.json` (as vLLM falls back to it); None when
    neither exists (a BF16 checkpoint)."""
    qc = raw.get("quantization_config")
    where = "config.json quantization_config"
    if not qc and directory is not None:
        path = os.path.join(directory, "hf_quant_config.json")
        if os.path.isfile(path):
            qc, where = read_json(path, what="ModelOpt quantization config"), path
    if not qc:
        return None
    q = read_modelopt_config(qc, where)
    if q["kv_cache_quant_algo"] not in (None, "FP8"):
        raise QuantizationError(f"{where}: kv_cache_quant_algo {q['kv_cache_quant_algo']!r}: only an FP8 KV cache is read")
    if "NVFP4" in q["quant_algo"] and (q["group_size"] or NVFP4_BLOCK) != NVFP4_BLOCK:
        raise QuantizationError(f"{where}: NVFP4 group_size {q['group_size']}: only {NVFP4_BLOCK} is supported")
    excl = tuple(m for m in q["exclude_modules"] if m not in ALWAYS_EXCLUDED)
    return QuantSpec(ALGOS[q["quant_algo"]], exclude=excl, activations=q["quant_algo"] != "W4A16_NVFP4")


class DequantizedFiles:
    """A `hf.io.CheckpointFiles` seen through dequantization: quantized weights read as f32 in their logical
    HF shape; their scale tensors are hidden from the key set and kept for `quant_state`."""

    _SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
    _KV = ("k_scale", "v_scale")

    def __init__(self, files, spec: QuantSpec):
        self.files, self.spec = files, spec
        self.directory, self.problems = files.directory, files.problems
        names = set(files.key_file)
        self.quantized = {k for k in names if k.endswith(".weight") and module_of(k) + ".weight_scale" in names}
        hidden = self._SUFFIXES + self._KV
        self.key_file = {k: v for k, v in files.key_file.items() if k.rsplit(".", 1)[-1] not in hidden}
        self.kv_keys = sorted(k for k in names if k.rsplit(".", 1)[-1] in self._KV)

    def _raw(self, key):
        return self.files.read(key)

    def scales(self, weight_key: str) -> dict:
        m = module_of(weight_key)
        return {s: self._raw(f"{m}.{s}").astype(np.float32) for s in self._SUFFIXES
                if f"{m}.{s}" in self.files.key_file}

    def shape(self, key):
        shp = self.files.shape(key)
        if key in self.quantized and self.spec.fmt == "nvfp4":
            return shp[:-1] + (shp[-1] * 2,)
        return shp

    def dtype(self, key):
        return "F32" if key in self.quantized else self.files.dtype(key)

    def read(self, key):
        if key not in self.quantized:
            return self.files.read(key)
        w = self._raw(key)
        sc = self.scales(key)
        if self.spec.fmt == "fp8":
            return w.astype(np.float32) * sc["weight_scale"]
        codes = unpack_e2m1(w)
        return codes * np.repeat(sc["weight_scale"], NVFP4_BLOCK, axis=-1) * sc["weight_scale_2"]

    def close(self):
        self.files.close()

    def quant_state(self, cfg) -> QuantState:
        """The scales on disk as a `QuantState` over our params layout."""
        layers: list[dict] = [{} for _ in range(cfg.num_hidden_layers)]
        experts: dict = {}
        for key in sorted(self.quantized):
            n, m = match(split_prefix(key)[1])
            rule = keys.RULES[n]
            i = int(m.group("i"))
            d = layer_dims(cfg, i)
            sc = self.scales(key)
            if self.spec.fmt == "nvfp4":
                blocks = rule.load(sc["weight_scale"], d)
                scale = sc["weight_scale_2"]
            else:
                blocks, scale = (None,) * len(rule.params), sc["weight_scale"]
            for p, b in zip(rule.params, blocks):
                e = {"scale": scale}
                if b is not None:
                    e["block_scale"] = b
                if "input_scale" in sc:
                    e["input_scale"] = sc["input_scale"]
                if rule.experts == "per_expert":
                    experts.setdefault((i, p), {})[int(m.group("j"))] = e
                else:
                    layers[i][p] = {k: jnp.asarray(v, jnp.float32) for k, v in e.items()}
        for (i, p), per in experts.items():
            stack = [per[j] for j in sorted(per)]
            e = {"scale": jnp.asarray(np.stack([s["scale"] for s in stack]).reshape(-1), jnp.float32)}
            if "block_scale" in stack[0]:
                e["block_scale"] = jnp.asarray(np.stack([s["block_scale"] for s in stack]), jnp.float32)
            if "input_scale" in stack[0]:
                e["input_scale"] = jnp.asarray(max(float(s["input_scale"]) for s in stack), jnp.float32)
            layers[i][p] = e
        return QuantState(self.spec, layers)

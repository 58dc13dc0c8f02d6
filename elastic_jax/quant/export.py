"""FP8 / NVFP4 checkpoints in the ModelOpt Hugging Face layout (METHOD §10), beside `elastic_jax.hf`.

Per quantized linear `<module>` (HF `[out, in]` layout):
  FP8   : `<module>.weight` float8_e4m3fn, `<module>.weight_scale` f32 [] (per tensor),
          `<module>.input_scale` f32 [] (static activation scale);  w = fp8 · weight_scale
  NVFP4 : `<module>.weight` uint8 [out, in/2] (two E2M1 codes per byte, element 2k in the low
          nibble), `<module>.weight_scale` float8_e4m3fn [out, in/16] (block scales),
          `<module>.weight_scale_2` f32 [] (second level), `<module>.input_scale` f32 [];
          w = e2m1 · weight_scale · weight_scale_2
`config.json` gains `quantization_config` {quant_method "modelopt", quant_algo "FP8" | "NVFP4",
group_size (NVFP4), exclude_modules, ...} and `hf_quant_config.json` is written beside it, as in
ModelOpt's `export_hf_checkpoint`. Written from memory of ModelOpt's exporter and the public
Nemotron FP8 / NVFP4 checkpoints (no network here to re-check): see BUILD_NOTES (issue 16).

safetensors' numpy API cannot hold float8, so these files are written (and their float8 tensors
read) by the few lines of `write_safetensors` / `read_tensor` (the format: u64 header length,
JSON header, raw little-endian data); torch's `safetensors.torch.load_file` reads them.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .formats import NVFP4_BLOCK, nvfp4_codes, pack_e2m1, unpack_e2m1
from .state import ALWAYS_EXCLUDED, QUANTIZABLE, QuantizationError, QuantSpec, QuantState, init_quant_state

_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
             np.dtype(np.uint8): "U8", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(np.float64): "F64"}
_NP_DTYPES = {v: k for k, v in _ST_NAMES.items()}
ALGOS = {"fp8": "FP8", "nvfp4": "NVFP4"}


# ------------------------------------------------------------------------------ safetensors I/O
def write_safetensors(arrays: dict, path: str, metadata: dict | None = None) -> None:
    """`safetensors.numpy.save_file` with float8 support (same argument order)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for k, a in arrays.items():
        dt = _ST_NAMES.get(np.dtype(a.dtype))
        if dt is None:
            raise QuantizationError(f"{k}: dtype {a.dtype} cannot be written")
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for a in arrays.values():
            f.write(np.ascontiguousarray(a).tobytes())


def read_tensor(path: str, key: str) -> np.ndarray:
    """One tensor of a safetensors file, any dtype above (float8 included), memory-mapped."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))[key]
    b, e = meta["data_offsets"]
    dt = _NP_DTYPES[meta["dtype"]]
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + b, shape=(e - b,))
    return np.array(mm.view(dt).reshape(meta["shape"]))


# ---------------------------------------------------------------------------------- export
def _hf_module(key: str) -> str:
    return key[:-len(".weight")]


def _quantized_rules(cfg, qs: QuantState):
    """HF weight key -> (layer, rule, expert or None) for every quantized tensor."""
    from ..hf import RULES, layer_dims
    out = {}
    for i, entries in enumerate(qs.layers):
        if not entries:
            continue
        d = layer_dims(cfg, i)
        for rule in RULES:
            if rule.kind != cfg.pattern[i] or rule.experts == "stacked" or not rule.when(d):
                continue
            if rule.params and all(p in entries for p in rule.params):
                if rule.experts == "per_expert":
                    for j in range(d.E):
                        out[rule.key(i, j)] = (i, rule, j)
                else:
                    out[rule.key(i)] = (i, rule, None)
    return out


def exclude_modules(cfg, qs: QuantState) -> list[str]:
    """ModelOpt `exclude_modules`: the always-high-precision modules and every quantizable
    projection this state leaves out."""
    names = list(ALWAYS_EXCLUDED)
    for i, c in enumerate(cfg.pattern):
        for k, mod in QUANTIZABLE[c].items():
            name = f"backbone.layers.{i}.{mod}"
            if k not in qs.layers[i] and name not in names and _present(cfg, i, k):
                names.append(name)
    return names


def _present(cfg, i, k):
    return not (k.startswith("shared") and not cfg.moe_shared_expert_intermediate_size)


def quantization_config(cfg, qs: QuantState) -> dict:
    """The `quantization_config` of config.json (ModelOpt HF export)."""
    qc = {"quant_method": "modelopt", "quant_algo": ALGOS[qs.spec.fmt], "kv_cache_quant_algo": None,
          "exclude_modules": exclude_modules(cfg, qs), "producer": {"name": "elastic_jax"}}
    if qs.spec.fmt == "nvfp4":
        qc["group_size"] = NVFP4_BLOCK
    return qc


def quantize_tensors(cfg, params, tensors: list, fmt: str, qs: QuantState | None):
    """The `(key, shape, thunk)` list of `hf._hf_tensors` with every quantized weight replaced by
    its packed weight and scales. Returns (tensors, quantization_config)."""
    from ..hf import layer_dims
    if qs is None:
        qs = init_quant_state(params, cfg, QuantSpec(fmt))
    if qs.spec.fmt != fmt:
        raise QuantizationError(f"quantization={fmt!r} but the quantization state is {qs.spec.fmt!r}")
    if fmt == "fp8" and qs.spec.activations and not qs.calibrated:
        raise QuantizationError("fp8 export needs static input scales: run elastic_jax.quant.calibrate first")
    where = _quantized_rules(cfg, qs)
    out = []
    for key, shape, thunk in tensors:
        hit = where.get(key)
        if hit is None:
            out.append((key, shape, thunk))
            continue
        i, rule, j = hit
        d = layer_dims(cfg, i)
        mod = _hf_module(key)
        parts = _export_parts(params["layers"][i]["mixer"], qs.layers[i], rule, j, d, fmt)
        for suffix, arr in parts.items():
            out.append((f"{mod}.{suffix}", arr.shape, lambda a=arr: a))
    return out, quantization_config(cfg, qs)


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
    q = {k: v for k, v in qconfig.items() if k not in ("quant_method", "producer")}
    with open(os.path.join(directory, "hf_quant_config.json"), "w") as f:
        json.dump({"producer": qconfig.get("producer", {}), "quantization": q}, f, indent=2)


# ------------------------------------------------------------------------------------ load
def spec_from_config(raw: dict) -> QuantSpec | None:
    """The QuantSpec of a config.json with a ModelOpt `quantization_config`, else None."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    algo = qc.get("quant_algo")
    if qc.get("quant_method") != "modelopt" or algo not in ALGOS.values():
        raise QuantizationError(f"quantization_config {qc.get('quant_method')!r}/{algo!r}: only ModelOpt FP8 and "
                                "NVFP4 checkpoints are read")
    if algo == "NVFP4" and qc.get("group_size", NVFP4_BLOCK) != NVFP4_BLOCK:
        raise QuantizationError(f"NVFP4 group_size {qc.get('group_size')}: only {NVFP4_BLOCK} is supported")
    fmt = {v: k for k, v in ALGOS.items()}[algo]
    excl = tuple(m for m in qc.get("exclude_modules") or () if m not in ALWAYS_EXCLUDED)
    return QuantSpec(fmt, exclude=excl)


class DequantizedFiles:
    """A `hf._Files` seen through dequantization: quantized weights read as f32 in their logical
    HF shape; their scale tensors are hidden from the key set and kept for `quant_state`."""

    _SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")

    def __init__(self, files, spec: QuantSpec):
        self.files, self.spec = files, spec
        self.directory, self.problems = files.directory, files.problems
        keys = set(files.key_file)
        self.quantized = {k for k in keys if k.endswith(".weight") and _hf_module(k) + ".weight_scale" in keys}
        self.key_file = {k: v for k, v in files.key_file.items() if k.rsplit(".", 1)[-1] not in self._SUFFIXES}

    def _raw(self, key):
        return read_tensor(os.path.join(self.directory, self.files.key_file[key]), key)

    def scales(self, weight_key: str) -> dict:
        m = _hf_module(weight_key)
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
        from ..hf import _PREFIXES, RULES, _match, layer_dims
        layers: list[dict] = [{} for _ in range(cfg.num_hidden_layers)]
        experts: dict = {}
        for key in sorted(self.quantized):
            prefix = next((p for p in _PREFIXES if key.startswith(p)), "")
            n, m = _match(key[len(prefix):])
            rule = RULES[n]
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


def checkpoint_bytes(directory: str) -> int:
    """Bytes of the safetensors files of an HF directory."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.endswith(".safetensors"))

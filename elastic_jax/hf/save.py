"""`save_hf`: (cfg, params) -> an HF NemotronH checkpoint folder (`from_pretrained` gives the same
logits), optionally in the ModelOpt FP8 / NVFP4 layout (`hf.modelopt`) and with the nested
family's budget table, router and tokenizer (`hf.budgets`). Keys are written as on the Hub
(`backbone.` prefix, per-expert tensors); the router weight and bias are float32.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import NemotronHConfig
from ..errors import HFCheckpointError
from ..fileio import atomic_folder, check_target, owned_names
from ..finite import check_finite
from ..model.params import check_params
from .budgets import BUDGETS_FILE, ROUTER_FILE, budget_table, flatten_tree
from .config_json import hf_config_dict
from .io import SAFE_SINGLE, progress_bar, write_index, write_safetensors
from . import keys
from .keys import layer_dims
from .modelopt import quantize_tensors, write_quant_config

# The top-level names `save_hf` writes: `overwrite` replaces a folder only if it holds nothing else.
HF_EXPORT_FILES = owned_names(r"config\.json", r"generation_config\.json", r"model\.safetensors",
                              r"model\.safetensors\.index\.json", r"model-\d{5}-of-\d{5}\.safetensors",
                              r"hf_quant_config\.json", r"elastic_budgets\.json", r"elastic_router\.safetensors",
                              r"elastic/(router\.safetensors)?",
                              r"tokenizer\.json",
                              r"tokenizer_config\.json", r"special_tokens_map\.json", r"chat_template\.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def hf_tensors(cfg: NemotronHConfig, params: dict, dtype) -> Iterable[tuple[str, tuple, Callable[[], np.ndarray]]]:
    """(key, shape, thunk) for every HF tensor, in file order; thunks convert lazily."""
    hd = dtype

    def host(x, f32):
        return np.asarray(jax.device_get(x)).astype(np.float32 if f32 else hd, copy=False)

    for layer in [None] + list(range(cfg.num_hidden_layers)):
        d = layer_dims(cfg, layer)
        kinds = ("top", "head") if layer is None else ("layer", cfg.pattern[layer])
        for rule in keys.RULES:
            if rule.kind not in kinds or rule.experts == "stacked":
                continue
            if layer is None:
                src = params
            elif rule.params == ("norm",) and rule.kind == "layer":
                src = params["layers"][layer]
            else:
                src = params["layers"][layer]["mixer"]
            if not rule.when(d):
                if rule.params in (("shared_up",), ("shared_down",)) and d.E:   # zero shared expert
                    shp = (1, d.D) if rule.params == ("shared_up",) else (d.D, 1)
                    yield rule.key(layer), shp, (lambda shp=shp, f=rule.f32: np.zeros(shp, np.float32 if f else hd))
                continue
            if rule.optional(cfg):   # e.g. conv bias with use_conv_bias=False: written only if nonzero
                vals = [np.asarray(src[p]) for p in rule.params]
                if all(not v.any() for v in vals):
                    continue
                raise HFCheckpointError("cannot write this model", [
                    f"{rule.key(layer)}: nonzero values but the config says it is absent ({rule.params})"])
            if rule.experts == "per_expert":
                # one host copy of the stacked [E, ...] leaf, sliced per expert, dropped after the last
                held: dict = {}

                def expert(j, r=rule, s=src, d=d, held=held):
                    if not held:
                        held.update({p: np.asarray(jax.device_get(s[p])) for p in r.params})
                    out = host(r.save(tuple(held[p][j] for p in r.params), d), r.f32)
                    if j == d.E - 1:
                        held.clear()
                    return out

                for j in range(d.E):
                    yield rule.key(layer, j), rule.shape(d), (lambda j=j, f=expert: f(j))
            else:
                yield (rule.key(layer), rule.shape(d),
                       lambda r=rule, s=src, d=d: host(r.save(tuple(s[p] for p in r.params), d), r.f32))


def _parse_size(s) -> int:
    if isinstance(s, bool):
        raise ValueError(f"max_shard_size={s!r}: expected bytes (int) or a size like '5GB' / '500MB'")
    if isinstance(s, int):
        n = s
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", str(s), re.I)
        if not m:
            raise ValueError(f"max_shard_size={s!r}: expected bytes (int) or a size like '5GB' / '500MB'")
        mult = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
        n = int(float(m.group(1)) * mult[(m.group(2) or "").upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size={s!r}: must be > 0 bytes")
    return n


def save_hf(directory: str | os.PathLike, cfg: NemotronHConfig, params: dict, *, dtype=None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = False,
            quantization: str | None = None, quant_state=None, kv_scales: dict | None = None,
            protect: Sequence[str | os.PathLike] = (), budgets=None, fractions: dict | None = None,
            elastic_cfg=None, router_params=None, tokenizer_dir: str | os.PathLike | None = None,
            allow_nonfinite: bool = False) -> str:
    """Write (cfg, params) as an HF NemotronH checkpoint that
    `transformers.NemotronHForCausalLM.from_pretrained(directory)` loads with the same logits.

    Keys are written as on the Hub (`backbone.` prefix, per-expert tensors), `config.json` with
    `layers_block_type` and the legacy `hybrid_override_pattern`, shards of at most
    `max_shard_size` with `model.safetensors.index.json` when there is more than one.
    `dtype`: on-disk dtype (None: the embedding's); router weight and bias are float32.
    The folder is written by `elastic_jax.fileio.atomic_folder`: into a temporary folder swapped
    in only when complete, so a failed export leaves nothing behind and the previous one intact.
    An existing empty folder is a valid target; `overwrite` replaces a folder only when it holds
    nothing but what save_hf writes (`HF_EXPORT_FILES`), else FileExistsError lists the rest. An
    empty path, a target containing the current directory or a `protect`ed path (the source of
    an export) is refused. A heterogeneous (per-layer width) config cannot be expressed as an HF
    NemotronH config and raises `HFCheckpointError`.
    `quantization` "fp8" | "nvfp4" (or a `quant_state`, `elastic_jax.quant.QuantState`): the
    projections are written packed with their scales in the ModelOpt layout
    (`elastic_jax.hf.modelopt`); without a state the weight scales come from these params;
    `kv_scales` ({attention layer: {"k_scale", "v_scale"}}, `elastic_jax.quant.calibrate_kv_cache`)
    adds FP8 KV-cache scales.
    `budgets` ({name: Widths}, nested submodels of this model) is written as `elastic_budgets.json`
    (see `budget_table`, with the optional per-budget `fractions` and the `elastic_cfg`), the
    budget router's `router_params` as `elastic/router.safetensors`: together the nested
    checkpoint (`elastic_jax.infer.checkpoint`). `tokenizer_dir`: a folder whose tokenizer files
    (`TOKENIZER_FILES`) are copied in, so `elastic-jax generate` works on the export.
    Every tensor is checked finite as written (after the dtype cast: float16 overflows to inf),
    and the router's before anything is written; a NaN / inf is `NonFiniteError` naming the
    tensor, nothing written (unless `allow_nonfinite`: a warning)."""
    table = None if not budgets else budget_table(cfg, budgets, fractions=fractions, elastic_cfg=elastic_cfg)
    tok_files = _tokenizer_files(tokenizer_dir)
    check_target(directory, owned=HF_EXPORT_FILES, overwrite=overwrite, protect=protect, what="save_hf")
    try:
        out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else params["embed"].dtype))
    except TypeError:
        raise ValueError(f"save_hf dtype={dtype!r}: expected float32, bfloat16 or float16") from None
    if out_dtype not in (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16)):
        raise ValueError(f"save_hf dtype={out_dtype}: expected float32, bfloat16 or float16")
    limit = _parse_size(max_shard_size)
    config = hf_config_dict(cfg, dtype=str(out_dtype))
    check_params(params, cfg)
    if router_params:
        check_finite(router_params, f"save_hf {os.fspath(directory)}: the budget router", allow=allow_nonfinite,
                     hint="nothing written (allow_nonfinite=True / --allow-nonfinite to write anyway)")
    tensors = list(hf_tensors(cfg, params, out_dtype))
    qconfig = None
    if quantization is not None or quant_state is not None:   # ModelOpt FP8 / NVFP4 layout (METHOD §10)
        fmt = quantization if quantization is not None else quant_state.spec.fmt
        tensors, qconfig = quantize_tensors(cfg, params, tensors, fmt, quant_state, kv_scales=kv_scales)
        config["quantization_config"] = qconfig
    shards: list[list] = [[]]
    size = 0
    for key, shape, thunk in tensors:
        nbytes = int(np.prod(shape)) * (4 if "gate." in key else out_dtype.itemsize)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, shape, thunk))
        size += nbytes
    with atomic_folder(directory, owned=HF_EXPORT_FILES, overwrite=overwrite, protect=protect,
                       what="save_hf") as tmp:
        _write_hf_files(tmp, cfg, config, shards, len(tensors), progress,
                        finite_what=f"save_hf {os.fspath(directory)}", allow_nonfinite=allow_nonfinite)
        if qconfig is not None:
            write_quant_config(tmp, qconfig)
        if table is not None:
            with open(os.path.join(tmp, BUDGETS_FILE), "w") as f:
                json.dump(table, f, indent=1)
        if router_params:
            os.makedirs(os.path.join(tmp, os.path.dirname(ROUTER_FILE)), exist_ok=True)
            write_safetensors(flatten_tree(router_params), os.path.join(tmp, ROUTER_FILE))
        for src in tok_files:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
    return os.path.abspath(os.fspath(directory))


def _write_hf_files(tmp: str, cfg: NemotronHConfig, config: dict, shards: list, n_tensors: int,
                    progress: bool, finite_what: str | None = None,
                    allow_nonfinite: bool = False) -> None:
    """The files of an HF checkpoint into the (empty, temporary) folder `tmp` (one
    `write_safetensors` per shard, float8 / packed-uint8 quantized tensors included). `finite_what`:
    check each tensor finite (`NonFiniteError` naming it, prefixed by this; a warning with
    `allow_nonfinite`)."""
    names = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    bar = progress_bar(progress, n_tensors, "save_hf", "tensor")
    for name, shard in zip(names, shards):
        arrays = {}
        for key, shape, thunk in shard:
            a = thunk()
            if tuple(a.shape) != tuple(shape):
                raise HFCheckpointError("internal shape error", [f"{key}: {a.shape} != {shape}"])
            if finite_what is not None:
                check_finite({key: a}, finite_what, allow=allow_nonfinite, hint="nothing written (allow_nonfinite=True / "
                             "--allow-nonfinite to write anyway)")
            arrays[key] = a
            weight_map[key] = name
            total += a.nbytes
            bar.update(1)
        write_safetensors(arrays, os.path.join(tmp, name), metadata={"format": "pt"})
        del arrays
    bar.close()
    if len(shards) > 1:
        write_index(tmp, weight_map, total)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
                   "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}, f, indent=2)




def _tokenizer_files(tokenizer_dir) -> list[str]:
    if tokenizer_dir is None:
        return []
    tokenizer_dir = os.fspath(tokenizer_dir)
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} has no tokenizer.json")
    return [os.path.join(tokenizer_dir, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]



"""Exports as vLLM / SGLang load them (issue 28): ModelOpt FP8 / NVFP4 / W4A16 folders, the nested
folder, `nemotron_h_puzzle` slices, and the budget rules.

vLLM is not installed here (nor loadable without a GPU), so `VllmRules` re-implements, from vLLM's
source, exactly the rules its loader applies to a folder; every rule names the function it follows:

  vllm-project/vllm @ 00155cdecca722d98e34234c3d172725b7720b7d
      vllm/model_executor/layers/quantization/modelopt.py
      (ModelOptQuantConfigBase.from_config: nested `quantization` vs flat `quant_algo`/`ignore`/
      `kv_cache_scheme`; QUANT_ALGOS; ModelOptNvFp4Config._from_config's required nested fields;
      apply_vllm_mapper's `name*` -> `name`, `name.*` expansion; is_layer_excluded: fused exact
      match, substring match, fnmatch; the per-method parameters: ModelOptFp8LinearMethod,
      ModelOptNvFp4LinearMethod, ModelOptNvFp4W4A16LinearMethod; the unequal-global-scale warning)
  vllm-project/vllm @ 01693a61cbed06543efef7373f6774afb961f244
      vllm/model_executor/layers/quantization/utils/quant_utils.py (is_layer_skipped: fused shards
      must agree; the `experts` branch)
  vllm-project/vllm @ 00b08dc44519a82cbdd9061d92d1226985094622
      vllm/model_executor/models/nemotron_h.py (hf_to_vllm_mapper: prefix backbone -> model, mtp
      dropped, A_log -> A, embeddings -> embed_tokens, q/k/v stacked into qkv_proj;
      packed_modules_mapping; module tree per layer kind; MoE `experts` with ckpt names up_proj /
      down_proj; get_nemotron_h_config_for_layer; _get_max_n_routed_experts)
  vllm-project/vllm @ bb435dbd5899c5374d29f6383bb49fe8a6a814ef
      vllm/model_executor/layers/mamba/mamba_mixer2.py (conv1d built with quant_config=None,
      in_proj / out_proj quantized)
  vllm-project/vllm @ 0e06f49835a66b11f2b74410d30b1f88575ee527
      vllm/model_executor/model_loader/default_loader.py (_prepare_weights: glob `*.safetensors`
      in the folder, then filter_duplicate_safetensors_files keeps only files the index names)
  vllm/model_executor/model_loader/weight_utils.py (maybe_remap_kv_scale_name: ModelOpt's
      `<attn>.k_proj.k_scale` -> `<attn>.attn.k_scale`)
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import hf as ejhf, hf_cli, quant
from elastic_jax.elastic import budgets as ejb
from elastic_jax.errors import HFCheckpointError
from elastic_jax.hf import io as hfio, modelopt
from elastic_jax.hf.save import hf_tensors

sys.path.insert(0, os.path.dirname(__file__))
from test_hf import _ej_model  # noqa: E402

F8, U8 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.uint8)


# ------------------------------------------------------------------------------ vLLM's rules
class VllmRules:
    """What vLLM's NemotronH loader does with a folder (see the module docstring for sources)."""

    QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8",
                   "MIXED_PRECISION")
    PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}

    def __init__(self, folder: str):
        self.folder = folder
        self.config = json.load(open(os.path.join(folder, "config.json")))
        self.quant = self._quant_config()

    # -- modelopt.py: ModelOptQuantConfigBase.from_config / get_config_filenames
    def _quant_config(self):
        qc = self.config.get("quantization_config")
        if qc is None and os.path.isfile(os.path.join(self.folder, "hf_quant_config.json")):
            qc = json.load(open(os.path.join(self.folder, "hf_quant_config.json")))
        if qc is None:
            return None
        if "quantization" in qc:
            q = qc["quantization"]
            algo, kv, excl = q.get("quant_algo"), q.get("kv_cache_quant_algo"), q.get("exclude_modules", [])
            if "NVFP4" in str(algo).upper():
                missing = [f for f in ("group_size", "kv_cache_quant_algo", "exclude_modules") if f not in q]
                assert not missing, f"vLLM: NVFP4 quantization requires {missing} in hf_quant_config.json"
        else:
            assert qc.get("quant_method", "").lower().startswith("modelopt")
            algo = qc.get("quant_algo")
            s = qc.get("kv_cache_scheme")
            kv = "FP8" if isinstance(s, dict) and s.get("type") == "float" and s.get("num_bits") == 8 else None
            excl = qc.get("ignore", [])
        assert algo, "vLLM: Missing 'quant_algo' in quantization config"
        algo = str(algo).upper()
        assert algo in self.QUANT_ALGOS and isinstance(excl, list)
        # apply_vllm_mapper: `name*` -> `name`, `name.*`; then the model's WeightsMapper on the list
        expanded = []
        for e in excl:
            expanded += [e[:-1], e[:-1] + ".*"] if len(e) >= 2 and e[-1] == "*" and e[-2] != "." else [e]
        return {"algo": algo, "kv": kv, "exclude": [self.map_name(e) or e for e in expanded]}

    # -- nemotron_h.py hf_to_vllm_mapper (prefix, substrings; stacking is handled in `load`)
    @staticmethod
    def map_name(name: str) -> str | None:
        if name.startswith("mtp"):
            return None
        if name.startswith("backbone"):
            name = "model" + name[len("backbone"):]
        return name.replace("A_log", "A").replace("embeddings", "embed_tokens")

    # -- quant_utils.is_layer_skipped + modelopt.is_layer_excluded
    def excluded(self, prefix: str) -> bool:
        ex = self.quant["exclude"]
        proj = prefix.split(".")[-1]
        if proj in self.PACKED:
            got = {prefix.replace(proj, s) in ex for s in self.PACKED[proj]}
            assert len(got) == 1, f"vLLM: Detected some but not all shards of {prefix} are quantized"
            if got.pop():
                return True
        elif "experts" in prefix:
            if any(prefix in e for e in ex if "experts" in e):
                return True
        elif prefix in ex:
            return True
        if any(e != prefix and e in prefix for e in ex):
            return True
        return any(fnmatch.fnmatch(prefix, e) for e in ex)

    # -- the model's parameters (nemotron_h.py module tree; mamba_mixer2.py; the modelopt methods)
    def layer_config(self, i: int) -> dict:
        c = dict(self.config)
        if c.get("model_type") == "nemotron_h_puzzle":          # get_nemotron_h_config_for_layer
            c.update({k: v for k, v in c["block_configs"][i].items() if k != "block_type"})
        return c

    def pattern(self) -> str:
        c = self.config
        if c.get("model_type") == "nemotron_h_puzzle":
            kinds = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
            pat = "".join(kinds[b["block_type"]] for b in c["block_configs"])
            assert c.get("hybrid_override_pattern", pat) == pat      # SGLang reads the top-level pattern
            return pat
        return c["hybrid_override_pattern"]

    def params(self) -> dict:
        """{vLLM parameter name: ("linear", in_features, quantized) | ("plain",) | ("opt",) | expert table}"""
        c = self.config
        out = {"model.embed_tokens.weight": ("plain",), "model.norm_f.weight": ("plain",)}
        self._linear(out, "lm_head", c["hidden_size"])
        for i, t in enumerate(self.pattern()):
            lc, p = self.layer_config(i), f"model.layers.{i}"
            out[f"{p}.norm.weight"] = ("plain",)
            if t == "M":
                self._linear(out, f"{p}.mixer.in_proj", lc["hidden_size"])
                self._linear(out, f"{p}.mixer.out_proj", lc["mamba_num_heads"] * lc["mamba_head_dim"])
                for n in ("conv1d.weight", "A", "D", "dt_bias", "norm.weight"):
                    out[f"{p}.mixer.{n}"] = ("plain",)
                out[f"{p}.mixer.conv1d.bias"] = ("opt",)
            elif t == "*":
                self._linear(out, f"{p}.mixer.qkv_proj", lc["hidden_size"], shards=3)
                self._linear(out, f"{p}.mixer.o_proj", lc["num_attention_heads"] * lc["head_dim"])
                out[f"{p}.mixer.attn.k_scale"] = out[f"{p}.mixer.attn.v_scale"] = ("opt",)   # default 1.0
            elif t == "-":
                self._linear(out, f"{p}.mixer.up_proj", lc["hidden_size"])
                self._linear(out, f"{p}.mixer.down_proj", lc["intermediate_size"])
            else:
                out[f"{p}.mixer.gate.weight"] = out[f"{p}.mixer.gate.e_score_correction_bias"] = ("plain",)
                self._linear(out, f"{p}.mixer.shared_experts.up_proj", lc["hidden_size"])
                self._linear(out, f"{p}.mixer.shared_experts.down_proj",
                             lc["moe_shared_expert_intermediate_size"] * lc.get("n_shared_experts", 1))
                q = self.quant is not None and not self.excluded(f"{p}.mixer.experts")
                for j in range(lc["n_routed_experts"]):
                    for w, n_in in (("up_proj", lc["hidden_size"]), ("down_proj", lc["moe_intermediate_size"])):
                        self._linear(out, f"{p}.mixer.experts.{j}.{w}", n_in, quantized=q)
        return out

    def _linear(self, out, prefix, n_in, shards=1, quantized=None):
        if quantized is None:
            quantized = self.quant is not None and not self.excluded(prefix)
        algo = self.quant["algo"] if quantized else None
        out[f"{prefix}.weight"] = ("linear", n_in, algo, shards)
        if algo == "FP8":
            out[f"{prefix}.weight_scale"] = out[f"{prefix}.input_scale"] = ("scale", shards)
        elif algo in ("NVFP4", "W4A16_NVFP4"):
            out[f"{prefix}.weight_scale"] = ("block", n_in, shards)
            out[f"{prefix}.weight_scale_2"] = ("scale", shards)
            # W4A16 registers an input_scale placeholder that may stay unloaded
            out[f"{prefix}.input_scale"] = ("scale", shards) if algo == "NVFP4" else ("opt",)

    # -- default_loader._prepare_weights + the per-tensor load
    def weight_files(self) -> list[str]:
        files = sorted(glob.glob(os.path.join(self.folder, "*.safetensors")))
        index = os.path.join(self.folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            listed = {os.path.join(self.folder, f) for f in json.load(open(index))["weight_map"].values()}
            files = [f for f in files if f in listed]
        return files

    def load(self) -> dict:
        """Every tensor of the folder consumed by exactly one parameter, every required parameter
        filled, dtypes / packed shapes as the quantization method allocates them. Returns
        {vLLM parameter: [(shard, array)]}."""
        params = self.params()
        loaded: dict = {}
        for path in self.weight_files():
            for key in hfio.tensor_keys(path):
                name = self.map_name(key)
                if name is None:
                    continue
                shard = None
                for s in ("q", "k", "v"):
                    if f".{s}_proj.{s}_scale" in name:            # maybe_remap_kv_scale_name (ModelOpt)
                        name = name.replace(f".{s}_proj.{s}_scale", f".attn.{s}_scale")
                    elif f".{s}_proj." in name:                   # orig_to_new_stacked -> qkv_proj
                        name, shard = name.replace(f".{s}_proj.", ".qkv_proj."), s
                assert name in params, f"vLLM: There is no module or parameter named {name!r} (from {key})"
                loaded.setdefault(name, []).append((shard, hfio.read_tensor(path, key)))
        for name, spec in params.items():
            got = loaded.get(name, [])
            if spec[0] in ("opt",):
                continue
            n_shards = spec[-1] if spec[0] in ("linear", "scale", "block") else 1
            assert len(got) == n_shards, f"vLLM: weight {name} not initialized from checkpoint ({len(got)} tensors)"
            for _, a in got:
                self._check(name, spec, a)
        return loaded

    @staticmethod
    def _check(name, spec, a):
        kind = spec[0]
        if kind == "linear":
            _, n_in, algo = spec[:3]
            want = {"FP8": F8, "NVFP4": U8, "W4A16_NVFP4": U8}.get(algo)
            if want is None:
                assert a.dtype not in (F8, U8), f"{name}: excluded (unquantized) module holds a {a.dtype} tensor"
                assert a.shape[-1] == n_in, (name, a.shape, n_in)
            else:
                assert a.dtype == want, f"{name}: {algo} layer needs {want}, the file has {a.dtype}"
                assert a.shape[-1] == (n_in // 2 if want == U8 else n_in), (name, a.shape, n_in)
        elif kind == "block":
            assert a.dtype == F8 and a.shape[-1] == spec[1] // 16, (name, a.dtype, a.shape)
        elif kind == "scale":
            assert a.dtype == np.float32 and a.size == 1, (name, a.dtype, a.shape)


def _shared_global_scales(loaded: dict) -> None:
    """vLLM's NVFP4 linear warns (and loses accuracy) when fused shards' global scales differ."""
    for name, got in loaded.items():
        if name.endswith(("qkv_proj.weight_scale_2", "qkv_proj.input_scale", "qkv_proj.weight_scale")) \
                and got[0][1].size == 1:
            vals = {float(a) for _, a in got}
            assert len(vals) == 1, f"{name}: q/k/v scales differ {vals}"


# ------------------------------------------------------------------------------------ models
PATTERN = "M*E-ME"


@pytest.fixture(scope="module")
def model():
    cfg, params = _ej_model(PATTERN, n_group=2, topk_group=1, moe_shared_expert_intermediate_size=32)
    batches = [np.random.RandomState(b).randint(0, cfg.vocab_size, (2, 12)) for b in range(2)]
    states = {}
    for fmt in ("fp8", "nvfp4"):
        states[fmt] = quant.calibrate(params, cfg, quant.init_quant_state(params, cfg, fmt), batches)
    nano = quant.calibrate(params, cfg, quant.init_quant_state(params, cfg, quant.recipe_spec(cfg, "fp8", "nano")),
                           batches)
    kv = quant.calibrate_kv_cache(params, cfg, batches)
    return cfg, params, states, nano, kv


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.slow
def test_vllm_loads_quantized_export(model, tmp_path, fmt):
    cfg, params, states, _, _ = model
    out = ej.save_hf(tmp_path / fmt, cfg, params, quant_state=states[fmt])
    rules = VllmRules(out)
    assert rules.quant["algo"] == fmt.upper() and rules.quant["kv"] is None
    assert rules.excluded("lm_head") and not rules.excluded("model.layers.1.mixer.qkv_proj")
    assert not rules.excluded("model.layers.2.mixer.experts")
    loaded = rules.load()
    assert loaded["lm_head.weight"][0][1].dtype == np.float32          # lm_head stays high precision
    assert loaded["model.layers.1.mixer.qkv_proj.weight"][0][1].dtype == (F8 if fmt == "fp8" else U8)
    _shared_global_scales(loaded)
    # the legacy file alone (older SGLang / vLLM read only it) gives the same rules
    raw = json.load(open(os.path.join(out, "config.json")))
    del raw["quantization_config"]
    json.dump(raw, open(os.path.join(out, "config.json"), "w"))
    legacy = VllmRules(out)
    assert legacy.quant == rules.quant
    legacy.load()


def test_uncalibrated_nvfp4_is_w4a16_and_says_so(model, tmp_path, caplog):
    cfg, params, _, _, _ = model
    with caplog.at_level("WARNING", logger="elastic_jax.quant"):
        out = ej.save_hf(tmp_path / "w4a16", cfg, params, quantization="nvfp4")
    assert "W4A16_NVFP4" in caplog.text
    rules = VllmRules(out)
    assert rules.quant["algo"] == "W4A16_NVFP4"
    loaded = rules.load()
    assert not any(n.endswith("input_scale") for n in loaded)
    assert "input_activations" not in rules.config["quantization_config"]["config_groups"]["group_0"]
    _, _, qs = ej.load_hf(out, with_quant=True)
    assert qs.spec.fmt == "nvfp4" and not qs.spec.activations
    with pytest.raises(quant.QuantizationError, match="calibrate"):          # FP8 without input scales: refused
        ej.save_hf(tmp_path / "fp8", cfg, params, quantization="fp8")
    assert not (tmp_path / "fp8").exists()


def test_old_state_with_separate_qkv_scales_is_unified(model, tmp_path):
    cfg, params, states, _, _ = model
    qs = states["nvfp4"]
    layers = [dict(e) for e in qs.layers]
    layers[1]["k_proj"] = dict(layers[1]["k_proj"], scale=layers[1]["k_proj"]["scale"] * 0.5)   # pre-issue-28 state
    msgs = []
    tensors = list(hf_tensors(cfg, params, np.dtype(np.float32)))
    got, _ = modelopt.quantize_tensors(cfg, params, tensors, "nvfp4", quant.QuantState(qs.spec, layers),
                                      log=msgs.append)
    assert msgs and "group max" in msgs[0]
    s2 = {k: float(t()) for k, _, t in got if k.startswith("backbone.layers.1.mixer.") and k.endswith("weight_scale_2")}
    assert len(s2) == 4 and len({v for k, v in s2.items() if "o_proj" not in k}) == 1


def test_nano_recipe_keeps_attention_and_neighbours_bf16_with_kv_scales(model, tmp_path):
    cfg, params, _, nano, kv = model
    out = ej.save_hf(tmp_path / "nano", cfg, params, quant_state=nano, kv_scales=kv)
    rules = VllmRules(out)
    assert rules.quant["kv"] == "FP8"
    # layer 1 is attention; layers 0 and 4 are the nearest Mamba layers on each side
    for prefix in ("model.layers.1.mixer.qkv_proj", "model.layers.1.mixer.o_proj", "model.layers.0.mixer.in_proj",
                   "model.layers.4.mixer.out_proj"):
        assert rules.excluded(prefix), prefix
    assert not rules.excluded("model.layers.2.mixer.experts") and not rules.excluded("model.layers.3.mixer.up_proj")
    loaded = rules.load()
    k = float(loaded["model.layers.1.mixer.attn.k_scale"][0][1])
    assert loaded["model.layers.1.mixer.qkv_proj.weight"][0][1].dtype == np.float32
    assert k > 0 and kv[1]["k_scale"] == pytest.approx(k) and kv[1]["v_scale"] > 0
    # legacy file carries the KV algo too
    assert json.load(open(os.path.join(out, "hf_quant_config.json")))["quantization"]["kv_cache_quant_algo"] == "FP8"
    cfg2, p2 = ej.load_hf(out)              # our reader hides the KV scales and reads the rest
    assert cfg2.pattern == cfg.pattern


def test_nested_folder_has_only_model_weights_at_top(model, tmp_path):
    cfg, params, _, _, _ = model
    from elastic_jax.elastic import init_router
    from elastic_jax.hf import read_router
    from elastic_jax.infer.checkpoint import save_nested
    ecfg = ej.ElasticConfig(budgets=(1.0, 0.5), hidden_options=(1.0, 0.75), mamba_options=(1.0, 0.5), ffn_options=(1.0, 0.5), moe_expert_options=(1.0, 0.5), moe_ffn_options=(1.0, 0.5), router_dim=8)
    router = init_router(cfg, ecfg, jax.random.PRNGKey(0))
    fam = {"100%": ej.Widths(), "50%": ej.widths_for_budget(cfg, 0.5)}
    for shard in ("5GB", 20000):                      # one file, and shards with an index
        d = str(tmp_path / f"nested_{shard}")
        files = save_nested(d, cfg, params, fam, fractions={"100%": 1.0, "50%": 0.5}, router_params=router)
        assert os.path.join("elastic", "router.safetensors") in files
        if shard != "5GB":
            ej.save_hf(d, cfg, params, max_shard_size=shard, overwrite=True, budgets=fam, router_params=router)
        rules = VllmRules(d)
        assert all(os.path.basename(f).startswith("model") for f in rules.weight_files())
        rules.load()
        assert read_router(d) is not None


def test_slicing_a_quantized_folder_keeps_parent_scales(model, tmp_path):
    cfg, params, states, _, _ = model
    parent = ej.save_hf(tmp_path / "nvfp4", cfg, params, quant_state=states["nvfp4"])
    widths = {"hidden": 16, "ffn": 32, "moe_experts": 4, "moe_ffn": 16}   # whole 16-blocks of the parent
    parser = argparse.ArgumentParser()
    hf_cli.add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["slice", parent, str(tmp_path / "child"), "--widths", json.dumps(widths), "--quiet"])
    assert args.func(args) == 0
    child = str(tmp_path / "child")
    VllmRules(child).load()
    st_p, st_c = os.path.join(parent, "model.safetensors"), os.path.join(child, "model.safetensors")
    for key in ("backbone.layers.0.mixer.in_proj.weight_scale_2", "backbone.layers.3.mixer.down_proj.input_scale",
                "backbone.layers.2.mixer.experts.1.up_proj.weight_scale_2"):
        assert hfio.read_tensor(st_c, key) == hfio.read_tensor(st_p, key), key        # kept, not re-derived
    # down_proj block scales: the first 32 of 48 input channels = the first 2 blocks of every kept row
    bp = hfio.read_tensor(st_p, "backbone.layers.3.mixer.down_proj.weight_scale").astype(np.float32)
    bc = hfio.read_tensor(st_c, "backbone.layers.3.mixer.down_proj.weight_scale").astype(np.float32)
    np.testing.assert_array_equal(bc, bp[:16, :2])


def test_reader_accepts_both_forms_and_nvidias_files(tmp_path):
    nested = {"producer": {"name": "modelopt", "version": "0.33.0"},
              "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                               "exclude_modules": ["lm_head", "backbone.layers.5.mixer*"]}}
    flat = {"config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "dynamic": False},
                                          "input_activations": {"num_bits": 8, "type": "float", "dynamic": False},
                                          "targets": ["Linear"]}},
            "ignore": ["lm_head", "backbone.layers.3.mixer.q_proj"], "quant_algo": "FP8",
            "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
            "producer": {"name": "modelopt", "version": "0.35.0"}, "quant_method": "modelopt"}
    s = modelopt.spec_from_config({"quantization_config": flat})
    assert s.fmt == "fp8" and s.exclude == ("backbone.layers.3.mixer.q_proj",)
    assert modelopt.read_modelopt_config(flat)["kv_cache_quant_algo"] == "FP8"
    # old elastic_jax files (flat, exclude_modules) still read
    old = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head", "x"]}
    assert modelopt.spec_from_config({"quantization_config": old}).exclude == ("x",)
    # no quantization_config in config.json: hf_quant_config.json in the folder (vLLM's fallback)
    json.dump(nested, open(tmp_path / "hf_quant_config.json", "w"))
    s = modelopt.spec_from_config({}, str(tmp_path))
    assert s.fmt == "nvfp4" and s.exclude == ("backbone.layers.5.mixer*",)
    for bad, match in (({"quant_method": "awq", "quant_algo": "FP8"}, "modelopt"),
                       ({"quant_method": "modelopt", "quant_algo": "INT4_AWQ"}, "INT4_AWQ")):
        with pytest.raises(quant.QuantizationError, match=match):
            modelopt.spec_from_config({"quantization_config": bad})


# ------------------------------------------------------------------------ nemotron_h_puzzle
@pytest.mark.slow   # fast tier: over 100 s of CPU; the full suite runs it
def test_heterogeneous_slice_is_nemotron_h_puzzle(tmp_path):
    cfg, params = _ej_model("M*E-ME-E", n_group=2, topk_group=1)
    w = ej.Widths(hidden=24, ffn=(32, 48), moe_experts=(4, 6, 8), moe_ffn=(8, 16, 8), mamba_heads=2)
    sub_cfg, sub = ej.slice_params(params, cfg, w)
    out = ej.save_hf(tmp_path / "puz", sub_cfg, sub)
    c = json.load(open(os.path.join(out, "config.json")))
    assert c["model_type"] == "nemotron_h_puzzle" and c["architectures"] == ["NemotronHPuzzleForCausalLM"]
    moe = [b for b in c["block_configs"] if b["block_type"] == "moe"]
    assert [b["n_routed_experts"] for b in moe] == [4, 6, 8] and [b["moe_intermediate_size"] for b in moe] == [8, 16, 8]
    assert [b["intermediate_size"] for b in c["block_configs"] if b["block_type"] == "mlp"] == [32, 48]
    assert "n_routed_experts" not in c and "intermediate_size" not in c      # blockwise members only per block
    assert c["mamba_num_heads"] == 2 and c["hybrid_override_pattern"] == "M*E-ME-E"
    VllmRules(out).load()                  # per-layer expert tables and MLP widths, as vLLM builds them
    cfg2, p2 = ej.load_hf(out)
    assert (cfg2.ffn_per_layer, cfg2.moe_experts_per_layer, cfg2.moe_ffn_per_layer) == ((32, 48), (4, 6, 8), (8, 16, 8))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 9)))
    np.testing.assert_allclose(np.asarray(ej.forward(p2, tokens, cfg2)),
                               np.asarray(ej.forward(params, tokens, cfg, w.resolve(cfg))), atol=2e-5)
    # per-layer attention heads cannot be served: said, nothing written
    pcfg, pparams = _ej_model("M*E*")
    bad_cfg, bad = ej.slice_params(pparams, pcfg, ej.Widths(attn_heads=(2, 4)))
    with pytest.raises(HFCheckpointError, match="attention"):
        ej.save_hf(tmp_path / "bad", bad_cfg, bad)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------- budgets
def test_budget_rules():
    cfg, params = _ej_model(PATTERN, n_group=2, topk_group=1)
    from elastic_jax.elastic import init_router
    ecfg = ej.ElasticConfig(budgets=(1.0, 0.5), hidden_options=(1.0, 0.75), mamba_options=(1.0, 0.5), ffn_options=(1.0, 0.5), moe_expert_options=(1.0, 0.5), moe_ffn_options=(1.0, 0.5), router_dim=8)
    router = init_router(cfg, ecfg, jax.random.PRNGKey(0))
    assert ejb.trained_widths(router, cfg, ecfg, 1.0) == ej.Widths()          # "100%" is the parent
    assert ejb.budget_family(router, cfg, ecfg)["100%"] == ej.Widths()
    for b in (1e-9, 0.3):
        with pytest.raises(ValueError, match=r"outside the trained range \[0.5, 1\]"):
            ejb.trained_widths(router, cfg, ecfg, b)
    with pytest.warns(ejb.BudgetSizeWarning, match="target 50.0%"):
        ejb.check_budget_size(cfg, ej.Widths(), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ejb.check_budget_size(cfg, ej.Widths(), 1.0) == 1.0
    for target in ("params", "active"):
        w = ej.widths_for_budget(cfg, 0.5, target=target)
        got = ejb.measured_fraction(cfg, w, target)
        assert abs(got - 0.5) <= ejb.DEFAULT_TOLERANCE, (target, got)
        assert not ej.sliced_config(cfg, w).is_heterogeneous           # uniform: a plain nemotron_h slice
    e = ej.ElasticConfig(mem_context=64)
    w = ej.widths_for_budget(cfg, 0.6, target="memory", ecfg=e)
    assert abs(ejb.measured_fraction(cfg, w, "memory", e) - 0.6) <= ejb.DEFAULT_TOLERANCE
    assert ej.widths_for_budget(cfg, 1.0) == ej.Widths()
    with pytest.raises(ValueError, match="smallest uniform slice"):
        ej.widths_for_budget(cfg, 0.01)
    # every budget entry records its measured size; a miss warns
    with pytest.warns(ejb.BudgetSizeWarning):
        table = ejhf.budget_table(cfg, {"100%": ej.Widths(), "50%": ej.Widths(hidden=24)},
                                  fractions={"100%": 1.0, "50%": 0.5})
    rows = {r["name"]: r for r in table["budgets"]}
    assert rows["100%"]["measured"]["params_fraction"] == 1.0
    assert rows["50%"]["measured"]["params_fraction"] == pytest.approx(
        ej.param_count(cfg, ej.Widths(hidden=24)) / ej.param_count(cfg))

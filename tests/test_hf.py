"""HF NemotronH checkpoints in and out (issue 3).

Parity tests (marked `hf`) build tiny random `transformers.NemotronHForCausalLM` models in the test,
save them with `save_pretrained` and compare logits / greedy tokens with `ej.load_hf` + `ej.forward`;
the round-trip tests go the other way (`ej.save_hf` -> `from_pretrained`). The remaining tests use
checkpoints written by `ej.save_hf` / safetensors directly and need no torch.
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import elastic_jax as ej
from conftest import FAST_XLA, assert_trees_equal, max_abs_diff
from elastic_jax import hf as ejhf, hf_cli
from elastic_jax.errors import HFCheckpointError

TOL = 1e-4
SEQ = 21  # > chunk_size (8): several SSD chunks, the last one padded

# Tiny configs (transformers NemotronHConfig kwargs), one per feature named in the issue.
BASE = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
            conv_kernel=4, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=24,
            # the dt clamp written out: transformers 5.0-5.24 clamp at time_step_min, >= 5.25 at
            # time_step_limit (test_dt_clamp_is_time_step_limit), so every 5.x builds the same model
            time_step_min=0.001, time_step_limit=(0.001, float("inf")))
HF_CONFIGS = {
    # Nano v2-like dense hybrid (Mamba / MLP / attention), 4 Mamba groups, dt clamp active
    "dense_hybrid": dict(layers_block_type=["mamba", "mlp", "mamba", "attention", "mlp"],
                         mamba_num_heads=8, n_groups=4, time_step_min=0.01, time_step_limit=(0.01, float("inf"))),
    # Nano v3-like MoE hybrid with shared expert, routed scaling, legacy pattern spelling
    "moe_hybrid": dict(hybrid_override_pattern="MEM*E", routed_scaling_factor=2.5),
    # group-limited routing: 4 routing groups, top-2 groups, top-3 experts, negative correction
    # bias (every in-group score below 0, so the -inf masking of the other groups matters)
    "group_limited": dict(layers_block_type=["mamba", "moe", "attention", "moe"], n_group=4, topk_group=2,
                          num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=1.5),
}
BIAS_MEAN = {"group_limited": -1.5}
MEASURED: dict = {}
# one compiled program per config (widths are traced): ~3x cheaper than op-by-op execution
_forward = jax.jit(ej.forward, static_argnums=2)


def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return torch


def _hf_model(name, seed=0, **overrides):
    """A random NemotronH with O(1) activations, non-trivial norms, D, A, dt bias and router bias."""
    torch = _torch()
    from transformers import NemotronHConfig, NemotronHForCausalLM
    kw = {**BASE, **HF_CONFIGS.get(name, {}), **overrides}
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / p.shape[-1] ** 0.5))
            elif pname.endswith("dt_bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(BIAS_MEAN.get(name, 0.0) + 0.3 * torch.randn(b.shape, generator=g))
    return model


def _tokens(vocab, b=2, l=SEQ, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (b, l)).astype(np.int32)


def _hf_logits(model, tokens):
    torch = _torch()
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _hf_greedy(model, tokens, n):
    torch = _torch()
    from transformers import GenerationConfig
    t = torch.tensor(tokens, dtype=torch.long)
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), generation_config=gc)
    new = out[:, tokens.shape[1]:].numpy()
    # every row stopped early: HF returns fewer columns; pad like a stopped row
    return np.pad(new, ((0, 0), (0, n - new.shape[1])), constant_values=0)


def _ej_model(pattern="M*E-ME", seed=0, **kw):
    """An elastic_jax model with O(1) activations (for save_hf round trips), drawn with numpy
    over `ej.param_shapes` (no per-shape compilation)."""
    base = {k: v for k, v in BASE.items() if not k.startswith("time_step")}   # ours: the defaults
    cfg = ej.NemotronHConfig(**dict(base, hybrid_override_pattern=pattern, **kw))
    rng = np.random.RandomState(seed)

    def leaf(name, shape):
        if name == "A_log":
            return np.log(np.arange(1, shape[0] + 1)) + 0.2 * rng.randn(*shape)
        if name == "dt_bias":
            return rng.uniform(-6.0, -1.0, shape)
        if name == "e_score_correction_bias" or name.startswith("conv"):
            return 0.3 * rng.randn(*shape)
        if len(shape) == 1:   # norms, D
            return 1.0 + 0.2 * rng.randn(*shape)
        return rng.randn(*shape) * (0.6 / shape[-2] ** 0.5)   # [.., in, out]

    def build(tree, name=""):
        if isinstance(tree, dict):
            return {k: build(v, k) for k, v in tree.items()}
        if isinstance(tree, list):
            return [build(v, name) for v in tree]
        return jnp.asarray(leaf(name, tree).astype(np.float32))

    params = build(ej.param_shapes(cfg))
    ej.check_params(params, cfg)
    return cfg, params


# ------------------------------------------------------------------------ parity (transformers)
@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_and_greedy_match_transformers(name, tmp_path):
    model = _hf_model(name)
    model.save_pretrained(tmp_path / "ckpt")
    cfg, params = ej.load_hf(tmp_path / "ckpt")
    assert cfg.pattern == model.config.hybrid_override_pattern
    assert cfg.time_step_limit == tuple(model.config.time_step_limit)
    # config.json as transformers 5 writes it ({"__float__": "Infinity"}) reads with from_hf, from
    # the path and from what json.load returns
    assert ej.NemotronHConfig.from_hf(tmp_path / "ckpt").time_step_limit == cfg.time_step_limit
    raw = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert raw["time_step_limit"][1] == {"__float__": "Infinity"}
    assert ej.NemotronHConfig.from_hf(raw).time_step_limit == cfg.time_step_limit
    tokens = _tokens(cfg.vocab_size)
    ref = _hf_logits(model, tokens)
    got = np.asarray(_forward(params, jnp.asarray(tokens), cfg))
    assert np.abs(ref).max() > 1.0, "test model too close to zero to discriminate"
    diff = max_abs_diff(got, ref)
    MEASURED[name] = diff
    print(f"\n[{name}] max |logits elastic_jax - transformers| = {diff:.3g} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= TOL
    prompt = tokens[:, :9]
    want = _hf_greedy(model, prompt, 6)
    # HF stops a row at eos and pads it with pad_token_id; ej.generate does the same with stop_tokens
    gen = ej.generate(params, jnp.asarray(prompt), cfg, max_new_tokens=6, stop_tokens=(cfg.eos_token_id,))
    np.testing.assert_array_equal(np.asarray(gen.tokens), want)


@pytest.mark.hf
def test_bf16_checkpoint_loads_like_transformers(tmp_path):
    torch = _torch()
    from transformers import NemotronHForCausalLM
    _hf_model("moe_hybrid", seed=3).save_pretrained(tmp_path / "f32")
    # the HF way to a bf16 checkpoint: load in bf16 (router kept f32), save
    NemotronHForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "np") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["backbone.embeddings.weight"] == "BF16"
    assert dtypes["backbone.layers.1.mixer.gate.e_score_correction_bias"] == "F32"
    cfg, params = ej.load_hf(tmp_path / "bf16")
    assert params["embed"].dtype == jnp.bfloat16
    assert params["layers"][1]["mixer"]["e_score_correction_bias"].dtype == jnp.float32
    assert params["layers"][1]["mixer"]["gate"].dtype == jnp.float32
    # the same bf16 weights, computed in f32 on both sides
    ref_model = NemotronHForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    _, params32 = ej.load_hf(tmp_path / "bf16", dtype=jnp.float32)
    tokens = _tokens(cfg.vocab_size, seed=4)
    diff = max_abs_diff(_forward(params32, jnp.asarray(tokens), cfg), _hf_logits(ref_model, tokens))
    MEASURED["bf16_on_disk"] = diff
    assert diff <= TOL


@pytest.mark.hf
def test_sharded_save_pretrained_loads(tmp_path):
    model = _hf_model("moe_hybrid", seed=5)
    model.save_pretrained(tmp_path / "sh", max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "sh"))
    assert ejhf.SAFE_INDEX in files and sum(f.endswith(".safetensors") for f in files) >= 3
    cfg, params = ej.load_hf(tmp_path / "sh")
    tokens = _tokens(cfg.vocab_size, seed=6)
    diff = max_abs_diff(_forward(params, jnp.asarray(tokens), cfg), _hf_logits(model, tokens))
    MEASURED["sharded_save_pretrained"] = diff
    assert diff <= TOL


@pytest.mark.hf
@pytest.mark.parametrize("widths", [
    dict(hidden=24, mamba_heads=2, attn_heads=2, ffn=32, moe_experts=4, moe_ffn=8),
    dict(hidden=32, moe_experts=6, layers=(True, True, True, False, True, True)),
    dict(hidden=24, mamba_heads=2, mamba_channels=4, layers=(True, True, False, True, True, True)),
    None,
], ids=["all_axes", "experts_and_depth", "mamba_channels_and_depth", "full"])
@pytest.mark.slow
def test_save_hf_sliced_submodel_matches_masked_parent_in_transformers(widths, tmp_path):
    torch = _torch()
    from transformers import NemotronHForCausalLM
    cfg, params = _ej_model("M*E-ME", n_group=2, topk_group=1)
    w = None if widths is None else ej.Widths(**widths)
    sub_cfg, sub = ej.slice_params(params, cfg, w)
    out = ej.save_hf(tmp_path / "sub", sub_cfg, sub)
    model = NemotronHForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.hidden_size == sub_cfg.hidden_size
    assert model.config.hybrid_override_pattern == sub_cfg.pattern
    tokens = _tokens(cfg.vocab_size, seed=8)
    masked = np.asarray(_forward(params, jnp.asarray(tokens), cfg, None if w is None else w.resolve(cfg)))
    assert np.abs(masked).max() > 1.0
    diff = max_abs_diff(_hf_logits(model, tokens), masked)
    MEASURED[f"save_hf_roundtrip[{'full' if widths is None else ','.join(widths)}]"] = diff
    assert diff <= TOL


@pytest.mark.hf
def test_model_without_shared_expert_and_without_dt_clamp_exports_exactly(tmp_path):
    """No shared expert (HF always has one: a zero one is written) and time_step_limit (0, inf)
    (HF clamps at time_step_min: the smallest positive f32 is written)."""
    torch = _torch()
    from transformers import NemotronHForCausalLM
    cfg, params = _ej_model("ME*M", moe_shared_expert_intermediate_size=0, time_step_min=0.05)
    assert cfg.time_step_limit == (0.0, float("inf"))
    ej.save_hf(tmp_path / "x", cfg, params)
    model = NemotronHForCausalLM.from_pretrained(tmp_path / "x", dtype=torch.float32).eval()
    tokens = _tokens(cfg.vocab_size, seed=9)
    diff = max_abs_diff(_hf_logits(model, tokens), _forward(params, jnp.asarray(tokens), cfg))
    MEASURED["no_shared_expert_no_clamp"] = diff
    assert diff <= TOL


@pytest.mark.hf
def test_dt_clamp_is_time_step_limit(tmp_path):
    """dt is clamped to the config's time_step_limit (the original Nemotron-H semantics, which
    transformers follows from 5.25 on), not to time_step_min: a model whose time_step_min is far
    above its lower limit loads with the limit and matches transformers."""
    _torch()
    import transformers
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 25):
        pytest.skip(f"transformers {transformers.__version__} clamps dt at time_step_min (changed in 5.25)")
    # dt = softplus(x @ W + dt_bias) with dt_bias ~ N(0, 0.5): mostly below 0.5, where the clamps differ
    model = _hf_model("dense_hybrid", time_step_min=0.5, time_step_max=1.0, time_step_limit=(0.0, float("inf")))
    model.save_pretrained(tmp_path / "ckpt")
    cfg, params = ej.load_hf(tmp_path / "ckpt")
    assert cfg.time_step_limit == (0.0, float("inf")) and cfg.time_step_min == 0.5
    tokens = _tokens(cfg.vocab_size, seed=4)
    ref = _hf_logits(model, tokens)
    assert max_abs_diff(np.asarray(_forward(params, jnp.asarray(tokens), cfg)), ref) <= TOL
    clamped = cfg.replace(time_step_limit=(0.5, float("inf")))   # the old reading differs
    assert max_abs_diff(np.asarray(_forward(params, jnp.asarray(tokens), clamped)), ref) > 100 * TOL


# ------------------------------------------------------------------ load / save without torch
def test_save_load_roundtrip_is_exact_and_hub_layout(tmp_path):
    cfg, params = _ej_model("M*E-ME", n_group=2, topk_group=1)
    ej.save_hf(tmp_path / "rt", cfg, params)
    assert sorted(os.listdir(tmp_path / "rt")) == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "rt" / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "backbone.layers.2.mixer.experts.7.up_proj.weight" in keys
    assert "lm_head.weight" in keys and "backbone.embeddings.weight" in keys
    conf = json.load(open(tmp_path / "rt" / "config.json"))
    assert conf["hybrid_override_pattern"] == "M*E-ME"
    assert conf["layers_block_type"][:3] == ["linear_attention", "full_attention", "moe"]
    cfg2, params2 = ej.load_hf(tmp_path / "rt")
    assert cfg2.replace(time_step_limit=cfg.time_step_limit, time_step_min=cfg.time_step_min,
                        time_step_max=cfg.time_step_max, time_step_floor=cfg.time_step_floor) == cfg
    assert_trees_equal(params, params2)


def test_bf16_save_keeps_router_f32(tmp_path):
    cfg, params = _ej_model("ME")
    ej.save_hf(tmp_path / "b", cfg, params, dtype=jnp.bfloat16)
    cfg2, p2 = ej.load_hf(tmp_path / "b")
    assert p2["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(p2["layers"][1]["mixer"]["gate"]),
                                  np.asarray(params["layers"][1]["mixer"]["gate"]))
    np.testing.assert_array_equal(np.asarray(p2["embed"]), np.asarray(params["embed"].astype(jnp.bfloat16)))


def _write_manual_shards(src_dir, dst_dir, n_shards=3, prefix="model.", stacked=True, extra=None):
    """Re-write a single-file checkpoint as `n_shards` files + index, with the in-library layout
    (`model.` prefix, stacked 3-D experts) and optional extra tensors."""
    os.makedirs(dst_dir)
    with open(os.path.join(src_dir, "config.json")) as f:
        conf = json.load(f)
    tensors = {}
    with safe_open(os.path.join(src_dir, "model.safetensors"), "np") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    out = {}
    experts: dict = {}
    for k, v in tensors.items():
        nk = prefix + k[len("backbone."):] if k.startswith("backbone.") else k
        parts = nk.split(".")
        if stacked and "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            base = ".".join(parts[:i + 1] + [parts[i + 2]])
            experts.setdefault(base, {})[int(parts[i + 1])] = v
            continue
        out[nk] = v
    for base, d in experts.items():
        out[base] = np.stack([d[j] for j in sorted(d)])
    out.update(extra or {})
    keys = sorted(out)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {k: out[k] for k in keys[s::n_shards]}
        save_file(chunk, os.path.join(dst_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    with open(os.path.join(dst_dir, ejhf.SAFE_INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(conf, f)


def test_manual_shards_model_prefix_stacked_experts_and_mtp(tmp_path):
    cfg, params = _ej_model("MEM*E")
    ej.save_hf(tmp_path / "one", cfg, params)
    mtp = {"mtp.layers.0.mixer.q_proj.weight": np.ones((4, 4), np.float32)}
    _write_manual_shards(tmp_path / "one", tmp_path / "three", extra=mtp)
    _, p3 = ej.load_hf(tmp_path / "three")
    assert_trees_equal(params, p3)


def test_truncated_or_corrupt_shard_is_a_clear_error(tmp_path):
    cfg, params = _ej_model("ME")
    ej.save_hf(tmp_path / "one", cfg, params)
    _write_manual_shards(tmp_path / "one", tmp_path / "sh", n_shards=2, prefix="backbone.", stacked=False)
    shard = tmp_path / "sh" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(HFCheckpointError, match=r"model-00002-of-00002.safetensors: truncated or corrupt"):
        ej.load_hf(tmp_path / "sh")
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    with pytest.raises(HFCheckpointError, match="truncated or corrupt"):
        ej.load_hf(tmp_path / "sh")
    shard.unlink()
    with pytest.raises(HFCheckpointError, match="listed in the index but missing"):
        ej.load_hf(tmp_path / "sh")


def test_missing_unexpected_and_misshaped_tensors_reported_together(tmp_path):
    cfg, params = _ej_model("M*E")
    ej.save_hf(tmp_path / "ok", cfg, params)
    src = tmp_path / "ok" / "model.safetensors"
    with safe_open(str(src), "np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    del t["backbone.layers.1.mixer.k_proj.weight"]
    del t["backbone.layers.2.mixer.experts.3.down_proj.weight"]
    t["backbone.layers.1.mixer.bogus.weight"] = np.zeros(3, np.float32)
    t["backbone.layers.0.mixer.up_proj.weight"] = np.zeros((48, 32), np.float32)   # MLP tensor in a Mamba layer
    t["backbone.layers.0.mixer.A_log"] = np.zeros(5, np.float32)
    save_file(t, str(src), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError) as e:
        ej.load_hf(tmp_path / "ok")
    msg = str(e.value)
    assert len(e.value.problems) == 5, msg
    for needle in ("backbone.layers.1.mixer.k_proj.weight: missing",
                   "backbone.layers.2.mixer.experts.3.down_proj.weight: missing",
                   "backbone.layers.1.mixer.bogus.weight: unexpected",
                   "backbone.layers.0.mixer.up_proj.weight: unexpected (a MLP tensor, but layer 0 is Mamba2",
                   "backbone.layers.0.mixer.A_log: shape (5,) != expected (4,)"):
        assert needle in msg, msg


def test_unsupported_config_options_listed_together(tmp_path):
    cfg, params = _ej_model("ME")
    ej.save_hf(tmp_path / "c", cfg, params)
    p = tmp_path / "c" / "config.json"
    conf = json.load(open(p))
    conf.update(tie_word_embeddings=True, moe_latent_size=16, mlp_hidden_act="gelu")
    json.dump(conf, open(p, "w"))
    with pytest.raises(HFCheckpointError) as e:
        ej.load_hf(tmp_path / "c")
    assert [s.split("=")[0] for s in e.value.problems] == ["tie_word_embeddings", "moe_latent_size", "mlp_hidden_act"]


def test_legacy_config_field_names(tmp_path):
    cfg, params = _ej_model("M*-E")
    ej.save_hf(tmp_path / "l", cfg, params)
    p = tmp_path / "l" / "config.json"
    conf = json.load(open(p))
    for new, old in (("n_groups", "mamba_n_groups"), ("conv_kernel", "mamba_d_conv"), ("head_dim", "attention_head_dim"),
                     ("chunk_size", "mamba_chunk_size"), ("n_routed_experts", "num_local_experts"),
                     ("time_step_min", "mamba_dt_min")):
        conf[old] = conf.pop(new)
    del conf["layers_block_type"], conf["time_step_limit"]
    conf["hybrid_override_pattern"] = "M*-E"
    json.dump(conf, open(p, "w"))
    cfg2, params2 = ej.load_hf(tmp_path / "l")
    assert (cfg2.pattern, cfg2.n_groups, cfg2.head_dim, cfg2.n_routed_experts) == ("M*-E", 2, 8, 8)
    assert_trees_equal(params, params2)


def test_heterogeneous_submodel_cannot_be_written_and_nothing_is_left(tmp_path):
    cfg, params = _ej_model("M*E-ME")
    sub_cfg, sub = ej.slice_params(params, cfg, ej.Widths(mamba_heads=(2, 4)))
    assert sub_cfg.is_heterogeneous
    with pytest.raises(HFCheckpointError, match="cannot differ in mamba heads"):   # vLLM: Mamba is global
        ej.save_hf(tmp_path / "het", sub_cfg, sub)
    assert os.listdir(tmp_path) == []


def test_failed_export_writes_nothing_and_keeps_old_output(tmp_path, monkeypatch):
    cfg, params = _ej_model("ME")
    ej.save_hf(tmp_path / "out", cfg, params)
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    import safetensors.numpy as stn
    orig, calls = stn.save_file, []

    def failing(tensors, path, metadata=None):   # the second shard fails (a full disk)
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return orig(tensors, path, metadata=metadata)

    monkeypatch.setattr(stn, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        ej.save_hf(tmp_path / "out", cfg, params, max_shard_size=20_000, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        ej.save_hf(tmp_path / "new", cfg, params, max_shard_size=20_000)
    assert sorted(os.listdir(tmp_path)) == ["out"]   # no partial output, no temporary directory
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    with pytest.raises(FileExistsError):
        ej.save_hf(tmp_path / "out", cfg, params)


def test_save_hf_shards_and_loads_back(tmp_path):
    cfg, params = _ej_model("MEM*E")
    ej.save_hf(tmp_path / "s", cfg, params, max_shard_size="30KB")
    index = json.load(open(tmp_path / "s" / ejhf.SAFE_INDEX))
    assert len(set(index["weight_map"].values())) >= 3
    _, p2 = ej.load_hf(tmp_path / "s")
    assert_trees_equal(params, p2)


_MESH_SCRIPT = """
import sys, numpy as np, jax
from jax.sharding import NamedSharding, PartitionSpec as P
import elastic_jax as ej
from elastic_jax.train.config import MeshConfig
from elastic_jax.train.sharding import make_mesh
assert len(jax.devices()) == 4, jax.devices()
mesh = make_mesh(MeshConfig(fsdp=2, tensor=2))
cfg, p = ej.load_hf(sys.argv[1], mesh=mesh)
_, ref = ej.load_hf(sys.argv[1])
for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(ref)):
    assert isinstance(a.sharding, NamedSharding) and a.sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
q = p["layers"][1]["mixer"]["q_proj"]
assert q.sharding.spec == P("fsdp", "tensor"), q.sharding.spec
assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (16, 16)
print("OK", q.sharding.spec)
"""


def test_load_places_each_tensor_on_its_mesh_sharding(tmp_path):
    """4 forced CPU devices in a subprocess: fsdp=2 x tensor=2 with the training rules table."""
    import subprocess
    import sys
    cfg, params = _ej_model("M*E")
    ej.save_hf(tmp_path / "m", cfg, params)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_XLA}", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(tmp_path / "m")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_cli_slice_and_export(tmp_path, capsys):
    cfg, params = _ej_model("M*E-ME")
    ej.save_hf(tmp_path / "parent", cfg, params)
    parser = argparse.ArgumentParser(prog="elastic-jax")
    hf_cli.add_cli(parser.add_subparsers(dest="cmd", required=True))
    widths = {"hidden": 24, "mamba_heads": 2, "ffn": 32, "moe_experts": 4}
    args = parser.parse_args(["slice", str(tmp_path / "parent"), str(tmp_path / "child"),
                              "--widths", json.dumps(widths), "--dtype", "bfloat16"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    sub_cfg, sub = ej.slice_params(params, cfg, ej.Widths(**widths))
    cfg2, p2 = ej.load_hf(tmp_path / "child")
    assert cfg2.hidden_size == 24 and cfg2.mamba_num_heads == 2 and cfg2.n_routed_experts == 4
    assert p2["embed"].dtype == jnp.bfloat16 and p2["layers"][2]["mixer"]["gate"].dtype == jnp.float32
    assert_trees_equal(jax.tree_util.tree_map(lambda x, y: x.astype(y.dtype), sub, p2), p2)
    args = parser.parse_args(["export", str(tmp_path / "parent"), str(tmp_path / "copy"), "--quiet"])
    assert args.func(args) == 0
    assert_trees_equal(params, ej.load_hf(tmp_path / "copy")[1])
    for bad, match in (('{"hiden": 3}', "unknown axes"), ('{"mamba_heads": 3}', "mamba_heads"), ("[1]", "JSON object")):
        args = parser.parse_args(["slice", str(tmp_path / "parent"), str(tmp_path / "bad"), "--widths", bad])
        with pytest.raises(ValueError, match=match):
            args.func(args)
    args = parser.parse_args(["slice", str(tmp_path / "parent"), str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--widths"):
        args.func(args)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_from_elastic_run_at_trained_budget(tmp_path):
    """An orbax training checkpoint (params + router + configs) in, `--budget` -> the router's
    widths -> sliced HF directory out."""
    from elastic_jax.elastic.config import ElasticConfig
    from elastic_jax.elastic.router import budget_widths, init_router
    from elastic_jax.train.checkpoint import Checkpointer
    cfg, params = _ej_model("M*E-ME")
    ecfg = ElasticConfig(budgets=(1.0, 0.5), hidden_options=(1.0, 0.75), mamba_options=(1.0, 0.5),
                         ffn_options=(1.0, 0.5), moe_expert_options=(1.0, 0.5), moe_ffn_options=(1.0, 0.5),
                         router_dim=16)
    router = init_router(cfg, ecfg, jax.random.PRNGKey(3))
    ck = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    ck.save(7, {"state": {"params": params, "router": router}, "rng": jax.random.PRNGKey(0)},
            {"configs": {"model": cfg.to_dict(), "elastic": ecfg.to_dict()}, "step": 7})
    ck.close()
    parser = argparse.ArgumentParser(prog="elastic-jax")
    hf_cli.add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["slice", str(tmp_path / "run"), str(tmp_path / "b05"), "--budget", "0.5", "--quiet"])
    assert args.func(args) == 0
    widths = budget_widths(router, cfg, ecfg, 0.5)
    sub_cfg, sub = ej.slice_params(params, cfg, widths)
    got_cfg, got = ej.load_hf(tmp_path / "b05")
    assert ej.param_count(got_cfg) == ej.param_count(sub_cfg) < ej.param_count(cfg)
    assert_trees_equal(sub, got)
    args = parser.parse_args(["export", str(tmp_path / "run"), str(tmp_path / "full"), "--quiet"])
    assert args.func(args) == 0
    assert_trees_equal(params, ej.load_hf(tmp_path / "full")[1])
    # the full export records the run's nested family (every trained budget -> the router's widths)
    table = ejhf.read_budget_table(tmp_path / "full", cfg)
    assert list(table) == ["100%", "50%"] and table["50%"]["widths"] == widths
    assert table["50%"]["active_params"] == ej.param_count(cfg, widths, active=True)
    assert not (tmp_path / "b05" / ejhf.BUDGETS_FILE).exists()          # a slice carries no family


# config.json of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 (legacy field names, no time_step_limit)
NANO3_CONFIG = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2,
    "head_dim": 128, "hidden_dropout": 0.0, "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", "initializer_range": 0.02,
    "intermediate_size": 1856, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64, "mamba_hidden_act": "silu",
    "mamba_num_heads": 64, "mamba_proj_bias": False, "mamba_ssm_cache_dtype": "float32",
    "max_position_embeddings": 262144, "mlp_bias": False, "mlp_hidden_act": "relu2", "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "n_groups": 8, "n_routed_experts": 128,
    "n_shared_experts": 1, "norm_eps": 1e-05, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts_per_tok": 6, "num_hidden_layers": 52, "num_key_value_heads": 2, "num_logits_to_keep": 1,
    "pad_token_id": 0, "partial_rotary_factor": 1.0, "rescale_prenorm_residual": True, "residual_in_fp32": False,
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "sliding_window": None, "ssm_state_size": 128,
    "tie_word_embeddings": False, "time_step_floor": 0.0001, "time_step_max": 0.1, "time_step_min": 0.001,
    "topk_group": 1, "torch_dtype": "bfloat16", "use_bias": False, "use_cache": True, "use_conv_bias": True,
    "use_mamba_kernels": True, "vocab_size": 131072,
}


def test_published_nano3_config_reads_to_the_31_6b_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(NANO3_CONFIG))
    cfg, _ = ejhf.read_hf_config(tmp_path)
    assert (cfg.num_hidden_layers, cfg.count("E"), cfg.count("M"), cfg.count("*")) == (52, 23, 23, 6)
    assert (cfg.d_inner, cfg.conv_dim, cfg.time_step_limit) == (4096, 4096 + 2 * 8 * 128, (0.0, float("inf")))
    # model card: 31.6B parameters in total
    assert round(ej.param_count(cfg) / 1e9, 1) == 31.6
    # the HF shapes the loader expects for a routed expert and the fused Mamba in_proj
    d = ejhf.layer_dims(cfg, 1)
    rule = next(r for r in ejhf.RULES if r.hf == "mixer.experts.{j}.up_proj.weight")
    assert rule.shape(d) == (1856, 2688) and rule.key(1, 127) == "backbone.layers.1.mixer.experts.127.up_proj.weight"
    rule = next(r for r in ejhf.RULES if r.hf == "mixer.in_proj.weight")
    assert rule.shape(ejhf.layer_dims(cfg, 0)) == (2 * 4096 + 2 * 8 * 128 + 64, 2688)

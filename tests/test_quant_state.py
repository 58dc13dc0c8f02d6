"""Nested FP8 / NVFP4: fixed quantization state, masked == sliced, ModelOpt export round trip (METHOD §10)."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import quant
from elastic_jax.elastic.slicing import slice_params
from elastic_jax.hf import io as hfio, modelopt

CFG = ej.NemotronHConfig(vocab_size=64, hidden_size=64, hybrid_override_pattern="M*-E", intermediate_size=64,
                         moe_intermediate_size=32, mamba_head_dim=16, mamba_num_heads=4, n_groups=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=4,
                         num_experts_per_tok=2, moe_shared_expert_intermediate_size=32)
# two nested models that each cut every axis at once (channel counts multiples of 16: NVFP4 blocks);
# the second also drops a layer. One compile of the masked model serves both (widths are traced).
WIDTHS = {
    "all": ej.Widths(hidden=32, mamba_heads=2, attn_heads=2, ffn=16, moe_experts=2, moe_ffn=16),
    "all+layers": ej.Widths(hidden=48, mamba_heads=2, attn_heads=2, ffn=32, moe_experts=2, moe_ffn=16,
                            layers=(True, True, False, True)),
}


@pytest.fixture(scope="module")
def model():
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)
    states = {}
    for fmt in quant.FORMATS:
        qs = quant.init_quant_state(params, CFG, fmt)
        states[fmt] = quant.calibrate(params, CFG, qs, [tokens])
    fwd = jax.jit(ej.forward, static_argnums=2)
    return params, tokens, states, fwd


def test_state_layout_and_high_precision_tensors(model):
    params, tokens, states, _ = model
    fp8, nv = states["fp8"], states["nvfp4"]
    assert set(fp8.layers[0]) == {"z_proj", "x_proj", "B_proj", "C_proj", "dt_proj", "out_proj"}
    assert set(fp8.layers[3]) == {"up_proj", "down_proj", "shared_up", "shared_down"}   # router gate excluded
    assert fp8.layers[3]["up_proj"]["scale"].shape == (4,)                           # per expert
    assert nv.layers[3]["up_proj"]["block_scale"].shape == (4, 64 // 16, 32)
    # the in_proj pieces share one per-tensor scale (one HF tensor)
    s = {float(fp8.layers[0][k]["scale"]) for k in ("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj")}
    assert len(s) == 1
    amax = max(float(jnp.abs(params["layers"][0]["mixer"][k]).max()) for k in ("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj"))
    np.testing.assert_allclose(s.pop(), amax / 448.0, rtol=1e-6)
    assert fp8.calibrated and float(fp8.layers[1]["q_proj"]["input_scale"]) > 0
    # block scales are E4M3 values; second-level scale = amax / (6 * 448)
    b = np.asarray(nv.layers[2]["up_proj"]["block_scale"])
    np.testing.assert_array_equal(b, b.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    np.testing.assert_allclose(float(nv.layers[2]["up_proj"]["scale"]),
                               float(jnp.abs(params["layers"][2]["mixer"]["up_proj"]).max()) / (6 * 448), rtol=1e-6)
    # excluded by pattern -> no state, exported in exclude_modules
    spec = quant.QuantSpec("fp8", exclude=("*.mixer.o_proj",), kinds="M*E")
    qs = quant.init_quant_state(params, CFG, spec)
    assert "o_proj" not in qs.layers[1] and qs.layers[2] == {}
    ex = modelopt.exclude_modules(CFG, qs)
    assert "backbone.layers.1.mixer.o_proj" in ex and "backbone.layers.2.mixer.up_proj" in ex and "lm_head" in ex


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.slow
def test_quantized_forward_is_close_but_not_equal(model, fmt):
    params, tokens, states, fwd = model
    ref = fwd(params, tokens, CFG)
    q = fwd(quant.qweight_params(params, states[fmt]), tokens, CFG)
    rel = float(jnp.linalg.norm(q - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < (0.08 if fmt == "fp8" else 0.3), rel


def test_nvfp4_activations_are_simulated_once_calibrated(model):
    """A calibrated NVFP4 state also quantizes every quantized matmul's input (16-element blocks,
    dynamic E4M3 scales, the calibrated FP32 input scale); `activations=False` or an uncalibrated
    state simulates the weights only. A dense layer equals the matmul of the two references."""
    import dataclasses
    from elastic_jax.model.layers import dense
    params, tokens, states, fwd = model
    qs = states["nvfp4"]
    assert qs.calibrated and float(qs.layers[1]["q_proj"]["input_scale"]) > 0
    w4a4 = fwd(quant.qweight_params(params, qs), tokens, CFG)
    w4a16 = fwd(quant.qweight_params(params, quant.QuantState(dataclasses.replace(qs.spec, activations=False), qs.layers)),
                tokens, CFG)
    bare = quant.init_quant_state(params, CFG, "nvfp4")
    np.testing.assert_array_equal(np.asarray(fwd(quant.qweight_params(params, bare), tokens, CFG)), np.asarray(w4a16))
    ref = fwd(params, tokens, CFG)
    err = lambda q: float(jnp.linalg.norm(q - ref) / jnp.linalg.norm(ref))
    assert err(w4a16) < err(w4a4) < 0.5, (err(w4a16), err(w4a4))
    e = qs.layers[1]["q_proj"]
    qw = quant.qweight_params(params, qs)["layers"][1]["mixer"]["q_proj"]
    x = jax.random.normal(jax.random.PRNGKey(5), (3, CFG.hidden_size))
    expect = quant.formats.nvfp4_activation(x, e["input_scale"]) @ quant.quantize_weight(
        params["layers"][1]["mixer"]["q_proj"], e, "nvfp4")
    np.testing.assert_allclose(np.asarray(dense(x, qw)), np.asarray(expect), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.slow
def test_quantized_masked_equals_quantized_sliced(model, fmt):
    params, tokens, states, fwd = model
    qs = states[fmt]
    for axis, w in WIDTHS.items():
        masked = fwd(quant.qweight_params(params, qs), tokens, CFG, w)
        sub_cfg, sub = slice_params(params, CFG, w)
        sub_qs = ej.elastic.slice_quant_state(qs, params, CFG, w)
        sliced = fwd(quant.qweight_params(sub, sub_qs), tokens, sub_cfg)
        np.testing.assert_allclose(np.asarray(masked), np.asarray(sliced), atol=2e-5, err_msg=f"{fmt} {axis}")
        # scales are state: re-deriving them from the sliced tensors would differ
        fresh = quant.init_quant_state(sub, sub_cfg, fmt)
        if axis == "all":
            assert any(float(jnp.max(jnp.abs(fresh.layers[i][k]["scale"] - sub_qs.layers[i][k]["scale"]))) > 0
                       for i in range(len(fresh.layers)) for k in fresh.layers[i])


@pytest.mark.slow
def test_elastic_model_serves_the_quantized_submodels(model):
    """`ElasticModel(quant=)` threads the state through prefill and decode (the budget-control and
    text paths): the masked view's prefill and one forced decode step give the quantized forward's
    logits; the sliced view carries the sliced state (its forward is the masked==sliced test's)."""
    from elastic_jax.infer.budget import ElasticModel, _force, _prefill
    params, tokens, states, fwd = model
    qs, w = states["nvfp4"], WIDTHS["all"]
    ext = jnp.concatenate([tokens, tokens[:, :1]], axis=1)
    expect = np.asarray(fwd(quant.qweight_params(params, qs), ext, CFG, w))
    m = ElasticModel(CFG, params, {"n": w}, mode="masked", quant=qs)
    c, p, ww = m.view("n")
    assert m.quant_view("n") is qs
    logits, cache = _prefill(p, tokens, jnp.ones(tokens.shape, bool), ww, cfg=c, max_len=ext.shape[1], quant=qs)
    np.testing.assert_allclose(np.asarray(logits), expect[:, -2], atol=2e-5)
    step, _ = _force(p, ww, cache, logits, ext[:, -1], jnp.ones((ext.shape[0],), bool), cfg=c, quant=qs)
    np.testing.assert_allclose(np.asarray(step), expect[:, -1], atol=2e-5)
    sliced = ElasticModel(CFG, params, {"n": w}, mode="sliced", quant=qs).quant_view("n")
    for a, b in zip(jax.tree.leaves(sliced.layers), jax.tree.leaves(ej.elastic.slice_quant_state(qs, params, CFG, w).layers)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nvfp4_misaligned_slice_is_a_named_error(model):
    params, _, states, _ = model
    with pytest.raises(quant.QuantizationError, match="16-element"):
        ej.elastic.slice_quant_state(states["nvfp4"], params, CFG, ej.Widths(hidden=40))
    odd = ej.NemotronHConfig(vocab_size=64, hidden_size=40, hybrid_override_pattern="-", intermediate_size=32)
    with pytest.raises(quant.QuantizationError, match="block size"):
        quant.init_quant_state(ej.init_params(odd, jax.random.PRNGKey(0)), odd, "nvfp4")
    quant.init_quant_state(ej.init_params(odd, jax.random.PRNGKey(0)), odd, "fp8")   # fine in fp8


def test_pack_unpack_e2m1_round_trip_and_nibble_order():
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    v = np.concatenate([grid, -grid[1:], [0.0]]).astype(np.float32)      # 16 values
    p = quant.pack_e2m1(v[None])
    assert p.dtype == np.uint8 and p.shape == (1, 8)
    assert p[0, 0] == (0b0001 << 4) | 0b0000            # 0.0 low nibble, 0.5 high nibble
    assert p[0, 3] == (0b0111 << 4) | 0b0110            # 4.0 (code 6) low, 6.0 (code 7) high
    assert p[0, 4] == (0b1010 << 4) | 0b1001            # -0.5 (sign bit | 1) low, -1.0 high
    np.testing.assert_array_equal(quant.unpack_e2m1(p)[0], v)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_export_load_round_trip_same_logits(model, tmp_path, fmt):
    params, tokens, states, fwd = model
    w = WIDTHS["all"]
    sub_cfg, sub = slice_params(params, CFG, w)
    sub_qs = ej.elastic.slice_quant_state(states[fmt], params, CFG, w)
    out = ej.save_hf(tmp_path / fmt, sub_cfg, sub, quant_state=sub_qs)
    raw = json.load(open(os.path.join(out, "config.json")))
    qc = raw["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == fmt.upper()
    # ModelOpt's converted form: exclusions under `ignore` (what vLLM / SGLang read), group size in config_groups
    assert "lm_head" in qc["ignore"] and "exclude_modules" not in qc and "group_size" not in qc
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == (8 if fmt == "fp8" else 4)
    legacy = json.load(open(os.path.join(out, "hf_quant_config.json")))["quantization"]
    assert legacy["quant_algo"] == fmt.upper() and legacy["exclude_modules"] == qc["ignore"]
    assert (legacy.get("group_size") == 16) == (fmt == "nvfp4") and "kv_cache_quant_algo" in legacy
    st = os.path.join(out, "model.safetensors")
    wkey = "backbone.layers.0.mixer.in_proj.weight"
    wt = hfio.read_tensor(st, wkey)
    D = sub_cfg.hidden_size
    if fmt == "fp8":
        assert wt.dtype == ml_dtypes.float8_e4m3fn and wt.shape[1] == D
        assert hfio.read_tensor(st, wkey + "_scale").shape == ()
    else:
        assert wt.dtype == np.uint8 and wt.shape[1] == D // 2
        bs = hfio.read_tensor(st, "backbone.layers.0.mixer.in_proj.weight_scale")
        assert bs.dtype == ml_dtypes.float8_e4m3fn and bs.shape == (wt.shape[0], D // 16)
        assert hfio.read_tensor(st, "backbone.layers.0.mixer.in_proj.weight_scale_2").shape == ()
        assert hfio.read_tensor(st, "backbone.layers.3.mixer.experts.1.up_proj.weight").dtype == np.uint8
    assert hfio.read_tensor(st, "backbone.layers.1.mixer.q_proj.input_scale").dtype == np.float32
    assert hfio.read_tensor(st, "backbone.embeddings.weight").dtype == np.float32   # high precision
    assert hfio.read_tensor(st, "backbone.layers.3.mixer.gate.weight").dtype == np.float32
    cfg2, params2, qs2 = ej.load_hf(out, with_quant=True)
    assert qs2.spec.fmt == fmt
    expect = fwd(quant.qweight_params(sub, sub_qs), tokens, sub_cfg)
    got = fwd(quant.qweight_params(params2, qs2), tokens, cfg2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), atol=2e-5)
    # the dequantized weights are exactly the fake-quantized ones
    wq = quant.quantize_weight(sub["layers"][1]["mixer"]["q_proj"], sub_qs.layers[1]["q_proj"], fmt)
    np.testing.assert_allclose(np.asarray(params2["layers"][1]["mixer"]["q_proj"]), np.asarray(wq), rtol=1e-6)


def test_torch_reads_the_float8_files(model, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    params, tokens, states, _ = model
    out = ej.save_hf(tmp_path / "t", CFG, params, quant_state=states["nvfp4"])
    t = load_file(os.path.join(out, "model.safetensors"))
    assert t["backbone.layers.1.mixer.q_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert t["backbone.layers.1.mixer.q_proj.weight"].dtype == torch.uint8


def test_fp8_export_needs_calibration(model, tmp_path):
    params, _, _, _ = model
    with pytest.raises(quant.QuantizationError, match="calibrate"):
        ej.save_hf(tmp_path / "x", CFG, params, quantization="fp8")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_nvfp4_qad_beats_ptq_at_every_budget(model, tmp_path):
    """QAD (TrainConfig.qad) through the training loop: the fake-quantized (weights and activations)
    elastic student, trained against the frozen model at the sampled budgets, ends closer (KL) to the
    high-precision nested model than NVFP4 PTQ at every budget."""
    from elastic_jax.data import DataConfig, make_dataset
    from elastic_jax.elastic.config import ElasticConfig
    from elastic_jax.elastic.router import budget_widths, init_router
    from elastic_jax.train import OptimConfig, Stage, TrainConfig, train_elastic

    params, tokens, states, fwd = model
    ecfg = ElasticConfig(budgets=(1.0, 0.6), router_dim=8, quantization="nvfp4", hidden_options=(1.0, 0.5),
                         mamba_options=None, attn_options=None, ffn_options=(1.0, 0.5), moe_expert_options=None,
                         moe_ffn_options=None)
    router = init_router(CFG, ecfg, jax.random.PRNGKey(3))
    ds = make_dataset(DataConfig(num_documents=64, synthetic_vocab=64), CFG.vocab_size)
    tc = TrainConfig(stages=(Stage(seq_len=16, batch_size=4, steps=12),), qad="nvfp4", checkpoint_every=12,
                     async_checkpointing=False, vocab_chunk=None, tensorboard=False, plot=False,
                     optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant", freeze_router=True))
    qs = states["nvfp4"]          # calibrated: weights and activations (W4A4) fake-quantized
    res = train_elastic(CFG, ecfg, tc, params, params, ds, tmp_path / "qad", router_params=router,
                        quant_state=qs, progress=False)
    assert res.steps == 12 and all(np.isfinite(h["loss"]) for h in res.history)
    # the scales are non-trainable state saved in the checkpoint, unchanged by training
    from elastic_jax.train.checkpoint import load_run
    _, _, _, _, saved = load_run(tmp_path / "qad", with_quant=True)
    assert saved.spec.fmt == "nvfp4"
    for a, b in zip(jax.tree.leaves(saved.layers), jax.tree.leaves(qs.layers)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    held_out = jax.random.randint(jax.random.PRNGKey(9), (4, 16), 0, 64)

    def kl(student, w):
        lt = jax.nn.log_softmax(fwd(params, held_out, CFG, w))
        ls = jax.nn.log_softmax(fwd(quant.qweight_params(student, qs), held_out, CFG, w))
        return float(jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1)))

    for b in ecfg.budgets:
        w = budget_widths(router, CFG, ecfg, b)
        ptq, qad = kl(params, w), kl(res.params, w)
        print("budget", b, "KL ptq", ptq, "qad", qad)
        assert qad < ptq, (b, ptq, qad)


def test_cli_slice_quantize_writes_a_quarter(model, tmp_path):
    from elastic_jax import cli
    params, tokens, _, fwd = model
    src = ej.save_hf(tmp_path / "src", CFG, params)
    w = '{"hidden": 32, "mamba_heads": 2, "attn_heads": 2, "ffn": 16, "moe_experts": 2, "moe_ffn": 16}'
    sizes = {}
    for q in (None, "nvfp4"):
        out = str(tmp_path / f"out-{q}")
        argv = ["slice", src, out, "--widths", w, "--quiet", "--calib-batches", "1"] + (["--quantize", q] if q else [])
        assert cli.main(argv) == 0
        sizes[q] = hfio.checkpoint_bytes(out)
    cfg2, params2, qs2 = ej.load_hf(str(tmp_path / "out-nvfp4"), with_quant=True)
    assert qs2.spec.fmt == "nvfp4" and cfg2.hidden_size == 32
    assert np.isfinite(np.asarray(fwd(quant.qweight_params(params2, qs2), tokens, cfg2))).all()
    assert sizes["nvfp4"] < 0.6 * sizes[None]       # f32 source: projections 4 bits + scales

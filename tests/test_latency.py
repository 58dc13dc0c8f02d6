"""The roofline latency model (elastic_jax/eval/latency.py) on known configs, and the frontier logic
it feeds (synthetic grid points): issue 15."""
import numpy as np
import pytest

from elastic_jax import NemotronHConfig
from elastic_jax.elastic import param_count
from elastic_jax.eval.latency import (NANO3_30B_A3B, PROFILES, HardwareProfile, decode_cost, forward_cost,
                                      generation_latency, prefill_cost, scale_widths)
from elastic_jax.widths import Widths

# ~1B active: a hybrid with 24 Mamba/MoE/attention layers at hidden 2048
ONE_B = NemotronHConfig(vocab_size=65536, hidden_size=2048, hybrid_override_pattern="MEM*EMEM*EMEM*EMEM*EMEM*E",
                        num_attention_heads=16, num_key_value_heads=4, head_dim=128, mamba_num_heads=32,
                        mamba_head_dim=64, n_groups=8, ssm_state_size=64, n_routed_experts=64,
                        num_experts_per_tok=4, moe_intermediate_size=1024, moe_shared_expert_intermediate_size=2048,
                        max_position_embeddings=8192)


def test_one_b_config_is_about_one_b_active():
    assert 0.7e9 < param_count(ONE_B, active=True) < 1.5e9


def test_reprefill_of_1k_tokens_is_under_5_percent_of_1k_decode_steps_on_h100():
    pre = prefill_cost(ONE_B, None, "h100", batch=1, length=1024)
    dec = decode_cost(ONE_B, None, "h100", batch=1, start=1024, steps=1024)
    assert dec.calls == 1024 and pre.calls == 1
    assert pre.seconds < 0.05 * dec.seconds
    # decode is memory-bound (bytes / bandwidth >> FLOPs / peak for one token); a prefill reads the
    # weights once for all its tokens
    h = PROFILES["h100"]
    one = decode_cost(ONE_B, None, h, batch=1, start=1024, steps=1)
    assert one.bytes / h.hbm_bandwidth > 10 * one.flops / h.peak_flops
    assert pre.bytes < 10 * one.bytes            # every expert once, not 1024 x top-k


def test_moe_bytes_grow_with_distinct_experts_hit():
    # one decode step per batch size: routed experts hit = min(E, batch * top-k)
    b = [decode_cost(ONE_B, None, "h100", batch=n, start=0, steps=1).bytes for n in (1, 2, 4, 16, 64)]
    assert all(x < y for x, y in zip(b, b[1:]))
    per_expert = 2 * 2048 * 1024 * 2 * ONE_B.count("E")                 # up + down, bf16, every MoE layer
    # batch 1 -> 2: 4 more experts per layer (top-4), plus the extra row's KV / state / embedding row
    assert b[1] - b[0] == pytest.approx(4 * per_expert, rel=0.05)
    # saturated: 16 x 4 = 64 = E and 64 x 4 > E hit the same experts; only per-row traffic differs
    per_row = b[1] - b[0] - 4 * per_expert
    assert b[4] - b[3] == pytest.approx(48 * per_row, rel=1e-6)
    # fewer experts in the nested model (moe_experts) -> fewer bytes once saturated
    small = decode_cost(ONE_B, Widths(moe_experts=32), "h100", batch=64, start=0, steps=1).bytes
    assert b[4] - small == pytest.approx(32 * per_expert, rel=0.02)


def test_kv_cache_read_grows_with_context_and_ssm_state_does_not():
    c0 = forward_cost(ONE_B, None, "h100", batch=1, new_tokens=1, context=0).bytes
    c1 = forward_cost(ONE_B, None, "h100", batch=1, new_tokens=1, context=1000).bytes
    kv = 1000 * 2 * 4 * 128 * 2 * ONE_B.count("*")                     # K+V, 4 KV heads x 128, bf16
    assert c1 - c0 == pytest.approx(kv)
    mamba_only = NemotronHConfig(hybrid_override_pattern="MM", vocab_size=64)
    a = forward_cost(mamba_only, None, "h100", batch=1, new_tokens=1, context=0).bytes
    b = forward_cost(mamba_only, None, "h100", batch=1, new_tokens=1, context=5000).bytes
    assert a == b


def test_overhead_dominates_a_tiny_model_and_profiles_validate():
    tiny = NemotronHConfig()
    c = decode_cost(tiny, None, "h100", batch=1, start=0, steps=10)
    assert c.seconds == pytest.approx(10 * PROFILES["h100"].step_overhead_s, rel=0.01)
    with pytest.raises(ValueError, match="unknown hardware profile"):
        decode_cost(tiny, None, "a100x", batch=1, start=0, steps=1)
    with pytest.raises(ValueError, match="hbm_bandwidth"):
        HardwareProfile("bad", 1e12, 0.0, 0.0)


def test_scale_widths_keeps_fractions_on_the_paper_parent():
    tiny = NemotronHConfig(hidden_size=64, mamba_num_heads=8, n_routed_experts=8, moe_intermediate_size=32)
    w = scale_widths(tiny, Widths(hidden=32, mamba_heads=4, moe_experts=4, moe_ffn=16), NANO3_30B_A3B)
    assert (w.hidden, w.mamba_heads, w.moe_experts, w.moe_ffn) == (1344, 32, 64, 928)
    full = scale_widths(tiny, None, NANO3_30B_A3B)
    assert param_count(NANO3_30B_A3B, full, active=True) == param_count(NANO3_30B_A3B, active=True)
    assert 3.0e9 < param_count(NANO3_30B_A3B, active=True) < 3.8e9           # METHOD §2.2: ~3.6B with embeddings


def test_generation_latency_phases_and_reprefill():
    big = scale_widths(ONE_B, None, ONE_B)
    small = Widths(hidden=1024, mamba_heads=16, moe_experts=32)
    same = generation_latency("h100", think_cfg=ONE_B, think_widths=big, batch=1, prompt_len=64,
                              think_steps=1000, answer_steps=10)
    switch = generation_latency("h100", think_cfg=ONE_B, think_widths=small, answer_widths=big, batch=1,
                                prompt_len=64, think_steps=1000, answer_steps=10, reprefill_len=1072)
    assert switch["think_s"] < 0.7 * same["think_s"]
    assert switch["answer_s"] > same["answer_s"]                                  # the re-prefill costs
    assert switch["total_s"] < same["total_s"]                                     # ... but far less than it saves
    assert np.isclose(same["total_s"], same["think_s"] + same["answer_s"])


# ------------------------------------------------------------------------------ frontier logic (synthetic grid)
def _synthetic_grid(acc):
    """Budget-control grid points of a ~1B-active model costed on H100: both sizes write the same
    1000-token trace; `acc[(think, answer)]` is the accuracy of each pair."""
    small = Widths(hidden=1024, mamba_heads=16, attn_heads=8, moe_experts=32, moe_ffn=512)
    w = {"50%": small, "100%": None}
    pts = []
    for (a, b), y in acc.items():
        reprefill = 0 if a == b else 1072
        lat = generation_latency("h100", think_cfg=ONE_B, think_widths=w[a], answer_widths=w[b], prompt_len=64,
                                 think_steps=1001, answer_steps=8, reprefill_len=reprefill)
        pts.append({"scheme": "truncation" if a == b else "budget_control", "think_model": a, "answer_model": b,
                    "thinking_budget": 1024, "label": f"{a}->{b}@1024", "accuracy": y,
                    "latency_model_s": lat["total_s"], "latency_s": 1.0,
                    "flops": lat["think_flops"] + lat["answer_flops"]})
    return pts


def test_small_thinks_large_answers_dominates_when_the_answer_gap_is_large():
    from elastic_jax.eval.report import analyze
    grid = _synthetic_grid({("50%", "50%"): 0.50, ("100%", "100%"): 0.90, ("50%", "100%"): 0.90,
                            ("100%", "50%"): 0.52})
    a = analyze({"grid": grid})
    assert a["x_axis"] == "latency_model_s"
    d = a["budget_control_vs_truncation"]
    assert {"point": "50%->100%@1024", "dominates": ["100%->100%@1024"]} in d["dominating"]
    # the FLOPs axis charges the 1072-token re-prefill like 1072 decoded tokens: no win visible there
    assert a["flops_axis"]["dominating"] == [] and a["flops_axis"]["baseline_dominated_frac"] == 0.0
    by = {p["label"]: p for p in grid}
    assert by["50%->100%@1024"]["flops"] > by["100%->100%@1024"]["flops"]
    assert by["50%->100%@1024"]["latency_model_s"] < 0.8 * by["100%->100%@1024"]["latency_model_s"]


def test_no_win_without_an_answer_gap():
    from elastic_jax.eval.report import analyze
    grid = _synthetic_grid({("50%", "50%"): 0.89, ("100%", "100%"): 0.90, ("50%", "100%"): 0.89,
                            ("100%", "50%"): 0.88})
    d = analyze({"grid": grid})["budget_control_vs_truncation"]
    assert d["dominating"] == [] and d["baseline_dominated_frac"] == 0.0

"""The report's reviewer checks (issue 30): dominance only outside the paired interval, the seen /
unseen split of scoring units, the matched-cost interval corrected for the candidates, and the
latency model's sensitivity table."""
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax.eval.report import _matched, analyze, render_markdown
from elastic_jax.eval.rigor import dominance_with_intervals, latency_sensitivity, seen_unseen

N = 400


def _pt(label, x, acc, rng, scheme="budget_control"):
    correct = (rng.random(N) < acc).astype(float)
    return {"label": label, "scheme": scheme, "latency_model_s": x, "accuracy": float(correct.mean()),
            "correct": list(correct)}


def test_dominance_needs_the_difference_outside_the_interval():
    rng = np.random.default_rng(0)
    base = [_pt("t@8", 1.0, 0.40, rng, "truncation"), _pt("t@16", 2.0, 0.80, rng, "truncation")]
    # a challenger point a hair better than t@16 (the same problems, two answers flipped right)
    tie = dict(base[1], label="c_tie", scheme="budget_control", correct=list(base[1]["correct"]))
    flips = [i for i, c in enumerate(tie["correct"]) if c == 0][:2]
    for i in flips:
        tie["correct"][i] = 1.0
    tie["accuracy"] = float(np.mean(tie["correct"]))
    clear = dict(_pt("c_clear", 0.9, 0.0, rng), correct=list(np.maximum(base[0]["correct"],
                                                                       (rng.random(N) < 0.3).astype(float))))
    clear["accuracy"] = float(np.mean(clear["correct"]))
    d = dominance_with_intervals([tie, clear], base, "latency_model_s")
    assert d["point_estimate_dominated_frac"] == 1.0               # point estimates: both beaten
    assert d["baseline_undominated"] == ["t@16"]                   # +0.005 is inside its interval
    assert [w["point"] for w in d["dominating"]] == ["c_clear"] and d["baseline_dominated_frac"] == 0.5
    (det,) = d["dominating"][0]["details"]
    assert det["point"] == "t@8" and det["ci"][0] > 0
    # no per-problem scores: no dominance can be shown
    bare = [{k: v for k, v in p.items() if k != "correct"} for p in (tie, clear)]
    assert dominance_with_intervals(bare, base, "latency_model_s")["baseline_dominated_frac"] == 0.0


def test_matched_cost_interval_is_wider_for_more_candidates():
    rng = np.random.default_rng(1)
    base = [_pt("t@8", 1.0, 0.5, rng, "truncation")]
    few = [_pt(f"c{i}", 0.5, 0.55, rng) for i in range(2)]
    many = few + [_pt(f"d{i}", 0.5, 0.3, rng) for i in range(30)]
    (r2,), (r32,) = _matched(few, base, "latency_model_s"), _matched(many, base, "latency_model_s")
    assert (r2["k"], r32["k"]) == (2, 32) and r2["best"] == r32["best"]
    assert r32["diff_ci"][1] - r32["diff_ci"][0] > r2["diff_ci"][1] - r2["diff_ci"][0]


def test_seen_unseen_split_and_report_section():
    results = {"eval": {"units_seen": [[True, False], [True, True], [False, False]]},
               "parent": {"name": "parent", "accuracy": 0.5, "params": 10, "active_params": 5, "scores": [0.5, 1.0, 0.0],
                          "parts_gold_trace": [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]},
               "nested": [{"name": "50%", "accuracy": 0.5, "params": 5, "active_params": 3, "scores": [0.5, 0.5, 0.5]}], "baselines": []}
    su = seen_unseen(results)
    p = su[0]
    assert (p["units_seen"], p["units_unseen"]) == (3, 3)
    assert p["gold_seen"] == pytest.approx(1.0) and p["gold_unseen"] == pytest.approx(1 / 3)
    assert p["own_all_seen"] == 1.0 and p["own_none_seen"] == 0.0
    assert "gold_seen" not in su[1] and su[1]["own_all_seen"] == 0.5
    text = render_markdown(results, analyze(results))
    assert "seen and unseen scoring units" in text and "3 occur in some training document and 3 do not" in text
    assert seen_unseen({"nested": []}) is None


def test_latency_sensitivity_table():
    from elastic_jax.eval.latency import LatencyTarget
    cfg = ej.NemotronHConfig(hidden_size=64, hybrid_override_pattern="M*E", vocab_size=64, n_routed_experts=8,
                             num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                             mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=64)
    widths = {"100%": ej.Widths(), "50%": ej.Widths(hidden=32, moe_experts=4, moe_ffn=16, mamba_heads=2)}
    sens = latency_sensitivity(LatencyTarget.make("h100", "nano3_30b_a3b"), cfg, widths, prompt_len=20,
                               think_steps=40, answer_steps=8)
    rows = {(r["batch"], r["bandwidth_frac"], r["overhead_s"]): r for r in sens["rows"]}
    assert len(rows) == 3 * 4 * 3 and all(r["ratio"]["100%"] == 1.0 for r in rows.values())
    # less bandwidth: slower; more overhead: slower and the ratio moves toward 1 (a fixed cost per call)
    assert rows[(1, 0.6, 15e-6)]["full_ms"] > rows[(1, 1.0, 15e-6)]["full_ms"]
    r0, r50 = rows[(1, 1.0, 0.0)]["ratio"]["50%"], rows[(1, 1.0, 50e-6)]["ratio"]["50%"]
    assert r0 < r50 < 1.0
    assert rows[(128, 1.0, 15e-6)]["full_ms"] > rows[(1, 1.0, 15e-6)]["full_ms"]

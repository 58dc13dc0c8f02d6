"""Issue 30: training seeds in the main job, the pre-registered parent (convergence rule, gap vs parent
steps) and their report sections."""
import dataclasses
import os

import numpy as np
import pytest

from elastic_jax.eval.parent_curve import ParentRule, converged_step, gap_row, heldout_loss, parent_curve_markdown
from elastic_jax.eval.report import analyze, render_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ the convergence rule
def test_rule_stops_at_the_first_snapshot_that_improved_less_than_stated():
    rule = ParentRule(window=250, min_improvement=0.02)
    # improvements over 250 steps: 0.30, 0.15, 0.015 (< 0.02: stop at 1000), 0.001
    curve = [(250, 1.50), (500, 1.20), (750, 1.05), (1000, 1.035), (1250, 1.034)]
    r = converged_step(curve, rule, cap=1500)
    assert (r["step"], r["converged"]) == (1000, True) and "+0.0150" in r["reason"]
    # a window of two snapshots compares 500 steps apart: 1.50 -> 1.05 (0.45), 1.20 -> 1.035 (0.165), 1.05 -> 1.034
    r = converged_step(curve, ParentRule(window=500, min_improvement=0.02), cap=1500)
    assert r["step"] == 1250
    # order does not matter; exactly the threshold is not "less than"
    r = converged_step(list(reversed([(100, 2.0), (200, 1.98)])), ParentRule(window=100, min_improvement=0.02), cap=200)
    assert r["step"] == 200 and not r["converged"]


def test_rule_trains_to_the_cap_when_still_improving_and_refuses_bad_input():
    rule = ParentRule(window=250, min_improvement=0.01)
    r = converged_step([(250, 1.0), (500, 0.9), (750, 0.8), (1000, 0.7)], rule, cap=1000)
    assert (r["step"], r["converged"]) == (1000, False) and "not converged" in r["reason"]
    with pytest.raises(ValueError, match="non-finite"):
        converged_step([(250, 1.0), (500, float("nan"))], rule, cap=500)
    with pytest.raises(ValueError, match="empty"):
        converged_step([], rule, cap=500)
    with pytest.raises(ValueError, match="ParentRule.window"):
        ParentRule(window=0)
    with pytest.raises(ValueError, match="ParentRule.min_improvement"):
        ParentRule(min_improvement=-1.0)


@pytest.mark.slow
def test_heldout_loss_is_the_masked_next_token_cross_entropy():
    """Reference: log-softmax in numpy over the model's logits, masked by hand to the positions whose
    next token is in the same (non-padding) document."""
    import jax
    from elastic_jax import NemotronHConfig, init_params
    from elastic_jax.model import forward
    cfg = NemotronHConfig(vocab_size=32, hidden_size=32, hybrid_override_pattern="M*", num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, mamba_num_heads=2, mamba_head_dim=16, n_groups=1,
                          ssm_state_size=8, conv_kernel=4, chunk_size=8, intermediate_size=32,
                          max_position_embeddings=32)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 32, (2, 8)).astype(np.int32)
    seg = np.asarray([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    got = heldout_loss(params, cfg, [{"tokens": tokens, "segment_ids": seg}])
    logits = np.asarray(forward(params, tokens, cfg, segment_ids=seg), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tot, cnt = 0.0, 0
    for b in range(2):
        for i in range(7):
            if seg[b, i] > 0 and seg[b, i + 1] == seg[b, i]:
                tot -= logp[b, i, tokens[b, i + 1]]
                cnt += 1
    assert cnt == 4 + 7
    assert got == pytest.approx(tot / cnt, rel=1e-5)


# ------------------------------------------------------------------------------ seeds in the recipe
def test_seed_k_is_the_documented_separate_run_with_its_seeds_moved():
    """Seed k of a multi-seed run trains exactly what a separate run with `--set seed=K --set
    parent_train.seed=K --set comparison_seed=K` trains (eval/seeds.py's documented option)."""
    from elastic_jax.experiment import apply_overrides, load_experiment
    from elastic_jax.recipes.family import config_dict, seed_offsets
    xp = load_experiment(os.path.join(ROOT, "experiments", "tiny_star_elastic.py"), False)
    assert xp.seeds == 3 and load_experiment(os.path.join(ROOT, "experiments", "tiny_star_elastic.py"), True).seeds == 1
    for k in (1, 2):
        sep = apply_overrides(dataclasses.replace(xp, seeds=1),
                              [f"seed={k}", f"parent_train.seed={k}", f"comparison_seed={k}"])
        assert config_dict(seed_offsets(xp, k)) == config_dict(sep)
    assert config_dict(seed_offsets(xp, 0)) == config_dict(dataclasses.replace(xp, seeds=1))
    with pytest.raises(ValueError, match="seeds"):
        dataclasses.replace(xp, seeds=0)


def test_parent_rule_and_curve_are_checked_against_the_parents_snapshots():
    from elastic_jax.experiment import load_experiment
    xp = load_experiment(os.path.join(ROOT, "experiments", "tiny_star_elastic.py"), False)
    assert xp.parent_rule is not None and xp.parent_train.checkpoint_every == 250
    with pytest.raises(ValueError, match="not parent snapshot steps"):
        dataclasses.replace(xp, parent_curve=(300,))
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(xp, parent_rule=ParentRule(window=100))
    with pytest.raises(ValueError, match="keep_checkpoints"):
        dataclasses.replace(xp, parent_train=dataclasses.replace(xp.parent_train, keep_checkpoints=1))


# ------------------------------------------------------------------------------ the report
def _synthetic_results(seeds=3):
    rng = np.random.default_rng(1)
    row = lambda name, p, n=300: {"name": name, "accuracy": p, "params": 10, "active_params": 5, "exact_trace": 0.95,
                                  "accuracy_gold_trace": p, "scores": list(rng.binomial(1, p, n).astype(float)),
                                  "scores_gold_trace": list(rng.binomial(1, p, n).astype(float))}
    runs = [{"seed": s, "parent": row("parent", 0.6), "nested": [row("100%", 0.58), row("75%", 0.5), row("50%", small)],
             "baselines": [row("75%", 0.45), row("50%", small - 0.05)]}
            for s, small in enumerate((0.30, 0.42, 0.50)[:seeds])]
    res = dict(runs[0], eval={"n_problems": 300}, seed_runs=runs[1:])
    res["parent_rule"] = {"rule": ParentRule().to_dict(), "cap": 1000,
                          "seeds": [{"seed": s, **converged_step([(250, 1.0), (500, 0.9), (750, 0.85), (1000, 0.84)],
                                                                 ParentRule(), 1000)} for s in range(seeds)]}
    res["parent_curve"] = [gap_row(st, rng.binomial(1, 0.5, 300), rng.binomial(1, p, 300),
                                   rng.binomial(1, 0.4, 300), "30 short + 20 long steps")
                           for st, p in ((250, 0.42), (500, 0.6))]
    return res


def test_report_has_the_seeds_section_and_the_verdict_over_seeds():
    res = _synthetic_results()
    a = analyze(res)
    assert a["seeds"]["seeds"] == 3
    v = a["verdict"]
    assert v["seeds"] == 3 and len(v["per_seed"]) == 3
    # the headline verdict's interval is the seeds x problems one: wider than seed 0's problems-only interval
    from elastic_jax.eval.report import verdict
    one = verdict(res)
    assert v["answer_gap_ci"][1] - v["answer_gap_ci"][0] > one["answer_gap_ci"][1] - one["answer_gap_ci"][0]
    text = render_markdown(res, a)
    assert "## Seeds x problems: 3 training seed(s)" in text and "Verdict over seeds" in text
    assert "a property of the models this run trained" in text
    assert "the eval problems alone account for" in text
    # one seed: no seeds section, the single-seed verdict
    single = dict(res, seed_runs=[])
    a1 = analyze(single)
    assert "seeds" not in a1 and "seeds" not in a1["verdict"]
    assert "Seeds x problems" not in render_markdown(single, a1)


def test_report_has_the_parent_rule_and_the_gap_vs_steps_curve():
    res = _synthetic_results()
    text = render_markdown(res, analyze(res))
    assert "## The parent: a pre-registered length and the gap vs parent steps" in text
    # improvements 0.10, 0.05, then 0.01 < 0.02: the rule stops at 1000
    assert "| 0 | 250: 1.0000, 500: 0.9000, 750: 0.8500, 1000: 0.8400 | 1000 |" in text
    assert "| 250 |" in text and "| 500 |" in text and "gap 100% - 50%" in text
    assert parent_curve_markdown({}) == []


# ------------------------------------------------------------------------------ tokens for the whole family
def test_family_token_accounting_on_a_known_case():
    from elastic_jax.eval.family import family_markdown, family_tokens
    res = {"training": {"elastic_tokens": 1000, "parent_tokens": 5000}, "nested_tokens": {"75%": 400.0, "50%": 300.0}}
    a = {"token_efficiency": {"75%": {"multiple": 1.5}, "50%": {"multiple": 2.0}}}
    f = family_tokens(res, a)
    assert [s["tokens"] for s in f["sizes"]] == [[600.0, 600.0], [600.0, 600.0]]
    assert f["separate"] == [1200.0, 1200.0] and f["ratio"] == [1.2, 1.2]
    assert f["separate_with_search"] == [2200.0, 2200.0] and f["ratio_with_search"] == [2.2, 2.2]
    # bounds from the sweep: matched at the smallest multiple / by no swept baseline
    a = {"token_efficiency": {"75%": {"multiple": "<= 0.5"}, "50%": {"multiple": "> 2"}}}
    f = family_tokens(res, a)
    assert f["sizes"][0]["tokens"] == [0.0, 200.0] and f["sizes"][1]["tokens"] == [600.0, float("inf")]
    assert f["separate"] == [600.0, float("inf")] and f["ratio_with_search"][0] == pytest.approx(1.6)
    text = "\n".join(family_markdown(res, {"family_tokens": f}))
    assert "## Tokens to match: the whole family" in text and "1,600 - unbounded" in text
    assert family_tokens({"training": {}}, a) is None and family_markdown(res, {}) == []


def test_report_states_family_tokens_from_a_token_sweep():
    res = _synthetic_results()
    rng = np.random.default_rng(2)
    res["training"] = {"elastic_tokens": 10_000, "parent_tokens": 50_000, "baseline_tokens": {"50%": 3000}}
    res["nested_tokens"] = {"100%": 5000.0, "75%": 3000.0, "50%": 2000.0}
    res["token_sweep"] = [{"name": "50%", "multiple": m, "train_tokens": int(m * 2000), "accuracy": p,
                           "scores": list(rng.binomial(1, p, 300).astype(float))}
                          for m, p in ((0.5, 0.05), (1.0, 0.1), (2.0, 0.9))]
    a = analyze(res)
    f = a["family_tokens"]
    assert f["elastic"] == 10_000 and [s["name"] for s in f["sizes"]] == ["50%"]
    m = a["token_efficiency"]["50%"]["multiple"]
    assert 1.0 < m < 2.0 and f["separate"][0] == pytest.approx(m * 2000)
    assert "## Tokens to match: the whole family" in render_markdown(res, a)


def test_report_has_the_lr_sweep_and_from_scratch_baselines_when_run():
    res = _synthetic_results()
    rng = np.random.default_rng(3)
    row = lambda **kw: dict(kw, scores=list(rng.binomial(1, kw["accuracy"], 300).astype(float)))
    res["token_sweep"] = [row(name="50%", multiple=1.0, train_tokens=2000, accuracy=0.30)]
    res["config"] = {"baseline_train": {"optim": {"lr": 1e-3}}}
    res["lr_sweep"] = [row(kind="lr", name="50%", lr=3e-3, train_tokens=2000, steps=10, accuracy=0.35)]
    # from-scratch snapshots at every quarter: the nested 50% model (accuracy ~0.30 in the synthetic results)
    # is matched between the 2nd (0.10) and the 3rd (0.50) snapshot, so between 45x and 67.5x its 2000 tokens
    res["nested_tokens"] = {"100%": 5000.0, "75%": 3000.0, "50%": 2000.0}
    res["scratch"] = [row(kind="scratch", name="50%", train_tokens=45_000 * q, steps=25 * q, multiple=22.5 * q,
                          accuracy=a) for q, a in ((1, 0.02), (2, 0.10), (3, 0.50), (4, 0.70))]
    res["training"] = {"parent_tokens": 50_000, "elastic_tokens": 10_000}
    a = analyze(res)
    text = render_markdown(res, a)
    assert "### The 1x baselines' learning rate" in text
    assert "| 50% | 0.001 | 0.300" in text and "| 50% | 0.003 |" in text
    assert "### From scratch" in text and "| 50% | 100 | 180,000 | 90.0x |" in text
    m = a["scratch_to_match"]["50%"]["multiple"]
    assert 45.0 < m < 67.5
    f = a["family_tokens"]
    assert f["scratch"][0] == pytest.approx(m * 2000) and f["scratch_ratio"][0] == pytest.approx(m * 2000 / 10_000)
    assert "| every size trained from scratch, at matched accuracy |" in text and "not measured in this run" not in text
    # never matched within the run: a lower bound, reported as unbounded above
    res["scratch"] = [dict(r, accuracy=0.05, scores=[0.0] * 300) for r in res["scratch"]]
    a = analyze(res)
    assert a["scratch_to_match"]["50%"]["multiple"] == "> 90" and a["family_tokens"]["scratch"] == [180_000.0, float("inf")]
    assert "180,000 - unbounded" in render_markdown(res, a)


def test_extra_baseline_rows_evaluate_every_scratch_snapshot(tmp_path, monkeypatch):
    """One row per LR-sweep run and per from-scratch snapshot; a snapshot's tokens are its share of the
    run's steps and its multiple is over the tokens that size saw in the elastic run."""
    import types
    from elastic_jax.recipes import family
    loaded = []
    monkeypatch.setattr("elastic_jax.train.checkpoint.load_run",
                        lambda run_dir, step: loaded.append((os.path.basename(run_dir), step)) or (None, f"p{step}"))
    res = types.SimpleNamespace(params="final", tokens_seen=8000)
    extra = [{"kind": "lr", "name": "50%", "lr": 3e-3, "run": "baseline_50_lr0.003", "cfg": "c", "res": res, "steps": 4},
             {"kind": "scratch", "name": "50%", "run": "scratch_50", "cfg": "c", "res": res, "steps": 8,
              "snapshots": [2, 4, 6, 8]}]
    rows = family.extra_baseline_rows(extra, str(tmp_path), {"50%": 1000.0},
                                      lambda p, n: {"accuracy": 0.5, "params_used": p})
    assert [(r["kind"], r["steps"], r["train_tokens"], r["multiple"], r["params_used"], r["final"]) for r in rows] == [
        ("lr", 4, 8000, 8.0, "final", True), ("scratch", 2, 2000, 2.0, "p2", False),
        ("scratch", 4, 4000, 4.0, "p4", False), ("scratch", 6, 6000, 6.0, "p6", False),
        ("scratch", 8, 8000, 8.0, "final", True)]
    assert loaded == [("scratch_50", 2), ("scratch_50", 4), ("scratch_50", 6)]


@pytest.mark.slow
def test_lr_sweep_and_from_scratch_baselines_train_each_smaller_size(tmp_path):
    """`_extra_baselines` (seed 0's optional token-accounting baselines): per smaller size one KD run at
    each extra learning rate (its logged LR peaks at that rate) and one CE run from random init for
    `scratch_steps` steps, with the elastic run's / the parent's warmup share."""
    import json
    import jax
    from elastic_jax.data import make_dataset
    from elastic_jax.elastic import trained_widths
    from elastic_jax.elastic.router import init_router
    from elastic_jax.experiment import load_experiment
    from elastic_jax.model import init_params
    from elastic_jax.recipes.family import budget_name, extra_baselines
    xp = load_experiment(os.path.join(ROOT, "experiments", "tiny_star_elastic.py"), True)
    st = xp.baseline_train.stages[0]
    base = dataclasses.replace(xp.baseline_train, stages=(dataclasses.replace(st, steps=3),))
    xp = dataclasses.replace(xp, baseline_lrs=(3e-3,), scratch_steps=2, baseline_train=base,
                             data=dataclasses.replace(xp.data, num_documents=256))
    cfg, ecfg = xp.model, xp.elastic
    data = make_dataset(xp.data, cfg.vocab_size)
    teacher = init_params(cfg, jax.random.PRNGKey(0))
    router = init_router(cfg, ecfg, jax.random.PRNGKey(1))
    widths = {budget_name(b): trained_widths(router, cfg, ecfg, b) for b in ecfg.budgets}
    out = extra_baselines(xp, str(tmp_path), data, teacher, widths, base, {n: 1.0 for n in widths}, say=print)
    assert [(e["kind"], e["name"]) for e in out] == [("lr", "75%"), ("scratch", "75%"), ("lr", "50%"), ("scratch", "50%")]
    for e in out:
        assert e["res"].steps == e["steps"] == (3 if e["kind"] == "lr" else 2) and e["res"].tokens_seen > 0
        if e["kind"] == "scratch":      # every quarter of the run kept for the tokens to match (2 steps: each)
            assert e["snapshots"] == [1, 2]
        recs = [json.loads(l) for l in open(os.path.join(str(tmp_path), e["run"], "metrics.jsonl"))]
        if e["kind"] == "lr":      # step 0 of a linear warmup over `warmup_steps` from the swept peak
            assert recs[0]["step"] == 0
            assert recs[0]["lr"] == pytest.approx(3e-3 / max(1, base.optim.warmup_steps), rel=1e-3)
    with pytest.raises(ValueError, match="scratch_steps"):
        dataclasses.replace(xp, scratch_steps=-1)
    with pytest.raises(ValueError, match="baseline_lrs"):
        dataclasses.replace(xp, baseline_lrs=(0.0,))

"""The main job end to end (`experiments/tiny_star_elastic.py --quick`), the report / eval CLI on
its outputs, the Pareto helpers, and the Colab notebook executed headless."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from elastic_jax.eval import dominance, pareto_front
from elastic_jax.eval.report import PLOTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "tiny_star_elastic.py")
NOTEBOOK = os.path.join(ROOT, "experiments", "star_elastic_colab.ipynb")


def test_pareto_front_and_dominance():
    pts = [{"label": "a", "latency_s": 1.0, "accuracy": 0.5}, {"label": "b", "latency_s": 2.0, "accuracy": 0.4},
           {"label": "c", "latency_s": 2.0, "accuracy": 0.9}, {"label": "d", "latency_s": 3.0, "accuracy": 0.9},
           {"label": "e", "latency_s": 0.5, "accuracy": 0.1}]
    assert [pts[i]["label"] for i in pareto_front(pts)] == ["e", "a", "c"]
    base = [{"label": "t1", "latency_s": 1.5, "accuracy": 0.45}, {"label": "t2", "latency_s": 0.4, "accuracy": 0.3}]
    d = dominance(pts, base)
    assert d["dominating"] == [{"point": "a", "dominates": ["t1"]}]
    assert d["baseline_undominated"] == ["t2"] and d["baseline_dominated_frac"] == 0.5


def _point(scheme, a, b, t, acc, lat):
    return {"scheme": scheme, "think_model": a, "answer_model": b, "thinking_budget": t, "accuracy": acc,
            "latency_s": lat, "think_latency_s": lat * 0.8, "answer_latency_s": lat * 0.2, "think_tokens": 10,
            "answer_tokens": 4, "prefill_tokens": 20, "flops": 1e6, "think_flops": 8e5, "answer_flops": 2e5,
            "forced_frac": 0.5, "mean_thinking_tokens": t * 0.9, "label": f"{a}->{b}@{t}"}


def test_write_report_from_results(tmp_path):
    from elastic_jax.eval import write_report
    results = {
        "title": "unit", "parent": {"name": "parent", "params": 100, "active_params": 80, "accuracy": 0.9,
                                    "accuracy_no_thinking": 0.1},
        "nested": [{"name": "100%", "params": 100, "active_params": 80, "accuracy": 0.9},
                   {"name": "50%", "params": 50, "active_params": 40, "accuracy": 0.7}],
        "baselines": [{"name": "50%", "params": 50, "active_params": 40, "accuracy": 0.6, "train_tokens": 1000}],
        "training": {"parent_tokens": 5000, "elastic_tokens": 1000, "baseline_tokens": {"50%": 1000},
                     "histories": {"parent": [{"step": 0, "loss": 3.0, "tokens_seen": 10},
                                              {"step": 1, "loss": 1.0, "tokens_seen": 20}]}},
        "memory": {"nested_checkpoint_bytes": 100, "separate_checkpoint_bytes": 150},
        "grid": [_point("truncation", "100%", "100%", 8, 0.3, 1.0), _point("truncation", "100%", "100%", 16, 0.8, 2.0),
                 _point("budget_control", "50%", "100%", 16, 0.85, 1.5)],
        "grid_budgets": [8, 16]}
    paths = write_report(results, str(tmp_path))
    for f in ("report.md", "results.json") + PLOTS:
        assert os.path.getsize(paths[f]) > 0
    r = json.load(open(paths["results.json"]))
    d = r["analysis"]["budget_control_vs_truncation"]
    assert d["dominating"] == [{"point": "50%->100%@16", "dominates": ["100%->100%@16"]}]
    assert r["analysis"]["tokens"]["ratio_baselines_over_elastic"] == 1.0
    md = open(paths["report.md"]).read()
    assert "50%->100%@16 dominates 100%->100%@16" in md and "+0.100" in md


# the quick main job with its quantization stage on (off in the combine default and its --quick), two training
# seeds and the from-scratch baselines (one seed and none in --quick), so every report section is exercised
QUICK_ARGS = ("--quick", "--set", "quant.enabled=true", "--set", "seeds=2", "--set", "scratch_steps=8")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("star_quick")
    proc = subprocess.run([sys.executable, "-m", "elastic_jax.experiment", "run", EXPERIMENT, *QUICK_ARGS, "--out",
                           str(out)], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(out)


@pytest.mark.slow
def test_quick_main_job_writes_every_report_file(quick_run):
    for f in ("report.md", "results.json", "tokenizer.json") + PLOTS:
        assert os.path.getsize(os.path.join(quick_run, f)) > 0, f
    nested = os.path.join(quick_run, "checkpoints", "nested")
    for f in ("config.json", "model.safetensors", "elastic_budgets.json", os.path.join("elastic", "router.safetensors"),
              "tokenizer.json"):
        assert os.path.isfile(os.path.join(nested, f)), f
    with open(os.path.join(quick_run, "results.json")) as f:
        r = json.load(f)
    assert [n["name"] for n in r["nested"]] == ["100%", "75%", "50%"]
    assert [b["name"] for b in r["baselines"]] == ["75%", "50%"]
    assert all(b["train_tokens"] > 0 for b in r["baselines"]) and r["training"]["elastic_tokens"] > 0
    # nested models never grow with a smaller budget (the quick run's router has had only a few steps to
    # learn, so equal sizes are possible); one nested checkpoint is smaller than the separate ones
    act = [n["active_params"] for n in r["nested"]]
    assert act[0] >= act[1] >= act[2]
    assert r["memory"]["nested_checkpoint_bytes"] < r["memory"]["separate_checkpoint_bytes"]
    schemes = {p["scheme"] for p in r["grid"]}
    assert schemes == {"truncation", "budget_control", "transplant", "parent_truncation"}
    assert len([p for p in r["grid"] if p["scheme"] in ("truncation", "budget_control")]) == 9 * len(r["grid_budgets"])
    assert len([p for p in r["grid"] if p["scheme"] == "parent_truncation"]) == len(r["grid_budgets"])
    primary = r["latency"]["primary"]
    assert primary == "h100@nano3_30b_a3b" and "host" in r["latency"]["targets"]
    for p in r["grid"]:
        assert 0.0 <= p["accuracy"] <= 1.0 and p["latency_s"] > 0 and p["flops"] > 0
        assert p["mean_thinking_tokens"] <= p["thinking_budget"]
        assert len(p["correct"]) == r["eval"]["grid_problems"] and 0.0 <= p["exact_trace"] <= 1.0
        m = p["modeled"][primary]
        assert p["latency_model_s"] == m["total_s"] and m["think_s"] > 0 and m["answer_s"] > 0
        assert set(p["modeled"]) == set(r["latency"]["targets"])
        if p["scheme"] == "budget_control":
            assert 0 < p["reprefill_length"] < r["eval"]["max_trace_tokens"] + 40 and p["reprefill_length"] % 8 == 0
    # accuracy moves with the thinking budget (not a single cliff value) in the truncation series
    series = [{p["accuracy"] for p in r["grid"] if p["scheme"] in ("truncation", "parent_truncation")
               and p["think_model"] == m} for m in ("parent", "100%", "75%", "50%")]
    assert max(len(s) for s in series) >= 2
    # diagnostics: answer accuracy given the gold trace, exact-trace rate, and the verdict
    for row in [r["parent"]] + r["nested"] + r["baselines"]:
        assert 0.0 <= row["accuracy_gold_trace"] <= 1.0 and 0.0 <= row["exact_trace"] <= 1.0
        assert len(row["scores"]) == len(row["scores_gold_trace"]) == r["eval"]["n_problems"]
    v = r["analysis"]["verdict"]
    assert isinstance(v["testable"], bool) and v["reason"] and len(v["answer_gap_ci"]) == 2
    assert r["analysis"]["x_axis"] == "latency_model_s" and r["analysis"]["power"]["rows"]
    assert set(r["analysis"]["nested_minus_baseline"]) == {"75%", "50%"}
    # quantization stage: every nested model under FP8 PTQ / NVFP4 PTQ / NVFP4 QAD, KL, bytes on disk
    q = r["quantization"]
    assert q["precisions"] == ["fp8_ptq", "nvfp4_ptq", "nvfp4_qad"] and q["budgets"] == ["100%", "75%", "50%"]
    assert q["qad_steps"] > 0 and q["activations"]
    for v in q["precisions"]:
        for n in q["budgets"]:
            row = q["accuracy"][v][n]
            assert 0.0 <= row["accuracy"] <= 1.0 and len(row["scores"]) == r["eval"]["n_problems"]
            assert 0.0 < q["kl"][v][n] < 10.0
    sizes = q["checkpoint_bytes"]
    assert sizes["nvfp4_ptq"] == sizes["nvfp4_qad"] < sizes["fp8_ptq"] < sizes["bf16"]
    assert all(d < 1e-3 for d in q["export_roundtrip_max_abs_logit_diff"].values())
    assert os.path.isfile(os.path.join(quick_run, "checkpoints", "nested_nvfp4_qad", "hf_quant_config.json"))
    # issue 30: training seeds 1.. on the same problems, the parent rule per seed, the gap-vs-steps curve
    assert [x["seed"] for x in r["seed_runs"]] == [1]
    for x in r["seed_runs"]:
        assert [n["name"] for n in x["nested"]] == ["100%", "75%", "50%"] and len(x["baselines"]) == 2
        assert len(x["nested"][0]["scores_gold_trace"]) == r["eval"]["n_problems"]
    assert [x["seed"] for x in r["parent_rule"]["seeds"]] == [0, 1]
    assert [c["steps"] for c in r["parent_curve"]] == list(r["config"]["parent_curve"])
    assert r["analysis"]["seeds"]["seeds"] == 2 and r["analysis"]["verdict"]["seeds"] == 2
    # from scratch: each smaller size at every quarter of its 8 steps, and the family's from-scratch route
    assert [(x["name"], x["steps"]) for x in r["scratch"]] == [(n, s) for n in ("75%", "50%") for s in (2, 4, 6, 8)]
    for x in r["scratch"]:
        assert x["train_tokens"] > 0 and x["multiple"] == pytest.approx(x["train_tokens"] / r["nested_tokens"][x["name"]])
        assert len(x["scores"]) == r["eval"]["n_problems"]
    assert set(r["analysis"]["scratch_to_match"]) == {"75%", "50%"} and r["analysis"]["family_tokens"]["scratch"]
    report = open(os.path.join(quick_run, "report.md")).read()
    for needle in ("Seeds x problems: 2 training seed(s)", "The parent: a pre-registered length",
                   "Quantized nested checkpoints", "NVFP4 QAD - PTQ", "independent baseline", "Training tokens", "Checkpoint memory", "Pareto frontier of",
                   "dominate", "Verdict: the task", "Primary axis: modeled latency", "Statistical power",
                   "Against truncation of the parent alone", "### From scratch",
                   "| every size trained from scratch, at matched accuracy |"):
        assert needle in report, needle


@pytest.mark.slow
def test_quick_main_job_resumes_with_its_seed_runs_and_curve(quick_run, tmp_path):
    """A rerun into a copy of the finished run reuses every training run, the seeds' rows and the curve,
    and reports the same seeds x problems numbers."""
    import shutil
    out = str(tmp_path / "again")
    shutil.copytree(quick_run, out, ignore=shutil.ignore_patterns("jax_cache"))
    proc = subprocess.run([sys.executable, "-m", "elastic_jax.experiment", "run", EXPERIMENT, *QUICK_ARGS, "--out", out],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("rows of a finished seed run reused") == 1
    assert "elastified" not in proc.stdout               # the curve's runs were not redone
    with open(os.path.join(quick_run, "results.json")) as f:
        a = json.load(f)
    with open(os.path.join(out, "results.json")) as f:
        b = json.load(f)
    assert a["seed_runs"] == b["seed_runs"] and a["parent_curve"] == b["parent_curve"]
    assert a["analysis"]["seeds"] == b["analysis"]["seeds"]
    assert a["parent"]["scores"] == b["parent"]["scores"] and a["scratch"] == b["scratch"]


@pytest.mark.slow
def test_report_cli_redraws(quick_run, tmp_path):
    from elastic_jax.eval.cli import add_cli
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["report", quick_run, "--out", str(tmp_path)])
    assert args.func(args) == 0
    for f in ("report.md", "results.json") + PLOTS:
        assert os.path.getsize(tmp_path / f) > 0
    from elastic_jax import cli
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2      # one `error:` line, exit status 2
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", quick_run, "--budgets", "0,8"])


@pytest.mark.slow
def test_eval_cli_on_saved_checkpoint(quick_run, tmp_path):
    from elastic_jax.eval.cli import run_eval
    r = run_eval(quick_run, str(tmp_path), thinking_budgets=(4, 40), n_problems=16)
    assert os.path.isfile(tmp_path / "report.md") and len(r["grid"]) == 9 * 2
    with pytest.raises(ValueError, match="not a trained budget"):
        run_eval(quick_run, str(tmp_path), thinking_budgets=(4,), n_problems=4, transplant=[("30%", "100%")])
    with pytest.raises(ValueError, match="holds no nested checkpoint"):
        run_eval(str(tmp_path), None)


@pytest.mark.slow
def test_colab_notebook_runs_headless(quick_run, tmp_path):
    """The notebook the way Colab runs it: a kernel in a fresh environment without elastic_jax,
    outside the source tree; its install cell installs the repository, and every later cell runs in
    the same kernel (no restart)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from conftest import copy_source, fresh_venv
    python = fresh_venv(str(tmp_path / "venv"))
    spec_dir = tmp_path / "jupyter" / "kernels" / "fresh"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(
        {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "fresh",
         "language": "python"}))
    workdir = tmp_path / "colab"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ELASTIC_JAX_REPO=copy_source(str(tmp_path / "repo")),
               STAR_ELASTIC_OUT=quick_run,      # the finished quick run of this module
               STAR_ELASTIC_QUICK="1",          # the smoke setting (the default is the real run)
               STAR_ELASTIC_REUSE="1")          # its results.json: the evaluation is not run twice
    nb = nbformat.read(NOTEBOOK, as_version=4)
    old_path = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(tmp_path / "jupyter")
    try:
        nbclient.NotebookClient(nb, timeout=1200, kernel_name="fresh",
                                resources={"metadata": {"path": str(workdir)}}).execute(env=env)
    finally:
        if old_path is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old_path
    installed = "".join(o.get("text", "") for o in nb.cells[1].get("outputs", []))
    assert str(tmp_path / "venv") in installed, f"the kernel did not import the fresh install: {installed!r}"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    assert any("nested" in o.get("text", "") for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)   # ends with generate on three budget pairs
    assert "think 50% -> answer 100%" in text and "think 100% -> answer 100%" in text and "tok/s" in text
    _check_generate_cell_scores_the_trained_task(text, quick_run)


def _check_generate_cell_scores_the_trained_task(text, run):
    """The last cell prompts the run's own task (its eval levels) and scores the answers with it:
    per budget pair, its accuracy equals the report's on the same problems (greedy, same models;
    a few ties may break differently) and the report's overall one within sampling noise."""
    import math
    import re
    from elastic_jax.experiment import load_experiment
    ev = load_experiment(EXPERIMENT, quick=True).eval
    assert f"task levels {ev.levels[0]}-{ev.levels[-1]}," in text
    rows = re.findall(r"accuracy ([0-9.]+) on (\d+) problems; report: ([0-9.]+) on the same problems, "
                      r"([0-9.]+) on its (\d+)", text)
    assert len(rows) == 3, text[-3000:]
    for acc, n, same, overall, _ in rows:
        acc, n, same, overall = float(acc), int(n), float(same), float(overall)
        assert abs(acc - same) <= 0.1, (acc, same)
        assert abs(acc - overall) <= 1.5 / math.sqrt(n) + 2 / n, (acc, overall, n)


def test_grid_intervals_are_keyed_by_scheme_as_well_as_label():
    """Budget control and transplant share labels (`50%->100%@8`): each row's interval is its own
    (it contains its own accuracy)."""
    from elastic_jax.eval.report import analyze, point_key
    rng = np.random.RandomState(0)
    grid = []
    for scheme, acc in (("budget_control", 0.8), ("transplant", 0.2)):
        p = _point(scheme, "50%", "100%", 8, acc, 1.0)
        p["correct"] = (rng.rand(400) < acc).astype(float).tolist()
        p["accuracy"] = float(np.mean(p["correct"]))
        grid.append(p)
    ci = analyze({"grid": grid})["point_ci"]
    assert len(ci) == 2
    for p in grid:
        lo, hi = ci[point_key(p)]
        assert lo <= p["accuracy"] <= hi, (p["scheme"], p["accuracy"], lo, hi)

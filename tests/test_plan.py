"""The paper's runs as experiment files and `elastic-jax plan` (issue 12): published sizes from the
cost model, the curriculum as published, shrunken versions of both files planned and compiled for
a TPU slice (ahead of time, when libtpu is installed) and on 8 host CPU devices, the JSON schema,
an oversized plan naming its dominant term, the remat x micro-batch search."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from elastic_jax import aot, plan
from elastic_jax.experiment import load_experiment
from elastic_jax.pod import DataMix, PodExperiment, Target, mix_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XP30 = os.path.join(ROOT, "experiments", "nemotron3_nano_30b_a3b.py")
XP12 = os.path.join(ROOT, "experiments", "nemotron_nano_v2_12b.py")
SHRUNK = os.path.join(ROOT, "tests", "scripts", "shrunk_pod_experiment.py")
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SCHEMA = {"params_total": int, "params_active": int, "per_device_bytes": int, "hbm_bytes": int, "fits": (bool, type(None)),
          "flops_per_step": float, "step_seconds_estimate": float, "compile_seconds": float, "budgets": list}
BUDGET_SCHEMA = {"budget": float, "params_total": int, "params_active": int, "params_active_with_embeddings": int,
                 "inference_memory": dict}


def check_schema(res: dict):
    res = json.loads(json.dumps(res, default=str))          # what --json prints
    for key, typ in SCHEMA.items():
        assert key in res, key
        assert isinstance(res[key], typ) or (typ is float and isinstance(res[key], int)), (key, res[key])
    assert len(res["budgets"]) >= 2
    for b in res["budgets"]:
        for key, typ in BUDGET_SCHEMA.items():
            assert isinstance(b[key], typ), (key, b[key])
        assert set(b["inference_memory"]) >= {"weights_bytes", "kv_cache_bytes", "ssm_state_bytes", "total_bytes"}
    for st in res["stages"]:
        assert st["stage_chip_hours"] > 0 and st["tokens_per_second"] > 0 and 0 < st["mfu_estimate"] <= 1
        assert st["sharding"] and "embed" in st["sharding"]
    budgets = sorted(b["params_total"] for b in res["budgets"])
    assert budgets == sorted(set(budgets)), "nested budgets must differ in size"


@pytest.fixture(scope="module")
def experiments():
    return {"nano3": load_experiment(XP30), "nano2": load_experiment(XP12)}


@pytest.fixture(scope="module")
def counts(experiments):
    out = {}
    for name, xp in experiments.items():
        out[name] = {"parent": plan.model_counts(xp.model),
                     "budgets": {b: plan.model_counts(xp.model, w) for b, w, _ in plan.nominal_widths(xp.model, xp.elastic)}}
    return out


def test_experiment_files_build_their_configs(experiments):
    for xp in experiments.values():
        assert isinstance(xp, PodExperiment)
        assert [t.platform for t in xp.targets] == ["tpu", "gpu", "gpu"]
        assert xp.train.policy.scan_layers and xp.data.reasoning_ratio == 0.7
        for t in xp.targets:            # every stage's batch splits into whole sequences per batch shard
            m = t.microbatches or xp.train.microbatches
            n = t.mesh.data * t.mesh.fsdp * t.mesh.expert
            assert all(s.batch_size % m == 0 and (s.batch_size // m) % n == 0 for s in xp.train.stages), t
    n3, n2 = experiments["nano3"], experiments["nano2"]
    assert n3.model.num_hidden_layers == 52 and n2.model.num_hidden_layers == 62
    assert (n2.model.count("M"), n2.model.count("-"), n2.model.count("*")) == (28, 28, 6)
    # the curricula as published (METHOD §7)
    s1, s2 = n2.train.stages
    assert (s1.seq_len, s1.tokens, s1.budget_probs, s2.seq_len, s2.tokens, s2.budget_probs) == \
        (8192, 65e9, None, 49152, 45e9, (0.5, 0.3, 0.2))
    assert (n2.train.optim.lr, n2.train.optim.router_lr) == (9e-5, 1e-2)
    s1, s2 = n3.train.stages
    assert (s1.seq_len, s1.tokens, s1.budget_probs, s2.seq_len, s2.tokens, s2.budget_probs) == \
        (8192, 100e9, None, 49152, 60e9, (0.5, 0.3, 0.2))
    assert (n3.train.optim.lr, n3.train.optim.router_lr) == (1e-4, 1e-2)


def test_parent_counts_equal_published_sizes_within_one_percent(counts):
    near = lambda x, ref, tol=0.01: abs(x / ref - 1) <= tol
    p = counts["nano2"]["parent"]
    assert near(p["params_total"], 12.3e9)
    p = counts["nano3"]["parent"]
    assert near(p["params_total"], 31.6e9) and near(p["params_active"], 3.2e9, 0.015)
    assert near(p["params_active_with_embeddings"], 3.6e9)


def test_nested_budgets_land_near_the_papers(counts):
    near = lambda x, ref: abs(x / ref - 1) <= 0.05
    b = counts["nano2"]["budgets"]
    assert near(b[0.75]["params_total"], 9e9) and near(b[0.5]["params_total"], 6e9), b
    b = counts["nano3"]["budgets"]
    assert near(b[0.78]["params_total"], 23e9) and near(b[0.78]["params_active_with_embeddings"], 2.8e9), b
    assert near(b[0.56]["params_total"], 12e9) and near(b[0.56]["params_active_with_embeddings"], 2.0e9), b


def test_mix_documents_keeps_the_token_ratio():
    rng = np.random.default_rng(0)
    r = [np.zeros(rng.integers(50, 150), np.int32) for _ in range(300)]
    p = [np.ones(rng.integers(50, 150), np.int32) for _ in range(600)]
    mixed = mix_documents(r, p, 0.7, seed=1)
    tok_r = sum(d.size for d in mixed if d.size and d[0] == 0)
    tok_p = sum(d.size for d in mixed if d.size and d[0] == 1)
    assert abs(tok_r / (tok_r + tok_p) - 0.7) < 0.02
    assert sum(d.size for d in mix_documents(r, [], 0.7)) == sum(d.size for d in r)
    with pytest.raises(ValueError, match="reasoning_ratio"):
        DataMix(reasoning=None, pretraining=None, reasoning_ratio=1.5)


def test_topology_flag_uses_the_experiments_own_target_for_that_slice(experiments):
    """`--topology` naming a slice the experiment has a target for plans with that target's mesh and
    micro-batches (the 12B's tensor axis); another slice gets all chips on fsdp."""
    import argparse
    cli = plan.add_cli(argparse.ArgumentParser().add_subparsers())
    own = plan._target_from_args(experiments["nano2"], cli.parse_args(["x.py", "--topology", "v5p:4x4x8"]))
    assert (own.mesh.fsdp, own.mesh.tensor, own.microbatches) == (32, 4, 16)
    other = plan._target_from_args(experiments["nano2"], cli.parse_args(["x.py", "--topology", "v5p:4x4x4"]))
    assert other.mesh is None and other.topology == "v5p:4x4x4"
    meshed = plan._target_from_args(experiments["nano2"], cli.parse_args(["x.py", "--topology", "v5p:4x4x8",
                                                                          "--mesh", "fsdp=128"]))
    assert (meshed.mesh.fsdp, meshed.mesh.tensor) == (128, 1)


def test_search_keeps_the_cheapest_plan_that_fits(monkeypatch, experiments):
    """The search tries every remat policy x micro-batch count and keeps the fastest that fits
    (the compile is replaced by a table here; the compiled path is the tests below)."""
    xp = experiments["nano3"]
    stage = xp.stage("short")
    target = Target("t", "tpu", topology="v5p:4x4x8", microbatches=4)
    monkeypatch.setattr(plan, "target_devices", lambda t: [None] * 128)
    cost = {"none": 1.0, "minimal": 1.1, "save_dots": 1.05, "full": 1.3}

    def fake(xp_, t, st, *, microbatches, remat):
        fits = remat in ("minimal", "full") and microbatches >= 8
        return {"remat": remat, "microbatches": microbatches, "fits": fits, "per_device_bytes": 1,
                "step_seconds_estimate": cost[remat] * (1 + 0.01 * microbatches), "compile_seconds": 0.0,
                "dominant_term": None if fits else "temporaries"}
    monkeypatch.setattr(plan, "plan_stage", fake)
    res = plan.search_stage(xp, target, stage)
    assert {(r["remat"], r["microbatches"]) for r in res["tried"]} == \
        {(r, m) for r in plan.REMAT_SEARCH for m in (4, 6, 12)}   # 384, 256, 128 sequences on 128 chips
    assert (res["best"]["remat"], res["best"]["microbatches"]) == ("minimal", 12)


_TPU = aot.tpu_unavailable_reason()
needs_tpu = pytest.mark.skipif(_TPU is not None, reason=f"TPU AOT compiles unavailable: {_TPU}")


@pytest.fixture(scope="module")
def cpu_job(tmp_path_factory):
    """The 8-CPU-device job (tests/scripts/plan_cpu_check.py: a CPU compile, a GPU lowering, the pod
    runner), started in the background so that it overlaps the in-process TPU compiles."""
    tmp = tmp_path_factory.mktemp("plan")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_XLA}", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "scripts", "plan_cpu_check.py"),
                             str(tmp / "plans.json"), str(tmp)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc, tmp / "plans.json"
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def cpu_plans(cpu_job):
    proc, out = cpu_job
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.read_text())


def _shrunk(source: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHRUNK_SOURCE", source)
        mp.setenv("SHRUNK_TOPOLOGY", "v5e:2x2")
        return load_experiment(SHRUNK)


@pytest.fixture(scope="module")
def tpu_plans(cpu_job):
    """Two TPU compiles (v5e:2x2, ahead of time) serving every TPU assertion: the shrunken 30B-A3B's
    long stage, and the shrunken 12B's short stage judged against a deliberately tiny HBM (the
    oversized plan). Requests `cpu_job` so that the CPU job runs beside them."""
    xp30, xp12 = _shrunk(XP30), _shrunk(XP12)
    tiny_hbm = dataclasses.replace(xp12.targets[0], hbm_gib=0.0005)
    return {"nano3": plan.plan(xp30, xp30.targets[0], stages=["long"]),
            "nano2_oversized": plan.plan(xp12, tiny_hbm, stages=["short"])}


@needs_tpu
@pytest.mark.slow   # pod-target compiles in an 8-device subprocess
@pytest.mark.parametrize("name", ["nano3", "nano2_oversized"])
def test_shrunken_experiment_plans_and_compiles_for_a_tpu_slice(tpu_plans, name):
    res = tpu_plans[name]
    check_schema(res)
    st = res["stages"][0]
    assert st["compiled"] and st["devices"] == 4 and st["chip"]["name"] == "TPU v5e"
    assert st["memory"]["temp_bytes"] > 0
    assert st["mesh"]["fsdp"] == 4 and "fsdp" in st["sharding"]["embed"]
    if name == "nano3":
        assert res["fits"] and res["per_device_bytes"] < res["hbm_bytes"]


@needs_tpu
@pytest.mark.slow   # pod-target compiles in an 8-device subprocess
def test_oversized_plan_reports_fits_false_and_its_dominant_term(tpu_plans):
    res = tpu_plans["nano2_oversized"]
    st = res["stages"][0]
    assert res["fits"] is False and st["fits"] is False
    terms = st["memory"]["terms"]
    assert st["dominant_term"] == max(terms, key=terms.get) and st["advice"]
    assert st["per_device_bytes"] > st["hbm_bytes"]
    assert f"dominant term {st['dominant_term']}" in plan.format_report(res)


@pytest.mark.slow   # pod-target compiles in an 8-device subprocess
def test_shrunken_experiments_plan_on_8_cpu_devices(cpu_plans):
    """The 30B-A3B file compiled by XLA:CPU, the 12B one lowered and sharded (the GPU path), both
    over 8 host devices."""
    for name in ("nano3_cpu", "nano2_gpu"):
        assert cpu_plans[name]["rc"] == 0
        res = cpu_plans[name]["plan"]
        check_schema(res)
        for st in res["stages"]:
            assert st["devices"] == 8 and st["mesh"]["fsdp"] == 8 and "fsdp" in st["sharding"]["embed"]
    st = cpu_plans["nano3_cpu"]["plan"]["stages"][0]
    assert st["compiled"] and st["memory"]["temp_bytes"] > 0 and cpu_plans["nano3_cpu"]["plan"]["fits"]


@pytest.mark.slow   # pod-target compiles in an 8-device subprocess
def test_gpu_plan_lowers_and_says_it_did_not_compile(cpu_plans):
    res = cpu_plans["nano2_gpu"]["plan"]
    assert [st["stage"] for st in res["stages"]] == ["short", "long"]
    for st in res["stages"]:
        assert st["compiled"] is False and "lowered and sharded only" in st["note"]
        assert st["chip"]["name"] == "NVIDIA H200 SXM" and st["memory"]["temp_bytes"] is None
        assert st["fits"] is None and st["fits_arguments"] is True          # temporaries unknown: fits unknown
        assert st["target"] == "h100x8"                                      # the experiment's own GPU target
        assert st["step_seconds_lower_bound"] <= st["step_seconds_estimate"] and st["assumed_mfu"] == 0.4
    assert res["fits"] is None
    report = plan.format_report(res)
    assert "fits: unknown" in report and "roofline lower bound" in report and "assumed MFU of 0.40" in report


@pytest.mark.slow   # pod-target compiles in an 8-device subprocess
def test_pod_runner_trains_from_an_hf_parent_and_resumes(cpu_plans):
    """`elastic-jax run` of a PodExperiment on the job's 8 devices (run in the CPU job): the parent
    read from its HF folder onto the mesh, importance + permutation, the data mix, training, then
    a rerun resumes."""
    r = cpu_plans["pod_runner"]
    first, again = r["first"], r["again"]
    assert r["devices"] == 8
    assert first["steps"] == 2 and first["target"] == "here" and first["resumed_from"] is None
    assert again["resumed_from"] == 2


def test_weight_gathers_are_charged_per_micro_batch():
    """More micro-batches gather the fsdp-sharded weights more often: the interconnect bytes grow
    linearly; no fsdp axis, no gathers."""
    xp = load_experiment(XP30)
    g = lambda m, f=128: plan.step_gather_bytes(xp.model, microbatches=m, fsdp=f, remat="full")
    assert g(256) == 64 * g(4) > 0 and g(4, f=1) == 0.0
    total = plan.model_counts(xp.model)["params_total"]
    assert g(1) == pytest.approx(total * 127 / 128 * (4 * 2 + 4))      # 4 bf16 passes + f32 grads


def test_activation_advice_offers_only_levers_not_yet_pulled():
    full_one_seq = {"mesh": {"data": 1, "fsdp": 128, "tensor": 1, "expert": 1}, "micro_batch": 128, "remat": "full"}
    advice = plan._advice("temporaries", full_one_seq)
    assert "--remat" not in advice and "--microbatches" not in advice and "tensor" in advice
    roomy = dict(full_one_seq, micro_batch=512, remat="none")
    advice = plan._advice("temporaries", roomy)
    assert "--remat full" in advice and "4 sequences per chip" in advice
    assert "fsdp axis" in plan._advice("params", full_one_seq)

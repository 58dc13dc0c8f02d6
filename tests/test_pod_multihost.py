"""The pod path on a simulated pod: the tiny PodExperiment of tests/scripts/tiny_pod_experiment.py
(an HF parent written here, two curriculum stages, a data mix) run by `elastic-jax run` as
1 process x 8 CPU devices and as 2 processes x 4 CPU devices (jax.distributed on localhost, gloo):
equal loss curves and equal final parameters (f32, 1e-5 relative: only the order of
cross-process reductions differs). The 2-process run gets a SIGTERM on every process in its second
stage: both exit 0 with one "preempted" line after saving; the rerun of the same commands finishes
it. The result is then sliced and exported on one CPU device."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_XLA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "tests", "scripts", "tiny_pod_experiment.py")
CLI = [sys.executable, "-m", "elastic_jax.cli"]


def _env(cache, parent, devices, steps="3,8"):
    return dict(os.environ, XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PLATFORMS="cpu", TINY_POD_PARENT=str(parent), TINY_POD_STEPS=steps)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def _two_processes(out, env):
    port = _free_port()
    return [subprocess.Popen(CLI + ["run", EXP, "--out", str(out), "--coordinator", f"127.0.0.1:{port}",
                                    "--num-processes", "2", "--process-id", str(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def _params(run_dir):
    """The final params of a run, restored on this process's one CPU device (whatever mesh)."""
    import jax
    from elastic_jax.train.checkpoint import load_run
    cfg, params, router, ecfg = load_run(run_dir)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    import jax
    import elastic_jax as ej
    from elastic_jax.hf import save_hf
    sys.path.insert(0, os.path.dirname(EXP))
    import tiny_pod_experiment
    d = tmp_path_factory.mktemp("pod") / "parent"
    save_hf(d, tiny_pod_experiment.MODEL, ej.init_params(tiny_pod_experiment.MODEL, jax.random.PRNGKey(0)))
    return d


@pytest.mark.slow
def test_two_hosts_equal_one_host_and_survive_sigterm(tmp_path, parent):
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.Popen(CLI + ["run", EXP, "--out", str(one)], env=_env(cache, parent, 8),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = _two_processes(two, _env(cache, parent, 4))
    # SIGTERM to every process once the second stage has started
    batches = two / "elastic" / "batches.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if batches.exists() and any(r["stage"] == "long" for r in _jsonl(batches)):
            break
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    for o in outs:
        line = [l for l in o.splitlines() if l.startswith("elastic-jax run:")]
        assert len(line) == 1 and "preempted: saved a checkpoint at step" in line[0], o[-2000:]
    saved = int(line[0].split("at step ")[1].split()[0])
    assert 3 < saved < 11, saved                      # inside the second stage (steps 3..10)
    assert str(saved) in os.listdir(two / "elastic" / "checkpoints")
    assert not (two / "result.json").exists()

    procs = _two_processes(two, _env(cache, parent, 4))          # the same commands again: resume
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    out1 = single.communicate(timeout=900)[0]
    assert single.returncode == 0, out1[-3000:]
    res = json.loads((two / "result.json").read_text())
    assert res["resumed_from"] == saved and res["steps"] == 11 and res["processes"] == 2

    # equal loss curves (every step logged; the resumed run appends) and equal batches
    la = {r["step"]: r["loss"] for r in _jsonl(one / "elastic" / "metrics.jsonl")}
    lb = {r["step"]: r["loss"] for r in _jsonl(two / "elastic" / "metrics.jsonl")}
    assert sorted(la) == sorted(lb) == list(range(11))
    np.testing.assert_allclose([lb[s] for s in range(11)], [la[s] for s in range(11)], rtol=1e-5)
    assert _jsonl(one / "elastic" / "batches.jsonl")[0]["stage"] == "short"
    # equal final parameters, restored on this one CPU device from 8-device checkpoints
    pa, pb = _params(one / "elastic"), _params(two / "elastic")
    assert pa.keys() == pb.keys()
    for k in pa:   # per tensor, relative L2 (Adam divides near-zero gradients by their own size, so a
        #            single element may differ by more: measured max 1e-4 of one 2048-element tensor)
        assert pa[k].dtype == np.float32, k                   # f32 master weights
        rel = np.linalg.norm(pb[k] - pa[k]) / max(np.linalg.norm(pa[k]), 1e-30)
        assert rel < 1e-5, (k, rel)

    # after the run, on one CPU device: slice a trained budget and export the full model
    env1 = dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu")
    for args in (["slice", str(two / "elastic"), str(tmp_path / "half"), "--budget", "0.5"],
                 ["export", str(two / "elastic"), str(tmp_path / "full"), "--dtype", "float32"]):
        r = subprocess.run(CLI + args + ["--quiet"], env=env1, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from elastic_jax.hf import load_hf
    _, exported = load_hf(tmp_path / "full")
    np.testing.assert_array_equal(np.asarray(exported["embed"], np.float32), pb["['embed']"])
    assert (tmp_path / "half" / "config.json").exists()

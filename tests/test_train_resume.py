"""SIGKILL mid-run (while a checkpoint is being committed) + rerun of the same command (here on a
2-device mesh: restore onto a different mesh) == one uninterrupted run: same final params, same
sequence of batches; the interrupted checkpoint is never taken as the latest. Runs `elastic-jax run experiments/distill_tiny.py --quick` in subprocesses."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_XLA

# full suite only, not the fast tier (-m "not slow"): SIGKILL / resume of whole CLI training runs in subprocesses
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "run_killable.py")
EXP = os.path.join(ROOT, "experiments", "distill_tiny.py")


def _env(cache, **extra):
    env = dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    env.update(extra)
    return env


def _cmd(out):
    return [sys.executable, SCRIPT, "run", EXP, "--quick", "--out", str(out)]


def _final_state(run_dir):
    import jax
    from elastic_jax.train import Checkpointer
    ck = Checkpointer(os.path.join(run_dir, "elastic", "checkpoints"))
    step = ck.latest_step()
    tree = ck.restore_local(step)           # whatever mesh wrote it
    ck.close()
    return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def test_sigkill_mid_save_then_resume_equals_uninterrupted(tmp_path):
    cache = tmp_path / "jax_cache"
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    # the uninterrupted reference and the run killed while committing step 4, side by side
    ref = subprocess.Popen(_cmd(ref_dir), env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = subprocess.run(_cmd(run_dir), env=_env(cache, KILL_AT_COMMIT_STEP="4"), capture_output=True, text=True,
                            timeout=900)
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    ckpt_dir = run_dir / "elastic" / "checkpoints"
    names = sorted(os.listdir(ckpt_dir))
    assert "2" in names and "4" not in names, names
    assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names   # the interrupted save
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(str(ckpt_dir))
    assert mngr.latest_step() == 2
    mngr.close()

    # resume on a different mesh: 2 devices, data-parallel (the mesh may change between runs)
    resumed = subprocess.run(_cmd(run_dir) + ["--set", "train.mesh.data=2"],
                             env=_env(cache, XLA_FLAGS=FAST_XLA + " --xla_force_host_platform_device_count=2"),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out[-3000:]

    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 8
    step_a, a = _final_state(ref_dir)
    step_b, b = _final_state(run_dir)
    assert step_a == step_b == 8 and a.keys() == b.keys()
    for k in a:   # 2-device data parallelism only reorders float sums
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=5e-5, err_msg=k)
    batches_a = _jsonl(ref_dir / "elastic" / "batches.jsonl")
    batches_b = _jsonl(run_dir / "elastic" / "batches.jsonl")
    assert [r["step"] for r in batches_b] == list(range(8))
    assert batches_a == batches_b
    losses_a = [r["loss"] for r in _jsonl(ref_dir / "elastic" / "metrics.jsonl")]
    losses_b = [r["loss"] for r in _jsonl(run_dir / "elastic" / "metrics.jsonl")]
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-4)
    np.testing.assert_array_equal(losses_b[:2], losses_a[:2])          # steps before the kill: same process setup
    rec = _jsonl(run_dir / "elastic" / "metrics.jsonl")[-1]      # per-budget KD, router, schedules
    assert {"tau", "scale", "budget_loss", "tokens_per_s", "budgets_sampled"} <= rec.keys()
    assert any(k.startswith("task_budget_") for k in rec) and any(k.startswith("choice_hidden_") for k in rec)
    # progress artefacts
    assert (run_dir / "elastic" / "curves.png").stat().st_size > 1000
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "elastic" / "tb"))

    # rerunning with a different config in the same folder is refused, naming the field
    bad = subprocess.run(_cmd(run_dir) + ["--set", "train.optim.lr=0.5"], env=_env(cache), capture_output=True,
                         text=True, timeout=900)
    assert bad.returncode != 0
    assert "different config" in bad.stderr and "train.optim.lr" in bad.stderr, bad.stderr[-2000:]

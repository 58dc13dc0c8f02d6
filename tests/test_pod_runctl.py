"""Pod-run robustness on one device: resume from a stage-end checkpoint, SIGTERM -> checkpoint +
`Preempted` -> exact resume, the run-folder lock, checkpoint checksums (a flipped byte), f32
master weights, and the pod's names (cloud TPU accelerator types, target by device count)."""
import json
import os
import signal
import socket

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax.errors import CheckpointCorrupt, Preempted, RunFolderLocked
from elastic_jax.train import hostdata
from elastic_jax.train.checkpoint import Checkpointer
from elastic_jax.train.runctl import RunLock


def _lm(tmp_path, steps=(2, 3)):
    from elastic_jax.data import DataConfig, make_dataset
    from elastic_jax.train import OptimConfig, Stage, TrainConfig
    cfg = ej.NemotronHConfig(vocab_size=32, hidden_size=16, hybrid_override_pattern="-", intermediate_size=16)
    ds = make_dataset(DataConfig(num_documents=32, synthetic_vocab=32), cfg.vocab_size)
    tc = TrainConfig(stages=(Stage("a", seq_len=8, batch_size=2, steps=steps[0]),
                             Stage("b", seq_len=16, batch_size=2, steps=steps[1])),
                     checkpoint_every=100, keep_checkpoints=10, async_checkpointing=False, vocab_chunk=None,
                     tensorboard=False, plot=False, optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
    return cfg, tc, ds, ej.init_params(cfg, jax.random.PRNGKey(0))


def _same(a, b):
    chex.assert_trees_all_equal(a, b)


def _losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from elastic_jax.train import train_lm
    cfg, tc, ds, p0 = _lm(None)
    run = tmp_path_factory.mktemp("ref") / "run"
    res = train_lm(cfg, tc, p0, ds, run, progress=False)
    return res, str(run)


def test_resume_from_a_stage_end_checkpoint(tmp_path, reference):
    """The stage-end save stores no iterator (the next stage starts afresh): resuming from it
    continues exactly (it used to fail: data_states.hosts was None)."""
    import shutil
    from elastic_jax.train import train_lm
    ref, ref_dir = reference
    run = tmp_path / "run"
    shutil.copytree(os.path.join(ref_dir, "checkpoints"), run / "checkpoints")
    ck = Checkpointer(run / "checkpoints", async_save=False)
    assert ck.all_steps() == [2, 5]
    assert ck.read_meta(2)["data_states"]["hosts"] is None          # a stage-end checkpoint
    shutil.rmtree(run / "checkpoints" / "5")
    ck.close()
    cfg, tc, ds, p0 = _lm(None)
    res = train_lm(cfg, tc, p0, ds, run, progress=False)
    assert res.resumed_from == 2 and res.steps == 5
    _same(res.params, ref.params)
    ref_l, l = _losses(ref_dir), _losses(run)
    assert [l[s] for s in (2, 3, 4)] == [ref_l[s] for s in (2, 3, 4)]


def test_sigterm_saves_at_the_next_step_and_the_rerun_resumes_exactly(tmp_path, reference, monkeypatch):
    from elastic_jax.train import train_lm
    ref, ref_dir = reference
    run = tmp_path / "run"
    calls = {"n": 0}
    real_next = hostdata.GlobalRows.__next__

    def next_then_sigterm(self):
        calls["n"] += 1
        if calls["n"] == 4:                  # while step 3 (the second stage's second) is being fed
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    monkeypatch.setattr(hostdata.GlobalRows, "__next__", next_then_sigterm)
    cfg, tc, ds, p0 = _lm(None)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="saved a checkpoint at step 4") as e:
        train_lm(cfg, tc, p0, ds, run, progress=False)
    assert e.value.step == 4 and signal.getsignal(signal.SIGTERM) is before   # handler given back
    ck = Checkpointer(run / "checkpoints", async_save=False)
    assert ck.all_steps() == [2, 4] and ck.read_meta(4)["data_states"]["hosts"] is not None
    ck.close()
    assert not (run / RunLock.NAME).exists()                 # the lock is released
    monkeypatch.setattr(hostdata.GlobalRows, "__next__", real_next)
    res = train_lm(cfg, tc, p0, ds, run, progress=False)
    assert res.resumed_from == 4 and res.steps == 5
    _same(res.params, ref.params)
    assert _losses(run) == _losses(ref_dir)


def test_preempted_cli_prints_one_line_and_exits_0(monkeypatch, capsys, tmp_path):
    from elastic_jax import experiment

    def preempted(cfg, out):
        raise Preempted(7, "/x/checkpoints")
    monkeypatch.setattr(experiment, "run_experiment", preempted)
    exp = tmp_path / "e.py"
    exp.write_text("import dataclasses\n@dataclasses.dataclass\nclass C:\n    a: int = 1\n"
                   "def config(quick=False):\n    return C()\n")
    from elastic_jax.cli import main
    assert main(["run", str(exp), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["elastic-jax run: preempted: saved a checkpoint at step 7 in /x/checkpoints; "
                   "rerun the same command to resume"]
    assert main(["run", str(exp), "--coordinator", "h:1"]) == 2            # the three flags go together
    assert "go together" in capsys.readouterr().err


# ------------------------------------------------------------------ the lock
def test_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path):
    a = RunLock(tmp_path)
    a.acquire()
    holder = json.loads((tmp_path / RunLock.NAME).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["start"]
    with pytest.raises(RunFolderLocked, match=rf"in use by another run \(host {socket.gethostname()}, pid "
                                              rf"{os.getpid()}, started"):
        RunLock(tmp_path).acquire()
    a.release()
    assert not (tmp_path / RunLock.NAME).exists()
    # a crashed holder on this host (its pid no longer runs): taken over with a warning
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / RunLock.NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                                     "start": "yesterday"}))
    b = RunLock(tmp_path)
    with pytest.warns(UserWarning, match=rf"stale lock .* pid {dead} .* no longer runs"):
        b.acquire()
    assert json.loads((tmp_path / RunLock.NAME).read_text())["pid"] == os.getpid()
    b.release()
    # another host's lock: live while refreshed, stale when not refreshed for stale_after_s
    (tmp_path / RunLock.NAME).write_text(json.dumps({"host": "other-host", "pid": 1, "start": "t"}))
    with pytest.raises(RunFolderLocked, match="host other-host, pid 1"):
        RunLock(tmp_path).acquire()
    old = os.path.getmtime(tmp_path / RunLock.NAME) - 3600
    os.utime(tmp_path / RunLock.NAME, (old, old))
    with pytest.warns(UserWarning, match="not refreshed for"):
        RunLock(tmp_path, stale_after_s=600).acquire()


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path):
    from elastic_jax.train import train_lm
    cfg, tc, ds, p0 = _lm(None)
    lock = RunLock(tmp_path / "run")
    os.makedirs(tmp_path / "run")
    lock.acquire()
    with pytest.raises(RunFolderLocked, match="in use by another run"):
        train_lm(cfg, tc, p0, ds, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()       # nothing written
    lock.release()


# ------------------------------------------------------------------ checksums
def _flip(step_dir, n=64):
    """Flip `n` bytes in the middle of the largest file of a step's arrays (the ocdbt data file of
    "w"; orbax alone restores such a file without complaint: wrong values, up to ~1e38)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    big = max(files, key=os.path.getsize)
    data = bytearray(open(big, "rb").read())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0x01
    open(big, "wb").write(bytes(data))


def test_a_flipped_byte_is_detected(tmp_path):
    rng = np.random.default_rng(0)
    trees = [{"w": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32), "b": jnp.arange(4.0) + s}
             for s in range(2)]
    ck = Checkpointer(tmp_path, async_save=False)
    for s, t in enumerate(trees):
        ck.save(s + 1, t, {"configs": {}})
    ck.wait()
    assert set(ck.read_meta(2)["checksums"]) == {"w", "b"}
    _flip(ck.step_path(2))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trees[0])
    with pytest.raises(CheckpointCorrupt, match=rf"{ck.step_path(2)}/state: array 'w' does not match the checksum"):
        ck.restore_state(2, abstract)
    with pytest.warns(UserWarning, match=r"step 2 .* cannot be restored \(CheckpointCorrupt: .* array 'w'"):
        step, got = ck.restore_newest(lambda s: ck.restore_state(s, abstract))
    assert step == 1
    _same(got, trees[0])
    _flip(ck.step_path(1))
    with pytest.raises(CheckpointCorrupt, match="no checkpoint step can be restored"):
        ck.restore_newest(lambda s: ck.restore_state(s, abstract))
    ck.close()


# ------------------------------------------------------------------ f32 master weights
def test_f32_master_weights_keep_an_update_that_bf16_weights_lose():
    """lr 1e-4 on weights of ~0.05: Adam's first step moves each weight by ~1e-4, under half a bf16
    ulp of 0.05 (2^-10): the bf16 copy does not move, the f32 master copy does. PodExperiment keeps
    the student's master weights (and so Adam's moments) in f32 by default."""
    import optax
    from elastic_jax.pod import PodExperiment
    from elastic_jax.train import OptimConfig
    from elastic_jax.train.optim import make_optimizer
    tx = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0), 10)
    w = jnp.full((64,), 0.05) + jnp.linspace(0, 0.01, 64)
    g = jnp.linspace(-1, 1, 64)
    moved = {}
    for dt in (jnp.float32, jnp.bfloat16):
        p = {"params": w.astype(dt), "router": {}}
        st = tx.init(p)
        upd, _ = tx.update({"params": g.astype(dt), "router": {}}, st, p)
        new = optax.apply_updates(p, upd)["params"]
        assert new.dtype == dt
        moved[dt] = int(jnp.sum(new != p["params"]))
        if dt == jnp.float32:
            assert jax.tree.leaves(st)[1].dtype == jnp.float32          # Adam's moments in f32
    assert moved[jnp.float32] >= 60 and moved[jnp.bfloat16] == 0, moved
    f = PodExperiment.__dataclass_fields__
    assert f["param_dtype"].default == "float32" and f["teacher_dtype"].default == "bfloat16"


# ------------------------------------------------------------------ names
def test_tpu_targets_are_named_as_google_cloud_names_them():
    from elastic_jax.pod import Target, tpu_accelerator_type
    assert tpu_accelerator_type("v5p:4x4x8") == "v5p-256"
    assert tpu_accelerator_type("v5p:4x4x4") == "v5p-128"
    assert tpu_accelerator_type("v5e:4x4") == "v5litepod-16"
    assert tpu_accelerator_type("v4:2x2x1") == "v4-8"
    Target("v5p-256", "tpu", topology="v5p:4x4x8")
    with pytest.raises(ValueError, match="Google Cloud names that slice 'v5p-256'"):
        Target("v5p-128", "tpu", topology="v5p:4x4x8")


def test_run_picks_the_target_with_the_jobs_device_count():
    from elastic_jax.experiment import load_experiment
    from elastic_jax.pod import _runtime_target
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    xp = load_experiment(os.path.join(root, "experiments", "nemotron3_nano_30b_a3b.py"))
    assert _runtime_target(xp, 128, "tpu").name == "v5p-256"
    assert _runtime_target(xp, 8, "gpu").name == "h100x8"
    with pytest.raises(ValueError, match="no target has 64 devices"):
        _runtime_target(xp, 64, "tpu")


def test_host_rows_of_a_batch_sharding():
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((1,), ("x",))
    assert hostdata.host_rows(NamedSharding(mesh, P(None, "x")), (2, 4, 8)) == slice(0, 4)


# ------------------------------------------------------------------ the path layer (local and gs://)
@pytest.fixture(params=["local", "gs"])
def run_root(request, tmp_path, monkeypatch):
    """A run folder: a local one, or a gs:// URL served by an in-memory fsspec filesystem (what
    epath uses for gs:// without TensorFlow: the same code path as a real bucket with gcsfs)."""
    if request.param == "local":
        return str(tmp_path / "run")
    from fsspec.implementations.memory import MemoryFileSystem

    class Bucket(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]

        def __init__(self, *a, **k):
            super().__init__()
    import importlib
    registry = importlib.import_module("fsspec.registry")._registry
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, Bucket)
    return "gs://bucket/run"


def test_path_layer_lock_and_result_files(run_root):
    from elastic_jax import fileio
    assert fileio.is_url(run_root) == run_root.startswith("gs://")
    fileio.makedirs(run_root)
    res = fileio.join(run_root, "result.json")
    fileio.write_json_atomic(res, {"steps": 3})
    assert fileio.isfile(res) and json.loads(fileio.read_text(res)) == {"steps": 3}
    a = RunLock(run_root)
    a.acquire()
    assert json.loads(fileio.read_text(a.path))["pid"] == os.getpid()
    with pytest.raises(RunFolderLocked, match=f"lock {run_root}/run.lock"):
        RunLock(run_root).acquire()
    a.release()
    assert not fileio.exists(a.path)
    ck = fileio.join(run_root, "checkpoints", "3")
    fileio.makedirs(fileio.join(ck, "state"))
    for f in ("_CHECKPOINT_METADATA", "state/_METADATA"):
        fileio.epath_of(fileio.join(ck, f)).write_text("{}")
    c = Checkpointer.__new__(Checkpointer)            # only the folder checks (orbax itself takes gs://)
    c.directory = fileio.resolve(fileio.join(run_root, "checkpoints"))
    assert c.incomplete(3) == "item 'meta' missing or incomplete (no meta/metadata)"

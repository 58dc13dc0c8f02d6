"""Fault injection (issue 13): every bad input or fault gives one named error, and nothing a user
had is lost. Each case asserts the error type and message and, where something could be written,
that nothing was written or lost (checksums of the files that must survive).

Most cases need no model compile: they share one tiny HF export and one tiny orbax run folder
(module fixtures, params drawn with numpy). Classes (BUILD_NOTES "Reliability" table): safe
overwrite, interrupted writes (SIGKILL), disk faults, damaged checkpoints, NaN guard, teacher
fingerprint, shard-name security, JSON / safetensors validation, config / widths validation,
the checked path under jit, argument checks, CLI exit status.
"""
import errno
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from conftest import is_shape, random_params
from elastic_jax import cli, fileio
from elastic_jax import hf as ejhf
from elastic_jax.errors import (CheckpointCorrupt, CheckpointMismatch, HFCheckpointError, JSONFileError,
                                TrainingDiverged)
from elastic_jax.infer.checkpoint import load_nested, save_nested
from elastic_jax.train.checkpoint import Checkpointer, load_run, params_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL = os.path.join(ROOT, "tests", "scripts", "kill_during_write.py")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _tiny(seed=1, pattern="*-"):
    cfg = ej.NemotronHConfig(vocab_size=32, hidden_size=16, hybrid_override_pattern=pattern, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, intermediate_size=32)
    return cfg, random_params(cfg, seed)


def _sums(folder) -> dict:
    """{relative path: sha256} of every file under `folder` (what must survive)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _leftovers(parent) -> list:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


@pytest.fixture(scope="module")
def model():
    return _tiny()


@pytest.fixture(scope="module")
def export(model, tmp_path_factory):
    """One tiny HF export (read-only use: copy it before damaging it)."""
    cfg, params = model
    return ej.save_hf(tmp_path_factory.mktemp("export") / "hf", cfg, params)


def _write_run(run_dir, cfg, params_by_step):
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False, keep=10)
    for step, params in params_by_step.items():
        ck.save(step, {"state": {"params": params}, "rng": np.zeros(2, np.uint32)},
                {"configs": {"model": cfg.to_dict(), "elastic": None}, "step": step})
    ck.close()
    return run_dir


@pytest.fixture(scope="module")
def run_template(model, tmp_path_factory):
    """A tiny run folder (orbax steps 1 and 2, params differ) plus a metrics file."""
    cfg, params = model
    p2 = jax.tree.map(lambda x: x + 1.0, params)
    d = str(tmp_path_factory.mktemp("run") / "run")
    _write_run(d, cfg, {1: params, 2: p2})
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write('{"step": 0, "loss": 1.0}\n')
    return d, params, p2


@pytest.fixture
def run(run_template, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(run_template[0], d)
    return d


def _cli(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


# ================================================================== safe overwrite
@pytest.mark.parametrize("target", ["", "   "])
def test_empty_path_refused(model, tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    before = _sums(tmp_path)
    with pytest.raises(ValueError, match="output path is empty"):
        ej.save_hf(target, *model, overwrite=True)
    assert _sums(tmp_path) == before


@pytest.mark.parametrize("rel", [".", ".."])
def test_target_containing_the_current_directory_refused(model, tmp_path, monkeypatch, rel):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = _sums(tmp_path)
    with pytest.raises(ValueError, match="current directory"):
        ej.save_hf(rel, *model, overwrite=True)
    assert _sums(tmp_path) == before


@pytest.mark.parametrize("where", ["same", "parent"])
def test_target_that_is_or_contains_the_source_refused(model, export, tmp_path, where):
    src = tmp_path / "a" / "src"
    shutil.copytree(export, src)
    before = _sums(tmp_path)
    target = src if where == "same" else tmp_path / "a"
    with pytest.raises(ValueError, match="contains\\) the source"):
        ej.save_hf(target, *model, overwrite=True, protect=[src])
    assert _sums(tmp_path) == before


def test_overwrite_refuses_a_run_folder_and_lists_its_contents(model, run):
    before = _sums(run)
    with pytest.raises(FileExistsError, match=r"did not write: \['checkpoints', 'metrics.jsonl'\]"):
        ej.save_hf(run, *model, overwrite=True)
    assert _sums(run) == before and not _leftovers(os.path.dirname(run))


def test_non_empty_target_needs_overwrite(model, export, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(export, out)
    before = _sums(out)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        ej.save_hf(out, *model)
    assert _sums(out) == before


def test_existing_empty_folder_is_a_valid_target(model, tmp_path):
    (tmp_path / "empty").mkdir()
    ej.save_hf(tmp_path / "empty", *model)
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "generation_config.json", "model.safetensors"]


def test_target_that_is_a_file_or_symlink_refused(model, tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(FileExistsError, match="not a folder"):
        ej.save_hf(tmp_path / "f", *model, overwrite=True)
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "link")
    with pytest.raises(FileExistsError, match="not a folder"):
        ej.save_hf(tmp_path / "link", *model, overwrite=True)
    assert (tmp_path / "f").read_text() == "mine"


def test_overwrite_replaces_a_previous_export_with_normal_permissions(model, export, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(export, out)
    cfg, params = model
    p2 = jax.tree.map(lambda x: x * 2, params)
    old = os.umask(0o022)
    try:
        ej.save_hf(out, cfg, p2, overwrite=True, max_shard_size="4KB")
    finally:
        os.umask(old)
    assert oct(os.stat(out).st_mode & 0o777) == "0o755"
    assert {oct(os.stat(out / f).st_mode & 0o777) for f in os.listdir(out)} == {"0o644"}
    _, back = ej.load_hf(out)
    np.testing.assert_array_equal(np.asarray(back["embed"]), p2["embed"])
    assert not _leftovers(tmp_path)


def test_failed_write_keeps_the_previous_export(model, export, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    shutil.copytree(export, out)
    before = _sums(out)
    import safetensors.numpy as stn

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(stn, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        ej.save_hf(out, *model, overwrite=True)
    assert _sums(out) == before and not _leftovers(tmp_path)


def test_failed_final_rename_restores_the_previous_export(model, export, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    shutil.copytree(export, out)
    before = _sums(out)
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)      # the two-rename fallback
    real = os.rename

    def rename(a, b):
        if ".tmp-" in os.path.basename(a):
            raise OSError(errno.EIO, "I/O error", a)
        return real(a, b)
    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        ej.save_hf(out, *model, overwrite=True)
    assert _sums(out) == before and not _leftovers(tmp_path)


def test_stale_temporary_folders_are_cleaned_and_reported(model, tmp_path):
    dead = 2 ** 22 + 12345                         # no such process
    stale = tmp_path / f".hf.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".hf.tmp-{os.getppid()}-xyz"   # a live writer's folder is left alone
    live.mkdir()
    other = tmp_path / f".hf.tmp-{dead}@another_host-xyz"  # another host's (shared filesystem): never touched
    other.mkdir()
    with pytest.warns(UserWarning, match="left by an interrupted write"):
        ej.save_hf(tmp_path / "hf", *model)
    assert not stale.exists() and live.exists() and other.exists()


def test_previous_folder_left_aside_by_a_crash_is_restored(model, export, tmp_path):
    aside = tmp_path / f".hf.old-{2 ** 22 + 7}-abc"
    aside.mkdir()
    shutil.copytree(export, aside / "old")
    before = _sums(aside / "old")
    with pytest.warns(UserWarning, match="restored the previous folder"):
        with pytest.raises(FileExistsError, match="pass overwrite=True"):    # restored, then checked again
            ej.save_hf(tmp_path / "hf", *model)
    assert _sums(tmp_path / "hf") == before and not _leftovers(tmp_path)


# ================================================================== interrupted writes (SIGKILL)
def _kill(mode, out):
    r = subprocess.run([sys.executable, KILL, mode, str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == -9, r.stdout[-2000:] + r.stderr[-2000:]


def test_sigkill_during_save_hf_keeps_the_previous_export(model, export, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(export, out)
    before = _sums(out)
    _kill("save_hf_tensors", out)
    assert _sums(out) == before
    assert len(_leftovers(tmp_path)) == 1                     # the killed writer's temporary folder
    with pytest.warns(UserWarning, match="interrupted write"):
        ej.save_hf(out, *model, overwrite=True)               # cleaned up by the next save
    assert not _leftovers(tmp_path)


def test_sigkill_between_renames_is_repaired_by_the_next_save(model, export, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(export, out)
    before = _sums(out)
    _kill("save_hf_renames", out)
    assert not out.exists()                                   # the crash window of a two-rename swap
    with pytest.warns(UserWarning, match="restored the previous folder"):
        with pytest.raises(FileExistsError):
            ej.save_hf(out, *model)                           # no overwrite: refused, but repaired first
    assert _sums(out) == before and not _leftovers(tmp_path)


def test_sigkill_during_a_training_checkpoint_commit(model, tmp_path):
    ck_dir = tmp_path / "run" / "checkpoints"
    _kill("train_commit", ck_dir)
    ck = Checkpointer(ck_dir, async_save=False)
    assert ck.all_steps() == [1] and ck.latest_step() == 1
    ck.close()
    cfg, params, _, _ = load_run(tmp_path / "run")
    np.testing.assert_array_equal(np.asarray(params["embed"]), _tiny()[1]["embed"])


# ================================================================== disk faults
@pytest.fixture
def mount(tmp_path):
    if not IS_ROOT or not sys.platform.startswith("linux"):
        pytest.skip("needs root on Linux to mount a tmpfs")
    mounted = []

    def do(name, opts):
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode()[:200]}")
        mounted.append(d)
        return d
    yield do
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)])


def test_full_disk_leaves_nothing_and_keeps_the_previous_export(model, export, mount, tmp_path, capsys):
    disk = mount("disk", "size=64k")
    ej.save_hf(disk / "hf", *model)                            # ~10 KB: fits
    before = _sums(disk / "hf")
    big_cfg = ej.NemotronHConfig(vocab_size=512, hidden_size=64, hybrid_override_pattern="-", intermediate_size=64)
    big = jax.tree.map(lambda s: np.ones(s, np.float32), ej.param_shapes(big_cfg), is_leaf=is_shape)   # ~300 KB
    with pytest.raises(OSError) as e:
        ej.save_hf(disk / "hf", big_cfg, big, overwrite=True)
    assert e.value.errno == errno.ENOSPC
    assert _sums(disk / "hf") == before and os.listdir(disk) == ["hf"]
    big_src = ej.save_hf(tmp_path / "big", big_cfg, big)
    rc, err = _cli(["export", big_src, str(disk / "hf"), "--overwrite", "--quiet"], capsys)
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err and "No space" in err
    assert _sums(disk / "hf") == before and os.listdir(disk) == ["hf"]


def test_read_only_target(model, export, mount, capsys):
    ro = mount("ro", "ro,size=64k")
    with pytest.raises(OSError) as e:
        ej.save_hf(ro / "hf", *model)
    assert e.value.errno == errno.EROFS
    rc, err = _cli(["export", str(export), str(ro / "hf"), "--quiet"], capsys)
    assert rc == 2 and err.startswith("elastic-jax export: error:") and "Read-only file system" in err
    assert os.listdir(ro) == []


# ================================================================== damaged checkpoints
def _truncate_largest(step_dir):
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(p)
             and os.path.basename(p) not in ("_METADATA", "_sharding", "_CHECKPOINT_METADATA")]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    return biggest


def test_truncated_array_file_in_latest_step_falls_back_with_a_warning(run, run_template):
    _truncate_largest(os.path.join(run, "checkpoints", "2"))
    with pytest.warns(UserWarning, match=r"checkpoint step 2 at .*/checkpoints/2 cannot be restored"):
        cfg, params, _, _ = load_run(run)
    np.testing.assert_array_equal(np.asarray(params["embed"]), run_template[1]["embed"])


def test_every_step_damaged_is_checkpoint_corrupt(run, capsys, tmp_path):
    for s in ("1", "2"):
        _truncate_largest(os.path.join(run, "checkpoints", s))
    before = _sums(run)
    with pytest.warns(UserWarning), pytest.raises(CheckpointCorrupt, match=r"no checkpoint step can be restored"):
        load_run(run)
    with pytest.warns(UserWarning):
        rc, err = _cli(["export", run, str(tmp_path / "out"), "--quiet"], capsys)
    assert rc == 2 and "error:" in err and "no checkpoint step can be restored" in err and "Traceback" not in err
    assert _sums(run) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["empty", "no_state", "no_marker"])
def test_incomplete_step_folder_is_not_a_step(run, run_template, damage):
    ck_dir = os.path.join(run, "checkpoints")
    if damage == "empty":
        os.mkdir(os.path.join(ck_dir, "3"))
    else:
        shutil.copytree(os.path.join(ck_dir, "2"), os.path.join(ck_dir, "3"))
        if damage == "no_state":
            shutil.rmtree(os.path.join(ck_dir, "3", "state"))
        else:
            os.remove(os.path.join(ck_dir, "3", "_CHECKPOINT_METADATA"))
    ck = Checkpointer(ck_dir, async_save=False)
    assert ck.latest_step() == 2 and ck.all_steps() == [1, 2] and ck.incomplete(3)
    ck.close()
    with pytest.warns(UserWarning, match="step 3"):
        _, params, _, _ = load_run(run)
    np.testing.assert_array_equal(np.asarray(params["embed"]), run_template[2]["embed"])


def test_explicit_damaged_step_is_checkpoint_corrupt(run):
    _truncate_largest(os.path.join(run, "checkpoints", "2"))
    with pytest.raises(CheckpointCorrupt, match=r"checkpoints/2: cannot be restored"):
        load_run(run, step=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        load_run(run, step=7)


def test_meta_without_model_config_falls_back(run, run_template):
    meta = glob.glob(os.path.join(run, "checkpoints", "2", "meta", "metadata"))[0]
    with open(meta, "w") as f:
        json.dump({"step": 2}, f)
    with pytest.warns(UserWarning, match=r"configs\.model"):
        _, params, _, _ = load_run(run)
    np.testing.assert_array_equal(np.asarray(params["embed"]), run_template[1]["embed"])


def test_damaged_newer_steps_are_set_aside_not_deleted(run):
    _truncate_largest(os.path.join(run, "checkpoints", "2"))
    before = _sums(os.path.join(run, "checkpoints", "2"))
    ck = Checkpointer(os.path.join(run, "checkpoints"), async_save=False)
    with pytest.warns(UserWarning, match="moved the damaged checkpoint step 2 aside"):
        moved = ck.set_aside_after(1)
    assert ck.all_steps() == [1] and _sums(moved[0]) == before
    ck.close()


def test_run_folder_without_checkpoints(tmp_path):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointCorrupt, match="no checkpoint step"):
        load_run(tmp_path / "r")


# ================================================================== NaN guard
@pytest.mark.parametrize("bad", ["loss", "grad_norm", "update", "params"])
def test_finite_checks_name_each_non_finite_quantity(bad):
    from elastic_jax.train.step import FINITE_CHECKS, finite_checks
    ok = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0), "update": {"w": jnp.ones(3)},
          "params": {"w": jnp.ones(3), "i": jnp.arange(3)}}
    ok[bad] = jax.tree.map(lambda x: x * jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else x, ok[bad])
    flags = np.asarray(finite_checks(ok["loss"], ok["grad_norm"], ok["update"], ok["params"]))
    assert [n for n, f in zip(FINITE_CHECKS, flags) if not f] == [bad]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's training runs: a resumed run compiles the
    same step program again, which then costs a cache read instead of an XLA compile."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    from jax.experimental.compilation_cache import compilation_cache as cc
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()                    # the cache is set up once per process: re-read the config
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


def _lm_setup(lr, steps=2, seed=0):
    from elastic_jax.data import DataConfig, make_dataset
    from elastic_jax.train import OptimConfig, Stage, TrainConfig
    cfg = ej.NemotronHConfig(vocab_size=32, hidden_size=16, hybrid_override_pattern="-", intermediate_size=16)
    ds = make_dataset(DataConfig(num_documents=16, synthetic_vocab=32), cfg.vocab_size)
    tc = TrainConfig(stages=(Stage(seq_len=8, batch_size=2, steps=steps),), checkpoint_every=1,
                     async_checkpointing=False, vocab_chunk=None, tensorboard=False, plot=False,
                     optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant", clip_norm=0.0))
    return cfg, tc, ds, ej.init_params(cfg, jax.random.PRNGKey(seed))


def test_nan_guard_rejects_a_non_finite_update_even_with_a_finite_loss(tmp_path):
    from elastic_jax.train import train_lm
    cfg, tc, ds, p0 = _lm_setup(lr=1e39)          # inf in float32: the loss is finite, the update is not
    with pytest.raises(TrainingDiverged, match=r"non-finite update / params .* at step 0 \(stage 'stage', "
                                               r"budget\(s\) \[1\.0\]\).*Last good checkpoint: step 0"):
        train_lm(cfg, tc, p0, ds, tmp_path / "run", progress=False)
    ck = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    assert ck.all_steps() == [0]                  # the kept (initial) state; the poisoned one never saved
    ck.close()
    _, params, _, _ = load_run(tmp_path / "run")
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(p0["embed"]))


# ================================================================== teacher fingerprint + resume fallback
def test_fingerprint_tracks_the_values_not_the_object():
    _, a = _tiny(seed=1)
    _, b = _tiny(seed=2)
    fa = params_fingerprint(a)
    assert fa == params_fingerprint(jax.tree.map(np.copy, a)) == params_fingerprint(jax.tree.map(jnp.asarray, a))
    assert fa != params_fingerprint(b)
    c = jax.tree.map(np.copy, a)
    c["layers"][0]["norm"][3] += 1e-7                # one element
    assert fa != params_fingerprint(c)
    assert params_fingerprint(None) is None


def test_resume_skips_a_damaged_step_and_refuses_another_teacher(tmp_path, compile_cache):
    from elastic_jax.train import train_kd
    cfg, tc, ds, teacher = _lm_setup(lr=1e-3, steps=2)
    run = tmp_path / "kd"
    train_kd(cfg, tc, cfg, teacher, teacher, ds, run, progress=False)
    _truncate_largest(os.path.join(run, "checkpoints", "2"))
    import dataclasses
    tc3 = tc.replace(stages=(dataclasses.replace(tc.stages[0], steps=3),))
    with pytest.raises(CheckpointMismatch, match="train.stages"):   # a config change is not damage: no fallback
        train_kd(cfg, tc3, cfg, teacher, teacher, ds, run, progress=False)
    with pytest.warns(UserWarning, match="step 2"):
        res = train_kd(cfg, tc, cfg, teacher, teacher, ds, run, progress=False)
    assert res.resumed_from == 1 and res.steps == 2
    assert glob.glob(os.path.join(run, "checkpoints", "corrupt.2.*"))         # kept aside, not deleted
    other = ej.init_params(cfg, jax.random.PRNGKey(5))
    before = _sums(run / "checkpoints")
    with pytest.raises(CheckpointMismatch, match="teacher_fingerprint"):
        train_kd(cfg, tc, cfg, other, teacher, ds, run, progress=False)
    assert _sums(run / "checkpoints") == before


# ================================================================== shard-name security
def _with_index(export, tmp_path, weight_map):
    d = tmp_path / "hf"
    shutil.copytree(export, d)
    with open(d / ejhf.SAFE_INDEX, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return d


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""])
def test_index_shard_names_must_be_plain_files(export, tmp_path, name):
    d = _with_index(export, tmp_path, {"backbone.embeddings.weight": name})
    with pytest.raises(HFCheckpointError, match="never opened"):
        ej.load_hf(d)


def test_symlinked_shard_leaving_the_folder_is_refused(export, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(os.path.join(export, "model.safetensors"), outside)
    d = tmp_path / "hf"
    shutil.copytree(export, d)
    os.remove(d / "model.safetensors")
    os.symlink(outside, d / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="symlink that leaves the checkpoint folder"):
        ej.load_hf(d)


def test_symlinked_shard_inside_the_folder_is_fine(export, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(export, d)
    os.rename(d / "model.safetensors", d / "real.safetensors")
    os.symlink("real.safetensors", d / "model.safetensors")
    cfg, params = ej.load_hf(d)
    assert params["embed"].shape == (32, 16)


# ================================================================== JSON / safetensors validation
@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "the top level must be a JSON object, got list"),
])
def test_hf_config_json_is_validated_naming_the_file(export, tmp_path, content, match):
    d = tmp_path / "hf"
    shutil.copytree(export, d)
    (d / "config.json").write_bytes(content)
    with pytest.raises(JSONFileError, match=rf"config.json \(HF config\): {match}"):
        ej.load_hf(d)


@pytest.mark.parametrize("index,match", [
    ({"metadata": {}}, r"missing required field\(s\) \['weight_map'\]"),
    ({"weight_map": ["model.safetensors"]}, "tensor name -> file name"),
    ({"weight_map": {"backbone.embeddings.weight": 3}}, "tensor name -> file name"),
])
def test_index_json_is_validated(export, tmp_path, index, match):
    d = tmp_path / "hf"
    shutil.copytree(export, d)
    (d / ejhf.SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match=match):
        ej.load_hf(d)


@pytest.fixture(scope="module")
def nested_template(model, tmp_path_factory):
    cfg, params = model
    d = str(tmp_path_factory.mktemp("nested") / "nested")
    save_nested(d, cfg, params, {"100%": ej.Widths(), "50%": ej.Widths(hidden=8)}, fractions={"100%": 1.0})
    return d


@pytest.fixture
def nested(nested_template, tmp_path):
    d = tmp_path / "nested"
    shutil.copytree(nested_template, d)
    return d


def test_nested_checkpoint_loads(nested):
    cfg, params, budgets, fractions = load_nested(str(nested))
    assert sorted(budgets) == ["100%", "50%"] and fractions["100%"] == 1.0


@pytest.mark.parametrize("budgets,match", [
    ({"elastic": None}, r"missing required field\(s\) \['budgets'\]"),
    ({"budgets": {}}, "field 'budgets' must be list"),
    ({"budgets": []}, "field 'budgets' is empty"),
    ({"budgets": [{"widths": {}}]}, r"field 'budgets\[0\].name' is missing"),
    ({"budgets": [{"name": "a", "widths": {"hidden": 999}}]}, r"budgets\[0\].widths.*exceeds the parent size"),
    ({"budgets": [{"name": "a", "widths": {"depth": 1}}]}, "unknown width axes"),
    ({"budgets": [{"name": "a", "widths": {}, "fraction": "half"}]}, "fraction' must be a number"),
])
def test_nested_budgets_json_is_validated(nested, budgets, match):
    (nested / "elastic_budgets.json").write_text(json.dumps(budgets))
    with pytest.raises(JSONFileError, match=rf"elastic_budgets.json.*{match}"):
        load_nested(str(nested))


def test_nested_config_json_field_errors_name_the_file(nested):
    raw = json.loads((nested / "config.json").read_text())
    raw["layer_norm_epsilon"] = 0.0
    (nested / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFCheckpointError, match=r"(?s)config.json.*NemotronHConfig.layer_norm_epsilon=0.0: must be > 0"):
        load_nested(str(nested))


def test_nested_safetensors_errors_name_the_file(nested):
    p = nested / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(HFCheckpointError, match=r"(?s)nested.*model.safetensors: truncated or corrupt"):
        load_nested(str(nested))


def test_nested_params_are_checked_against_the_config(nested):
    raw = json.loads((nested / "config.json").read_text())
    raw["intermediate_size"] = 48
    (nested / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFCheckpointError, match=r"does not match its config.json"):
        load_nested(str(nested))


def test_nested_checkpoint_of_the_previous_layout_is_refused_with_the_re_export(tmp_path, capsys):
    """Before the HF layout: budgets.json + a flattened model.safetensors. Loading, `eval` and
    `generate` name the layout and the command that re-exports it; nothing is changed."""
    from elastic_jax.infer.checkpoint import LegacyNestedCheckpoint
    from elastic_jax.infer.text import TextGenerator
    old = tmp_path / "nested"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "model.safetensors").write_bytes(b"")
    (old / "budgets.json").write_text(json.dumps({"budgets": [{"name": "100%", "widths": {}}]}))
    before = _sums(old)
    for load in (load_nested, TextGenerator.load):
        with pytest.raises(LegacyNestedCheckpoint, match=r"(?s)previous layout.*elastic-jax export"):
            load(str(old))
    rc, err = _cli(["eval", str(tmp_path)], capsys)
    assert rc != 0 and "previous layout" in err and "elastic-jax export" in err
    assert _sums(old) == before


@pytest.mark.parametrize("results,match", [
    ({"nested": []}, "holds no evaluated models"),
    ({"title": "x"}, r"missing required field\(s\) \['nested'\]"),
    ([1], "top level must be a JSON object"),
])
def test_report_without_models_is_refused(tmp_path, capsys, results, match):
    (tmp_path / "results.json").write_text(json.dumps(results))
    before = _sums(tmp_path)
    rc, err = _cli(["report", str(tmp_path)], capsys)
    assert rc == 2 and err.count("error:") == 1 and match.replace("\\", "") .split("(")[0] in err
    assert _sums(tmp_path) == before
    with pytest.raises(ValueError, match="no evaluated models"):
        from elastic_jax.eval.report import write_report
        write_report({"nested": []}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ================================================================== config validation
@pytest.mark.parametrize("field,value,match", [
    ("layer_norm_epsilon", 0.0, "must be > 0"),
    ("layer_norm_epsilon", float("nan"), "must be a finite number"),
    ("routed_scaling_factor", float("inf"), "must be a finite number"),
    ("time_step_limit", (1.0, 0.5), "0 <= low <= high"),
    ("time_step_limit", (float("nan"), 1.0), "low finite"),
    ("time_step_limit", (0.0, float("nan")), "0 <= low <= high"),
    ("time_step_limit", (float("inf"), float("inf")), "low finite"),
    ("time_step_limit", (0.0,), "pair of numbers"),
    ("hidden_size", 64.0, "must be a positive integer"),
    ("vocab_size", "64", "must be a positive integer"),
    ("norm_topk_prob", "yes", "must be a bool"),
    ("time_step_min", 0.0, "must be > 0"),
    ("pad_token_id", -1, "must be an integer >= 0"),
])
def test_config_fields_are_type_and_range_checked(field, value, match):
    with pytest.raises(ValueError, match=rf"NemotronHConfig.{field}=.*{match}"):
        ej.NemotronHConfig(**{field: value})


def test_infinite_upper_time_step_limit_is_allowed():
    assert ej.NemotronHConfig(time_step_limit=(0.0, float("inf"))).time_step_limit[1] == float("inf")


@pytest.mark.parametrize("extra,match", [
    ({"num_hidden_layers": 5}, r"num_hidden_layers=5 but the layer pattern 'M\*' has 2 layers"),
    ({"hybrid_override_pattern": "*M"}, r"layers_block_type spells the pattern 'M\*' but hybrid_override_pattern"),
    ({"rms_norm_eps": 1e-6, "layer_norm_epsilon": 1e-5}, "rms_norm_eps=1e-06 and its canonical name"),
])
def test_contradictory_hf_fields_are_an_error(extra, match):
    d = {"layers_block_type": ["mamba", "attention"], **extra}
    with pytest.raises(ValueError, match=match):
        ej.NemotronHConfig.from_hf(d)


def test_contradictory_config_json_is_an_hf_checkpoint_error(export, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(export, d)
    raw = json.loads((d / "config.json").read_text())
    raw["num_hidden_layers"] = 7
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFCheckpointError, match="num_hidden_layers=7"):
        ej.load_hf(d)


# ================================================================== widths / forward inputs
@pytest.mark.parametrize("kw,match", [
    ({"hidden": float("inf")}, "must be finite integers"),
    ({"hidden": float("nan")}, "must be finite integers"),
    ({"hidden": "big"}, "must be integers"),
    ({"layers": (False, False)}, "drops every layer"),
])
def test_widths_bad_values(model, kw, match):
    cfg, params = model
    with pytest.raises(ValueError, match=match):
        ej.forward(params, jnp.zeros((1, 4), jnp.int32), cfg, ej.Widths(**kw))


def _opts(cfg, axis="ffn", counts=(32, 16), probs=(0.5, 0.5), **kw):
    return ej.SoftWidths.from_options(cfg, {axis: counts}, {axis: probs}, **kw)


@pytest.mark.parametrize("kw,match", [
    ({"counts": (64, 16)}, "exceeds the parent size"),
    ({"axis": "attn_heads", "counts": (2, 0), "probs": (0.5, 0.5)}, r"Widths.attn_heads=\(0,\): must be > 0"),
    ({"probs": (0.5, -0.1)}, "finite and >= 0"),
    ({"probs": (0.5, float("nan"))}, "finite and >= 0"),
    ({"probs": (1.0,)}, "one probability per option"),
    ({"axis": "depth"}, "unknown axes"),
    ({"layers": (0.0, 0.0)}, "every layer gate is 0"),
    ({"layers": (1.0,)}, "layers has 1 gates"),
])
def test_soft_widths_from_options_validates_concrete_inputs(model, kw, match):
    with pytest.raises(ValueError, match=match):
        _opts(model[0], **kw)


def test_soft_widths_missing_probs(model):
    with pytest.raises(ValueError, match=r"options\['ffn'\] given but no probs"):
        ej.SoftWidths.from_options(model[0], {"ffn": (32,)}, {})


def test_forward_with_every_layer_gate_zero_is_refused(model):
    cfg, params = model
    sw = ej.Widths().to_soft(cfg)
    import dataclasses
    sw = dataclasses.replace(sw, layers=jnp.zeros((cfg.num_hidden_layers,)))
    with pytest.raises(ValueError, match="drop every layer"):
        ej.forward(params, jnp.zeros((1, 4), jnp.int32), cfg, sw)


def test_segment_ids_of_the_wrong_shape_are_named(model):
    cfg, params = model
    with pytest.raises(ValueError, match=r"segment_ids must have the shape of tokens \(2, 4\), got \(2, 3\)"):
        ej.forward(params, jnp.zeros((2, 4), jnp.int32), cfg, segment_ids=jnp.ones((2, 3), jnp.int32))


# ================================================================== checked path under jit
def test_checked_forward_catches_out_of_range_tokens_under_jit(model):
    from jax.experimental import checkify
    cfg, params = model
    f = jax.jit(checkify.checkify(lambda p, t: ej.forward(p, t, cfg, checked=True), errors=checkify.user_checks))
    err, _ = f(params, jnp.asarray([[1, 2, 3]], jnp.int32))
    err.throw()                                                       # in range: no error
    err, _ = f(params, jnp.asarray([[1, 40, 3]], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=r"token ids must be in \[0, vocab_size=32\); got range \[1, 40\]"):
        err.throw()


def test_checked_decode_past_cache_capacity_under_jit(model):
    from jax.experimental import checkify
    cfg, params = model
    cache = ej.init_cache(cfg, 1, 2, params)
    step = jax.jit(checkify.checkify(lambda p, t, c: ej.decode_step(p, t, c, cfg, checked=True),
                                     errors=checkify.user_checks))
    tok = jnp.asarray([[1]], jnp.int32)
    for _ in range(2):
        err, (_, cache) = step(params, tok, cache)
        err.throw()
    err, _ = step(params, tok, cache)
    with pytest.raises(checkify.JaxRuntimeError, match=r"cache overflow: position 2 \+ 1 new tokens > max_len=2"):
        err.throw()


def test_generate_runs_on_the_checked_path(model, monkeypatch):
    import importlib
    gen = importlib.import_module("elastic_jax.model.generate")
    cfg, params = model
    out = ej.generate(params, jnp.asarray([[1, 2]], jnp.int32), cfg, max_new_tokens=2)
    assert out.tokens.shape == (1, 2)
    # the compiled loop itself checks: an out-of-range prompt that slipped past the host check raises
    with pytest.raises(ValueError, match="token ids must be in"):
        err, _ = gen._generate(params, jnp.asarray([[1, 99]], jnp.int32), jnp.ones((1, 2), bool), None,
                               jax.random.PRNGKey(0), jnp.float32(0), jnp.float32(1), cfg=cfg, max_new_tokens=2,
                               max_len=4, greedy=True, stop_tokens=())
        err.throw()


# ================================================================== argument checks
@pytest.mark.parametrize("dtype", ["int32", "bool", "complex64", "nonsense"])
def test_load_hf_dtype_must_be_float(export, dtype):
    with pytest.raises(ValueError, match=r"load_hf dtype=.*(float32, bfloat16 or float16)"):
        ej.load_hf(export, dtype=dtype)


@pytest.mark.parametrize("size", [0, -1, "0MB", True, "lots"])
def test_max_shard_size_must_be_positive(model, tmp_path, size):
    with pytest.raises(ValueError, match=r"max_shard_size=.*(must be > 0|expected bytes)"):
        ej.save_hf(tmp_path / "hf", *model, max_shard_size=size)
    assert os.listdir(tmp_path) == []


# ================================================================== CLI exit status
def test_cli_expected_failures_are_one_error_line(export, run, tmp_path, capsys):
    cases = [
        (["export", str(tmp_path / "missing"), str(tmp_path / "o")], "neither an HF directory"),
        (["slice", str(export), str(tmp_path / "o"), "--widths", "{bad"], "--widths is not valid JSON"),
        (["slice", str(export), str(tmp_path / "o"), "--widths", '{"hidden": 1e9}'], "exceeds the parent size"),
        (["export", str(export), ""], "output path is empty"),
        (["export", str(export), run, "--overwrite"], "did not write"),
        (["export", run, run, "--overwrite"], "the source"),
    ]
    before = _sums(run)
    for argv, match in cases:
        rc, err = _cli(argv + ["--quiet"], capsys)
        assert rc == 2, (argv, err)
        assert err.startswith(f"elastic-jax {argv[0]}: error:") and match in err and "Traceback" not in err, err
    assert _sums(run) == before and not (tmp_path / "o").exists()


def test_cli_training_diverged_is_an_expected_failure(tmp_path, capsys):
    exp = tmp_path / "exp.py"
    exp.write_text(
        "import dataclasses\n"
        "from elastic_jax.errors import TrainingDiverged\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class C:\n    x: int = 1\n"
        "    def run(self, out):\n        raise TrainingDiverged('non-finite loss at step 3')\n"
        "def config(quick=False):\n    return C()\n")
    rc, err = _cli(["run", str(exp), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and err.strip() == "elastic-jax run: error: non-finite loss at step 3"


def test_cli_errors_in_the_users_experiment_code_keep_their_traceback(tmp_path):
    exp = tmp_path / "exp.py"
    exp.write_text("def config(quick=False):\n    raise ValueError('my own bug')\n")
    with pytest.raises(ValueError, match="my own bug"):
        cli.main(["run", str(exp), "--out", str(tmp_path / "o")])

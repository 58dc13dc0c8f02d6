"""Fault injection, training side (issues 33, 29): the NaN guard covers every tree the step writes,
no checkpoint holds a non-finite leaf, a diverged run leaves an exportable last good checkpoint,
a damaged newest step falls back quietly, a full disk during a checkpoint is one line, and sizes
from the user are checked before anything is allocated."""
import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import cli
from elastic_jax.errors import NonFiniteError
from elastic_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(bad=None):
    t = {"params": {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)},
         "router": {"r": np.ones(4, np.float32)}, "i": np.arange(3)}
    if bad is not None:
        group, name, value = bad
        t[group][name] = t[group][name].copy()
        t[group][name].flat[1] = value
    return t


# ================================================================== NaN guard (issue 33)
@pytest.mark.parametrize("value", [1e30, -3e20])
def test_finite_checks_reject_params_whose_square_overflows(value):
    """lr 1e30 left finite params ~1e30 whose next forward (and router probs) are NaN."""
    from elastic_jax.train.step import FINITE_CHECKS, finite_checks
    flags = np.asarray(finite_checks(jnp.float32(1), jnp.float32(1), {"w": jnp.ones(3)},
                                     jax.tree.map(jnp.asarray, _tree(("router", "r", value)))))
    assert [n for n, f in zip(FINITE_CHECKS, flags) if not f] == ["params"]
    ok = np.asarray(finite_checks(jnp.float32(1), jnp.float32(1), {"w": jnp.ones(3)},
                                  jax.tree.map(jnp.asarray, _tree(("router", "r", 1e15)))))
    assert ok.all()


def test_finite_checks_cover_the_optimizer_state():
    from elastic_jax.train.step import FINITE_CHECKS, finite_checks
    nu = {"w": jnp.asarray([1.0, jnp.inf])}
    flags = np.asarray(finite_checks(jnp.float32(1), jnp.float32(1), {"w": jnp.ones(2)}, {"w": jnp.ones(2)}, nu))
    assert [n for n, f in zip(FINITE_CHECKS, flags) if not f] == ["optimizer state"]


@pytest.mark.parametrize("bad", [("params", "w", np.nan), ("router", "r", np.inf)])
def test_checkpoint_save_refuses_a_non_finite_leaf_naming_it(tmp_path, bad):
    ck = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ck.save(1, {"state": _tree()}, {"step": 1})
    with pytest.raises(NonFiniteError, match=rf"checkpoint step 2 .*\['state'\]\['{bad[0]}'\]\['{bad[1]}'\].*not saved"):
        ck.save(2, {"state": _tree(bad)}, {"step": 2})
    assert ck.all_steps() == [1]
    ck.close()


def test_nonfinite_leaves_names_host_and_device_leaves():
    from elastic_jax.finite import check_finite, nonfinite_leaves
    t = _tree(("params", "b", -np.inf))
    t["router"]["r"] = jnp.asarray([1.0, jnp.nan])
    assert nonfinite_leaves(t) == ["['params']['b']", "['router']['r']"]
    assert nonfinite_leaves(_tree()) == []
    with pytest.warns(UserWarning, match="allowed for debugging"):
        check_finite(t, "x", allow=True)


@pytest.mark.slow   # fast tier: over 100 s of CPU; the full suite runs it
def test_diverging_cli_run_leaves_a_last_good_checkpoint_that_exports_finite(tmp_path, capsys):
    """The run of issue 33: lr 1e30 for model and router. The first update is rejected, the kept
    state is the last checkpoint, and it exports to a nested family with finite logits."""
    run = tmp_path / "RUN"
    rc = cli.main(["run", os.path.join(ROOT, "experiments", "distill_tiny.py"), "--quick", "--out", str(run),
                   "--set", "train.optim.lr=1e30", "--set", "train.optim.router_lr=1e30",
                   "--set", "train.checkpoint_every=1", "--set", "train.tensorboard=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: non-finite" in err and "Last good checkpoint: step 0" in err, err[-2000:]
    rc = cli.main(["export", str(run / "elastic"), str(tmp_path / "OUT"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    from elastic_jax.infer.checkpoint import load_nested
    cfg, params, budgets, _ = load_nested(str(tmp_path / "OUT"))
    for name, w in budgets.items():
        logits = ej.forward(params, jnp.arange(8, dtype=jnp.int32)[None] % cfg.vocab_size, cfg, w)
        assert np.isfinite(np.asarray(logits)).all(), name


_RERUN = """
import sys
sys.path.insert(0, {tests!r})
from test_faults import _lm_setup
from elastic_jax.train import train_lm
cfg, tc, ds, p0 = _lm_setup(lr=1e-3, steps=3)
train_lm(cfg, tc, p0, ds, {run!r}, progress=False)
"""


@pytest.mark.slow   # whole CLI training runs in subprocesses
def test_damaged_newest_step_rerun_prints_only_the_warning(tmp_path):
    """Truncating the newest step's JSON array metadata made orbax's failed restore leave
    tensorstore callbacks on a closed event loop: dozens of asyncio tracebacks on stderr."""
    run = tmp_path / "run"
    script = _RERUN.format(tests=os.path.join(ROOT, "tests"), run=str(run))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = glob.glob(str(run / "checkpoints" / "3" / "state" / "array_metadatas" / "*"))
    assert meta
    with open(meta[0], "r+b") as f:
        f.truncate(os.path.getsize(meta[0]) // 2)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step 3" in r.stderr and "cannot be restored" in r.stderr
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-3000:]
    assert glob.glob(str(run / "checkpoints" / "corrupt.3.*"))


# ================================================================== full disk during a training checkpoint (issue 29)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

_FULL_EXP = """
import dataclasses, sys
sys.path.insert(0, {tests!r})

@dataclasses.dataclass(frozen=True)
class C:
    steps: int = 3

    def run(self, out):
        from test_faults import _lm_setup
        from elastic_jax.train import train_lm
        cfg, tc, ds, p0 = _lm_setup(lr=1e-3, steps=self.steps)
        train_lm(cfg, tc.replace(async_checkpointing=True), p0, ds, out, progress=False)

def config(quick=False):
    return C()
"""


@pytest.mark.slow   # whole CLI training runs in subprocesses
@pytest.mark.parametrize("size", ["16k", "60k", "150k"])
def test_full_disk_during_a_training_checkpoint_is_one_line(tmp_path, size):
    """16k: refused before orbax starts (free space < the state); 60k / 150k: orbax's background
    commit fails (in the first or a later step) and its log tracebacks are replaced by one line."""
    if not IS_ROOT or not sys.platform.startswith("linux"):
        pytest.skip("needs root on Linux to mount a tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode()[:200]}")
    try:
        exp = tmp_path / "exp.py"
        exp.write_text(_FULL_EXP.format(tests=os.path.join(ROOT, "tests")))
        r = subprocess.run([sys.executable, "-m", "elastic_jax.cli", "run", str(exp), "--out", str(disk / "run")],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "ERROR:absl" not in r.stderr, r.stderr[-3000:]
        lines = [l for l in r.stderr.splitlines() if "error:" in l]
        # one line naming what could not be written: a checkpoint (with the bytes it needs) or, when
        # the disk fills between checkpoints, the log file being appended to
        assert len(lines) == 1 and str(disk / "run") in lines[0], r.stderr[-3000:]
        if "checkpoints" in lines[0]:
            assert "no space left" in lines[0] or "bytes free but a checkpoint needs about" in lines[0], lines[0]
            assert "bytes" in lines[0], lines[0]
        else:
            assert "No space left on device" in lines[0] and ".jsonl" in lines[0], lines[0]
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_checkpointer_close_names_a_full_disk_orbax_reports_on_close(tmp_path, monkeypatch):
    """orbax's `CheckpointManager.close` re-raises what its background threads hit; a metadata file
    written there fails as a bare "[Errno 28]" (no path). CI's 150k tmpfs run once ended on that
    line: `close` now names the checkpoint folder like every other full-disk error."""
    import errno
    ck = Checkpointer(tmp_path / "checkpoints", async_save=True)
    ck.save(1, {"state": _tree()}, {"step": 1})
    ck.wait()
    real_close = ck.manager.close

    def full_disk_close():
        real_close()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck.manager, "close", full_disk_close)
    with pytest.raises(OSError, match=rf"writing a checkpoint into {tmp_path / 'checkpoints'} failed: no space left"):
        ck.close()


def test_metrics_close_on_a_full_disk_names_the_file(tmp_path):
    """Closing the logs flushes what a failed write left buffered: on a full disk that is one OSError
    naming the file (it was a bare "[Errno 28]", which replaced the named error of the run's end), and
    every file is closed before it is raised."""
    import errno
    from elastic_jax.train.metrics import RunLogger

    class FullDisk:
        closed = False

        def close(self):
            self.closed = True
            raise OSError(errno.ENOSPC, "No space left on device")

    log = RunLogger(str(tmp_path), start_step=0, tensorboard=False)
    log._metrics.close()
    log._batches.close()
    log._metrics, log._batches = FullDisk(), FullDisk()
    with pytest.raises(OSError, match="writing .*metrics.jsonl failed: No space left on device") as e:
        log.close()
    assert e.value.errno == errno.ENOSPC and log._batches.closed


# ================================================================== decode-path context and cache checks (issue 29)
def _model():
    from test_faults import _tiny
    return _tiny()


def test_jitted_decode_past_the_cache_gives_nan_not_values():
    cfg, params = _model()
    cache = ej.init_cache(cfg, 1, 2, params)
    step = jax.jit(lambda p, t, c: ej.decode_step(p, t, c, cfg))
    tok = jnp.asarray([[1]], jnp.int32)
    for _ in range(2):
        logits, cache = step(params, tok, cache)
        assert np.isfinite(np.asarray(logits)).all()
    logits, cache = step(params, tok, cache)
    assert np.isnan(np.asarray(logits)).all()                    # past max_len=2
    from elastic_jax.finite import check_logits
    with pytest.raises(NonFiniteError):
        check_logits(logits[:, -1], "decode")


def test_cache_filled_at_other_widths_is_refused():
    cfg, params = _model()
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    half = ej.Widths(hidden=8)
    _, cache = ej.prefill(params, tokens, cfg, half, max_len=8)
    with pytest.raises(ValueError, match=r"cache was filled by the submodel at widths \[hidden=8;.*runs at \[hidden=16"):
        ej.decode_step(params, tokens[:, :1], cache, cfg)
    logits, cache = ej.decode_step(params, tokens[:, :1], cache, cfg, half)     # the same submodel: fine
    _, full = ej.prefill(params, tokens, cfg, None, max_len=8)
    ej.decode_step(params, tokens[:, :1], full, cfg, ej.Widths())            # None and full Widths are one model


def test_generate_refuses_a_prompt_beyond_the_context():
    cfg, params = _model()
    import dataclasses
    cfg = dataclasses.replace(cfg, max_position_embeddings=8)
    with pytest.raises(ValueError, match=r"prompt length 7 \+ max_new_tokens 2 exceeds the model's context "
                                         r"max_position_embeddings=8"):
        ej.generate(params, jnp.ones((1, 7), jnp.int32), cfg, max_new_tokens=2)


def test_traced_widths_out_of_range_are_caught_on_the_checked_path():
    from jax.experimental import checkify
    cfg, params = _model()
    f = jax.jit(checkify.checkify(lambda p, h: ej.forward(p, jnp.asarray([[1, 2]], jnp.int32), cfg,
                                                           ej.Widths(hidden=h), checked=True),
                                  errors=checkify.user_checks))
    err, logits = f(params, jnp.int32(8))
    err.throw()
    assert np.isfinite(np.asarray(logits)).all()
    for bad in (0, -3, 17):
        err, _ = f(params, jnp.int32(bad))
        with pytest.raises(checkify.JaxRuntimeError, match=r"Widths.hidden must be in \[1, full size\]"):
            err.throw()
    with pytest.raises(ValueError, match="Widths.hidden=0"):                # concrete: refused before tracing
        ej.forward(params, jnp.asarray([[1, 2]], jnp.int32), cfg, ej.Widths(hidden=0))


def test_empty_token_sequence_is_named():
    cfg, params = _model()
    with pytest.raises(ValueError, match=r"tokens must hold at least one position .* got shape \(1, 0\)"):
        ej.forward(params, jnp.zeros((1, 0), jnp.int32), cfg)

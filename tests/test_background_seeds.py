"""The main job's seeds in a worker thread (recipes/family.py `BackgroundSeeds`) and what makes that safe:
a SIGTERM reaches every run training in the process (runctl `stop_live_runs`, `relay_sigterm`), an error
in either thread stops the other's runs and surfaces once, and the rows come back in seed order."""
import dataclasses
import os
import signal
import threading
import time

import pytest

from elastic_jax.errors import Preempted
from elastic_jax.recipes import family
from elastic_jax.train import runctl


def _fake_run(started: threading.Event | None = None, limit_s: float = 30.0) -> str:
    """A 'training run' in the calling thread: polls its watcher like the loop does, until told to stop."""
    w = runctl.PreemptionWatcher()
    try:
        if started is not None:
            started.set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            if w.reached(0):
                raise Preempted(3, "run")
            time.sleep(0.01)
        return "finished"
    finally:
        w.close()


def _in_thread(fn):
    out, started = {}, threading.Event()

    def target():
        try:
            out["value"] = fn(started)
        except BaseException as e:
            out["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    assert started.wait(10)
    return t, out


def test_sigterm_in_a_main_thread_run_stops_the_runs_of_other_threads():
    t, out = _in_thread(lambda started: _fake_run(started))
    with pytest.raises(Preempted):
        main = runctl.PreemptionWatcher()            # the main thread's run holds the handler
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10
            while not main.reached(0) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert main.reached(0)
            raise Preempted(5, "main")
        finally:
            main.close()
    t.join(10)
    assert isinstance(out.get("error"), Preempted)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert not runctl._LIVE


def test_relay_sigterm_stops_other_threads_while_the_main_thread_is_not_training():
    before = signal.getsignal(signal.SIGTERM)
    t, out = _in_thread(lambda started: _fake_run(started))
    with pytest.raises(Preempted, match="saved checkpoints"):
        with runctl.relay_sigterm("/runs/x"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                              # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before
    t.join(10)
    assert isinstance(out.get("error"), Preempted)


@dataclasses.dataclass(frozen=True)
class _Experiment:
    seeds: int = 3
    progress: bool = True


def _background(monkeypatch, rows_fn):
    monkeypatch.setattr(family, "seed_rows", rows_fn)
    return family.BackgroundSeeds(_Experiment(), "out", None, None, None, None, None, lambda m: None, grace_s=10)


def test_background_seeds_return_rows_in_order_with_their_phases(monkeypatch):
    def rows(xp, k, out_dir, data, calib, eval_set, tok, gold, phases, say):
        assert xp.progress is False                      # no training bars from the worker
        phases["parent"] = phases.get("parent", 0.0) + 1.0
        time.sleep(0.05 * (3 - k))
        return {"seed": k}
    bg = _background(monkeypatch, rows)
    phases = {"parent": 10.0}
    assert bg.result(phases) == [{"seed": 1}, {"seed": 2}]
    assert phases["parent"] == 10.0 and phases["seeds_parent"] == 2.0 and phases["seeds_background"] > 0.05


def test_an_error_of_a_seed_surfaces_in_the_main_thread(monkeypatch):
    def rows(xp, k, *a):
        raise ValueError(f"seed {k}: bad data")
    bg = _background(monkeypatch, rows)
    with pytest.raises(ValueError, match="seed 1: bad data"):
        bg.result({})


def test_an_error_in_the_main_thread_stops_the_seed_runs(monkeypatch):
    started, finished = threading.Event(), []

    def rows(xp, k, *a):
        finished.append(_fake_run(started, limit_s=60))
        return {"seed": k}
    bg = _background(monkeypatch, rows)
    assert started.wait(10)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="main failed"):
        with bg:
            raise RuntimeError("main failed")
    assert time.monotonic() - t0 < 10                    # not the 60 s the run would take
    assert not bg.thread.is_alive() and finished == []   # seed 1 saved and stopped; seed 2 never started
    assert isinstance(bg.error, Preempted)

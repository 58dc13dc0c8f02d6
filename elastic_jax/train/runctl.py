"""Run control: the preemption notice and the run-folder lock.

`PreemptionWatcher`: "should every host save and stop after this step?". With `jax.distributed`
up, a SIGTERM (or the platform's own preemption notice) is caught by JAX's preemption service and
`multihost_utils.reached_preemption_sync_point(step)` turns it into one step on which every host
answers True; it must be asked on every host at every step. In a single process, a SIGTERM
handler sets a flag (the previous handler comes back on `close()`). Signals reach the main thread
only, so the handler sets the flag of every live watcher of the process: runs training in other
threads (the main job's seeds) save and stop too; `relay_sigterm()` does the same while the main
thread is not training itself.

`RunLock`: `<run folder>/run.lock` (JSON: host, pid, start time) held by one process while a run
trains there. A second run on the same folder gets `RunFolderLocked` naming the holder. A lock
left by a crash is taken over with a warning: on the same host when its pid no longer runs, on
another host when it was not refreshed (`touch()`, at most once a minute) for `stale_after_s`.
The folder may be a URL (gs://, through `fileio`'s path layer); there the lock is written in one
request (object stores have no exclusive create), so two runs started in the same instant may
both take it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import warnings

import jax
import numpy as np

from .. import fileio
from ..errors import Preempted, RunFolderLocked


def _distributed_client():
    try:
        from jax._src import distributed
        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


_LIVE: set = set()          # the process's open single-process watchers (any thread)
_LIVE_LOCK = threading.Lock()


def stop_live_runs() -> None:
    """Ask every run training in this process to save and stop at its next step (`Preempted`)."""
    with _LIVE_LOCK:
        for w in _LIVE:
            w.flag = True


class PreemptionWatcher:
    def __init__(self):
        self.flag = False
        self._prev = None
        self.multihost = _distributed_client() is not None
        if not self.multihost:
            with _LIVE_LOCK:
                _LIVE.add(self)
            if threading.current_thread() is threading.main_thread():
                self._prev = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        stop_live_runs()

    def reached(self, step: int) -> bool:
        """True on every host at the same step once any host got a termination notice."""
        if self.multihost:
            from jax.experimental import multihost_utils
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:         # the preemption service is off (jax_enable_preemption_service)
                return self.flag
        return self.flag

    def close(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None


@contextlib.contextmanager
def relay_sigterm(directory: str):
    """Main thread, while other threads train: a SIGTERM asks every live run to save and stop
    (`stop_live_runs`) and raises `Preempted` here (the main thread's own runs take over the signal
    while they train, and do the same). Outside the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        stop_live_runs()
        raise Preempted(None, directory)
    prev = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


class RunLock:
    """See the module docstring. `acquire()` raises `RunFolderLocked` when a live run holds it."""

    NAME = "run.lock"

    def __init__(self, folder: str, *, stale_after_s: float = 900.0):
        self.folder = fileio.resolve(folder)
        self.path = fileio.join(self.folder, self.NAME)
        self.stale_after_s = stale_after_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "start": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False
        self._last_touch = 0.0

    def _holder(self) -> dict | None:
        if not fileio.exists(self.path):
            return None
        try:
            return json.loads(fileio.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}                      # unreadable: a torn write; judged by its age

    def _stale(self, holder: dict) -> str | None:
        """Why the lock of `holder` is stale (None: it is live)."""
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            return None if fileio.pid_alive(holder["pid"]) else f"process {holder['pid']} no longer runs"
        try:
            age = time.time() - fileio.mtime(self.path)
        except FileNotFoundError:
            return "it was just released"
        return f"not refreshed for {age:.0f} s" if age > self.stale_after_s else None

    def acquire(self) -> None:
        data = json.dumps(self.me).encode()
        for _ in range(3):
            try:
                if fileio.is_url(self.path):
                    if fileio.exists(self.path):
                        raise FileExistsError(self.path)
                    fileio.write_json_atomic(self.path, self.me)
                    self.held = True
                    return
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                why = self._stale(holder)
                if why is None:
                    raise RunFolderLocked(
                        f"{os.path.dirname(self.path)} is in use by another run (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}, started {holder.get('start')}; lock {self.path}). Wait for it to end, "
                        f"or use another output folder; if that run is dead (another host's lock is taken over "
                        f"after {self.stale_after_s:.0f} s without a refresh), delete {self.path}")
                warnings.warn(f"taking over the stale lock {self.path} of host {holder.get('host')} pid "
                              f"{holder.get('pid')} (started {holder.get('start')}): {why}", stacklevel=2)
                fileio.write_json_atomic(self.path, self.me)
                self.held = True
                return
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except OSError as e:                 # a full disk: no half-written lock left behind
                with contextlib.suppress(OSError):
                    os.remove(self.path)
                raise OSError(e.errno, e.strerror, self.path) from None
            self.held = True
            return
        raise RunFolderLocked(f"{self.path}: could not take the run-folder lock (it changes hands repeatedly)")

    def touch(self) -> None:
        """Refresh the lock (at most once a minute), so other hosts see it is live."""
        if self.held and time.time() - self._last_touch > 60:
            try:
                if fileio.is_url(self.path):
                    fileio.write_json_atomic(self.path, self.me)
                else:
                    os.utime(self.path)
            except FileNotFoundError:
                pass
            self._last_touch = time.time()

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                fileio.remove(self.path)
            self.held = False


def gather_json(obj) -> list:
    """Every process's JSON-able `obj` (in process order)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    raw = json.dumps(obj).encode()
    n = np.asarray(multihost_utils.process_allgather(np.asarray([len(raw)], np.int32))).reshape(-1)
    buf = np.zeros((int(n.max()),), np.uint8)
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    allb = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), -1)
    return [json.loads(bytes(allb[i, :n[i]]).decode()) for i in range(jax.process_count())]


def acquire_everywhere(lock: RunLock) -> None:
    """Process 0 takes `lock`; every process raises the same `RunFolderLocked` if it could not."""
    err = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except RunFolderLocked as e:
            err = str(e)
    if jax.process_count() > 1:
        err = gather_json(err)[0]
    if err is not None:
        raise RunFolderLocked(err)

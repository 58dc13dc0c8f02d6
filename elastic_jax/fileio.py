"""Writing a folder atomically without ever losing what a user had there: `atomic_folder`.

    with atomic_folder(out, owned=HF_EXPORT_FILES, overwrite=True, protect=[src]) as tmp:
        ...write files into tmp...
    # now `out` is the complete new folder; the previous one is gone only if it held nothing
    # but files this writer owns

Rules (the only way any writer of this package replaces a folder):
  * an empty path, a target that is / contains a protected path (the source of an export), or a
    target that contains the current directory is refused (ValueError);
  * an existing empty folder is a valid target; an existing non-empty one needs `overwrite` AND
    must hold nothing but names matched by `owned` — else FileExistsError listing the others;
  * files are written into `.<name>.tmp-<pid>@<host>-*` beside the target and swapped in by one atomic
    `renameat2(RENAME_EXCHANGE)` where the OS supports it (else two renames; if the second fails
    the previous folder is renamed back);
  * leftovers of interrupted writes (`.<name>.tmp-<pid>@<host>-*` / `.<name>.old-...` of a process
    of THIS host that no longer runs; another host's are never touched, on a shared filesystem its
    pid means nothing here) are cleaned up on the next write, with a warning; a previous folder left
    aside by a crash between the two renames is put back first;
  * the new folder gets the permissions of a normal `mkdir` under the umask (mkdtemp gives 0700).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import os
import re
import shutil
import tempfile
import warnings
from typing import Callable, Iterable, Iterator

Owned = Callable[[str], bool]


def owned_names(*patterns: str) -> Owned:
    """A predicate on top-level names: True when one of the regexes matches the whole name."""
    rx = [re.compile(p) for p in patterns]
    return lambda name: any(r.fullmatch(name) for r in rx)


def _owned_entry(target: str, name: str, owned: Owned) -> bool:
    """A plain owned file, or a folder owned as `name/` holding only plain owned `name/file`s."""
    path = os.path.join(target, name)
    if os.path.islink(path):
        return False
    if os.path.isfile(path):
        return owned(name)
    return os.path.isdir(path) and owned(name + "/") and all(
        os.path.isfile(os.path.join(path, f)) and not os.path.islink(os.path.join(path, f)) and owned(f"{name}/{f}")
        for f in os.listdir(path))


def _inside(path: str, folder: str) -> bool:
    """`path` equals or lies under `folder` (both real, absolute)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _host_tag() -> str:
    import socket
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LIBC = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False when unsupported."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _LIBC.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def save_safetensors(arrays: dict, path: str, metadata: dict | None = None) -> None:
    """`safetensors.numpy.save_file`, with its I/O failures (a full or read-only disk) raised as
    the OSError they are (safetensors reports them as SafetensorError "... (os error 28)")."""
    import safetensors.numpy as stn
    from safetensors import SafetensorError
    try:
        stn.save_file(arrays, path, metadata=metadata)
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), path) from None


def _normal_permissions(folder: str) -> None:
    """What `mkdir` / `open` give under the umask (mkdtemp and some writers use 0700 / 0600)."""
    m = _umask()
    os.chmod(folder, 0o777 & ~m)
    for dirpath, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~m)
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~m)


def clean_stale(directory: str) -> list[str]:
    """Remove (and report) leftovers of interrupted writes of `directory` by dead processes; put a
    previous folder that a crash left aside back in place when `directory` is missing."""
    parent, name = os.path.split(directory)
    done = []
    for kind in ("old", "tmp"):
        for p in sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}.{kind}-*"))):
            m = re.fullmatch(rf"\.{re.escape(name)}\.{kind}-(\d+)(?:@([A-Za-z0-9_.]+))?-.*", os.path.basename(p))
            if m is None or (m.group(2) is not None and m.group(2) != _host_tag()) or pid_alive(int(m.group(1))):
                continue
            old = os.path.join(p, "old")
            if kind == "old" and os.path.isdir(old) and not os.path.lexists(directory):
                os.rename(old, directory)
                warnings.warn(f"{directory}: restored the previous folder that an interrupted write left in {p}",
                              stacklevel=3)
            shutil.rmtree(p, ignore_errors=True)
            done.append(p)
            warnings.warn(f"{directory}: removed {p}, left by an interrupted write", stacklevel=3)
    return done


def check_target(directory: str | os.PathLike, *, owned: Owned, overwrite: bool,
                 protect: Iterable[str | os.PathLike] = (), what: str = "write") -> str:
    """The absolute target path after the safety rules of the module docstring (no side effects)."""
    raw = os.fspath(directory)
    if not raw or not raw.strip():
        raise ValueError(f"{what}: the output path is empty")
    target = os.path.abspath(raw)
    real = os.path.realpath(target)
    if _inside(os.path.realpath(os.getcwd()), real):
        raise ValueError(f"{what}: the output {target} is (or contains) the current directory; refusing to replace it")
    for src in protect:
        if src is None:
            continue
        s = os.path.realpath(os.fspath(src))
        if _inside(s, real):
            raise ValueError(f"{what}: the output {target} is (or contains) the source {s}; write elsewhere")
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise FileExistsError(f"{what}: {target} exists and is not a folder; not replacing it")
        names = sorted(os.listdir(target))
        if names:
            if not overwrite:
                raise FileExistsError(f"{what}: {target} exists and is not empty; pass overwrite=True "
                                      "(CLI: --overwrite) to replace it")
            foreign = [n for n in names if not _owned_entry(target, n, owned)]
            if foreign:
                raise FileExistsError(
                    f"{what}: {target} holds files this writer did not write: {foreign[:10]}"
                    + (" ..." if len(foreign) > 10 else "") + "; not replacing it (move them, or write elsewhere)")
    return target


@contextlib.contextmanager
def atomic_folder(directory: str | os.PathLike, *, owned: Owned, overwrite: bool = False,
                  protect: Iterable[str | os.PathLike] = (), what: str = "write") -> Iterator[str]:
    """Yield a temporary folder to fill; on success it replaces `directory` atomically. On any
    error (or interrupt) the temporary folder is removed and `directory` is as it was."""
    target = check_target(directory, owned=owned, overwrite=overwrite, protect=protect, what=what)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    if clean_stale(target):     # a previous folder may be back in place: check the target again
        check_target(target, owned=owned, overwrite=overwrite, protect=protect, what=what)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}@{_host_tag()}-", dir=parent)
    try:
        yield tmp
        _normal_permissions(tmp)
        # re-check: the target may have changed while we wrote
        check_target(target, owned=owned, overwrite=overwrite, protect=protect, what=what)
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)     # tmp now holds the previous folder
        else:
            trash = tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}@{_host_tag()}-", dir=parent)
            os.rename(target, os.path.join(trash, "old"))
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(os.path.join(trash, "old"), target)
                os.rmdir(trash)
                raise
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` to write; on success it is flushed to disk and renamed
    over `path` (readers see the old file or the new one, never a truncated one). On any error
    the temporary file is removed and `path` is as it was; an OSError without a file name (a full
    disk while writing) is raised naming `path`."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent,
                               suffix=os.path.splitext(name)[1])   # writers that pick a format by suffix
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno and e.filename is None:   # a bare "[Errno 28]" from a write
            raise OSError(e.errno, e.strerror, path) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) into `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


# ------------------------------------------------------------------ one path layer (local or gs://)
def is_url(path: str | os.PathLike) -> bool:
    """A `scheme://` path (gs://, s3://, ...) rather than a local one."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """The canonical string of a run path: absolute for a local path, unchanged for a URL (gs://
    works wherever orbax / tensorstore take it: checkpoints, the lock, result files)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def epath_of(path: str | os.PathLike):
    """`etils.epath.Path` of `path` (local: the os backend; gs:// etc.: tf.io.gfile or fsspec)."""
    from etils import epath
    return epath.Path(resolve(path))


def join(path: str | os.PathLike, *names: str) -> str:
    return str(epath_of(path).joinpath(*names)) if is_url(path) else os.path.join(resolve(path), *names)


def exists(path) -> bool:
    return epath_of(path).exists() if is_url(path) else os.path.exists(path)


def isfile(path) -> bool:
    return epath_of(path).is_file() if is_url(path) else os.path.isfile(path)


def makedirs(path) -> None:
    epath_of(path).mkdir(parents=True, exist_ok=True)


def rename(src, dst) -> None:
    if is_url(src):
        epath_of(src).rename(epath_of(dst))
    else:
        os.rename(src, dst)


def mtime(path) -> float:
    return float(epath_of(path).stat().mtime) if is_url(path) else os.path.getmtime(path)


def remove(path) -> None:
    if is_url(path):
        epath_of(path).unlink()
    else:
        os.remove(path)


def read_text(path) -> str:
    return epath_of(path).read_text()


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """`obj` as JSON at `path`: locally through `atomic_file` (a temporary file beside it, renamed
    into place); on object stores, where no rename is atomic, written in one request."""
    import json
    text = json.dumps(obj, indent=1)
    if is_url(path):
        epath_of(path).write_text(text)
    else:
        write_text_atomic(path, text)

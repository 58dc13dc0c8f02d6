"""The named errors of elastic_jax, and the one JSON reader every loader uses.

Every expected failure (bad input, a damaged file, a diverged run) is one of these classes or a
plain `ValueError` / `OSError`; the CLI prints such errors as one `error: ...` line with exit
status 2 (`EXPECTED_ERRORS`). Anything else is a bug and keeps its traceback.

This module is the bottom layer: it imports nothing from the package.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence


class HFCheckpointError(ValueError):
    """Everything wrong with a checkpoint (or an export), one problem per line in `problems`."""

    def __init__(self, what: str, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s)\n  " + "\n  ".join(self.problems))


class CheckpointMismatch(ValueError):
    """The checkpoint in `out_dir` was written by a run with a different config (or teacher)."""


class CheckpointCorrupt(ValueError):
    """No step of a run's checkpoint folder can be restored (each failure is listed)."""


class JSONFileError(ValueError):
    """A JSON file that is not what its reader expects; the message names the file and the field."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm, update or parameter; the message names the step, stage
    and budget(s). The update was not applied and nothing was saved after it."""


class RunFolderLocked(ValueError):
    """Another live process holds the run folder's lock (the message names its host, pid and start)."""


class Preempted(Exception):
    """A termination notice (SIGTERM, or the platform's preemption notice) stopped training at a
    step boundary after every host saved a checkpoint of that step. Not an error: `elastic-jax run`
    prints one line and exits 0; rerunning the same command resumes from `step` (None: several runs
    training in threads of one process stopped, each at its own step)."""

    def __init__(self, step: int | None, directory: str):
        self.step, self.directory = step, directory
        super().__init__(f"preempted: saved a checkpoint at step {step} in {directory}; rerun the same command to "
                         "resume" if step is not None else
                         f"preempted: the runs training in {directory} saved checkpoints; rerun the same command "
                         "to resume")


class NonFiniteError(ValueError):
    """NaN / inf values where finite ones are needed (weights loaded, saved or exported, a
    checkpoint's state, a model's logits); the message names the tensor(s)."""


EXPECTED_ERRORS = (ValueError, OSError, TrainingDiverged)   # CLI: one `error:` line, exit status 2


def read_json(path: str | os.PathLike, *, what: str = "", required: Sequence[str] = ()) -> dict:
    """The JSON object in `path` (UTF-8), checked to be an object holding the `required` keys.
    Raises FileNotFoundError (missing) or JSONFileError naming the file (and field) otherwise.
    transformers' `{"__float__": "Infinity"}` spelling of non-finite floats is decoded."""
    path = os.fspath(path)
    label = f"{path}" + (f" ({what})" if what else "")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{label}: no such file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        obj = decode_json_floats(json.loads(text))
    except (json.JSONDecodeError, ValueError) as e:
        raise JSONFileError(f"{label}: not valid JSON ({e})") from None
    except RecursionError:
        raise JSONFileError(f"{label}: JSON nested too deeply to read") from None
    if not isinstance(obj, dict):
        raise JSONFileError(f"{label}: the top level must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise JSONFileError(f"{label}: missing required field(s) {missing}")
    return obj


def decode_json_floats(obj):
    """`obj` with transformers' `{"__float__": "Infinity"}` spelling of non-finite floats (what
    `json.load` returns for a config.json written by transformers >= 5) decoded to floats."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and isinstance(obj["__float__"], str):
            try:
                return float(obj["__float__"])
            except ValueError:
                return obj
        return {k: decode_json_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_json_floats(v) for v in obj]
    return obj


def json_field(obj: dict, key: str, types, path: str | os.PathLike, *, where: str = "") -> Any:
    """`obj[key]` checked to be of `types`; JSONFileError naming file and field otherwise."""
    field = f"{where}.{key}" if where else key
    if key not in obj:
        raise JSONFileError(f"{os.fspath(path)}: field {field!r} is missing")
    v = obj[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise JSONFileError(f"{os.fspath(path)}: field {field!r} must be {names}, got {type(v).__name__} {v!r:.80}")
    return v


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def check_finite_number(value, name: str, *, positive: bool = False, allow_inf: bool = False) -> float:
    """`value` as a float, checked finite (or +inf when `allow_inf`) and > 0 when `positive`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: must be a number")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise ValueError(f"{name}={value!r}: must be finite")
    if positive and not v > 0:
        raise ValueError(f"{name}={value!r}: must be > 0")
    return v

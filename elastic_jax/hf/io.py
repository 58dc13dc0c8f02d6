"""Safetensors files of an HF checkpoint, through the `safetensors` library, float8 included.

On disk (what `transformers.NemotronHForCausalLM.save_pretrained` writes and the Hub holds):
`model.safetensors`, or shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json`. Writing goes through `safetensors.numpy.save_file`, which tags
float8 (`F8_E4M3`) and uint8 (`U8`, the packed NVFP4 weights ModelOpt writes) itself. Reading
goes through `safe_open`; its numpy framework cannot build float8 arrays, so those tensors (and
only those) are memory-mapped at the offsets `safe_open` has validated: the library checks that
the tensors cover the data buffer contiguously to the end of the file, in `offset_keys()` order.
"""
from __future__ import annotations

import contextlib
import json
import os

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..errors import HFCheckpointError, JSONFileError, read_json
from ..fileio import save_safetensors

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# bytes per element of every safetensors dtype tag (to locate a tensor in the data buffer)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# dtypes safetensors' numpy framework cannot build: read through ml_dtypes at the validated offset
_ML_DTYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


def write_safetensors(arrays: dict, path: str, metadata: dict | None = None) -> None:
    """`safetensors.numpy.save_file` of {name: array} (float32 / bfloat16 / float16 / float8_e4m3fn /
    uint8 ...; 0-d scalars included), I/O failures raised as OSError (`fileio.save_safetensors`)."""
    # np.require keeps 0-d scalars 0-d (np.ascontiguousarray would make them shape (1,))
    save_safetensors({k: np.require(np.asarray(a), requirements="C") for k, a in arrays.items()}, path,
                     metadata=metadata)


class SafetensorsFile:
    """One safetensors file opened with `safe_open` (memory-mapped); any dtype read, float8 too."""

    def __init__(self, path: str):
        self.path = path
        self._cm = safe_open(path, framework="np")
        self._h = self._cm.__enter__()
        self._offsets: dict[str, int] | None = None

    def keys(self) -> list[str]:
        return list(self._h.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._h.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The safetensors dtype tag ("F32", "BF16", "F8_E4M3", "U8", ...)."""
        return self._h.get_slice(key).get_dtype()

    def _nbytes(self, key: str) -> int:
        return int(np.prod(self.shape(key), dtype=np.int64)) * _ITEMSIZE[self.dtype(key)]

    def read(self, key: str) -> np.ndarray:
        dt = self.dtype(key)
        if dt not in _ML_DTYPES:
            return self._h.get_tensor(key)
        if self._offsets is None:      # data buffer = the file's tail; tensors contiguous in offset order
            order = self._h.offset_keys()
            pos = os.path.getsize(self.path) - sum(self._nbytes(k) for k in order)
            self._offsets = {}
            for k in order:
                self._offsets[k] = pos
                pos += self._nbytes(k)
        mm = np.memmap(self.path, dtype=_ML_DTYPES[dt], mode="r", offset=self._offsets[key], shape=self.shape(key))
        return np.array(mm)

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def progress_bar(enabled: bool, total: int, desc: str, unit: str):
    """A tqdm bar over the tensors of a checkpoint (disabled unless `enabled`)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def read_tensor(path: str, key: str) -> np.ndarray:
    """One tensor of a safetensors file, any dtype (float8 included)."""
    f = SafetensorsFile(path)
    try:
        return f.read(key)
    finally:
        f.close()


def tensor_keys(path: str) -> list[str]:
    """The tensor names of a safetensors file."""
    f = SafetensorsFile(path)
    try:
        return f.keys()
    finally:
        f.close()


def checkpoint_bytes(directory: str) -> int:
    """Bytes of the top-level safetensors files of an HF directory."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.endswith(".safetensors"))


def unsafe_shard_name(directory: str, fname: str) -> str | None:
    """Why `fname` is not a plain file name inside `directory` (None when it is)."""
    if not fname or fname in (".", "..") or os.path.isabs(fname) or "/" in fname or "\\" in fname \
            or os.path.basename(fname) != fname or "\0" in fname:
        return "a shard must be a plain file name inside the checkpoint folder (no '..', '/', absolute paths)"
    path = os.path.join(directory, fname)
    if os.path.islink(path):
        real, root = os.path.realpath(path), os.path.realpath(directory)
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            return f"a symlink that leaves the checkpoint folder (-> {real})"
    return None


class CheckpointFiles:
    """The safetensors files of a checkpoint (headers read, tensors memory-mapped and read one at a
    time) and which file holds each key (`key_file`). Unreadable files are collected in `problems`."""

    def __init__(self, directory: str):
        self.directory = directory
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, SafetensorsFile] = {}
        self.key_file: dict[str, str] = {}
        self.problems: list[str] = []
        index = os.path.join(directory, SAFE_INDEX)
        single = os.path.join(directory, SAFE_SINGLE)
        if os.path.isfile(index):
            self._from_index(index)
        elif os.path.isfile(single):
            keys = self._keys(SAFE_SINGLE)
            if keys is not None:
                self.key_file = {k: SAFE_SINGLE for k in keys}
        else:
            others = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if len(others) == 1:
                keys = self._keys(others[0])
                if keys is not None:
                    self.key_file = {k: others[0] for k in keys}
            elif others:
                raise HFCheckpointError(f"no {SAFE_INDEX} in {directory}",
                                        [f"{len(others)} safetensors files ({', '.join(others[:4])}, ...) but no "
                                         "index saying which holds which tensor"])
            else:
                raise FileNotFoundError(f"{directory}: no {SAFE_SINGLE} and no {SAFE_INDEX}")

    def _from_index(self, index: str) -> None:
        try:
            wmap = read_json(index, what="safetensors index", required=("weight_map",))["weight_map"]
        except JSONFileError as e:
            raise HFCheckpointError(f"corrupt index {index}", [str(e)]) from None
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise HFCheckpointError(f"corrupt index {index}",
                                    ["field 'weight_map' must be an object of tensor name -> file name"])
        files = sorted(set(wmap.values()))
        unsafe = [f"{f!r}: {why}" for f in files for why in [unsafe_shard_name(self.directory, f)] if why]
        if unsafe:
            raise HFCheckpointError(f"unsafe shard names in {index} (never opened)", unsafe)
        listed: dict[str, set] = {}
        for fname in files:
            keys = self._keys(fname)
            if keys is not None:
                listed[fname] = keys
        for k, fname in wmap.items():
            if fname not in listed:
                continue
            if k not in listed[fname]:
                self.problems.append(f"{k}: the index puts it in {fname}, which does not contain it")
            else:
                self.key_file[k] = fname

    def _keys(self, fname: str) -> set | None:
        why = unsafe_shard_name(self.directory, fname)
        if why:
            raise HFCheckpointError(f"unsafe safetensors file in {self.directory} (never opened)", [f"{fname!r}: {why}"])
        path = os.path.join(self.directory, fname)
        if not os.path.isfile(path):
            self.problems.append(f"{fname}: listed in the index but missing from {self.directory}")
            return None
        try:
            h = SafetensorsFile(path)
        except (SafetensorError, OSError) as e:
            self.problems.append(f"{fname}: truncated or corrupt safetensors file ({os.path.getsize(path)} bytes): {e}")
            return None
        self._stack.callback(h.close)
        self._handles[fname] = h
        return set(h.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return self._handles[self.key_file[key]].shape(key)

    def dtype(self, key: str) -> str:
        return self._handles[self.key_file[key]].dtype(key)

    def read(self, key: str) -> np.ndarray:
        fname = self.key_file[key]
        try:
            return self._handles[fname].read(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise HFCheckpointError(f"cannot read {key}", [f"{fname}: {e}"]) from None

    def close(self) -> None:
        self._stack.close()


def write_index(directory: str, weight_map: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json` (tensor name -> shard file)."""
    with open(os.path.join(directory, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


__all__ = ["CheckpointFiles", "SAFE_INDEX", "SAFE_SINGLE", "SafetensorsFile", "checkpoint_bytes", "progress_bar",
           "read_tensor", "tensor_keys", "unsafe_shard_name", "write_index", "write_safetensors"]

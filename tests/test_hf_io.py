"""`hf.io`: the one safetensors reader / writer (the `safetensors` library; float8 and the packed
NVFP4 uint8 included), checked against the library's own header and numpy / ml_dtypes values."""
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from elastic_jax.errors import HFCheckpointError
from elastic_jax.hf import io as hfio


def _bits(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _arrays():
    rng = np.random.default_rng(0)
    return {"w8": rng.uniform(-448, 448, (5, 7)).astype(ml_dtypes.float8_e4m3fn),
            "packed": rng.integers(0, 256, (4, 3), dtype=np.uint8),
            "bf": rng.normal(size=(3, 2)).astype(ml_dtypes.bfloat16),
            "scale": np.asarray(np.float32(0.125)),                       # 0-d stays 0-d
            "block": rng.uniform(0, 448, (2, 16)).astype(ml_dtypes.float8_e4m3fn),
            "f32": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]}  # not contiguous


def test_write_then_read_every_dtype_bit_for_bit(tmp_path):
    path = str(tmp_path / "a.safetensors")
    arrays = _arrays()
    hfio.write_safetensors(arrays, path, metadata={"format": "pt"})
    with safe_open(path, framework="np") as h:     # the library's own tags
        assert {k: h.get_slice(k).get_dtype() for k in h.keys()} == {
            "w8": "F8_E4M3", "packed": "U8", "bf": "BF16", "scale": "F32", "block": "F8_E4M3", "f32": "F32"}
        assert h.metadata() == {"format": "pt"}
    assert sorted(hfio.tensor_keys(path)) == sorted(arrays)
    for k, a in arrays.items():
        got = hfio.read_tensor(path, k)
        assert got.dtype == a.dtype and got.shape == a.shape, k
        np.testing.assert_array_equal(_bits(got), _bits(a), err_msg=k)


def test_checkpoint_files_index_shards_and_a_corrupt_file(tmp_path):
    arrays = _arrays()
    hfio.write_safetensors({k: arrays[k] for k in ("w8", "scale")}, str(tmp_path / "model-00001-of-00002.safetensors"))
    hfio.write_safetensors({k: arrays[k] for k in ("packed", "block")}, str(tmp_path / "model-00002-of-00002.safetensors"))
    hfio.write_index(str(tmp_path), {"w8": "model-00001-of-00002.safetensors", "scale": "model-00001-of-00002.safetensors",
                                     "packed": "model-00002-of-00002.safetensors", "block": "model-00002-of-00002.safetensors"}, 0)
    files = hfio.CheckpointFiles(str(tmp_path))
    try:
        assert not files.problems and files.dtype("block") == "F8_E4M3" and files.shape("scale") == ()
        for k in ("w8", "block", "packed", "scale"):
            assert files.read(k).shape == arrays[k].shape
            np.testing.assert_array_equal(_bits(files.read(k)), _bits(arrays[k]))
    finally:
        files.close()
    # bytes past the last tensor: safetensors refuses the file (so float8 offsets are always exact)
    with open(tmp_path / "model-00002-of-00002.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    files = hfio.CheckpointFiles(str(tmp_path))
    assert any("model-00002-of-00002.safetensors: truncated or corrupt" in p for p in files.problems)
    files.close()
    with pytest.raises(HFCheckpointError, match="unsafe shard"):
        hfio.write_index(str(tmp_path), {"w8": "../x.safetensors"}, 0)
        hfio.CheckpointFiles(str(tmp_path))
    assert hfio.checkpoint_bytes(str(tmp_path)) == sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path)
                                                       if f.endswith(".safetensors"))

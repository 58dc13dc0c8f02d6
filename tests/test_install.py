"""Installs as users make them: the repository root shadows no distribution on the package index,
and a non-editable wheel built from a clean checkout works in a fresh environment outside the
source tree (every other test runs against the editable install, which hides a subpackage missing
from the wheel)."""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, copy_source, fresh_venv


def _run(cmd, cwd, timeout=600, **kw):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# Run from the repository root with the root first on sys.path (what `python -m pytest`, a notebook
# or `python -c` there do): which `kernels` is found, and does transformers build a NemotronH?
_SHADOW_PROBE = r"""
import importlib.util, json, os, sys
root = os.path.abspath(sys.argv[1])
sys.path.insert(0, root)
spec = importlib.util.find_spec("kernels")
out = {"origin": spec and spec.origin,
       "locations": [os.path.abspath(p) for p in (spec.submodule_search_locations or [])] if spec else []}
if sys.argv[2] == "1":
    from transformers import NemotronHConfig, NemotronHForCausalLM
    m = NemotronHForCausalLM(NemotronHConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
        layers_block_type=["mamba", "attention"], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8))
    import torch
    out["logits"] = list(m(torch.zeros(1, 4, dtype=torch.long)).logits.shape)
print(json.dumps(out))
"""


def test_repository_root_does_not_shadow_hugging_face_kernels():
    """transformers >= 5.25 imports Hugging Face's `kernels` when it builds a model; a package named
    `kernels` in our root would be found first from there. Our top-level kernels/ is no package."""
    assert not os.path.exists(os.path.join(REPO_ROOT, "kernels", "__init__.py")), \
        "kernels/__init__.py makes the folder importable as `kernels` from the repository root"
    with_tf = _installed("transformers") and _installed("torch")
    out = json.loads(_run([sys.executable, "-c", _SHADOW_PROBE, REPO_ROOT, "1" if with_tf else "0"], cwd=REPO_ROOT))
    origin, ours = out["origin"], os.path.join(REPO_ROOT, "kernels")
    assert origin is None or not os.path.abspath(origin).startswith(ours + os.sep), \
        f"`kernels` resolves to our file {origin}"   # (a venv inside the checkout is not ours)
    if _installed("kernels"):   # Hugging Face's distribution: it, not our folder, is what `kernels` means
        assert origin is not None and "site-packages" in origin, out
        assert os.path.join(REPO_ROOT, "kernels") not in out["locations"], out
    if with_tf:
        assert out["logits"] == [1, 4, 64]


_SMOKE = r"""
import os, sys, numpy as np, jax, elastic_jax as ej
assert os.path.abspath(ej.__file__).startswith(os.path.abspath(sys.prefix)), ej.__file__
cfg = ej.NemotronHConfig(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                         ssm_state_size=8, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)
params = ej.init_params(cfg, jax.random.PRNGKey(0))
tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % cfg.vocab_size
w = ej.Widths(hidden=24, mamba_heads=2, attn_heads=2, moe_experts=2, moe_ffn=8)
sub_cfg, sub = ej.slice_params(params, cfg, w)
err = float(abs(ej.forward(sub, tokens, sub_cfg) - ej.forward(params, tokens, cfg, w)).max())
assert err < 1e-5, err
print("ok", ej.kernels.__file__)
"""


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    """`pip install .` / `pip install git+...` (Colab, pod images): the wheel built from a clean
    checkout holds every subpackage; installed non-editable into a fresh venv, it imports, runs a
    forward and a slice, and its console script answers --help, from a folder outside the tree."""
    src = copy_source(str(tmp_path / "src"))
    try:   # build with this environment's setuptools when it meets pyproject's requirement (no download)
        isolation = int(importlib.metadata.version("setuptools").split(".")[0]) < 68
    except importlib.metadata.PackageNotFoundError:
        isolation = True
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *([] if isolation else ["--no-build-isolation"]),
          "-w", str(tmp_path / "dist"), src], cwd=str(tmp_path))
    wheels = os.listdir(tmp_path / "dist")
    assert len(wheels) == 1 and wheels[0].endswith(".whl"), wheels
    import zipfile
    names = zipfile.ZipFile(tmp_path / "dist" / wheels[0]).namelist()
    packages = {os.path.dirname(n) for n in names if n.endswith("/__init__.py")}
    expected = {os.path.relpath(d, src) for d, _, files in os.walk(os.path.join(src, "elastic_jax"))
                if "__init__.py" in files}
    assert expected <= packages, f"subpackages missing from the wheel: {sorted(expected - packages)}"
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` in the wheel shadows HF's"

    python = fresh_venv(str(tmp_path / "venv"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([python, "-c", "import elastic_jax"], cwd=str(elsewhere), capture_output=True, text=True)
    assert r.returncode != 0, "the fresh venv already imports elastic_jax: the test would prove nothing"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(tmp_path / "dist" / wheels[0])],
         cwd=str(elsewhere))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    out = _run([python, "-c", _SMOKE], cwd=str(elsewhere), env=env)
    assert out.startswith("ok") and str(tmp_path / "venv") in out
    helptext = _run([str(tmp_path / "venv" / "bin" / "elastic-jax"), "--help"], cwd=str(elsewhere), env=env)
    assert "run" in helptext and "slice" in helptext

"""Shared test helpers: the tiny model configs and the closeness assertions that several test files
use (import them with `from conftest import ...`; pytest puts this folder on `sys.path`).

The suite runs on ONE CPU device: `train.make_mesh` spans all devices, so a process with forced
extra devices would change every training test's mesh. Tests that need several devices (and
multi-process / SIGKILL tests) therefore keep their own subprocess."""
from __future__ import annotations

import os

# Compile fast. Tiny test programs spend most of their CPU time in XLA:CPU's LLVM passes, not in
# running; level-0 codegen leaves the HLO (fusions, op order) as it is, so results are unchanged.
# Set before any backend exists, here and (through the environment) in every subprocess a test
# starts (the quick main job, the multi-device scripts). Measured in BUILD_NOTES ("Test suite time").
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_XLA).strip()

import chex  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import elastic_jax as ej  # noqa: E402

# The small hybrid most unit tests start from (hidden 32, 4 Mamba heads in 2 groups, GQA 4/2,
# 4 experts top-2); a test file states only the fields it changes.
TINY = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16)

# The "hidden 64" hybrid of the foundation invariants (test_model, test_attention): 8 Mamba heads,
# 8 experts, a chunk of 8 so that sequences cross SSD chunk boundaries.
HYBRID64 = ej.NemotronHConfig(vocab_size=96, hidden_size=64, hybrid_override_pattern="MEM*-E", num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8,
                              mamba_head_dim=8, n_groups=2, ssm_state_size=16, chunk_size=8, n_routed_experts=8,
                              num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48)


def tiny_config(pattern: str, **overrides) -> ej.NemotronHConfig:
    """`TINY` with the layer pattern `pattern` and `overrides` (any NemotronHConfig field)."""
    return ej.NemotronHConfig(**{**TINY, "hybrid_override_pattern": pattern, **overrides})


def is_shape(x) -> bool:
    """Leaf predicate for `ej.param_shapes` trees (tuples of ints)."""
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def random_params(cfg: ej.NemotronHConfig, seed: int = 0, scale: float = 0.5):
    """Gaussian float32 numpy parameters of `cfg`'s shapes (no JAX compile per shape)."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: (scale * rng.randn(*s)).astype(np.float32), ej.param_shapes(cfg), is_leaf=is_shape)


def max_abs_diff(a, b) -> float:
    """max |a - b| in float64."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_close(a, b, tol: float = 1e-5, what: str = "") -> None:
    """max |a - b| <= tol * max(max |b|, 1): the scale-relative check used against references."""
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = max(float(np.abs(b).max(initial=0.0)), 1.0)
    err = float(np.abs(a - b).max(initial=0.0)) / scale
    assert err <= tol, f"{what}: max error {err:.2e} (relative to {scale:.2e}) > {tol:.0e}"


def assert_trees_equal(a, b) -> None:
    """Same tree structure, shapes and dtypes, and bit-equal values."""
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_equal(a, b)


# ------------------------------------------------------------------------ installs as users make them
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_source(dest: str) -> str:
    """The files a clean checkout has (git's tracked and untracked-but-not-ignored files, so
    uncommitted work is included) copied to `dest`; a build there leaves the checkout untouched."""
    import shutil
    import subprocess
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(REPO_ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return dest


def fresh_venv(dest: str) -> str:
    """A new virtual environment at `dest` without elastic_jax, whose dependencies are this
    environment's installed distributions (linked, not reinstalled: no downloads, seconds, not
    minutes). elastic_jax's own install (editable finder, dist-info, .pth hooks) is left out, so
    the venv imports elastic_jax only after something installs it there. Returns its python."""
    import site
    import subprocess
    import sys
    import sysconfig
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", dest], check=True)
    python = os.path.join(dest, "bin", "python")
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    deps = os.path.join(dest, "deps")
    os.makedirs(deps)
    ours = ("elastic_jax", "__editable__", "__editable___elastic_jax")
    for parent in {sysconfig.get_paths()["purelib"], *site.getsitepackages()}:
        if not os.path.isdir(parent):
            continue
        for name in os.listdir(parent):
            if name.startswith(ours) or name.endswith(".pth") or os.path.exists(os.path.join(deps, name)):
                continue
            os.symlink(os.path.join(parent, name), os.path.join(deps, name))
    with open(os.path.join(venv_site, "zz_parent_deps.pth"), "w") as f:
        f.write(deps + "\n")
    return python

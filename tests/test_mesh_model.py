"""The model and kernels under a mesh (8 fake CPU devices, own process: tests/scripts/
mesh_model_check.py) equal one device: expert-parallel MoE (all-to-all and psum schemes, both kernel
impls), activation constraints, SSD / gmm per shard without gathering their operands. And the
rules table below the model: overrides, the sufficiently-sharded check, TrainConfig fields."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import elastic_jax as ej
from conftest import FAST_XLA, tiny_config
from elastic_jax import sharding as shd
from elastic_jax.train.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "mesh_model_check.py")


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "mesh.json"
    env = dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow   # one 8-device subprocess (mesh_results)
def test_model_under_mesh_equals_one_device(mesh_results):
    rows = mesh_results["model"]
    assert {r["mesh"] for r in rows} >= {"expert=8", "data=2,expert=4", "fsdp=2,tensor=2,expert=2"}
    assert {r["widths"] for r in rows} == {"full", "masked"}
    assert {r["impl"] for r in rows} == {"xla", "pallas", "xla+scan"}
    for r in rows:
        assert r["logits_err"] < 1e-5 and r["grad_err"] < 1e-5, r
    # the expert axis really dispatched tokens by all-to-all; rules without it fall back to psum
    by = {(r["mesh"], r["widths"]): r for r in rows}
    assert by[("expert=8", "full")]["all_to_all"] > 0
    # under lax.scan (part C) too: the layer loop is a while loop with the all-to-alls inside
    scan = by[("expert=8 scan", "masked")]
    assert scan["all_to_all"] > 0 and scan["while"] > by[("expert=8", "masked")]["while"], scan
    assert by[("data=2,expert=4, batch->data", "masked")]["all_to_all"] == 0


@pytest.mark.slow   # one 8-device subprocess (mesh_results)
def test_kernels_per_shard_equal_unsharded(mesh_results):
    rows = mesh_results["kernels"]
    assert {(r["kernel"], r["impl"]) for r in rows} == {(k, i) for k in ("ssd", "gmm") for i in ("xla", "pallas")}
    for r in rows:
        assert r["err"] < 1e-5 and r["grad_err"] < 1e-5, r
        assert r["all_gather"] == 0, r          # per shard: no operand is gathered


@pytest.mark.slow   # one 8-device subprocess (mesh_results)
def test_quantized_experts_under_mesh(mesh_results):
    q = mesh_results["quant"]
    assert q["amax_err"] < 1e-6 and q["err"] < 1e-5, q


@pytest.mark.slow   # one 8-device subprocess (mesh_results)
def test_expert_parallel_loads_and_bf16(mesh_results):
    """Issue 14's per-expert loads come out of the expert-parallel MoE equal to one device's
    (padding excluded), also for soft widths in the official soft-mask form; bf16 parameters: bf16
    grouped matmuls at DEFAULT precision per shard."""
    rows = mesh_results["moe"]
    assert len(rows) == 3
    n_valid_choices = (8 * 8 - 3) * 2                 # B·L tokens, 3 padding, top-2
    for r in rows:
        assert r["err"] < 1e-5 and r["load_err"] == 0 and r["load_total"] == n_valid_choices, r
        assert r["soft_premask_err"] < 1e-5, r          # soft widths, official pre-relu² mask form
        assert r["bf16_err"] < 2e-2 and r["bf16_vs_f32"] < 5e-2, r
        assert r["ragged_dots"] and all(d == ["bfloat16", "(Precision.DEFAULT, Precision.DEFAULT)"]
                                        for d in r["ragged_dots"]), r


@pytest.mark.slow   # one 8-device subprocess (mesh_results)
def test_moe_token_chunks_equal_all_tokens_at_once(mesh_results):
    """ComputePolicy.moe_token_chunk (issue 12: the 49K stage's MoE dispatch one chunk at a time):
    one device and every mesh layout, values, per-expert loads and gradients equal the unchunked
    call, and the chunks are one scan of n chunks (22 of 3 tokens on one device, 3-11 per token shard;
    every count pads the last chunk)."""
    rows = mesh_results["moe_chunks"]
    assert len(rows) == 4
    for r in rows:
        assert r["chunk_err"] < 1e-5 and r["chunk_grad_err"] < 1e-5 and r["chunk_load_err"] == 0, r
        assert r["chunks"] in r["chunk_scans"] and r["chunks"] not in r["unchunked_scans"], r


# ------------------------------------------------------------------ rules table (no devices needed)
MESH = AbstractMesh((2, 2, 2, 1), shd.MESH_AXES)
SMALL = tiny_config("M*-E", intermediate_size=32, chunk_size=128)


def test_rules_overrides_and_errors():
    rules = shd.merge_rules([("embed", None), ("batch", ["data"])])
    assert dict(rules)["embed"] is None and dict(rules)["batch"] == ("data",)
    assert shd.logical_to_spec(("vocab", "embed"), (64, 32), MESH, rules) == P("tensor", None)
    assert shd.logical_to_spec(("vocab", "embed"), (64, 32), MESH) == P("tensor", "fsdp")
    with pytest.raises(ValueError, match="not a mesh axis"):
        shd.merge_rules([("embed", "model")])
    with pytest.raises(ValueError, match="sharding_rules"):
        TrainConfig(sharding_rules=(("embed", "nope"),))
    cfg = TrainConfig(sharding_rules=[["embed", None]])
    assert cfg.sharding_rules == (("embed", None),)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # without a mesh in context the activation helpers are no-ops
    x = np.ones((2, 3))
    assert shd.constrain(x, ("batch", "act_embed")) is x and shd.context_mesh() is None


def test_insufficiently_sharded_params_are_an_error_naming_them():
    shapes = jax.eval_shape(lambda: ej.init_params(SMALL, jax.random.PRNGKey(0)))
    axes = ej.param_axes(SMALL)
    assert shd.assert_params_sufficiently_sharded(axes, shapes, MESH) == 0.0
    # hidden 30 does not divide fsdp=4: every embed-sharded matrix silently replicates today
    odd = SMALL.replace(hidden_size=30)
    mesh = AbstractMesh((1, 4, 2, 1), shd.MESH_AXES)
    shapes = jax.eval_shape(lambda: ej.init_params(odd, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match=r"\['embed'\].*split 2x of 8x"):
        shd.assert_params_sufficiently_sharded(ej.param_axes(odd), shapes, mesh)
    # the tolerance admits it, and the fraction comes back
    assert 0.5 < shd.assert_params_sufficiently_sharded(ej.param_axes(odd), shapes, mesh, tolerance=1.0) <= 1.0

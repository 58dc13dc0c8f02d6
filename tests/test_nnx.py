"""elastic_jax.nnx.ElasticLM (the Flax NNX wrapper): logits equal `ej.forward` on the same
weights, parent and nested widths; its params carry the logical axes; it round-trips to the
functional tree; `nnx.Optimizer` trains it (one step lowers the loss)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elastic_jax as ej
from conftest import assert_close, random_params, tiny_config

nnx = pytest.importorskip("flax.nnx")
from elastic_jax.nnx import ElasticLM  # noqa: E402

CFG = tiny_config("MEM*-E")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(jnp.asarray, random_params(CFG, seed=1, scale=0.3))


@pytest.mark.slow
def test_logits_equal_the_functional_forward_parent_and_nested(params):
    model = ElasticLM.from_params(CFG, params)
    nested = ej.Widths(hidden=24, mamba_heads=2, attn_heads=2, ffn=24, moe_experts=2, moe_ffn=8).resolve(CFG)
    for w in (None, nested):
        assert_close(model(TOKENS, w), ej.forward(params, TOKENS, CFG, w), 1e-5, f"widths={w}")
    # and a different nested width really is a different function (the check can fail)
    assert float(jnp.abs(model(TOKENS, nested) - model(TOKENS)).max()) > 1e-3


def test_round_trip_and_logical_axes(params):
    model = ElasticLM.from_params(CFG, params)
    back = model.to_params()
    chex.assert_trees_all_equal_shapes_and_dtypes(back, params)
    chex.assert_trees_all_equal(back, params)
    chex.assert_trees_all_equal(ElasticLM.from_params(CFG, back).to_params(), params)
    # every nnx.Param carries its logical axis names (ej.param_axes), leaf for leaf
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    got = jax.tree.leaves(nnx.to_pure_dict(specs), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    want = jax.tree.leaves(ej.param_axes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    assert len(got) == len(want) == len(jax.tree.leaves(params))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(specs),
             is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]]
    want_by_path = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(
        {**ej.param_axes(CFG), "layers": dict(enumerate(ej.param_axes(CFG)["layers"]))},
        is_leaf=lambda x: isinstance(x, tuple))[0]}
    assert {p: tuple(s) for p, s in zip(paths, got)} == want_by_path
    assert tuple(model.embed.get_metadata()["out_sharding"]) == ("vocab", "embed")


def test_random_init_and_bad_arguments():
    model = ElasticLM(CFG, rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal_shapes(model.to_params(), ej.init_params(CFG, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="exactly one of rngs= .* or params="):
        ElasticLM(CFG)
    with pytest.raises(ValueError, match="parameters do not match the config"):
        ElasticLM.from_params(tiny_config("M*"), ej.init_params(CFG, jax.random.PRNGKey(0)))


@pytest.mark.slow
def test_nnx_optimizer_step_lowers_the_loss(params):
    model = ElasticLM.from_params(CFG, params)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    w = ej.Widths(hidden=24, ffn=24).resolve(CFG)            # train a nested submodel, as the KD step does

    def loss_fn(m):
        logits = m(TOKENS[:, :-1], w)
        return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

    @nnx.jit
    def step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    before = float(step(model, opt))
    after = float(loss_fn(model))
    assert np.isfinite(before) and after < before - 1e-3, (before, after)
    # the update reached the functional tree: the same loss through ej.forward
    logits = ej.forward(model.to_params(), TOKENS[:, :-1], CFG, w)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()
    assert abs(float(ref) - after) < 1e-5

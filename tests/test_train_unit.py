"""Training building blocks on one device: chunked KD / CE losses, optimizer groups and schedules,
the sharding rules, configs and overrides, and short in-process runs (LM, fixed-student KD, NaN stop)."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

import elastic_jax as ej
from elastic_jax.data import DataConfig, make_dataset
from elastic_jax.elastic.config import ElasticConfig
from elastic_jax.experiment import DistillConfig, apply_overrides, load_experiment
from elastic_jax.train import (Checkpointer, MeshConfig, OptimConfig, Stage, TrainConfig, TrainingDiverged,
                               make_mesh, train_elastic, train_kd, train_lm)
from elastic_jax.train.losses import chunked_ce, chunked_kl
from elastic_jax.train.optim import lr_schedule, make_optimizer
from elastic_jax.train.sharding import logical_to_spec, tree_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize("chunk", [None, 7, 16, 1000])
@pytest.mark.slow
def test_chunked_kl_matches_dense(chunk):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    xt, xs = jax.random.normal(k[0], (2, 5, 12)), jax.random.normal(k[1], (2, 5, 8))
    wt, ws = jax.random.normal(k[2], (12, 37)), jax.random.normal(k[3], (8, 37))
    T = 1.7

    def dense(ws):
        zt, zs = xt @ wt / T, xs @ ws / T
        return jnp.sum(jax.nn.softmax(zt) * (jax.nn.log_softmax(zt) - jax.nn.log_softmax(zs)), -1)

    got = chunked_kl(xt, wt, xs, ws, temperature=T, chunk=chunk)
    np.testing.assert_allclose(got, dense(ws), atol=2e-6)
    g1 = jax.grad(lambda w: chunked_kl(xt, wt, xs, w, temperature=T, chunk=chunk).sum())(ws)
    g2 = jax.grad(lambda w: dense(w).sum())(ws)
    np.testing.assert_allclose(g1, g2, atol=2e-6)
    assert np.all(np.asarray(got) >= -1e-6)


def test_chunked_ce_matches_dense():
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x, w = jax.random.normal(k[0], (3, 4, 8)), jax.random.normal(k[1], (8, 29))
    tgt = jax.random.randint(k[2], (3, 4), 0, 29)
    ref = -jnp.take_along_axis(jax.nn.log_softmax(x @ w), tgt[..., None], -1)[..., 0]
    np.testing.assert_allclose(chunked_ce(x, w, tgt, chunk=6), ref, atol=2e-6)


# ------------------------------------------------------------------ optimizer
def test_router_group_has_its_own_lr_and_freeze_switches():
    tree = {"params": {"w": jnp.ones((3, 3))}, "router": {"r": jnp.ones((2, 2))}}
    grads = jax.tree.map(jnp.ones_like, tree)
    opt = OptimConfig(lr=1e-3, router_lr=1e-1, warmup_steps=0, schedule="constant", clip_norm=0.0)
    tx = make_optimizer(opt, 10)
    up, _ = tx.update(grads, tx.init(tree), tree)
    np.testing.assert_allclose(up["params"]["w"], -1e-3, rtol=1e-4)     # Adam's first step = -lr·sign
    np.testing.assert_allclose(up["router"]["r"], -1e-1, rtol=1e-4)
    for field, group in (("freeze_router", "router"), ("freeze_model", "params")):
        tx = make_optimizer(opt.__class__(**{**opt.__dict__, field: True}), 10)
        up, _ = tx.update(grads, tx.init(tree), tree)
        assert float(jnp.abs(jax.tree.leaves(up[group])[0]).max()) == 0.0


def test_passed_rates_replace_the_schedule_and_share_the_compiled_update():
    """`tx.update(..., lr=, router_lr=)` (the training loop passes each step's scheduled rates) scales by
    those rates and keeps the optimizer state's layout and count; the same rates as the schedule give
    the same updates as the schedule itself, and the update's program is the same for every schedule."""
    tree = {"params": {"w": jnp.arange(9.0).reshape(3, 3)}, "router": {"r": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda x: jnp.sin(x) + 0.5, tree)
    opt = OptimConfig(lr=1e-2, router_lr=1e-1, warmup_steps=3, schedule="cosine")
    tx = make_optimizer(opt, 20)
    st = tx.init(tree)
    for step in range(4):
        own, st_own = tx.update(grads, st, tree)
        rates = {"lr": lr_schedule(opt.lr, opt, 20)(step), "router_lr": lr_schedule(opt.router_lr, opt, 20)(step)}
        got, st_got = tx.update(grads, st, tree, **rates)
        chex.assert_trees_all_close(got, own, rtol=1e-6)
        assert jax.tree.structure(st_got) == jax.tree.structure(st_own)
        chex.assert_trees_all_equal(st_got, st_own)
        st = st_own
    up, _ = tx.update(grads, tx.init(tree), tree, lr=jnp.float32(0.5), router_lr=jnp.float32(0.0))
    assert float(jnp.abs(up["params"]["w"]).max()) == pytest.approx(0.5, rel=1e-3)     # Adam step 1: lr·sign
    assert float(jnp.abs(up["router"]["r"]).max()) == 0.0
    # the program of an update with passed rates holds none of the schedule's constants (without them it does)
    other = OptimConfig(lr=3e-3, router_lr=1e-2, warmup_steps=7, schedule="linear")

    def hlo(o, total, rates):
        t = make_optimizer(o, total)
        fn = lambda state, r: t.update(grads, state, tree, **(r or {}))
        return jax.jit(fn).lower(t.init(tree), rates).as_text()

    rates = {"lr": jnp.float32(1e-3), "router_lr": jnp.float32(1e-2)}
    assert hlo(opt, 20, rates) == hlo(other, 50, rates)
    assert hlo(opt, 20, None) != hlo(other, 50, None)


def test_lr_schedule_warmup_then_cosine():
    f = lr_schedule(1.0, OptimConfig(warmup_steps=4, schedule="cosine", final_lr_ratio=0.1), 20)
    np.testing.assert_allclose([float(f(i)) for i in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert float(f(19)) == pytest.approx(0.1, rel=1e-5)
    assert float(f(10)) < float(f(5))


# ------------------------------------------------------------------ sharding rules
def test_rules_table_specs():
    mesh = AbstractMesh((2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"))
    assert logical_to_spec(("embed", "vocab"), (32, 128), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(("embed", "vocab"), (33, 128), mesh) == jax.sharding.PartitionSpec(None, "tensor")
    # one mesh axis at most once per array
    assert logical_to_spec(("heads", "mlp"), (8, 8), mesh) == jax.sharding.PartitionSpec("tensor", None)
    assert logical_to_spec(("batch", "length"), (8, 16), mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), (2, 16), mesh) == jax.sharding.PartitionSpec("data", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_spec(("bogus",), (4,), mesh)


def test_every_param_gets_a_sharding_and_bad_mesh_is_rejected():
    cfg = ej.NemotronHConfig()
    mesh = make_mesh(MeshConfig())
    shapes = jax.eval_shape(lambda: ej.init_params(cfg, jax.random.PRNGKey(0)))
    sh = tree_shardings(ej.param_axes(cfg), shapes, mesh)
    assert len(jax.tree.leaves(sh)) == len(jax.tree.leaves(shapes))
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"needs {n * 3} devices .* but {n} are available"):
        make_mesh(MeshConfig(data=n * 3))


# ------------------------------------------------------------------ configs / experiments
def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of steps or tokens"):
        Stage(steps=3, tokens=100)
    assert Stage(seq_len=10, batch_size=4, tokens=95).num_steps == 3
    with pytest.raises(ValueError, match="microbatches"):
        TrainConfig(stages=(Stage(batch_size=6, steps=1),), microbatches=4)
    with pytest.raises(ValueError, match="one probability per budget"):
        Stage(steps=1, budget_probs=(0.5, 0.5)).probs(3)
    with pytest.raises(ValueError, match="OptimConfig.schedule"):
        OptimConfig(schedule="step")
    with pytest.raises(ValueError, match="MeshConfig.tensor"):
        MeshConfig(tensor=0)


def test_load_experiment_and_overrides():
    cfg = load_experiment(os.path.join(ROOT, "experiments", "distill_tiny.py"), quick=True)
    assert isinstance(cfg, DistillConfig)
    new = apply_overrides(cfg, ["train.optim.lr=1e-3", "train.stages.1.steps=5", "train.stages.0.budget_probs=(0.2, 0.8)",
                                "data.kind=task", "train.optim.freeze_router=true", "model.hidden_size=48"])
    assert new.train.optim.lr == 1e-3 and new.train.stages[1].steps == 5 and new.data.kind == "task"
    assert new.train.stages[0].budget_probs == (0.2, 0.8) and new.train.optim.freeze_router is True
    assert new.model.hidden_size == 48 and cfg.train.optim.lr != 1e-3               # frozen: a new object
    with pytest.raises(ValueError, match="'train.optim.lrr'.*no field 'lrr'"):
        apply_overrides(cfg, ["train.optim.lrr=1"])
    with pytest.raises(ValueError, match=r"train.stages.0.steps='abc'.* int"):
        apply_overrides(cfg, ["train.stages.0.steps=abc"])
    with pytest.raises(ValueError, match="not an index"):
        apply_overrides(cfg, ["train.stages.7.steps=1"])
    with pytest.raises(ValueError, match="DataConfig.kind"):                        # config validation re-runs
        apply_overrides(cfg, ["data.kind=csv"])


def test_the_config_class_names_its_runner(tmp_path):
    """`run_experiment` calls the config class's own `run(out_dir)`: the library's three experiment
    configs name their runners in their bodies; a class without one, and the removed
    `register_runner`, are one clear error naming the fix."""
    import dataclasses
    from elastic_jax.experiment import register_runner, run_experiment
    from elastic_jax.pod import PodExperiment, run_pod
    from elastic_jax.recipes.star_elastic import StarElasticExperiment, run_star_elastic
    for cls, fn in ((DistillConfig, "run_distill"), (StarElasticExperiment, run_star_elastic.__name__),
                    (PodExperiment, run_pod.__name__)):
        assert fn in cls.run.__doc__ and fn in cls.run.__code__.co_names, cls

    @dataclasses.dataclass(frozen=True)
    class Mine:
        x: int = 1

        def run(self, out_dir):
            return ("ran", self.x, out_dir)

    out = tmp_path / "a" / "b"
    assert run_experiment(Mine(2), out) == ("ran", 2, str(out)) and out.is_dir()

    @dataclasses.dataclass(frozen=True)
    class NoRunner:
        x: int = 1
    with pytest.raises(ValueError, match=r"NoRunner says nothing runs it: give the config class a method `def run"):
        run_experiment(NoRunner(), tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(TypeError, match=r"register_runner\(Mine, \.\.\.\) was removed: .*def run\(self, out_dir\)"):
        register_runner(Mine, lambda c, o: None)


# ------------------------------------------------------------------ short runs
def _tiny():
    return ej.NemotronHConfig(vocab_size=64, hidden_size=32, hybrid_override_pattern="*-", num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, intermediate_size=64)


@pytest.mark.slow
def test_train_lm_learns_and_kd_accepts_a_smaller_student(tmp_path, monkeypatch):
    from elastic_jax.train import loop
    compiles, compile_step = [], loop.compile_step          # micro-batch size of every step compile
    monkeypatch.setattr(loop, "compile_step", lambda *a, **k: compiles.append(a[5]) or compile_step(*a, **k))
    cfg = _tiny()
    ds = make_dataset(DataConfig(num_documents=64, synthetic_vocab=64, synthetic_len=(10, 30)), cfg.vocab_size)
    tc = TrainConfig(stages=(Stage(seq_len=32, batch_size=4, steps=12),), optim=OptimConfig(lr=1e-2, warmup_steps=2),
                     vocab_chunk=24, checkpoint_every=100, tensorboard=False, plot=False)
    p0 = ej.init_params(cfg, jax.random.PRNGKey(0))
    res = train_lm(cfg, tc, p0, ds, tmp_path / "lm", progress=False)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert res.tokens_seen == sum(h["tokens"] for h in res.history)
    assert Checkpointer(tmp_path / "lm" / "checkpoints").latest_step() == 12   # end-of-stage checkpoint
    sub_cfg, sub = ej.slice_params(res.params, cfg, ej.Widths(hidden=24, ffn=32))
    # two stages of one shape: one compiled step serves both
    kd = train_kd(sub_cfg, tc.replace(stages=(Stage("a", seq_len=32, batch_size=4, steps=1),
                                              Stage("b", seq_len=32, batch_size=4, steps=1))),
                  cfg, res.params, sub, ds, tmp_path / "kd", progress=False)
    assert kd.steps == 2 and all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in kd.history)
    assert compiles == [4, 4]          # the LM run and the KD run: one step compile each


def test_nan_loss_stops_run_naming_step_and_budget(tmp_path):
    cfg = _tiny()
    ecfg = ElasticConfig(budgets=(1.0, 0.5), router_dim=8, hidden_options=(1.0, 0.5), mamba_options=None,
                         ffn_options=(1.0, 0.5), moe_expert_options=None, moe_ffn_options=None)
    p0 = ej.init_params(cfg, jax.random.PRNGKey(0))
    ds = make_dataset(DataConfig(num_documents=32, synthetic_vocab=64), cfg.vocab_size)
    # lr 1e30: the first Adam step moves every weight by ~1e30 (finite, but its square and the next
    # forward are not): the guard rejects it at step 0 and the kept state is saved as step 0
    tc = TrainConfig(stages=(Stage(seq_len=16, batch_size=2, steps=4),), checkpoint_every=1, async_checkpointing=False,
                     optim=OptimConfig(lr=1e30, warmup_steps=0, schedule="constant", clip_norm=0.0),
                     vocab_chunk=32, tensorboard=False, plot=False)
    with pytest.raises(TrainingDiverged, match=r"non-finite params .* at step 0 \(stage 'stage', budget\(s\) \[(1\.0|0\.5)\]\).*"
                                               r"Last good checkpoint: step 0"):
        train_elastic(cfg, ecfg, tc, p0, p0, ds, tmp_path / "run", progress=False)
    ck = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ck.all_steps() == [0]
    meta = ck.read_meta(0)
    assert meta["step"] == 0 and meta["configs"]["elastic"]["budgets"] == [1.0, 0.5]
    ck.close()


def test_progress_bar_shows_the_sampled_budget():
    """The bar's postfix: loss, the budget each microbatch sampled (elastic runs), tokens/s, stage."""
    from elastic_jax.train.metrics import progress_postfix
    m = {"loss": np.float32(1.23456), "budget_idx": np.asarray([2, 0])}
    post = progress_postfix(m, 1234.5, "short", (1.0, 0.75, 0.5))
    assert post == {"loss": "1.2346", "budget": "50%,100%", "tok_s": "1,234", "stage": "short"}
    assert "budget" not in progress_postfix(m, 1.0, "lm")          # parent / baseline runs: no budget

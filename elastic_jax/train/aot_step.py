"""The elastic KD training step as an abstract program: compile it for a target mesh (a TPU
topology on a CPU host, elastic_jax/aot.py) without building any array.

    mesh = make_mesh(MeshConfig(fsdp=8), devices=aot.tpu_devices("v5p:2x2x2"))
    fn, args = abstract_elastic_step(cfg, ElasticConfig(), mesh, batch=8, length=8192)
    report = aot.compile_report(fn, *args, mesh=mesh)

The step is the training loop's own (`loop.compile_step`: frozen teacher + student + router +
optimizer, donated state, the loop's shardings from the one rules table).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..aot import abstract_tree
from ..config import NemotronHConfig
from ..model.params import init_params
from ..model.policy import ComputePolicy
from . import sharding as shd
from .config import OptimConfig
from .loop import compile_step, step_shardings
from .optim import RATE_ARGS, make_optimizer
from .step import StepSpec


def abstract_elastic_step(cfg: NemotronHConfig, elastic_cfg, mesh, *, batch: int, length: int,
                          param_dtype=jnp.bfloat16, teacher_dtype=None, policy: ComputePolicy | None = None,
                          vocab_chunk: int = 8192,
                          optim: OptimConfig = OptimConfig(), rules=shd.DEFAULT_RULES, microbatches: int = 1):
    """(jitted step, abstract arguments) of one elastic distillation step on `mesh`: the teacher is
    `cfg` at full width, the student its masked copy; the student's parameters (and so AdamW's
    moments) in `param_dtype`, the teacher's in `teacher_dtype` (None: the same), the router f32;
    `microbatches` micro-batches (gradient accumulation) of `batch` sequences of `length` tokens."""
    from ..elastic.router import init_router

    spec = StepSpec("elastic", cfg, cfg, elastic_cfg, 1.0, vocab_chunk, microbatches, policy=policy)
    tx = make_optimizer(optim, 1000)
    cast = lambda t, dt: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), t)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    params = cast(shapes, param_dtype)
    teacher = cast(shapes, param_dtype if teacher_dtype is None else teacher_dtype)
    router = jax.eval_shape(lambda: init_router(cfg, elastic_cfg, jax.random.PRNGKey(1)))
    state_like = {"params": params, "router": router,
                  "opt_state": jax.eval_shape(tx.init, {"params": params, "router": router})}
    state_sh, teacher_sh = step_shardings(spec, mesh, state_like, teacher, rules)
    jitted, bspec = compile_step(spec, tx, mesh, state_sh, teacher_sh, batch)
    rep = NamedSharding(mesh, P())
    b_sh = NamedSharding(mesh, bspec)
    tokens = jax.ShapeDtypeStruct((microbatches, batch, length), jnp.int32, sharding=b_sh)
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)
    args = (abstract_tree(state_like, state_sh), abstract_tree(teacher, teacher_sh),
            {"tokens": tokens, "segment_ids": tokens}, scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32),
            jax.ShapeDtypeStruct((spec.n_budgets,), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep), {k: scalar(jnp.float32) for k in RATE_ARGS})
    return jitted, args

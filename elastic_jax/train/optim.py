"""The optimizer: AdamW over two parameter groups, model and router (METHOD §6.3, §7.1, §14.7).

The trainable tree is {"params": model params, "router": router params}; `optax.multi_transform`
gives each group its own Adam moments, learning rate and schedule (linear warmup over
`warmup_steps`, then constant / cosine / linear decay to `final_lr_ratio` · peak at the last step),
after one global-norm clip. A frozen group gets `optax.set_to_zero()` (no moments are kept).
Weight decay (decoupled) applies to matrices only (ndim >= 2), never to norms, biases or A_log.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from .config import OptimConfig


def lr_schedule(peak: float, optim: OptimConfig, total_steps: int):
    """Learning rate as a function of the optimizer's update count (0-based)."""
    W, T, r = optim.warmup_steps, max(int(total_steps), 1), optim.final_lr_ratio

    def sched(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        warm = jnp.minimum(1.0, s / W) if W > 0 else 1.0
        t = jnp.clip((s - W) / max(T - W, 1), 0.0, 1.0)
        if optim.schedule == "cosine":
            f = r + (1.0 - r) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        elif optim.schedule == "linear":
            f = 1.0 - (1.0 - r) * t
        else:
            f = 1.0
        return peak * warm * f

    return sched


RATE_ARGS = ("lr", "router_lr")      # the `update` keywords of each group's learning rate (model, router)


def scale_by_rate(schedule, rate_arg: str) -> optax.GradientTransformationExtraArgs:
    """`optax.scale_by_learning_rate(schedule)`, except that `update(..., **{rate_arg: lr})` scales by
    that (traced) rate instead of schedule(count). The training loop passes each step's rates, computed
    by the same schedule, so the compiled step holds none of the schedule's constants and runs of any
    length or warmup share one program (the persistent compile cache hits). The state is optax's
    `ScaleByScheduleState`, as before."""
    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del params
        rate = extra_args.get(rate_arg)
        step_size = -1 * (schedule(state.count) if rate is None else rate)
        updates = jax.tree.map(lambda g: jnp.asarray(step_size, dtype=g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _adamw(peak: float, optim: OptimConfig, total_steps: int, rate_arg: str):
    return optax.chain(
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
        optax.add_decayed_weights(optim.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
        scale_by_rate(lr_schedule(peak, optim, total_steps), rate_arg),
    )


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """The two-group optimizer for trees {"params": ..., "router": ...}. `tx.update(..., lr=, router_lr=)`
    (`RATE_ARGS`, traced scalars) overrides the groups' scheduled learning rates for that update."""
    groups = {
        "model": optax.set_to_zero() if optim.freeze_model else _adamw(optim.lr, optim, total_steps, RATE_ARGS[0]),
        "router": optax.set_to_zero() if optim.freeze_router else _adamw(optim.router_lr, optim, total_steps,
                                                                         RATE_ARGS[1]),
    }

    def labels(tree):
        return {"params": jax.tree.map(lambda _: "model", tree["params"]),
                "router": jax.tree.map(lambda _: "router", tree["router"])}

    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    return optax.chain(*parts, optax.multi_transform(groups, labels))

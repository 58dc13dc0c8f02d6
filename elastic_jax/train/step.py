"""One optimizer step of elastic distillation (and its plain-KD / LM special cases) as a pure,
jittable function (spec §6.3, §7.2, §14.6-8; ANCHORS §7.8).

    state = {"params": student, "router": router params ({} when not elastic), "opt_state": ...}
    new_state, metrics = step_fn(state, teacher_params, batch, step, tau, scale, budget_probs, base_key)

`batch` holds "tokens" / "segment_ids" int32 [M, b, L] (M = micro-batches). For micro-batch m:
    key_m = fold_in(fold_in(base_key, step), m)  ->  (k_budget, k_gumbel, k_hard)
    budget index  i ~ Categorical(budget_probs)            (same on every data shard: the key is
                                                            replicated, spec §7.2)
    router(one_hot(i)) -> Gumbel-softmax π -> SoftWidths  (hard sample w.p. hard_sample_prob)
    x_s = student final hidden (masked), x_t = stop_gradient(teacher final hidden)
    loss_m = mean_tokens KL_T(teacher ‖ student) + λ · budget_loss(π, budgets[i])
Gradients are averaged over the M micro-batches (lax.scan), clipped, and applied by the two-group
optimizer (optim.py). A non-finite loss leaves the state unchanged and is reported in
`metrics["finite"]`; the loop stops the run there (the last checkpoint stays intact).

Modes: "elastic" (above), "kd" (fixed student, possibly a different config than the teacher: no
router, no budget loss), "lm" (next-token cross-entropy, no teacher).

QAD (`StepSpec.quant`, spec §10): the student runs fake-quantized with the fixed scales in
`state["quant"]` (not trained, straight-through gradients); in elastic mode the frozen teacher runs
at the same sampled nested widths, so every nested quantized model learns from its own
high-precision self.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ..config import NemotronHConfig
from ..model.decoder import final_hidden
from .losses import chunked_ce, chunked_kl, masked_mean, next_token_targets

MODES = ("elastic", "kd", "lm")


@dataclass(frozen=True)
class StepSpec:
    """Static description of the step (hashable; closes over no arrays)."""

    mode: str
    model_cfg: NemotronHConfig
    teacher_cfg: NemotronHConfig | None = None
    elastic_cfg: Any = None
    temperature: float = 1.0
    vocab_chunk: int | None = 8192
    microbatches: int = 1
    freeze_model: bool = False
    freeze_router: bool = False
    quant: Any = None             # elastic_jax.quant.QuantSpec: QAD (state["quant"] holds the scales)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"StepSpec.mode={self.mode!r}: must be one of {MODES}")
        if self.mode == "elastic" and self.elastic_cfg is None:
            raise ValueError("mode='elastic' needs an ElasticConfig")
        if self.mode in ("elastic", "kd") and self.teacher_cfg is None:
            raise ValueError(f"mode={self.mode!r} needs the teacher config")

    @property
    def n_budgets(self) -> int:
        return self.elastic_cfg.n_budgets if self.mode == "elastic" else 1


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def micro_loss(spec: StepSpec, trainable, x_teacher, w_teacher, tokens, segment_ids, key, budget_idx, tau, scale,
               act_sharding=None, quant_layers=None, teacher_params=None):
    """Loss of one micro-batch and its auxiliaries (see the module docstring)."""
    from ..elastic import cost as ecost
    from ..elastic import router as erouter

    params = trainable["params"]
    cfg = spec.model_cfg
    valid = segment_ids > 0
    aux = {}
    if spec.mode == "elastic":
        ecfg = spec.elastic_cfg
        k_gumbel, k_hard = jax.random.split(key)
        code = erouter.budget_code_from_index(ecfg, budget_idx)
        hard = erouter.sample_hard(ecfg, k_hard) if ecfg.hard_sample_prob > 0 else False
        rout = erouter.route(trainable["router"], cfg, ecfg, code, k_gumbel, tau, scale, hard=hard)
        widths = rout.soft_widths
        budget = jnp.asarray(ecfg.budgets, jnp.float32)[budget_idx]
        bl = ecost.budget_loss(cfg, ecfg, rout, budget, budget_idx == 0)
        aux["choice"] = rout.choice
        aux["expected"] = ecost.expected_widths(rout, ecfg, cfg)
    else:
        widths, bl = None, jnp.zeros((), jnp.float32)
    qs = None
    if spec.quant is not None:
        from ..quant.state import QuantState
        qs = QuantState(spec.quant, quant_layers)
        if x_teacher is None and spec.mode != "lm":   # QAD teacher: the frozen model at the same widths
            tw = None if widths is None else jax.lax.stop_gradient(widths)
            x_teacher = jax.lax.stop_gradient(_constrain(final_hidden(
                teacher_params, tokens, spec.teacher_cfg, tw, segment_ids=segment_ids), act_sharding))
    x_s = _constrain(final_hidden(params, tokens, cfg, widths, segment_ids=segment_ids, quant=qs), act_sharding)
    if spec.mode == "lm":
        tgt, mask = next_token_targets(tokens, segment_ids)
        task = masked_mean(chunked_ce(x_s, params["lm_head"], tgt, chunk=spec.vocab_chunk), mask)
    else:
        kl = chunked_kl(x_teacher, w_teacher, x_s, params["lm_head"], temperature=spec.temperature,
                        chunk=spec.vocab_chunk)
        task = masked_mean(kl, valid)
    lam = spec.elastic_cfg.budget_weight if spec.mode == "elastic" else 0.0
    loss = task + lam * bl
    aux.update(task=task, budget_loss=bl, tokens=jnp.sum(valid.astype(jnp.float32)))
    return loss, aux


def make_step(spec: StepSpec, tx: optax.GradientTransformation, *, act_sharding=None):
    """The step function (not yet jitted; loop.py jits it with shardings)."""
    nb = spec.n_budgets

    def step_fn(state, teacher_params, batch, step, tau, scale, budget_probs, base_key):
        trainable = {"params": state["params"], "router": state["router"]}
        step_key = jax.random.fold_in(base_key, step)
        logp = jnp.log(jnp.asarray(budget_probs, jnp.float32))

        def one(carry, inp):
            gsum, = carry
            m, tokens, seg = inp
            key = jax.random.fold_in(step_key, m)
            k_budget, k_route = jax.random.split(key)
            bidx = jax.random.categorical(k_budget, logp) if spec.mode == "elastic" else jnp.zeros((), jnp.int32)
            if spec.mode == "lm":
                x_t = w_t = None
            elif spec.quant is not None:   # QAD: teacher inside micro_loss, at the student's widths
                x_t = None
                w_t = jax.lax.stop_gradient(teacher_params["lm_head"])
            else:
                x_t = jax.lax.stop_gradient(_constrain(
                    final_hidden(teacher_params, tokens, spec.teacher_cfg, None, segment_ids=seg), act_sharding))
                w_t = jax.lax.stop_gradient(teacher_params["lm_head"])
            (loss, aux), g = jax.value_and_grad(micro_loss, argnums=1, has_aux=True)(
                spec, trainable, x_t, w_t, tokens, seg, k_route, bidx, tau, scale, act_sharding,
                state.get("quant"), teacher_params)
            gsum = jax.tree.map(jnp.add, gsum, g)
            out = {"loss": loss, "task": aux["task"], "budget_loss": aux["budget_loss"], "budget_idx": bidx,
                   "tokens": aux["tokens"]}
            if "choice" in aux:
                out["choice"] = aux["choice"]
                out["expected"] = aux["expected"]
            return (gsum,), out

        M = spec.microbatches
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (gsum,), per_mb = jax.lax.scan(one, (zeros,), (jnp.arange(M), batch["tokens"], batch["segment_ids"]))
        grads = jax.tree.map(lambda g: g / M, gsum)
        if spec.freeze_model:
            grads["params"] = jax.tree.map(jnp.zeros_like, grads["params"])
        if spec.freeze_router:
            grads["router"] = jax.tree.map(jnp.zeros_like, grads["router"])
        loss = jnp.mean(per_mb["loss"])
        finite = jnp.isfinite(loss)
        updates, new_opt = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"params": keep(new_trainable["params"], state["params"]),
                     "router": keep(new_trainable["router"], state["router"]),
                     "opt_state": keep(new_opt, state["opt_state"])}
        if "quant" in state:   # QAD scales: fixed state, carried through unchanged
            new_state["quant"] = state["quant"]
        onehot = jax.nn.one_hot(per_mb["budget_idx"], nb, dtype=jnp.float32)          # [M, nb]
        metrics = {
            "loss": loss, "finite": finite, "task": jnp.mean(per_mb["task"]),
            "budget_loss": jnp.mean(per_mb["budget_loss"]), "tokens": jnp.sum(per_mb["tokens"]),
            "grad_norm": optax.global_norm(grads),
            "budget_idx": per_mb["budget_idx"], "mb_loss": per_mb["loss"],
            "task_by_budget": onehot.T @ per_mb["task"], "count_by_budget": jnp.sum(onehot, 0),
            "budget_loss_by_budget": onehot.T @ per_mb["budget_loss"],
        }
        if "choice" in per_mb:
            metrics["choice"] = per_mb["choice"]
            metrics["expected"] = per_mb["expected"]
        return new_state, metrics

    return step_fn

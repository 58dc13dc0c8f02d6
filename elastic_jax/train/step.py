"""One optimizer step of elastic distillation (and its plain-KD / LM special cases) as a pure,
jittable function (METHOD §6.3, §7.2, §14.6-8).

    state = {"params": student, "router": router params ({} when not elastic), "opt_state": ...}
    new_state, metrics = step_fn(state, teacher_params, batch, step, tau, scale, budget_probs, base_key)

`batch` holds "tokens" / "segment_ids" int32 [M, b, L] (M = micro-batches). For micro-batch m:
    key_m = fold_in(fold_in(base_key, step), m)  ->  (k_budget, k_gumbel, k_hard)
    budget index  i ~ Categorical(budget_probs)            (same on every data shard: the key is
                                                            replicated, METHOD §7.2)
    router(one_hot(i)) -> Gumbel-softmax π -> SoftWidths  (hard sample w.p. hard_sample_prob)
    x_s = student final hidden (masked), x_t = stop_gradient(teacher final hidden)
    loss_m = mean_tokens KL_T(teacher ‖ student) + λ · budget_loss(π, budgets[i])
With `gumbel_groups` = G > 1 the micro-batch's rows split into G groups (one per data shard when G
is the data-parallel size, as the official code draws per rank): group g routes with
fold_in(k_gumbel, g) / fold_in(k_hard, g) at the shared budget i, the student forward is vmapped
over (rows, widths) of the groups, the KL is the mean over all rows and the budget loss the mean
over groups. G = 1 is the single sample above, unchanged.
Gradients are averaged over the M micro-batches (lax.scan), clipped, and applied by the two-group
optimizer (optim.py). The NaN guard (`finite_checks`): a non-finite loss, gradient norm, update,
new trainable state (model incl. the expert-balancing bias, router) or optimizer state leaves the
whole state unchanged and is reported in `metrics["finite"]` (which check failed in
`metrics["finite_checks"]`); the loop stops the run there, so the last checkpoint stays the last
good, finite state. The new trainable state must have a finite float32 squared norm per leaf, not
just finite elements: |w| >= ~1e19 squares to inf, so the next forward pass (and the router's
probabilities) would be NaN although every element is finite (lr 1e30 did this).

MoE layers of the student are balanced without an auxiliary loss (`expert_bias_rate` > 0,
balance.py): the correction bias moves by the step's routing counts after the optimizer update,
counting only the experts each micro-batch's sampled widths keep active.

Modes: "elastic" (above), "kd" (fixed student, possibly a different config than the teacher: no
router, no budget loss), "lm" (next-token cross-entropy, no teacher).

QAD (`StepSpec.quant`, METHOD §10): the student runs fake-quantized with the fixed scales in
`state["quant"]` (not trained, straight-through gradients); in elastic mode the frozen teacher runs
at the same sampled nested widths, so every nested quantized model learns from its own
high-precision self.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ..config import NemotronHConfig
from ..model.decoder import final_hidden
from ..model.kinds import layers_with_aux
from ..model.policy import ComputePolicy
from ..quant.state import QuantState, qweight_params
from .balance import active_experts, load_deviation, routing_entropy, update_expert_bias
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
    policy: ComputePolicy | None = None     # runtime knobs of student and teacher (None: from the config)
    expert_bias_rate: float = 0.0      # aux-loss-free MoE balancing rate u (0 = off; balance.py)
    gumbel_groups: int = 1             # elastic: router samples per micro-batch (one per data shard)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"StepSpec.mode={self.mode!r}: must be one of {MODES}")
        if self.mode == "elastic" and self.elastic_cfg is None:
            raise ValueError("mode='elastic' needs an ElasticConfig")
        if self.mode in ("elastic", "kd") and self.teacher_cfg is None:
            raise ValueError(f"mode={self.mode!r} needs the teacher config")
        if not (isinstance(self.gumbel_groups, int) and self.gumbel_groups >= 1):
            raise ValueError(f"StepSpec.gumbel_groups={self.gumbel_groups!r}: must be an int >= 1")

    @property
    def balances_experts(self) -> bool:
        return (self.expert_bias_rate > 0 and not self.freeze_model
                and bool(layers_with_aux(self.model_cfg, "expert_load")))

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
    G = spec.gumbel_groups if spec.mode == "elastic" else 1
    if G > 1 and tokens.shape[0] % G:
        raise ValueError(f"gumbel_groups={G} must divide the micro-batch size ({tokens.shape[0]} rows)")
    if spec.mode == "elastic":
        ecfg = spec.elastic_cfg
        k_gumbel, k_hard = jax.random.split(key)
        code = erouter.budget_code_from_index(ecfg, budget_idx)
        budget = jnp.asarray(ecfg.budgets, jnp.float32)[budget_idx]

        def sample(kg, kh):    # one router sample (and its budget loss) at the shared budget
            hard = erouter.sample_hard(ecfg, kh) if ecfg.hard_sample_prob > 0 else False
            rout = erouter.route(trainable["router"], cfg, ecfg, code, kg, tau, scale, hard=hard)
            bl = ecost.budget_loss(cfg, ecfg, rout, budget, budget_idx == 0, budget_idx=budget_idx)
            return rout.soft_widths, bl, rout.choice, ecost.expected_widths(rout, ecfg, cfg)

        if G == 1:
            widths, bl, aux["choice"], aux["expected"] = sample(k_gumbel, k_hard)
        else:     # one sample per data-shard group g: keys fold_in(k, g), the budget shared (METHOD §7.2)
            fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
            widths, bl, choice, expected = jax.vmap(sample)(fold(k_gumbel, jnp.arange(G)),
                                                            fold(k_hard, jnp.arange(G)))
            bl = jnp.mean(bl)
            aux["choice"] = jax.tree.map(lambda c: c[0], choice)               # group 0's choice
            aux["expected"] = jax.tree.map(lambda e: jnp.mean(e, 0), expected)
    else:
        widths, bl = None, jnp.zeros((), jnp.float32)

    def grouped(fn, p, tok, seg, w):
        """fn(params, tokens, segment_ids, widths) -> (hidden [b, L, H], extra) on the whole micro-batch,
        or vmapped over the G row groups (every group at its own widths): the hidden rows put back in
        order, `extra` summed over the groups. The params enter broadcast to [G, ...] (their gradient
        sums over the groups) because lax.ragged_dot (MoE) batches only when all its operands do."""
        if G == 1:
            return fn(p, tok, seg, w)
        split = lambda a: a.reshape((G, a.shape[0] // G) + a.shape[1:])
        pg = jax.tree.map(lambda a: jnp.broadcast_to(a, (G,) + a.shape), p)
        h, extra = jax.vmap(fn)(pg, split(tok), split(seg), w)
        return h.reshape((-1,) + h.shape[2:]), jax.tree.map(lambda e: jnp.sum(e, 0), extra)

    qs = None
    if spec.quant is not None:
        qs = QuantState(spec.quant, quant_layers)
        if x_teacher is None and spec.mode != "lm":   # QAD teacher: the frozen model at the same widths
            tw = None if widths is None else jax.lax.stop_gradient(widths)
            x_teacher, _ = grouped(lambda p, tok, seg, w: (final_hidden(
                p, tok, spec.teacher_cfg, w, segment_ids=seg, policy=spec.policy), ()),
                teacher_params, tokens, segment_ids, tw)
            x_teacher = jax.lax.stop_gradient(_constrain(x_teacher, act_sharding))

    def quantized(p):       # QAD: the projections as fake-quantized QWeight leaves (straight-through)
        return p if qs is None else qweight_params(p, qs)

    if spec.balances_experts:
        def student(p, tok, seg, w):
            x, loads = final_hidden(quantized(p), tok, cfg, w, segment_ids=seg, policy=spec.policy,
                                    return_expert_load=True)
            loads = jnp.stack(loads)                                            # [n_moe, E]
            # balance among the experts this sample's widths keep (balance.py): per row group
            return x, (loads, load_deviation(loads, active_experts(cfg, w)))
        x_s, (aux["expert_load"], aux["expert_dev"]) = grouped(student, params, tokens, segment_ids, widths)
    else:
        x_s, _ = grouped(lambda p, tok, seg, w: (final_hidden(quantized(p), tok, cfg, w, segment_ids=seg,
                                                              policy=spec.policy), ()),
                         params, tokens, segment_ids, widths)
    x_s = _constrain(x_s, act_sharding)
    if spec.mode == "lm":
        tgt, mask = next_token_targets(tokens, segment_ids)
        task = masked_mean(chunked_ce(x_s, params["lm_head"], tgt, chunk=spec.vocab_chunk, policy=spec.policy),
                           mask)
    else:
        kl = chunked_kl(x_teacher, w_teacher, x_s, params["lm_head"], temperature=spec.temperature,
                        chunk=spec.vocab_chunk, policy=spec.policy)
        task = masked_mean(kl, valid)
    lam = spec.elastic_cfg.budget_weight if spec.mode == "elastic" else 0.0
    loss = task + lam * bl
    aux.update(task=task, budget_loss=bl, tokens=jnp.sum(valid.astype(jnp.float32)))
    return loss, aux


FINITE_CHECKS = ("loss", "grad_norm", "update", "params", "optimizer state")


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _all_norms_finite(tree) -> jax.Array:
    """Every floating leaf's float32 sum of squares is finite (implies every element is)."""
    leaves = [jnp.isfinite(jnp.sum(jnp.square(x.astype(jnp.float32))))
              for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def finite_checks(loss, grad_norm, updates, new_trainable, new_opt_state=None) -> jax.Array:
    """bool [5] in the order of FINITE_CHECKS: is each of loss, gradient norm, update, new
    trainable state (finite squared norm per leaf) and new optimizer state finite? The step is
    applied only when all are."""
    return jnp.stack([jnp.isfinite(loss), jnp.isfinite(grad_norm), _all_finite(updates),
                      _all_norms_finite(new_trainable), _all_finite(new_opt_state)])


def make_step(spec: StepSpec, tx: optax.GradientTransformation, *, act_sharding=None):
    """The step function (not yet jitted; loop.py jits it with shardings)."""
    nb = spec.n_budgets

    def step_fn(state, teacher_params, batch, step, tau, scale, budget_probs, base_key, rates=None):
        # rates: {"lr", "router_lr"} this step's learning rates (traced; the loop's schedule program), so the
        # compiled step is the same for every schedule; None: the optimizer's own schedule at its count
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
                    final_hidden(teacher_params, tokens, spec.teacher_cfg, None, segment_ids=seg,
                                 policy=spec.policy), act_sharding))
                w_t = jax.lax.stop_gradient(teacher_params["lm_head"])
            (loss, aux), g = jax.value_and_grad(micro_loss, argnums=1, has_aux=True)(
                spec, trainable, x_t, w_t, tokens, seg, k_route, bidx, tau, scale, act_sharding,
                state.get("quant"), teacher_params)
            gsum = jax.tree.map(jnp.add, gsum, g)
            out = {"loss": loss, "task": aux["task"], "budget_loss": aux["budget_loss"], "budget_idx": bidx,
                   "tokens": aux["tokens"]}
            if "expert_load" in aux:
                out["expert_load"] = aux["expert_load"]
                out["expert_dev"] = aux["expert_dev"]
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
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], trainable, **(rates or {}))
        new_trainable = optax.apply_updates(trainable, updates)
        new_params = new_trainable["params"]
        if spec.balances_experts:      # outside the optimizer: the bias has no gradient (balance.py)
            new_params = update_expert_bias(new_params, spec.model_cfg, rate=spec.expert_bias_rate,
                                            deviation=jnp.sum(per_mb["expert_dev"], 0))
        # the guard sees every tree the step writes: model (incl. the balancing bias), router, optimizer
        checks = finite_checks(loss, grad_norm, updates, {"params": new_params, "router": new_trainable["router"]},
                               new_opt)
        finite = jnp.all(checks)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"params": keep(new_params, state["params"]),
                     "router": keep(new_trainable["router"], state["router"]),
                     "opt_state": keep(new_opt, state["opt_state"])}
        if "quant" in state:   # QAD scales: fixed state, carried through unchanged
            new_state["quant"] = state["quant"]
        onehot = jax.nn.one_hot(per_mb["budget_idx"], nb, dtype=jnp.float32)          # [M, nb]
        metrics = {
            "loss": loss, "finite": finite, "finite_checks": checks, "task": jnp.mean(per_mb["task"]),
            "budget_loss": jnp.mean(per_mb["budget_loss"]), "tokens": jnp.sum(per_mb["tokens"]),
            "grad_norm": grad_norm,
            "budget_idx": per_mb["budget_idx"], "mb_loss": per_mb["loss"],
            "task_by_budget": onehot.T @ per_mb["task"], "count_by_budget": jnp.sum(onehot, 0),
            "budget_loss_by_budget": onehot.T @ per_mb["budget_loss"],
        }
        if "expert_load" in per_mb:
            metrics["routing_entropy"] = routing_entropy(jnp.sum(per_mb["expert_load"], 0))
        if "choice" in per_mb:
            metrics["choice"] = per_mb["choice"]
            metrics["expected"] = per_mb["expected"]
        return new_state, metrics

    return step_fn

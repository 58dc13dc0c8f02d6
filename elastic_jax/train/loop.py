"""The training loop shared by elastic distillation, plain KD and LM training (METHOD §6-7).

    res = train_elastic(cfg, ecfg, train_cfg, teacher_params, student_params, data, out_dir)
    res.params, res.router_params, res.history, res.tokens_seen

    train_lm(cfg, train_cfg, params, data, out_dir)                 # next-token CE (tiny parents)
    train_kd(cfg, train_cfg, teacher_cfg, teacher_params, student_params, data, out_dir)
                                                                    # one fixed student, KD only

`data`: a `TokenDataset` (`elastic_jax.data.make_dataset(DataConfig(...), vocab_size,
documents=...)`) or a `DataConfig` (loaded here with the model's vocabulary).

Every run writes `<out_dir>/checkpoints` (orbax), `metrics.jsonl`, `batches.jsonl`, `tb/` and
`curves.png`. If `<out_dir>/checkpoints` already holds a complete checkpoint of the same configs,
the run resumes from it — params, router, optimizer state, data iterator, stage, step and RNG —
and continues exactly as if it had never stopped (a checkpoint of another config raises
`CheckpointMismatch`; the teacher's `params_fingerprint` is part of what is compared). The
initial params passed in are then ignored. A damaged newest step is skipped with a warning (the
newest step that restores is used; none: `CheckpointCorrupt`). A non-finite loss, gradient norm,
update or parameter (step.py's NaN guard) raises `TrainingDiverged` naming the step, stage and
budget; the update is not applied and nothing is saved after it, so the last checkpoint is the
last good, finite state.

Sharding: the run uses the mesh of `train_cfg.mesh` over all devices (sharding.py); call
`elastic_jax.train.init_distributed(...)` first on multi-host jobs. Each host feeds its own rows
(hostdata.py: the loop's data-source interface and the per-host batch assembly); every host-side
read of a global array is of a replicated value (the metrics) or an explicit gather; process 0
writes the shared files (metrics, lock) and every process takes part in each checkpoint save.

Preemption (runctl.py): a SIGTERM, or the platform's preemption notice, makes every host save a
checkpoint at the next step boundary and raise `Preempted` (not an error; `elastic-jax run` exits
0). The run folder is locked while training (`run.lock`: host, pid, start time; `RunFolderLocked`
for a second run, a stale lock taken over with a warning).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import NemotronHConfig
from ..data import DataConfig, TokenDataset, make_dataset
from ..model.params import check_params, param_axes
from . import sharding as shd
from ..errors import Preempted, TrainingDiverged
from .. import fileio
from . import hostdata
from .runctl import PreemptionWatcher, RunLock, acquire_everywhere, gather_json
from .checkpoint import Checkpointer, abstract_like, params_fingerprint
from .config import TrainConfig
from .metrics import RunLogger, Throughput, batch_digest, plot_curves, progress_postfix
from .optim import RATE_ARGS, lr_schedule, make_optimizer
from .step import StepSpec, make_step


@dataclasses.dataclass
class TrainResult:
    params: Any
    router_params: Any
    history: list
    tokens_seen: int
    steps: int
    out_dir: str
    resumed_from: int | None = None


def train_elastic(model_cfg: NemotronHConfig, elastic_cfg, train_cfg: TrainConfig, teacher_params, student_params,
                  data, out_dir, *, router_params=None, extra_meta: dict | None = None, progress: bool = True,
                  quant_state=None) -> TrainResult:
    """Elastic distillation of every nested budget at once from the frozen `teacher_params`
    (usually the permuted parent; `student_params` starts as a copy of it). `router_params`
    default: `init_router(model_cfg, elastic_cfg, fold_in(seed, 1))`. `extra_meta`: JSON blob stored
    in every checkpoint (e.g. the importance ranking / permutation).
    `train_cfg.qad` ("fp8" | "nvfp4"): quantization-aware distillation of the fake-quantized
    student with the fixed scales `quant_state` (default: weight scales of `student_params`, the
    parent; FP8 needs a calibrated state, `elastic_jax.quant.calibrate`), saved in every checkpoint."""
    from ..elastic.router import init_router
    if router_params is None:
        router_params = init_router(model_cfg, elastic_cfg, jax.random.fold_in(jax.random.PRNGKey(train_cfg.seed), 1))
    spec = StepSpec("elastic", model_cfg, model_cfg, elastic_cfg, train_cfg.kd_temperature, train_cfg.vocab_chunk,
                    train_cfg.microbatches, train_cfg.optim.freeze_model, train_cfg.optim.freeze_router,
                    policy=train_cfg.policy, expert_bias_rate=train_cfg.expert_bias_rate,
                    gumbel_groups=train_cfg.gumbel_groups or 1)
    quant_layers = None
    if train_cfg.qad is not None:
        from .. import quant
        if quant_state is None:
            if train_cfg.qad == "fp8":
                raise ValueError("TrainConfig.qad='fp8' needs quant_state= a calibrated state "
                                 "(elastic_jax.quant.calibrate): FP8 activations use static input scales")
            quant_state = quant.init_quant_state(student_params, model_cfg, train_cfg.qad)
        if quant_state.spec.fmt != train_cfg.qad:
            raise ValueError(f"TrainConfig.qad={train_cfg.qad!r} but quant_state is {quant_state.spec.fmt!r}")
        spec = dataclasses.replace(spec, quant=quant_state.spec)
        quant_layers = quant_state.layers
    return _train(spec, train_cfg, teacher_params, student_params, router_params, data, out_dir,
                  extra_meta=extra_meta, progress=progress, quant_layers=quant_layers)


def train_lm(model_cfg: NemotronHConfig, train_cfg: TrainConfig, params, data, out_dir, *,
             extra_meta: dict | None = None, progress: bool = True) -> TrainResult:
    """Plain next-token cross-entropy training of `params` (e.g. the tiny parent)."""
    spec = StepSpec("lm", model_cfg, None, None, 1.0, train_cfg.vocab_chunk, train_cfg.microbatches,
                    train_cfg.optim.freeze_model, True, policy=train_cfg.policy,
                    expert_bias_rate=train_cfg.expert_bias_rate)
    return _train(spec, train_cfg, None, params, {}, data, out_dir, extra_meta=extra_meta, progress=progress)


def train_kd(model_cfg: NemotronHConfig, train_cfg: TrainConfig, teacher_cfg: NemotronHConfig, teacher_params,
             student_params, data, out_dir, *, extra_meta: dict | None = None, progress: bool = True) -> TrainResult:
    """KD of one fixed-size student (`model_cfg`) from a teacher of `teacher_cfg` (same vocabulary)."""
    if teacher_cfg.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"teacher vocab_size={teacher_cfg.vocab_size} != student vocab_size={model_cfg.vocab_size}")
    spec = StepSpec("kd", model_cfg, teacher_cfg, None, train_cfg.kd_temperature, train_cfg.vocab_chunk,
                    train_cfg.microbatches, train_cfg.optim.freeze_model, True, policy=train_cfg.policy,
                    expert_bias_rate=train_cfg.expert_bias_rate)
    return _train(spec, train_cfg, teacher_params, student_params, {}, data, out_dir, extra_meta=extra_meta,
                  progress=progress)


# --------------------------------------------------------------------------- internals
def _configs(spec: StepSpec, train_cfg: TrainConfig, data: TokenDataset, teacher_params=None) -> dict:
    return {
        "teacher_fingerprint": params_fingerprint(teacher_params),
        "mode": spec.mode,
        "model": spec.model_cfg.to_dict(),
        "teacher": None if spec.teacher_cfg is None else spec.teacher_cfg.to_dict(),
        "elastic": None if spec.elastic_cfg is None else spec.elastic_cfg.to_dict(),
        "train": json.loads(json.dumps(train_cfg.to_dict())),
        "data": json.loads(json.dumps(data.config.to_dict())),
    }


def step_shardings(spec: StepSpec, mesh, state_like, teacher_like, rules=shd.DEFAULT_RULES,
                   tolerance: float | None = None):
    """(state shardings, teacher shardings) for `state_like` {"params", "router", "opt_state"}.
    `tolerance`: check that student and teacher are sharded as the rules ask
    (`assert_params_sufficiently_sharded`; None = no check)."""
    if tolerance is not None:
        shd.assert_params_sufficiently_sharded(param_axes(spec.model_cfg), state_like["params"], mesh, rules,
                                               tolerance)
        if teacher_like is not None:
            shd.assert_params_sufficiently_sharded(param_axes(spec.teacher_cfg), teacher_like, mesh, rules,
                                                   tolerance)
    p_sh = shd.tree_shardings(param_axes(spec.model_cfg), state_like["params"], mesh, rules)
    rep = NamedSharding(mesh, P())
    r_sh = jax.tree.map(lambda _: rep, state_like["router"])
    trainable = {"params": state_like["params"], "router": state_like["router"]}
    o_sh = shd.follow_shardings(state_like["opt_state"], trainable, {"params": p_sh, "router": r_sh}, mesh)
    t_sh = None if teacher_like is None else shd.tree_shardings(param_axes(spec.teacher_cfg), teacher_like, mesh, rules)
    return {"params": p_sh, "router": r_sh, "opt_state": o_sh}, t_sh


def place_state(params, router_params, state_sh):
    """Fresh sharded copies of the trainable trees (the step donates its state; the caller's arrays
    must survive), plus the optimizer state initialized in place."""
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                   out_shardings={"params": state_sh["params"], "router": state_sh["router"]})
    state = dict(copy({"params": params, "router": router_params}))
    return state


def compile_step(spec: StepSpec, tx, mesh, state_sh, teacher_sh, micro_batch: int, *, activation_sharding=True,
                 rules=shd.DEFAULT_RULES):
    """jit of the step for one stage shape: batch [M, micro_batch, L] split over the batch rule.
    With `activation_sharding` the step is traced under `jax.set_mesh(mesh)` and `use_rules(rules)`:
    the model then constrains its activations by the rules and runs the MoE expert-parallel
    (elastic_jax/sharding.py); without it, GSPMD alone propagates the parameter shardings."""
    rep = NamedSharding(mesh, P())
    bspec = shd.batch_spec(mesh, micro_batch, rules, leading=1)
    b_sh = NamedSharding(mesh, bspec)
    act = NamedSharding(mesh, P(bspec[1], None, None)) if activation_sharding else None
    fn = make_step(spec, tx, act_sharding=act)
    jitted = jax.jit(fn, in_shardings=(state_sh, teacher_sh, {"tokens": b_sh, "segment_ids": b_sh},
                                       rep, rep, rep, rep, rep, rep),
                     out_shardings=(state_sh, rep), donate_argnums=(0,))
    if not activation_sharding:
        return jitted, bspec
    return _InMesh(jitted, mesh, rules), bspec


class _InMesh:
    """A jitted function traced, lowered and called with `mesh` and `rules` in context."""

    def __init__(self, jitted, mesh, rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args, **kw):
        with jax.set_mesh(self.mesh), shd.use_rules(self.rules):
            return self.jitted(*args, **kw)

    def lower(self, *args, **kw):
        with jax.set_mesh(self.mesh), shd.use_rules(self.rules):
            return self.jitted.lower(*args, **kw)


def _schedule_fn(spec: StepSpec, lr_fns, total: int, rep):
    """jit: step (device int32) -> {"tau", "scale", "lr", "router_lr"}, all on device (METHOD §5.2
    schedules, optimizer LR of each group), so the loop never waits on the host for them."""
    def sched(step):
        if spec.mode == "elastic":
            from ..elastic.router import schedules
            tau, scale = schedules(spec.elastic_cfg, step, total)
        else:
            tau, scale = jnp.float32(1.0), jnp.float32(1.0)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return {"tau": f32(tau), "scale": f32(scale), "lr": f32(lr_fns[0](step)), "router_lr": f32(lr_fns[1](step))}
    return jax.jit(sched, out_shardings=rep)


def _read_metrics(tree):
    """The training loop's one device->host transfer per step: the metrics of the step before
    the one just dispatched (so the device never idles waiting for the host)."""
    return jax.device_get(tree)


def _record(spec, stage, step, m, tau, scale, lrs, tok_s, tokens_seen) -> dict:
    rec = {"step": step, "stage": stage.name, "loss": float(m["loss"]), "task": float(m["task"]),
           "budget_loss": float(m["budget_loss"]), "grad_norm": float(m["grad_norm"]),
           "tokens": int(m["tokens"]), "tokens_seen": int(tokens_seen), "tokens_per_s": float(tok_s),
           "lr": lrs[0], "router_lr": lrs[1]}
    if "routing_entropy" in m:
        rec["routing_entropy"] = float(np.mean(np.asarray(m["routing_entropy"])))
    if spec.mode == "elastic":
        ecfg = spec.elastic_cfg
        rec["tau"], rec["scale"] = float(tau), float(scale)
        rec["budgets_sampled"] = [float(ecfg.budgets[i]) for i in np.asarray(m["budget_idx"]).reshape(-1)]
        cnt = np.asarray(m["count_by_budget"])
        for i, b in enumerate(ecfg.budgets):
            if cnt[i] > 0:
                rec[f"task_budget_{b:g}"] = float(np.asarray(m["task_by_budget"])[i] / cnt[i])
                rec[f"budget_loss_budget_{b:g}"] = float(np.asarray(m["budget_loss_by_budget"])[i] / cnt[i])
        from ..elastic.router import head_options
        opts = head_options(spec.model_cfg, ecfg)
        for axis, exp in m.get("expected", {}).items():
            exp = np.asarray(exp)
            ch = np.asarray(m["choice"][axis])
            o = np.asarray(opts[axis])
            for j, bi in enumerate(np.asarray(m["budget_idx"]).reshape(-1)):
                b = ecfg.budgets[int(bi)]
                # depth: the expected number of kept layers (Σ gates); widths: the mean over layers
                rec[f"width_{axis}_budget_{b:g}"] = float(np.sum(exp[j]) if axis == "layers" else np.mean(exp[j]))
                rec[f"choice_{axis}_budget_{b:g}"] = (o[ch[j]].tolist() if o.ndim == 1
                                                      else [int(o[k, c]) for k, c in enumerate(np.atleast_1d(ch[j]))])
    return rec


def _diverged_message(spec: StepSpec, stage, step: int, m: dict, ckpt: Checkpointer) -> str:
    """What the NaN guard rejected (step.py FINITE_CHECKS), where, and the last good checkpoint."""
    from .step import FINITE_CHECKS
    checks = np.asarray(m["finite_checks"])
    what = [n for n, ok in zip(FINITE_CHECKS, checks) if not ok]
    idx = np.asarray(m["budget_idx"]).reshape(-1)
    losses = np.asarray(m["mb_loss"]).reshape(-1)
    name = lambda b: float(spec.elastic_cfg.budgets[int(b)]) if spec.mode == "elastic" else 1.0
    bad = [name(b) for b, l in zip(idx, losses) if not np.isfinite(l)] or sorted({name(b) for b in idx})
    last = ckpt.latest_step()
    return (f"non-finite {' / '.join(what)} (loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}) at step "
            f"{step} (stage {stage.name!r}, budget(s) {bad}); the update was not applied and the run stopped. "
            f"Last good checkpoint: {'none' if last is None else f'step {last}'} in {ckpt.directory}")


def _check_stage_sizes(cfg, train_cfg: TrainConfig) -> None:
    """Each stage's rows fit the model's declared context, and its host batch (tokens and segment
    ids, int32) fits the host's memory: refused before anything is allocated."""
    from ..hostmem import check_host_bytes
    for st in train_cfg.stages:
        if st.seq_len > cfg.max_position_embeddings:
            raise ValueError(f"Stage({st.name!r}).seq_len={st.seq_len} exceeds the model's context "
                             f"max_position_embeddings={cfg.max_position_embeddings}; shorten the stage's rows or "
                             "raise max_position_embeddings")
        check_host_bytes(2 * 4 * st.batch_size * st.seq_len // max(1, jax.process_count()),
                         f"Stage({st.name!r}) batch of {st.batch_size} x {st.seq_len} tokens")


def _train(spec: StepSpec, train_cfg: TrainConfig, teacher_params, student_params, router_params, data, out_dir, *,
           extra_meta=None, progress=True, quant_layers=None) -> TrainResult:
    cfg = spec.model_cfg
    _check_stage_sizes(cfg, train_cfg)      # before the dataset or anything else is built
    if isinstance(data, DataConfig):
        data = make_dataset(data, cfg.vocab_size)
    if not isinstance(data, TokenDataset):
        raise TypeError(f"data must be an elastic_jax.data.TokenDataset or DataConfig, got {type(data).__name__}")
    if data.vocab_size != cfg.vocab_size:
        raise ValueError(f"the dataset was checked against vocab_size={data.vocab_size} but the model has "
                         f"vocab_size={cfg.vocab_size}")
    check_params(student_params, cfg)
    if teacher_params is not None:
        check_params(teacher_params, spec.teacher_cfg)
    stage_data = {i: make_dataset(st.data, cfg.vocab_size) for i, st in enumerate(train_cfg.stages)
                  if st.data is not None}
    nb = spec.n_budgets
    for st in train_cfg.stages:
        if spec.mode == "elastic":
            st.probs(nb)                     # raises if budget_probs does not match the budgets
        if st.batch_size % (train_cfg.microbatches * jax.process_count()):
            raise ValueError(f"Stage({st.name!r}).batch_size={st.batch_size} must be divisible by microbatches "
                             f"({train_cfg.microbatches}) x processes ({jax.process_count()})")

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    lock = RunLock(out_dir)
    acquire_everywhere(lock)
    try:
        return _train_locked(spec, train_cfg, teacher_params, student_params, router_params, data, out_dir,
                             stage_data, extra_meta, progress, quant_layers, lock)
    finally:
        lock.release()


def _train_locked(spec, train_cfg, teacher_params, student_params, router_params, data, out_dir, stage_data,
                  extra_meta, progress, quant_layers, lock) -> TrainResult:
    nb = spec.n_budgets
    mesh = shd.make_mesh(train_cfg.mesh)
    total = train_cfg.total_steps
    tx = make_optimizer(train_cfg.optim, total)
    configs = _configs(spec, train_cfg, data, teacher_params)

    trainable0 = {"params": student_params, "router": router_params}
    state_like = {"params": student_params, "router": router_params,
                  "opt_state": jax.eval_shape(tx.init, trainable0)}
    rules = shd.merge_rules(train_cfg.sharding_rules)
    state_sh, teacher_sh = step_shardings(spec, mesh, state_like, teacher_params, rules,
                                          tolerance=train_cfg.sharding_tolerance)
    if quant_layers is not None:   # QAD scales: small, replicated, checkpointed with the state
        state_like["quant"] = quant_layers
        state_sh["quant"] = jax.tree.map(lambda _: NamedSharding(mesh, P()), quant_layers)

    ckpt = Checkpointer(fileio.join(out_dir, "checkpoints"), keep=train_cfg.keep_checkpoints,
                        async_save=train_cfg.async_checkpointing)
    base_key = jax.random.PRNGKey(train_cfg.seed)
    data_states, tokens_seen = None, 0
    abstract = {"state": abstract_like(state_like, state_sh),
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))}
    found = ckpt.restore_newest(lambda s: (ckpt.check_compatible(s, configs), ckpt.restore_state(s, abstract)))
    start = None if found is None else found[0]
    if found is not None:
        if jax.process_index() == 0:
            ckpt.set_aside_after(start)      # damaged newer steps: kept aside, rewritten by this run
        if jax.process_count() > 1:          # the others wait for it, then list the steps again
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("elastic_jax.train: damaged steps set aside")
            ckpt.manager.reload()
        meta, restored = found[1]
        state = restored["state"]
        base_key = jnp.asarray(jax.device_get(restored["rng"]), jnp.uint32)
        data_states, tokens_seen = meta["data_states"], int(meta["tokens_seen"])
    else:
        state = place_state(student_params, router_params, state_sh)
        state["opt_state"] = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(
            {"params": state["params"], "router": state["router"]})
        if quant_layers is not None:
            state["quant"] = jax.device_put(jax.tree.map(jnp.copy, quant_layers), state_sh["quant"])
        start = 0
    teacher = None if teacher_params is None else jax.device_put(teacher_params, teacher_sh)

    primary = jax.process_index() == 0
    logger = RunLogger(out_dir, start_step=start, tensorboard=train_cfg.tensorboard, enabled=primary)
    lr_fns = (lr_schedule(train_cfg.optim.lr, train_cfg.optim, total),
              lr_schedule(train_cfg.optim.router_lr, train_cfg.optim, total))
    history: list[dict] = []
    bar = None
    if progress and primary:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=spec.mode, unit="step", dynamic_ncols=True)
    rep = NamedSharding(mesh, P())
    M = train_cfg.microbatches
    sched_fn = _schedule_fn(spec, lr_fns, total, rep)

    def _consume(pending, tokens_seen, save_kept=None) -> int:
        """Read one finished step's metrics (the loop's only device->host transfer per step), stop
        on a non-finite loss, log; returns the updated token count. `save_kept(at)`: when the
        rejected step was the last one dispatched, `state` is the kept last good state; it is
        saved as step `at` if that is newer than the last checkpoint."""
        at = pending[0]
        m, sched = _read_metrics((pending[1], pending[2]))
        stage = train_cfg.stages[train_cfg.stage_at(at)[0]]
        if not bool(m["finite"]):
            ckpt.wait()
            if save_kept is not None and at > (ckpt.latest_step() if ckpt.latest_step() is not None else -1):
                save_kept(at)
                ckpt.wait()
            raise TrainingDiverged(_diverged_message(spec, stage, at, m, ckpt))
        tokens_seen += int(m["tokens"])
        tok_s = thr.update(int(m["tokens"]))
        if at % train_cfg.log_every == 0 or at == total - 1:
            rec = _record(spec, stage, at, m, sched["tau"], sched["scale"],
                          (float(sched["lr"]), float(sched["router_lr"])), tok_s, tokens_seen)
            history.append(rec)
            logger.log(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(progress_postfix(m, tok_s, stage.name,
                                             spec.elastic_cfg.budgets if spec.mode == "elastic" else None))
        return tokens_seen

    step = start
    compiled = {}
    preempt = PreemptionWatcher()
    try:
        while step < total:
            si, s0 = train_cfg.stage_at(step)
            stage = train_cfg.stages[si]
            mb = stage.batch_size // M
            if mb not in compiled:        # stages of one micro-batch size share a jit (same shape: one compile)
                compiled[mb] = compile_step(spec, tx, mesh, state_sh, teacher_sh, mb,
                                            activation_sharding=train_cfg.activation_sharding, rules=rules)
            jitted, bspec = compiled[mb]
            b_sh, gshape = NamedSharding(mesh, bspec), (M, mb, stage.seq_len)
            stream = hostdata.open_stage_rows(stage_data.get(si, data), stage, si, M, hostdata.host_rows(b_sh, gshape))
            hostdata.restore_data_state(stream, data_states, si)
            data_states = None
            probs = np.asarray(stage.probs(nb) if spec.mode == "elastic" else (1.0,), np.float32)
            probs_dev = jax.device_put(probs, rep)
            thr = Throughput()
            stage_end = s0 + stage.num_steps
            pending = None    # the last dispatched step, its metrics read one step late
            while step < stage_end:
                local = next(stream)
                logger.batch(step, stage.name, batch_digest(local))
                glob = {k: hostdata.to_global(local[k], b_sh, gshape) for k in ("tokens", "segment_ids")}
                step_dev = jax.device_put(np.int32(step), rep)
                sched = sched_fn(step_dev)        # τ, logit scale, learning rates: on device, no sync
                state, m = jitted(state, teacher, glob, step_dev, sched["tau"], sched["scale"], probs_dev, base_key,
                                  {k: sched[k] for k in RATE_ARGS})
                if pending is not None:           # the previous step's metrics (it has finished by now)
                    tokens_seen = _consume(pending, tokens_seen)
                pending = (step, m, sched)
                step += 1
                stop = preempt.reached(step)      # every host, every step (the hosts agree on one step)
                lock.touch()
                if stop or step % train_cfg.checkpoint_every == 0 or step == stage_end:
                    def save(at):
                        # the iterator state of every host; at a stage end the next stage starts afresh
                        scope = getattr(stream, "state_scope", "host")
                        hosts = None if at == stage_end else (
                            [stream.get_state()] if scope == "global" else gather_json(stream.get_state()))
                        meta = {"configs": configs, "step": at, "stage": si, "tokens_seen": tokens_seen,
                                "data_states": {"stage": si if at < stage_end else si + 1, "hosts": hosts,
                                                "scope": scope},
                                "data_stats": data.stats.to_dict(), "extra": extra_meta,
                                "process_count": jax.process_count()}
                        ckpt.save(at, {"state": state, "rng": jax.device_put(base_key, rep)}, meta)
                    # every step up to here checked finite before anything is saved
                    tokens_seen = _consume(pending, tokens_seen, save_kept=save)
                    pending = None
                    save(step)
                    if stop:
                        ckpt.wait()
                        raise Preempted(step, ckpt.directory)
        ckpt.wait()
    finally:
        preempt.close()
        if bar is not None:
            bar.close()
        try:
            logger.close()
        finally:
            ckpt.close()
    if primary and train_cfg.plot:
        plot_curves(logger.metrics_path, os.path.join(out_dir, "curves.png"))
    return TrainResult(params=state["params"], router_params=state["router"], history=history,
                       tokens_seen=tokens_seen, steps=step, out_dir=out_dir,
                       resumed_from=None if start == 0 else start)

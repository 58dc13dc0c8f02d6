"""The runs of one Star Elastic family (METHOD §6-8) for the main job (`recipes/star_elastic.py`):
one seed's parent -> importance -> elastic run -> 1x baselines, the pre-registered parent rule and
the gap-vs-parent-steps curve (issue 30), the extra baselines of the token accounting (LR sweep,
from scratch), and the run's persistent compile cache."""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import jax
import numpy as np

from ..data import make_dataset
from ..elastic import estimate_importance, trained_widths, param_count, permute_params, slice_params
from ..elastic.slicing import embed_params
from ..infer.budget import ElasticModel
from ..infer.checkpoint import widths_to_dict
from ..model import init_params
from ..eval.accuracy import model_row
from ..eval.parent_curve import converged_step, gap_row, heldout_loss
from ..tasks import trace_text
from ..train import TrainConfig, train_elastic, train_kd, train_lm
from ..train.metrics import read_jsonl
from ..train.runctl import stop_live_runs
from ..widths import Widths


def embedded_model(cfg, name: str, widths: Widths, sub_params) -> ElasticModel:
    """A smaller model trained on its own (a baseline, a from-scratch run: a model of `sliced_config(cfg,
    widths)`) as submodel `name` of a masked `ElasticModel` at the parent's shapes (`embed_params`), so it
    runs the same compiled programs as the parent and every nested model of every seed (masked ==
    sliced: the main job evaluates every model through the masked forward)."""
    return ElasticModel(cfg, embed_params(sub_params, cfg, widths), {name: widths}, mode="masked")


def budget_name(fraction: float) -> str:
    return f"{round(100 * fraction):d}%"


def nested_tokens(train: TrainConfig, n_budgets: int) -> list[float]:
    """Expected training tokens each budget saw inside the elastic run: per stage, its tokens x the
    budget's sampling probability (uniform when the stage gives none); one budget per micro-batch."""
    out = np.zeros(n_budgets)
    for st in train.stages:
        tokens = st.tokens if st.tokens is not None else st.steps * st.seq_len * st.batch_size
        p = np.full(n_budgets, 1.0 / n_budgets) if st.budget_probs is None else np.asarray(st.budget_probs, float)
        out += tokens * p / p.sum()
    return [float(x) for x in out]


def history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    keep = ("step", "stage", "loss", "task", "tokens_seen")
    return [{k: v for k, v in r.items() if k in keep or k.startswith("task_budget_")} for r in read_jsonl(path)] \
        if os.path.isfile(path) else []


def announce(msg: str, progress: bool):
    if progress:
        print(f"[star-elastic] {msg}", flush=True)



def seed_offsets(xp, k: int):
    """Training seed `k` of `xp` (issue 30): the model init, the parent's run and the comparison seed
    (elastic run and baselines) moved by k; the training documents and eval problems stay the same, so
    per-problem scores pair across seeds. Equal to a separate run with `--set seed=K --set
    parent_train.seed=K --set comparison_seed=K` (eval/seeds.py)."""
    return dataclasses.replace(xp, seed=xp.seed + k, comparison_seed=xp.comparison_seed + k, seeds=1,
                               parent_train=dataclasses.replace(xp.parent_train, seed=xp.parent_train.seed + k))


def train_family(xp, out_dir: str, data, calib, phases: dict, say) -> dict:
    """Parent (CE) -> importance + permutation -> elastic distillation -> router widths per budget
    (METHOD §3, §6-8), in `out_dir`/parent and /elastic; each run resumes from its checkpoints."""
    cfg, ecfg = xp.model, xp.elastic
    t0 = time.perf_counter()
    say(f"parent: {param_count(cfg):,} params ({param_count(cfg, active=True):,} active), pattern {cfg.pattern}")
    parent0 = init_params(cfg, jax.random.PRNGKey(xp.seed))
    parent_res = train_lm(cfg, xp.parent_train, parent0, data, os.path.join(out_dir, "parent"), progress=xp.progress)
    parent, rule = parent_res.params, None
    if xp.parent_rule is not None:
        parent, rule = apply_parent_rule(xp, os.path.join(out_dir, "parent"), parent, data)
        say(f"parent rule: snapshot at step {rule['step']} ({rule['reason']})")
    phases["parent"] = phases.get("parent", 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    importance = estimate_importance(parent, cfg, [{"tokens": b["tokens"], "segment_ids": b["segment_ids"]}
                                                   for b in calib])
    teacher = permute_params(parent, cfg, importance)
    phases["importance"] = phases.get("importance", 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"elastic distillation into budgets {ecfg.budgets}")
    el_train = dataclasses.replace(xp.elastic_train, seed=xp.elastic_train.seed + xp.comparison_seed)
    el = train_elastic(cfg, ecfg, el_train, teacher, teacher, data, os.path.join(out_dir, "elastic"),
                       progress=xp.progress)
    phases["elastic"] = phases.get("elastic", 0.0) + time.perf_counter() - t0
    widths = {budget_name(b): trained_widths(el.router_params, cfg, ecfg, b) for b in ecfg.budgets}  # 100%: parent
    return {"parent_res": parent_res, "parent": parent, "importance": importance, "teacher": teacher, "el": el,
            "el_train": el_train, "widths": widths, "rule": rule}


def snapshots(parent_dir: str, every: int, total: int) -> list[int]:
    """The parent run's kept snapshot steps (multiples of `every`, and the last): a preemption's
    checkpoint at another step is not a snapshot."""
    from ..train.checkpoint import Checkpointer
    ck = Checkpointer(os.path.join(parent_dir, "checkpoints"), async_save=False)
    try:
        return sorted(s for s in ck.complete_steps() if s % every == 0 or s == total)
    finally:
        ck.close()


def apply_parent_rule(xp, parent_dir: str, final_params, data) -> tuple:
    """(the parent's params at the snapshot `xp.parent_rule` picks, the rule's record): held-out loss
    at every snapshot of the parent run (eval/parent_curve.py `converged_step`)."""
    from ..train.checkpoint import load_run
    rule, st, total = xp.parent_rule, xp.parent_train.stages[0], xp.parent_train.total_steps
    held = make_dataset(dataclasses.replace(xp.data, seed=xp.data.seed + 101,
                                            num_documents=max(64, 4 * rule.heldout_batches * st.batch_size)),
                        xp.model.vocab_size)
    stream = held.batches(st.seq_len, st.batch_size, epoch_seed=20_000)
    batches = [next(stream) for _ in range(rule.heldout_batches)]
    params = {s: (final_params if s == total else load_run(parent_dir, s)[1])
              for s in snapshots(parent_dir, xp.parent_train.checkpoint_every, total)}
    curve = [(s, heldout_loss(p, xp.model, batches)) for s, p in params.items()]
    res = converged_step(curve, rule, total)
    return params.get(res["step"], final_params), res


def baseline_steps_config(base_train: TrainConfig, multiple: float | None, seen: float,
                          warmup_fraction: float | None = None) -> TrainConfig:
    """The baseline's one-stage schedule on `multiple` x the `seen` tokens (None: `base_train` as given).
    `warmup_fraction`: its warmup is that share of its steps (issue 30: the elastic run's share, so a
    short baseline is not mostly warmup); None keeps `base_train`'s warmup steps."""
    if multiple is None:
        return base_train
    st = base_train.stages[0]
    steps = max(1, int(round(multiple * seen / (st.seq_len * st.batch_size))))
    optim = base_train.optim if warmup_fraction is None else dataclasses.replace(
        base_train.optim, warmup_steps=int(round(warmup_fraction * steps)))
    return dataclasses.replace(base_train, optim=optim, stages=(dataclasses.replace(st, steps=steps, tokens=None),))


def warmup_fraction(train: TrainConfig) -> float:
    """The share of `train`'s steps spent in warmup."""
    return min(1.0, train.optim.warmup_steps / max(1, train.total_steps))



_NOT_IN_SEED_ROWS = ("seeds", "parent_curve", "parent_curve_train", "quant", "title", "progress", "baseline_lrs",
                     "scratch_steps")


def seed_rows(xp, k: int, out_dir: str, data, calib, eval_set, tok, gold, phases: dict,
               say) -> dict:
    """Training seed k >= 1 (`seed_offsets`) in `out_dir`/seeds/seed{k}: its parent, elastic run and
    one baseline per nested size (the 1x token multiple, or `baseline_train` as given), each model
    evaluated on `eval_set` with the gold-trace diagnostics. The rows are cached in rows.json (written
    atomically, reused by a rerun of the same config and eval set); the runs resume from checkpoints."""
    from ..fileio import write_text_atomic
    xk = seed_offsets(xp, k)
    seed_dir = os.path.join(out_dir, "seeds", f"seed{k}")
    cache = os.path.join(seed_dir, "rows.json")
    # what the seed's rows depend on (not the seed count, the curve, the grid or quantization of seed 0)
    key = {"config": {f: v for f, v in config_dict(xk).items() if f not in _NOT_IN_SEED_ROWS},
           "n_problems": len(eval_set)}
    if os.path.isfile(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            say(f"seed {k}: rows of a finished seed run reused ({cache})")
            return cached["rows"]
    cfg, ecfg, ev = xk.model, xk.elastic, xk.eval
    say(f"seed {k} of {xp.seeds}: parent, elastic run and 1x baselines in {seed_dir}")
    fam = train_family(xk, seed_dir, data, calib, phases, say)
    widths, teacher, el = fam["widths"], fam["teacher"], fam["el"]
    names = list(widths)
    t0 = time.perf_counter()
    seen = dict(zip(names, nested_tokens(xk.elastic_train, len(names))))
    base_train = xk.baseline_train or xk.elastic_train
    base_train = dataclasses.replace(base_train, seed=base_train.seed + xk.comparison_seed)
    base = {}
    for n, b in zip(names, ecfg.budgets):
        if b >= 1.0:
            continue
        sub_cfg, sub_params = slice_params(teacher, cfg, widths[n])
        tc = baseline_steps_config(base_train, 1.0 if xk.token_multiples else None, seen[n],
                                   warmup_fraction(xk.elastic_train))
        res = train_kd(sub_cfg, tc, cfg, teacher, sub_params, data, os.path.join(seed_dir, f"baseline_{n.rstrip('%')}"),
                       progress=xk.progress)
        base[n] = (sub_cfg, res)
    phases["baselines"] = phases.get("baselines", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    say(f"seed {k}: evaluating the parent, nested models and baselines on {len(eval_set)} problems")
    # the masked forward (masked == sliced): one compiled program for every model of every seed, where sliced
    # copies would compile per seed's widths; the baselines embedded at the parent's shapes
    parent_model = ElasticModel(cfg, fam["parent"], {"parent": Widths()}, mode="masked")
    nested_model = ElasticModel(cfg, el.params, widths, mode="masked")
    rows = {"seed": k, "parent": {"name": "parent", **model_row(parent_model, "parent", eval_set, tok, ev, gold)},
            "nested": [{"name": n, "fraction": b, "widths": widths_to_dict(widths[n]),
                        "params": param_count(cfg, widths[n]), "active_params": param_count(cfg, widths[n], True),
                        **model_row(nested_model, n, eval_set, tok, ev, gold)} for n, b in zip(names, ecfg.budgets)],
            "baselines": [{"name": n, "params": param_count(c), "active_params": param_count(c, active=True),
                           "train_tokens": int(r.tokens_seen),
                           **model_row(embedded_model(cfg, n, widths[n], r.params), n, eval_set, tok, ev, gold)}
                          for n, (c, r) in base.items()],
            "training": {"parent_tokens": int(fam["parent_res"].tokens_seen), "elastic_tokens": int(el.tokens_seen),
                         "baseline_tokens": {n: int(r.tokens_seen) for n, (_, r) in base.items()}},
            "parent_rule": None if fam["rule"] is None else {"seed": k, **fam["rule"]}}
    phases["eval_seeds"] = phases.get("eval_seeds", 0.0) + time.perf_counter() - t0
    write_text_atomic(cache, json.dumps({"key": key, "rows": rows}, default=float))
    return rows



class BackgroundSeeds:
    """Training seeds 1.. (`seed_rows`, in order) in a worker thread while the main thread runs seed 0's
    family, baselines, evaluation and gap curve (issue 30): XLA compiles on one core and the evaluation
    decodes small batches, so one thread alone leaves a core idle ~25% of the time; the other thread's
    work takes it (the main job joins before its grid, whose wall clock is measured). Every program is
    deterministic and each seed runs its own runs in order, so the rows equal a sequential run's. The
    seeds' training bars are off (their announcements print); their phase times, which overlap the main
    thread's, go to `phases` (their wall clock as "seeds_background") when `result()` joins.

    As a context manager: on an error or `Preempted` in the main thread, the worker's runs are asked to
    save and stop (`runctl.stop_live_runs`), and are waited for up to `grace_s` (the thread is a daemon:
    a run it has not finished by then resumes from its last checkpoint)."""

    def __init__(self, xp, out_dir: str, data, calib, eval_set, tok, gold, say, *, grace_s: float = 120.0):
        self.phases, self.rows, self.error, self.wall_s = {}, [], None, 0.0
        self.grace_s, self.cancel = grace_s, threading.Event()
        quiet = dataclasses.replace(xp, progress=False)

        def work():
            t0 = time.perf_counter()
            try:
                for k in range(1, xp.seeds):
                    if self.cancel.is_set():
                        break
                    self.rows.append(seed_rows(quiet, k, out_dir, data, calib, eval_set, tok, gold, self.phases, say))
            except BaseException as e:          # re-raised in the main thread by result()
                self.error = e
            self.wall_s = time.perf_counter() - t0
        self.thread = threading.Thread(target=work, name="star-elastic-seeds", daemon=True)
        self.thread.start()

    def result(self, phases: dict) -> list[dict]:
        """Wait for the seeds; their rows (seed 1 first). Adds their phase times to `phases`."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        phases["seeds_background"] = self.wall_s
        for k, v in self.phases.items():
            phases[f"seeds_{k}"] = v
        return self.rows

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if typ is not None and self.thread.is_alive():
            self.cancel.set()
            stop_live_runs()
            self.thread.join(self.grace_s)
        return False


def parent_curve_rows(xp, out_dir: str, data, calib, eval_set, tok, say, main: dict) -> list[dict]:
    """The gap-vs-parent-steps curve (issue 30): each of seed 0's parent snapshots `xp.parent_curve`
    permuted by its own importance and elastified with `xp.parent_curve_train` (in
    `out_dir`/parent_curve/step{S}, resumable), then the parent, the full and the smallest nested model
    answer given the gold trace. `main` {"steps", "parent", "full", "small"} (gold-trace scores): the main
    run's own point, used as is when its parent is that snapshot and the schedules are the same.
    Cached in curve.json (atomic) for a rerun of the same config."""
    from ..eval.accuracy import answer_texts
    from ..fileio import write_text_atomic
    from ..tasks import score_answer
    from ..train.checkpoint import load_run
    cfg, ecfg, ev = xp.model, xp.elastic, xp.eval
    cache = os.path.join(out_dir, "parent_curve", "curve.json")
    key = {"config": config_dict(xp), "n_problems": len(eval_set)}
    if os.path.isfile(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["rows"]
    gold = [tok.encode(trace_text(p)) for p in eval_set.problems]
    tc = dataclasses.replace(xp.parent_curve_train, seed=xp.parent_curve_train.seed + xp.comparison_seed)
    sched = " + ".join(f"{st.steps} {st.name}" for st in tc.stages) + " steps"
    full, small = budget_name(max(ecfg.budgets)), budget_name(min(ecfg.budgets))
    score = lambda m, n: [score_answer(p, t) for p, t in zip(eval_set.problems,
                                                             answer_texts(m, n, eval_set, tok, ev, gold))]
    rows = []
    for steps in xp.parent_curve:
        if steps == main["steps"] and xp.parent_curve_train == xp.elastic_train:
            rows.append(gap_row(steps, main["parent"], main["full"], main["small"], sched + " (the main run)"))
            continue
        say(f"gap vs parent steps: the parent at step {steps}, elastified for {sched}")
        parent = load_run(os.path.join(out_dir, "parent"), steps)[1]
        imp = estimate_importance(parent, cfg, [{"tokens": b["tokens"], "segment_ids": b["segment_ids"]} for b in calib])
        teacher = permute_params(parent, cfg, imp)
        el = train_elastic(cfg, ecfg, tc, teacher, teacher, data, os.path.join(out_dir, "parent_curve", f"step{steps}"),
                           progress=xp.progress)
        widths = {budget_name(b): trained_widths(el.router_params, cfg, ecfg, b) for b in ecfg.budgets}
        nested = ElasticModel(cfg, el.params, {full: widths[full], small: widths[small]}, mode="masked")
        par = score(ElasticModel(cfg, parent, {"parent": Widths()}, mode="masked"), "parent")
        rows.append(gap_row(steps, par, score(nested, full), score(nested, small), sched))
    write_text_atomic(cache, json.dumps({"key": key, "rows": rows}))
    return rows



SCRATCH_SNAPSHOTS = 4        # a from-scratch run is evaluated at every quarter of its steps (tokens to match)


def extra_baselines(xp, out_dir: str, data, teacher, widths: dict, base_train: TrainConfig,
                     seen: dict, say) -> list[dict]:
    """Seed 0's optional baselines for the family's token accounting (issue 30): each smaller size's 1x
    baseline at every `xp.baseline_lrs` learning rate (run `baseline_<n>_lr<lr>`), and each smaller size
    from random init with the parent's CE schedule for `xp.scratch_steps` steps (run `scratch_<n>`), its
    snapshots at every quarter kept for the tokens it needs to match the nested model."""
    cfg, out = xp.model, []
    frac = warmup_fraction(xp.elastic_train)
    for n, b in zip(widths, xp.elastic.budgets):
        if b >= 1.0:
            continue
        sub_cfg, sub_params = slice_params(teacher, cfg, widths[n])
        for lr in xp.baseline_lrs:
            tc = baseline_steps_config(base_train, 1.0 if xp.token_multiples else None, seen[n], frac)
            tc = dataclasses.replace(tc, optim=dataclasses.replace(tc.optim, lr=lr))
            run = f"baseline_{n.rstrip('%')}_lr{lr:g}"
            say(f"baseline {n} at lr {lr:g}: KD alone for {tc.total_steps} steps")
            res = train_kd(sub_cfg, tc, cfg, teacher, sub_params, data, os.path.join(out_dir, run), progress=xp.progress)
            out.append({"kind": "lr", "name": n, "lr": lr, "run": run, "cfg": sub_cfg, "res": res, "steps": tc.total_steps})
        if xp.scratch_steps:
            pt, steps = xp.parent_train, xp.scratch_steps
            every = max(1, steps // SCRATCH_SNAPSHOTS)
            tc = dataclasses.replace(
                pt, seed=pt.seed + xp.comparison_seed, checkpoint_every=every, keep_checkpoints=SCRATCH_SNAPSHOTS + 2,
                optim=dataclasses.replace(pt.optim, warmup_steps=int(round(warmup_fraction(pt) * steps))),
                stages=(dataclasses.replace(pt.stages[0], steps=steps, tokens=None),))
            run = f"scratch_{n.rstrip('%')}"
            say(f"from scratch {n}: {param_count(sub_cfg):,} params, CE for {steps} steps")
            res = train_lm(sub_cfg, tc, init_params(sub_cfg, jax.random.PRNGKey(xp.seed + 17)), data,
                           os.path.join(out_dir, run), progress=xp.progress)
            out.append({"kind": "scratch", "name": n, "run": run, "cfg": sub_cfg, "res": res, "steps": tc.total_steps,
                        "snapshots": snapshots(os.path.join(out_dir, run), every, tc.total_steps)})
    return out


def extra_baseline_rows(extra: list[dict], out_dir: str, seen: dict, evaluate) -> list[dict]:
    """The report rows of `extra_baselines`: one per LR-sweep run, one per from-scratch snapshot (its
    `multiple`: the snapshot's tokens over the tokens that size saw in the elastic run, for
    `tokens_to_match`). `evaluate(params, name)` -> the accuracy row of that size's model `params`."""
    from ..train.checkpoint import load_run
    rows = []
    for e in extra:
        res = e["res"]
        for step in e.get("snapshots") or [e["steps"]]:
            params = res.params if step == e["steps"] else load_run(os.path.join(out_dir, e["run"]), step)[1]
            tokens = int(round(res.tokens_seen * step / e["steps"]))    # packed rows: the same tokens every step
            rows.append({"kind": e["kind"], "name": e["name"], "lr": e.get("lr"), "run": e["run"], "steps": step,
                         "final": step == e["steps"], "train_tokens": tokens, "multiple": tokens / seen[e["name"]],
                         **evaluate(params, e["name"])})
    return rows


class CompileCache:
    """JAX's persistent compilation cache in `<out_dir>/jax_cache` for the run, unless the caller set one:
    the training seeds (and a resumed run) compile the same programs again, which then costs a cache
    read instead of an XLA compile. The previous settings are restored on exit."""

    KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")

    def __init__(self, out_dir: str):
        self.dir = os.path.join(out_dir, "jax_cache")

    def __enter__(self):
        from jax.experimental.compilation_cache import compilation_cache as cc
        self.old = {k: getattr(jax.config, k) for k in self.KEYS}
        if self.old["jax_compilation_cache_dir"] is None:
            jax.config.update("jax_compilation_cache_dir", self.dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
            cc.reset_cache()
        return self

    def __exit__(self, *exc):
        from jax.experimental.compilation_cache import compilation_cache as cc
        if self.old["jax_compilation_cache_dir"] is None:
            for k, v in self.old.items():
                jax.config.update(k, v)
            cc.reset_cache()
        return False


def config_dict(xp) -> dict:
    """The experiment config as plain JSON (non-finite floats as strings)."""
    def conv(o):
        if dataclasses.is_dataclass(o):
            return {f.name: conv(getattr(o, f.name)) for f in dataclasses.fields(o)}
        if isinstance(o, (tuple, list)):
            return [conv(x) for x in o]
        if isinstance(o, float) and not np.isfinite(o):
            return str(o)
        return o
    return json.loads(json.dumps(conv(xp), default=str))

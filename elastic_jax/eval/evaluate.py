"""Evaluation of nested submodels on the embedded task and the budget-control grid (METHOD §9).

* `accuracy` — accuracy (exact match; partial credit per queried step on the query levels) of one
  (think, answer) configuration at one thinking budget;
* `evaluate_grid` — every (thinking model, answering model) pair x thinking budgets; pairs with
  think == answer are the truncation baseline ("standard budget control"), the others are the
  Star Elastic scheme; optional cache-transplant points are a separate scheme;
* `pareto_front` / `dominance` — the accuracy-latency frontier of each scheme and which points of
  one scheme dominate the other's frontier.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from ..infer.budget import BudgetOutput, ElasticModel, Specials, bucket_length, budget_generate
from ..tasks.dataset import EvalSet
from ..tasks.reasoning import score_answer
from .latency import LatencyTarget, mean_request_latency
from ..tasks.tokenizer import TaskTokenizer

SCHEMES = ("budget_control", "truncation", "parent_truncation", "transplant")
TRUNCATION_SCHEMES = ("truncation", "parent_truncation")


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One configuration measured on the whole eval set."""

    scheme: str
    think_model: str
    answer_model: str
    thinking_budget: int
    accuracy: float
    latency_s: float
    think_latency_s: float
    answer_latency_s: float
    think_tokens: int            # generated in the thinking phase (incl. </think>), whole batch
    answer_tokens: int
    prefill_tokens: int          # prompt + re-prefill positions
    flops: float
    think_flops: float
    answer_flops: float
    forced_frac: float           # rows whose </think> was forced by the budget
    mean_thinking_tokens: float  # per row, without </think>
    family: str = "nested"       # "nested" (the elastic family) or "parent" (the original model alone)
    correct: tuple = ()          # per-problem score (1/0, or partial credit), for intervals
    exact_trace: float | None = None   # share of rows whose thinking equals the reference trace
    reprefill_length: int = 0    # padded re-prefill length of the (last) batch, 0 when none
    modeled: dict = dataclasses.field(default_factory=dict)   # target key -> mean per-request seconds
    latency_model_s: float | None = None   # modeled total seconds per request on the primary target

    @property
    def label(self) -> str:
        return f"{self.think_model}->{self.answer_model}@{self.thinking_budget}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["label"] = self.label
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GridPoint":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def score(out: BudgetOutput, eval_set: EvalSet, tokenizer: TaskTokenizer) -> np.ndarray:
    """Per-row score of the answer phase's text against the reference (`score_answer`: exact
    match, or partial credit for answers with parts)."""
    if len(out.answer_tokens) != len(eval_set):
        raise ValueError(f"{len(out.answer_tokens)} outputs for an eval set of {len(eval_set)} problems")
    return np.asarray([score_answer(p, tokenizer.decode(a)) for p, a in zip(eval_set.problems, out.answer_tokens)])


def _modeled(model: ElasticModel, think_model: str, answer_model: str, targets, rows) -> dict:
    w_think, w_answer = model.budgets[think_model], model.budgets[answer_model]
    return {t.key: mean_request_latency(t, model.cfg, w_think, w_answer, rows) for t in targets}


def run_point(model: ElasticModel, eval_set: EvalSet, tokenizer: TaskTokenizer, *, think_model: str,
              answer_model: str, thinking_budget: int, max_thinking: int, max_answer_tokens: int = 6,
              transplant: bool = False, batch_size: int | None = None, repeats: int = 1,
              warmup: bool = True, latency_targets: Sequence[LatencyTarget] = (), primary: str | None = None,
              gold_traces: Sequence[Sequence[int]] | None = None, family: str = "nested",
              seen_shapes: set | None = None, thoughts: dict | None = None) -> GridPoint:
    """Measure one configuration. The first call per compiled shape is a warmup (not timed) when
    `warmup`; latency is the median over `repeats` timed runs, summed over batches.
    `latency_targets`: model each request's latency per phase (batch 1, its own prompt, trace and
    answer lengths; the re-prefill bucketed as run) on each target; `primary`: the key whose total
    becomes `latency_model_s`. `gold_traces`: reference thinking tokens per problem (-> exact_trace).
    `seen_shapes`: re-prefill shapes already compiled (shared across calls); a timed run that hit a
    new one (the bucket depends on the generated trace) is repeated, so compilation is not timed.
    `thoughts`: thinking phases kept across calls (`budget_generate`): a point whose thinking model and
    budget were already run answers from that run's trace and measured thinking latency."""
    specials = Specials.from_tokenizer(tokenizer)
    bs = batch_size or len(eval_set)
    idx = list(range(0, len(eval_set), bs))
    kw = dict(think_model=think_model, answer_model=answer_model, thinking_budget=int(thinking_budget),
              specials=specials, max_answer_tokens=max_answer_tokens, max_thinking=max_thinking,
              prompt_length=eval_set.max_prompt_len, transplant=transplant)
    correct, outs, rows, exact = [], [], [], []
    same = think_model == answer_model
    lat_think, lat_answer = 0.0, 0.0
    for s in idx:
        prompts = eval_set.prompts[s:s + bs]
        if len(prompts) < bs:                    # keep one compiled batch shape: pad with copies
            prompts = tuple(prompts) + (prompts[-1],) * (bs - len(prompts))
        if warmup:       # compiles: its thinking phase (timed with the compile) is not kept
            budget_generate(model, prompts, **kw, thoughts=None if thoughts is None else dict(thoughts))
            warmup = False
        runs = [budget_generate(model, prompts, **kw, thoughts=thoughts) for _ in range(max(1, repeats))]
        shape = (answer_model, bs, runs[0].reprefill_length)
        if seen_shapes is not None and runs[0].reprefill_length and shape not in seen_shapes:
            seen_shapes.add(shape)
            runs = [budget_generate(model, prompts, **kw, thoughts=thoughts) for _ in range(max(1, repeats))]
        n = min(bs, len(eval_set) - s)
        lat_think += float(np.median([r.think.latency_s for r in runs]))
        lat_answer += float(np.median([r.answer.latency_s for r in runs]))
        out = runs[0]
        sub = dataclasses.replace(eval_set, problems=eval_set.problems[s:s + n], prompts=eval_set.prompts[s:s + n],
                                  trace_lengths=eval_set.trace_lengths[s:s + n])
        trimmed = dataclasses.replace(out, think_tokens=out.think_tokens[:n], answer_tokens=out.answer_tokens[:n],
                                      forced=out.forced[:n])
        correct.append(score(trimmed, sub, tokenizer))
        outs.append((out, n, bs))
        for j in range(n):
            p, t, a = eval_set.prompts[s + j], trimmed.think_tokens[j], trimmed.answer_tokens[j]
            re = 0 if (same or transplant) else bucket_length(len(p) + len(t) + 1)
            rows.append((len(p), len(t) + 1, len(a), re))
            if gold_traces is not None:
                exact.append(list(map(int, t)) == list(map(int, gold_traces[s + j])))
    correct = np.concatenate(correct)
    frac = lambda o, n, b: n / b   # share of a padded batch that is real rows (stats scale with it)
    think_tok = sum(o.think.tokens * frac(o, n, b) for o, n, b in outs)
    ans_tok = sum(o.answer.tokens * frac(o, n, b) for o, n, b in outs)
    pre_tok = sum((o.think.prefill_tokens + o.answer.prefill_tokens) * frac(o, n, b) for o, n, b in outs)
    tf = sum(o.think.flops * frac(o, n, b) for o, n, b in outs)
    af = sum(o.answer.flops * frac(o, n, b) for o, n, b in outs)
    forced = np.concatenate([o.forced[:n] for o, n, _ in outs])
    mean_think = float(np.mean([len(t) for o, n, _ in outs for t in o.think_tokens[:n]]))
    scheme = "transplant" if transplant else (("parent_truncation" if family == "parent" else "truncation")
                                               if same else "budget_control")
    modeled = _modeled(model, think_model, answer_model, latency_targets, rows) if latency_targets else {}
    if primary is not None and primary not in modeled:
        raise ValueError(f"primary latency target {primary!r} is not among {list(modeled)}")
    return GridPoint(scheme=scheme, think_model=think_model, answer_model=answer_model,
                     thinking_budget=int(thinking_budget), accuracy=float(correct.mean()),
                     latency_s=lat_think + lat_answer, think_latency_s=lat_think, answer_latency_s=lat_answer,
                     think_tokens=int(round(think_tok)), answer_tokens=int(round(ans_tok)),
                     prefill_tokens=int(round(pre_tok)), flops=float(tf + af), think_flops=float(tf),
                     answer_flops=float(af), forced_frac=float(forced.mean()), mean_thinking_tokens=mean_think,
                     family=family, correct=tuple(float(c) for c in correct),
                     exact_trace=float(np.mean(exact)) if exact else None,
                     reprefill_length=int(outs[-1][0].reprefill_length), modeled=modeled,
                     latency_model_s=modeled[primary]["total_s"] if primary is not None else None)


def evaluate_grid(model: ElasticModel, eval_set: EvalSet, tokenizer: TaskTokenizer, thinking_budgets: Sequence[int],
                  *, submodels: Sequence[str] | None = None, transplant_pairs: Sequence[tuple[str, str]] = (),
                  max_answer_tokens: int = 6, batch_size: int | None = None, repeats: int = 1,
                  max_thinking: int | None = None, progress=None, latency_targets: Sequence[LatencyTarget] = (),
                  primary: str | None = None, gold_traces=None, family: str = "nested") -> list[GridPoint]:
    """Every (think, answer) pair of `submodels` (default: all trained budgets) x every thinking
    budget; then the transplant experiment for `transplant_pairs`. `max_thinking`: the decode
    capacity (default: the largest budget); one value for every call keeps one compiled program. Each
    (thinking model, budget) thinks once: the pairs that share it answer from its trace (`thoughts`)."""
    budgets = sorted({int(b) for b in thinking_budgets})
    if not budgets or budgets[0] <= 0:
        raise ValueError(f"thinking_budgets must be positive ints, got {list(thinking_budgets)}")
    names = list(submodels or model.names())
    for n in names:
        model.check_name(n)
    cap = budgets[-1] if max_thinking is None else int(max_thinking)
    if cap < budgets[-1]:
        raise ValueError(f"max_thinking={cap} must be >= the largest thinking budget {budgets[-1]}")
    jobs = [(a, b, t, False) for a, b in itertools.product(names, names) for t in budgets]
    jobs += [(a, b, t, True) for a, b in transplant_pairs for t in budgets]
    points, warmed, shapes, thoughts = [], set(), set(), {}
    for a, b, t, tr in jobs:
        key = (a, b, tr)
        p = run_point(model, eval_set, tokenizer, think_model=a, answer_model=b, thinking_budget=t, max_thinking=cap,
                      max_answer_tokens=max_answer_tokens, transplant=tr, batch_size=batch_size, repeats=repeats,
                      warmup=key not in warmed, latency_targets=latency_targets, primary=primary,
                      gold_traces=gold_traces, family=family, seen_shapes=shapes, thoughts=thoughts)
        warmed.add(key)
        points.append(p)
        if progress is not None:
            progress(p)
    return points


# ------------------------------------------------------------------------------ Pareto analysis
def latency_key(grid) -> str:
    """The grid's primary x axis: modeled latency when recorded, else wall clock."""
    return "latency_model_s" if grid and all(p.get("latency_model_s") is not None for p in grid) else "latency_s"


def pareto_front(points: Sequence, x: str = "latency_s", y: str = "accuracy") -> list[int]:
    """Indices of the non-dominated points (lower `x` and higher `y` are better), sorted by `x`.
    A point is dominated when another is no worse on both and strictly better on one."""
    xs = np.asarray([_get(p, x) for p in points], float)
    ys = np.asarray([_get(p, y) for p in points], float)
    keep = []
    for i in range(len(points)):
        dom = (xs <= xs[i]) & (ys >= ys[i]) & ((xs < xs[i]) | (ys > ys[i]))
        if not dom.any():
            keep.append(i)
    return sorted(keep, key=lambda i: (xs[i], -ys[i]))


def _get(p, k):
    return p[k] if isinstance(p, dict) else getattr(p, k)


def dominance(challengers: Sequence, baseline: Sequence, x: str = "latency_s", y: str = "accuracy") -> dict:
    """Compare two frontiers. Returns the challenger frontier points that dominate at least one
    baseline frontier point (with the points they dominate), the baseline frontier points no
    challenger dominates, and the share of the baseline frontier that is dominated."""
    cf = [challengers[i] for i in pareto_front(challengers, x, y)]
    bf = [baseline[i] for i in pareto_front(baseline, x, y)]
    wins = []
    dominated = set()
    for c in cf:
        beaten = [_label(b) for b in bf if _get(c, x) <= _get(b, x) and _get(c, y) >= _get(b, y)
                  and (_get(c, x) < _get(b, x) or _get(c, y) > _get(b, y))]
        if beaten:
            wins.append({"point": _label(c), "dominates": beaten})
            dominated.update(beaten)
    undominated = [_label(b) for b in bf if _label(b) not in dominated]
    return {"challenger_frontier": [_label(c) for c in cf], "baseline_frontier": [_label(b) for b in bf],
            "dominating": wins, "baseline_undominated": undominated,
            "baseline_dominated_frac": (len(dominated) / len(bf)) if bf else 0.0}


def _label(p) -> str:
    if isinstance(p, dict):
        return p.get("label") or f"{p['think_model']}->{p['answer_model']}@{p['thinking_budget']}"
    return p.label


def best_at_latency(points: Sequence, max_latency: float, y: str = "accuracy"):
    """The most accurate point whose latency is <= max_latency (None if none)."""
    ok = [p for p in points if _get(p, "latency_s") <= max_latency]
    return max(ok, key=lambda p: _get(p, y)) if ok else None

"""One model's accuracy row of the report: full thinking, and as diagnostics no thinking and the
gold trace given (the answer capacity)."""
from __future__ import annotations

import numpy as np

from ..infer.budget import ElasticModel, Specials, answer_generate
from ..tasks import TaskTokenizer, part_scores, score_answer
from .config import EvalConfig
from .evaluate import run_point


def answer_scores(model: ElasticModel, name: str, eval_set, tok: TaskTokenizer, ecfg: EvalConfig,
                  traces=None) -> list[float]:
    """Per-problem scores when `name` answers right after prompt + `traces` (a trace per problem; None
    = no thinking at all) + `</think>`."""
    return [score_answer(p, t) for p, t in zip(eval_set.problems, answer_texts(model, name, eval_set, tok, ecfg,
                                                                                 traces))]


def answer_texts(model: ElasticModel, name: str, eval_set, tok: TaskTokenizer, ecfg: EvalConfig,
                 traces=None) -> list[str]:
    """The decoded answers behind `answer_scores`."""
    sp = Specials.from_tokenizer(tok)
    traces = traces or [()] * len(eval_set)
    prompts = [list(p) + list(t) + [tok.end_think_id] for p, t in zip(eval_set.prompts, traces)]
    length = max(eval_set.max_prompt_len + ecfg.full_thinking + 1, max(len(p) for p in prompts))
    ans, _ = answer_generate(model, prompts, submodel=name, specials=sp, max_answer_tokens=ecfg.max_answer_tokens,
                             prompt_length=length, cache_len=length + ecfg.max_answer_tokens,   # one shape, and
                             capacity=max(ecfg.full_thinking, ecfg.max_answer_tokens))  # the grid's decode loop
    return [tok.decode(a) for a in ans]


def model_row(model: ElasticModel, name: str, eval_set, tok: TaskTokenizer, ecfg: EvalConfig, gold,
              diagnostics: bool = True) -> dict:
    """Accuracy with full thinking (per-problem scores kept for intervals), the exact-trace rate and,
    with `diagnostics`, accuracy without thinking and given the gold trace (answer capacity)."""
    pt = run_point(model, eval_set, tok, think_model=name, answer_model=name, thinking_budget=ecfg.full_thinking,
                   max_thinking=ecfg.full_thinking, max_answer_tokens=ecfg.max_answer_tokens,
                   batch_size=ecfg.batch_size, warmup=False, gold_traces=gold)
    row = {"accuracy": pt.accuracy, "scores": list(pt.correct), "exact_trace": pt.exact_trace}
    if diagnostics:
        none = answer_scores(model, name, eval_set, tok, ecfg)
        texts = answer_texts(model, name, eval_set, tok, ecfg, gold)
        given = [score_answer(p, t) for p, t in zip(eval_set.problems, texts)]
        row.update({"accuracy_no_thinking": float(np.mean(none)), "accuracy_gold_trace": float(np.mean(given)),
                    "scores_gold_trace": given,
                    # per answer part (scoring unit), for the seen / unseen split of the report
                    "parts_gold_trace": [part_scores(p, t) for p, t in zip(eval_set.problems, texts)]})
    return row

"""Token-level views of the task: training documents (lists of ids, for the trainer's in-memory
source) and evaluation sets (prompts + reference answers)."""
from __future__ import annotations

import dataclasses

from .reasoning import (COMBINE_LEVELS, PLUS, QUERY, QUERY_LEVELS, RECURRENCE_LEVELS, SUM_LEVELS, TAGS, Problem,
                        answer_text, check_levels, document_text, make_problems, prompt_text, trace_text)
from .tokenizer import SPECIAL_TOKENS, TaskTokenizer


def make_documents(seed: int, n: int, split: str = "train", difficulty=None,
                   tokenizer: TaskTokenizer | None = None) -> list[list[int]]:
    """`n` full documents (prompt, trace, answer, eos) as token-id lists, deterministic in the seed."""
    tok = tokenizer or TaskTokenizer.default()
    return [tok.encode(document_text(p)) for p in make_problems(seed, n, split, difficulty)]


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Problems with their tokenized prompts (ending in `<think>`) and reference traces."""

    problems: tuple[Problem, ...]
    prompts: tuple[tuple[int, ...], ...]
    trace_lengths: tuple[int, ...]      # tokens of the reference trace (without think tags)

    def __len__(self):
        return len(self.problems)

    @property
    def max_prompt_len(self) -> int:
        return max(len(p) for p in self.prompts)

    def head(self, n: int) -> "EvalSet":
        """The first `n` problems (the same problems in the same order: paired with the full set)."""
        if not 0 < n <= len(self):
            raise ValueError(f"EvalSet.head({n}): an eval set of {len(self)} problems has no first {n}")
        return EvalSet(self.problems[:n], self.prompts[:n], self.trace_lengths[:n])


def make_eval_set(seed: int, n: int, split: str = "test", difficulty=None,
                  tokenizer: TaskTokenizer | None = None) -> EvalSet:
    tok = tokenizer or TaskTokenizer.default()
    probs = make_problems(seed, n, split, difficulty)
    return EvalSet(problems=tuple(probs), prompts=tuple(tuple(tok.encode(prompt_text(p))) for p in probs),
                   trace_lengths=tuple(len(tok.encode(trace_text(p))) for p in probs))


def reference_answer_ids(p: Problem, tokenizer: TaskTokenizer) -> list[int]:
    return tokenizer.encode(answer_text(p))


def vocab_needed(levels=None, tokenizer: TaskTokenizer | None = None) -> int:
    """The smallest model vocab_size that covers every token the task's `levels` use (the sum
    levels need fewer ids than the query levels' extra tags)."""
    tok = tokenizer or TaskTokenizer.default()
    levels = check_levels(levels)
    spec = {**QUERY_LEVELS, **RECURRENCE_LEVELS, **COMBINE_LEVELS}
    steps = max(l + 2 if l in SUM_LEVELS else spec[l][0] for l in levels)
    words = list(SPECIAL_TOKENS) + [str(d) for d in range(10)] + list(TAGS[:steps]) + ["!"]
    words += [QUERY] if any(l not in SUM_LEVELS for l in levels) else []
    words += [PLUS] if any(l in COMBINE_LEVELS for l in levels) else []
    return 1 + max(tok.id(w) for w in words)

"""The embedded reasoning task: tagged running sums with carries.

A problem is a list of `k` tagged digits (k = difficulty + 2). The thinking trace walks the list
and keeps a running sum modulo 10, one step per digit, marking every step that wraps past 9 with
a carry token `!`. The answer is the full (two-digit) sum: its tens digit is the NUMBER of carry
marks in the trace and its units digit is the last running value, so producing it needs a count
over the whole trace, not a copy of its last line. Without the trace a model must add k digits
in one shot, which a few-million-parameter model does not learn in minutes: the thinking phase
matters, and truncating it (METHOD §9 "standard budget control") visibly costs accuracy.

    prompt : <bos> a 3 b 7 c 2 d 9 <think>
    trace  : a 0 3 3 b 3 7 0 ! c 0 2 2 d 2 9 1 ! </think>
    answer : <ans> 2 1 <eos>                    (3 + 7 + 2 + 9 = 21: two carries, last value 1)

Everything is deterministic from a seed. The train and test splits are disjoint by construction:
a problem belongs to the test split iff a stable hash (CRC-32) of its digits falls in the test
bucket, so no test problem is ever generated for training.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

TAGS = "abcdefgh"
MIN_LEVEL, MAX_LEVEL = 1, 4
TEST_BUCKETS = 5          # 1 / TEST_BUCKETS of all problems are test problems
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: the digits (its difficulty is len(digits) - 2)."""

    digits: tuple[int, ...]

    def __post_init__(self):
        if not (MIN_LEVEL + 2 <= len(self.digits) <= len(TAGS)):
            raise ValueError(f"Problem.digits must hold {MIN_LEVEL + 2}..{len(TAGS)} digits, got {len(self.digits)}")
        if any(not (0 <= int(d) <= 9) for d in self.digits):
            raise ValueError(f"Problem.digits must be in 0..9, got {self.digits}")

    @property
    def difficulty(self) -> int:
        return len(self.digits) - 2

    def steps(self) -> list[tuple[str, int, int, int, bool]]:
        """(tag, previous running value, digit, new running value, carry) for every step."""
        out, run = [], 0
        for tag, d in zip(TAGS, self.digits):
            new = run + d
            out.append((tag, run, d, new % 10, new >= 10))
            run = new % 10
        return out

    def answer(self) -> str:
        """Tens digit = number of carries, units digit = last running value (= the full sum)."""
        steps = self.steps()
        carries = sum(s[4] for s in steps)
        return f"{carries} {steps[-1][3]}"


def split_of(problem: Problem) -> str:
    """'test' iff CRC-32 of the digit string lands in bucket 0 of TEST_BUCKETS, else 'train'."""
    key = "".join(str(d) for d in problem.digits).encode()
    return "test" if zlib.crc32(key) % TEST_BUCKETS == 0 else "train"


def _check_level(difficulty) -> tuple[int, ...]:
    levels = (tuple(range(MIN_LEVEL, MAX_LEVEL + 1)) if difficulty is None
              else (difficulty,) if isinstance(difficulty, int) else tuple(difficulty))
    if not levels or any(not isinstance(l, (int, np.integer)) or not MIN_LEVEL <= l <= MAX_LEVEL for l in levels):
        raise ValueError(f"difficulty must be an int (or ints) in {MIN_LEVEL}..{MAX_LEVEL}, got {difficulty!r}")
    return tuple(int(l) for l in levels)


def make_problems(seed: int, n: int, split: str = "train", difficulty=None) -> list[Problem]:
    """`n` problems of `split` ('train' | 'test'), difficulty levels drawn uniformly from
    `difficulty` (an int, a sequence of ints, or None = all levels). Deterministic in (seed, split,
    difficulty); test problems may repeat at the lowest level (only 1000 distinct 3-digit lists)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = _check_level(difficulty)
    rng = np.random.default_rng([int(seed), SPLITS.index(split)])
    out = []
    while len(out) < n:
        level = int(rng.choice(levels))
        p = Problem(tuple(int(d) for d in rng.integers(0, 10, size=level + 2)))
        if split_of(p) == split:
            out.append(p)
    return out


# ------------------------------------------------------------------------------ text forms
BOS, EOS, PAD, THINK, END_THINK, ANSWER = "<bos>", "<eos>", "<pad>", "<think>", "</think>", "<ans>"


def prompt_text(p: Problem) -> str:
    """`<bos> a 3 b 7 ... <think>`: the prompt opens the thinking phase (like a chat template)."""
    return " ".join([BOS] + [f"{t} {d}" for t, d in zip(TAGS, p.digits)] + [THINK])


def trace_text(p: Problem) -> str:
    """The thinking steps (without the think tags)."""
    return " ".join(f"{t} {a} {d} {r}" + (" !" if c else "") for t, a, d, r, c in p.steps())


def answer_text(p: Problem) -> str:
    """`</think> <ans> T U <eos>`: what follows the trace."""
    return f"{END_THINK} {ANSWER} {p.answer()} {EOS}"


def document_text(p: Problem) -> str:
    return f"{prompt_text(p)} {trace_text(p)} {answer_text(p)}"


def parse_answer(text: str) -> str | None:
    """The answer after the last `<ans>` marker, up to `<eos>` (None when no marker)."""
    if ANSWER not in text:
        return None
    tail = text.rsplit(ANSWER, 1)[1]
    tail = tail.split(EOS, 1)[0]
    return " ".join(tail.split())


def check_answer(p: Problem, generated: str) -> bool:
    """Exact match of the parsed answer with `p.answer()`."""
    return parse_answer(generated) == p.answer()

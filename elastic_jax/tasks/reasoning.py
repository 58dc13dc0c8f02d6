"""The embedded reasoning task: tagged running sums with carries, and queries over the finished trace.

A problem is a list of `k` tagged digits. The thinking trace walks the list and keeps a running
sum modulo 10, one step per digit, marking every step that wraps past 9 with a carry token `!`.
Writing a step is local: the previous value, the next digit in order, their sum mod 10.

Levels 1-4 ("sum", k = level + 2): the answer is the full (two-digit) sum: its tens digit is the
NUMBER of carry marks in the trace and its units digit is the last running value, so producing it
needs a count over the whole trace, not a copy of its last line. Without the trace a model must
add k digits in one shot: the thinking phase matters, and truncating it (METHOD §9 "standard
budget control") visibly costs accuracy.

    prompt : <bos> a 3 b 7 c 2 d 9 <think>
    trace  : a 0 3 3 b 3 7 0 ! c 0 2 2 d 2 9 1 ! </think>
    answer : <ans> 2 1 <eos>                    (3 + 7 + 2 + 9 = 21: two carries, last value 1)

Levels 5-8 ("query", issue 15): the prompt also names `q` tags after `?`, and the answer gives the
running value at each queried step (`tag value` pairs, in the query's order). The trace is the
same locally easy walk, but up to 20 steps (~100 tokens); the answer is short but has to find
each queried step in a long finished trace and copy its value (associative recall over the whole
context, which needs width: attention and SSM state), and it is scored with partial credit per
queried step, so a trace cut short loses only the steps it did not reach.

    prompt : <bos> a 3 b 7 c 2 d 9 ? b d <think>
    trace  : (as above) </think>
    answer : <ans> b 0 d 1 <eos>

Levels 9-12 ("recurrence", issue 15): the prompt names `q` queried tags and gives two start
values; the trace is a Fibonacci walk modulo 10 (x_t = x_{t-2} + x_{t-1} mod 10), one step per
tag written like a sum step (tag, the two previous values, the new value), so every token is a copy
from 2-4 positions back or a one-digit sum of its two neighbours: even a narrow model writes it. No
closed form short-cuts the walk, so thinking is needed; the answer recalls the value at each queried
step of the finished trace (`tag value` pairs, partial credit per step, as the query levels), which
is where width is tested.

    prompt : <bos> ? d f a 3 b 7 <think>
    trace  : c 3 7 0 d 7 0 7 e 0 7 7 f 7 7 4 </think>
    answer : <ans> d 7 f 4 <eos>

Levels 13-16 ("combine", issue 15): the recurrence levels' trace, but the queried steps come in
pairs (separated by `+`) and each answer part names its pair and then gives, in ONE token, the sum
modulo 10 of the two values: that token has to fetch two values from the finished trace at once and
add them (the trace's own sums have their operands next to them). Partial credit per pair.

    prompt : <bos> ? c d + e f a 3 b 7 <think>
    trace  : c 3 7 0 d 7 0 7 e 0 7 7 f 7 7 4 </think>
    answer : <ans> c d 7 e f 1 <eos>           (0 + 7 = 7; 7 + 4 = 11 -> 1)

Everything is deterministic from a seed. The train and test splits are disjoint by construction:
a problem belongs to the test split iff a stable hash (CRC-32) of its digits (and query) falls in
the test bucket, so no test problem is ever generated for training. The recurrence and combine
levels hash the start pair alone (issue 30): a walk is fixed by its start pair, so a test walk (any
of its tagged steps, any queried value) never appears in a training document, whatever the level
or query (about 20 of the 100 start pairs are test walks).

A scoring unit (`scoring_units`) is what one answer part is scored on: (the digits it depends on,
its queried steps). `unit_seen` marks the units of a problem that also occur in some training
problem, so a report can give accuracy on seen and unseen units separately.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

TAGS = "abcdefghijklmnopqrst"  # one tag per step; the sum levels use the first 6
SUM_LEVELS = (1, 2, 3, 4)      # k = level + 2 digits, answer = the full sum
# query levels: level -> (digits, queried steps); traces of ~36 / ~54 / ~72 / ~90 (max 100) tokens
QUERY_LEVELS = {5: (8, 2), 6: (12, 3), 7: (16, 3), 8: (20, 4)}
# recurrence levels: level -> (steps incl. the 2 given, queried steps); traces of 4 x (steps - 2) =
# 24 / 36 / 48 / 56 tokens
RECURRENCE_LEVELS = {9: (8, 2), 10: (11, 2), 11: (14, 3), 12: (16, 4)}
# combine levels: level -> (steps incl. the 2 given, answer parts, queried steps per part); the same
# traces as the recurrence levels, each answer part one digit combining its part's queried values
COMBINE_LEVELS = {13: (8, 2, 2), 14: (11, 2, 2), 15: (14, 3, 2), 16: (16, 4, 2)}
MIN_LEVEL, MAX_LEVEL = 1, 16
DEFAULT_LEVELS = SUM_LEVELS    # difficulty=None: the original task
TEST_BUCKETS = 5          # 1 / TEST_BUCKETS of all problems are test problems
SPLITS = ("train", "test")
QUERY, PLUS = "?", "+"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: the digits and, for the query levels, the queried step indices (sorted). A
    recurrence problem (`recurrence` = its number of steps > 0) has the two start values as digits;
    a combine problem also has `per_part` > 0: each answer part combines that many consecutive
    queried steps (in sorted order) into one digit."""

    digits: tuple[int, ...]
    query: tuple[int, ...] = ()
    recurrence: int = 0
    per_part: int = 0

    def __post_init__(self):
        n = len(self.digits)
        if self.per_part:
            spec = (self.recurrence, len(self.query) // self.per_part, self.per_part)
            if len(self.digits) != 2 or len(self.query) % self.per_part or spec not in COMBINE_LEVELS.values():
                raise ValueError(f"a combine Problem needs 2 start digits and (steps, parts, queries per part) in "
                                 f"{sorted(COMBINE_LEVELS.values())}, got {n} digits, {self.recurrence} steps, "
                                 f"{len(self.query)} queries, {self.per_part} per part")
        if self.recurrence:
            if len(self.digits) != 2 or (not self.per_part and (self.recurrence, len(self.query))
                                         not in RECURRENCE_LEVELS.values()):
                raise ValueError(f"a recurrence Problem needs 2 start digits and (steps, queries) in "
                                 f"{sorted(RECURRENCE_LEVELS.values())}, got {n} digits, "
                                 f"({self.recurrence}, {len(self.query)})")
            n = self.recurrence
            if self.query and self.query[0] < 2:
                raise ValueError(f"a recurrence Problem queries steps 2.., not the given start values: {self.query}")
        elif not self.query and not (SUM_LEVELS[0] + 2 <= n <= SUM_LEVELS[-1] + 2):
            raise ValueError(f"Problem.digits must hold {SUM_LEVELS[0] + 2}..{SUM_LEVELS[-1] + 2} digits (or be a "
                             f"query problem), got {n}")
        elif self.query and (n, len(self.query)) not in QUERY_LEVELS.values():
            raise ValueError(f"Problem with {n} digits and {len(self.query)} queried steps matches no query level "
                             f"(digits, queries) in {sorted(QUERY_LEVELS.values())}")
        if any(not (0 <= int(d) <= 9) for d in self.digits):
            raise ValueError(f"Problem.digits must be in 0..9, got {self.digits}")
        if self.query and (list(self.query) != sorted(set(self.query)) or not 0 <= self.query[0] <= self.query[-1] < n):
            raise ValueError(f"Problem.query must be distinct sorted step indices in 0..{n - 1}, got {self.query}")

    @property
    def difficulty(self) -> int:
        if self.per_part:
            return next(l for l, spec in COMBINE_LEVELS.items()
                        if spec == (self.recurrence, len(self.query) // self.per_part, self.per_part))
        if self.recurrence:
            return next(l for l, spec in RECURRENCE_LEVELS.items() if spec == (self.recurrence, len(self.query)))
        if not self.query:
            return len(self.digits) - 2
        return next(l for l, spec in QUERY_LEVELS.items() if spec == (len(self.digits), len(self.query)))

    def steps(self) -> list[tuple[str, int, int, int, bool]]:
        """(tag, previous running value, digit, new running value, carry) for every step; for a
        recurrence problem (tag, x_{t-2}, x_{t-1}, x_t, False) (x_0, x_1 = the start digits, taken as is)."""
        if self.recurrence:
            xs = list(self.digits)
            while len(xs) < self.recurrence:
                xs.append((xs[-1] + xs[-2]) % 10)
            return [(TAGS[t], xs[t - 2] if t >= 2 else 0, xs[t - 1] if t >= 1 else 0, xs[t], False)
                    for t in range(self.recurrence)]
        out, run = [], 0
        for tag, d in zip(TAGS, self.digits):
            new = run + d
            out.append((tag, run, d, new % 10, new >= 10))
            run = new % 10
        return out

    def query_groups(self) -> list[tuple[int, ...]]:
        """The queried steps of each answer part: consecutive chunks of `per_part` (combine levels),
        else one step per part."""
        k = self.per_part or 1
        return [self.query[i:i + k] for i in range(0, len(self.query), k)]

    def answer_parts(self) -> list[str]:
        """The parts partial credit is given for: one `tag value` per queried step (query and
        recurrence levels); per group its tags and the sum mod 10 of their values
        (combine levels); the whole two-digit sum as one part (sum levels)."""
        steps = self.steps()
        if self.per_part:
            return [" ".join(steps[i][0] for i in g) + f" {sum(steps[i][3] for i in g) % 10}"
                    for g in self.query_groups()]
        if self.query:
            return [f"{steps[i][0]} {steps[i][3]}" for i in self.query]
        carries = sum(s[4] for s in steps)
        return [f"{carries} {steps[-1][3]}"]

    def answer(self) -> str:
        """Sum levels: tens digit = number of carries, units digit = last running value (= the full
        sum). Query levels: the running value at each queried step, as `tag value` pairs."""
        return " ".join(self.answer_parts())


def split_of(problem: Problem) -> str:
    """'test' iff CRC-32 of the digit (and query) string lands in bucket 0 of TEST_BUCKETS, else 'train'.
    Recurrence / combine problems: of the start pair alone (held-out walks)."""
    key = "".join(str(d) for d in problem.digits)
    if problem.recurrence:
        return "test" if zlib.crc32(f"walk{key}".encode()) % TEST_BUCKETS == 0 else "train"
    if problem.per_part:
        key += f"c{problem.per_part}"
    if problem.recurrence:
        key += f"r{problem.recurrence}"
    if problem.query:
        key += "?" + ",".join(str(i) for i in problem.query)
    return "test" if zlib.crc32(key.encode()) % TEST_BUCKETS == 0 else "train"


def scoring_units(problem: Problem) -> list[tuple]:
    """One hashable key per answer part (`answer_parts` order): the digits the part's value depends on
    and its queried steps. Sum levels: the whole problem; query levels: the digits up to the queried
    step; recurrence / combine levels: the walk (start pair) and the part's queried steps."""
    if not problem.query:
        return [(problem.digits, ())]
    if problem.recurrence:
        return [(problem.digits, g) for g in problem.query_groups()]
    return [(problem.digits[:i + 1], (i,)) for i in problem.query]


def unit_seen(problems, train_problems) -> list[list[bool]]:
    """Per problem, per answer part: does its scoring unit occur in any of `train_problems`?"""
    seen = {u for p in train_problems for u in scoring_units(p)}
    return [[u in seen for u in scoring_units(p)] for p in problems]


def check_levels(difficulty) -> tuple[int, ...]:
    """Normalise `difficulty` (None = DEFAULT_LEVELS, an int, or ints) to a tuple of valid levels."""
    levels = (DEFAULT_LEVELS if difficulty is None
              else (difficulty,) if isinstance(difficulty, (int, np.integer)) else tuple(difficulty))
    if not levels or any(not isinstance(l, (int, np.integer)) or not MIN_LEVEL <= l <= MAX_LEVEL for l in levels):
        raise ValueError(f"difficulty must be an int (or ints) in {MIN_LEVEL}..{MAX_LEVEL}, got {difficulty!r}")
    return tuple(int(l) for l in levels)


def make_problems(seed: int, n: int, split: str = "train", difficulty=None) -> list[Problem]:
    """`n` problems of `split` ('train' | 'test'), difficulty levels drawn uniformly from
    `difficulty` (an int, a sequence of ints, or None = the sum levels 1-4). Deterministic in (seed,
    split, difficulty); test problems may repeat at the lowest level (only 1000 distinct 3-digit lists)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = check_levels(difficulty)
    rng = np.random.default_rng([int(seed), SPLITS.index(split)])
    out = []
    while len(out) < n:
        level = int(rng.choice(levels))
        if level in QUERY_LEVELS:
            k, q = QUERY_LEVELS[level]
            digits = tuple(int(d) for d in rng.integers(0, 10, size=k))
            p = Problem(digits, tuple(sorted(int(i) for i in rng.choice(k, size=q, replace=False))))
        elif level in COMBINE_LEVELS:
            k, parts, per = COMBINE_LEVELS[level]
            digits = tuple(int(d) for d in rng.integers(0, 10, size=2))
            query = tuple(sorted(2 + int(i) for i in rng.choice(k - 2, size=parts * per, replace=False)))
            p = Problem(digits, query, k, per)
        elif level in RECURRENCE_LEVELS:
            k, q = RECURRENCE_LEVELS[level]
            digits = tuple(int(d) for d in rng.integers(0, 10, size=2))
            p = Problem(digits, tuple(sorted(2 + int(i) for i in rng.choice(k - 2, size=q, replace=False))), k)
        else:
            p = Problem(tuple(int(d) for d in rng.integers(0, 10, size=level + 2)))
        if split_of(p) == split:
            out.append(p)
    return out


# ------------------------------------------------------------------------------ text forms
BOS, EOS, PAD, THINK, END_THINK, ANSWER = "<bos>", "<eos>", "<pad>", "<think>", "</think>", "<ans>"


def prompt_text(p: Problem) -> str:
    """`<bos> a 3 b 7 ... [? b d] <think>` (recurrence: `<bos> ? d f a 3 b 7 <think>`, the start values
    next to the trace; combine: the groups separated by `+`): the prompt opens the thinking phase
    (like a chat template)."""
    if p.recurrence:
        groups = p.query_groups() if p.per_part else [p.query]
        query = f" {PLUS} ".join(" ".join(TAGS[i] for i in g) for g in groups)
        return " ".join([BOS, QUERY, query] + [f"{t} {d}" for t, d in zip(TAGS, p.digits)] + [THINK])
    query = [QUERY] + [TAGS[i] for i in p.query] if p.query else []
    return " ".join([BOS] + [f"{t} {d}" for t, d in zip(TAGS, p.digits)] + query + [THINK])


def trace_text(p: Problem) -> str:
    """The thinking steps (without the think tags)."""
    if p.recurrence:
        return " ".join(f"{t} {a} {b} {x}" for t, a, b, x, _ in p.steps()[2:])
    return " ".join(f"{t} {a} {d} {r}" + (" !" if c else "") for t, a, d, r, c in p.steps())


def answer_text(p: Problem) -> str:
    """`</think> <ans> ... <eos>`: what follows the trace."""
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


def part_scores(p: Problem, generated: str) -> list[float]:
    """Per expected answer part (`answer_parts` order): 1.0 when given right in place, else 0.0 (the
    parts `score_answer` credits)."""
    got = parse_answer(generated)
    want = p.answer_parts()
    if got is None:
        return [0.0] * len(want)
    if not p.query:
        return [float(got == p.answer())]
    words = got.split()
    k = len(want[0].split())
    given = [" ".join(words[i:i + k]) for i in range(0, len(words), k)]
    return [float(i < len(given) and given[i] == w) for i, w in enumerate(want)]


def score_answer(p: Problem, generated: str) -> float:
    """Partial credit: the share of `p.answer_parts()` given right, in place (part i = the i-th
    group of the parsed answer's words, as many words as a part has), over max(parts expected, parts
    given), so extra parts cost credit. 1.0 iff `check_answer`; the sum levels' one-part answer
    scores 0 or 1."""
    got = parse_answer(generated)
    if got is None:
        return 0.0
    if got == p.answer():
        return 1.0
    if not p.query:
        return 0.0
    want, words = p.answer_parts(), got.split()
    k = len(want[0].split())
    given = [" ".join(words[i:i + k]) for i in range(0, len(words), k)]
    right = sum(g == w for g, w in zip(given, want))
    return right / max(len(want), len(given))

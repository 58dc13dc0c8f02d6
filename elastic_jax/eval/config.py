"""The evaluation config of the main job and of `elastic-jax eval`."""
from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase

# the bar of the per-phase verdict (can the task test "one model thinks, another answers"?)
VERDICT_MIN_ANSWER_GAP = 0.05     # gold-trace answer accuracy, full minus smallest model (lower CI bound)
VERDICT_MAX_TRACE_GAP = 0.5       # the trace-quality gap must be below half the answer gap


@dataclass(frozen=True)
class EvalConfig(ConfigBase):
    """Evaluation: `n_problems` held-out problems of `split` (the budget-control grid on the first
    `grid_problems` of them; None = all); the grid's `thinking_budgets` (tokens); cache-transplant
    pairs (think, answer) by budget fraction; `repeats` timed runs."""

    n_problems: int = 200
    grid_problems: int | None = None
    split: str = "test"
    seed: int = 1234
    levels: tuple[int, ...] = (1, 2, 3, 4)
    thinking_budgets: tuple[int, ...] = (8, 16, 24, 32)
    full_thinking: int = 32                    # "no truncation": >= the longest trace (30 tokens); also the
                                               # grid's decode capacity, so both share compiled programs
    max_answer_tokens: int = 6
    transplant_pairs: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.75, 1.0))
    batch_size: int | None = None              # None: the whole eval set in one batch
    repeats: int = 1
    # modeled latency (elastic_jax/eval/latency.py): the report's primary axis is `latency_profile`
    # at `latency_reference` scale (the nested width fractions mapped onto that architecture; None =
    # the model as trained); every profile in `latency_profiles` is recorded too, and this machine
    # measured when `measure_host`
    latency_profile: str = "h100"
    latency_reference: str | None = "nano3_30b_a3b"
    latency_profiles: tuple[str, ...] = ("h100", "h200", "tpu_v5p")
    measure_host: bool = True
    parent_truncation: bool = True             # the paper's baseline: the parent alone, thinking cut at budgets

    def __post_init__(self):
        if self.n_problems <= 0:
            self.invalid("n_problems", self.n_problems, "must be > 0")
        if self.grid_problems is not None and not 0 < self.grid_problems <= self.n_problems:
            self.invalid("grid_problems", self.grid_problems, f"must be in 1..n_problems={self.n_problems} (or None)")
        if not self.thinking_budgets or min(self.thinking_budgets) <= 0:
            self.invalid("thinking_budgets", self.thinking_budgets, "must be positive token counts")
        if self.full_thinking < max(self.thinking_budgets):
            self.invalid("full_thinking", self.full_thinking, "must be >= the largest thinking budget")
        for name in ("levels", "thinking_budgets", "transplant_pairs", "latency_profiles"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(tuple(x) if isinstance(x, list) else x for x in v))

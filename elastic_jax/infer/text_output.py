"""What budget-controlled text generation returns (`infer/text.py`): per prompt a `TextResult`
(thinking and answer text and ids, OpenAI-style field names), per phase a `TextPhase` (submodel,
tokens, seconds after compilation, compile seconds, FLOPs), together a `TextOutput`."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TextPhase:
    """One phase over the batch: the submodel, tokens generated (the end-of-thinking text counts in
    the think phase), prompt positions prefilled, wall seconds of the run (prefill included,
    compilation not), seconds spent compiling this phase's programs (0 when cached), analytic
    FLOPs, and the modeled latency (None unless a `latency_model` is given)."""

    model: str
    tokens: int
    prefill_tokens: int
    latency_s: float
    flops: float
    modeled_latency_s: float | None = None
    compile_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.latency_s if self.latency_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s}

    def summary(self, phase: str) -> str:
        extra = "" if self.modeled_latency_s is None else f", modeled {self.modeled_latency_s:.4f} s"
        return (f"{phase} [{self.model}]: {self.tokens} tokens in {self.latency_s:.3f} s "
                f"({self.tokens_per_s:.1f} tok/s after compile; compile {self.compile_s:.2f} s; "
                f"prefill {self.prefill_tokens} tokens{extra})")


@dataclasses.dataclass(frozen=True)
class TextResult:
    """One prompt: the prompt ids; the thinking text (None without a thinking phase; the
    end-of-thinking text not included); whether the end of thinking was forced (budget + grace);
    the answer text (stop string cut off, specials kept); why it ended ("eos", "stop", "length");
    the thinking ids, the end-of-thinking ids (the model's own `</think>`, or the inserted text;
    empty when thinking did not end) and the answer ids."""

    prompt_ids: list
    thinking: str | None
    forced: bool
    answer: str
    finish: str
    think_ids: list
    answer_ids: list
    end_think_ids: list = dataclasses.field(default_factory=list)

    @property
    def reasoning_content(self) -> str | None:
        """The thinking text (the OpenAI-style field name)."""
        return self.thinking

    @property
    def content(self) -> str:
        return self.answer

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of the thinking phase: thinking and its end text."""
        return len(self.think_ids) + len(self.end_think_ids)

    @property
    def completion_tokens(self) -> int:
        """Every generated token (what `max_tokens` bounds)."""
        return self.reasoning_tokens + len(self.answer_ids)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TextOutput:
    results: list
    phases: dict   # "think" / "answer" -> TextPhase
    settings: dict = dataclasses.field(default_factory=dict)   # max_tokens, thinking_budget, grace, sampling

    @property
    def compile_s(self) -> float:
        return sum(p.compile_s for p in self.phases.values())

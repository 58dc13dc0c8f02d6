"""Training configs (frozen dataclasses): mesh, optimizer, curriculum stages, the run.

    TrainConfig(
        mesh=MeshConfig(data=2, fsdp=2, tensor=2),
        optim=OptimConfig(lr=1e-4, router_lr=1e-2, warmup_steps=60),
        stages=(Stage("short", seq_len=8192, batch_size=1536, tokens=100e9, budget_probs=None),     # uniform
                Stage("long", seq_len=49152, batch_size=512, tokens=60e9, budget_probs=(0.5, 0.3, 0.2))),
        kd_temperature=1.0, vocab_chunk=8192, microbatches=4)

METHOD §7 (curriculum) and §14.7-8 (optimizer groups, one budget per micro-batch). A stage gives
either `steps` or `tokens` (converted to ceil(tokens / (batch_size · seq_len)) steps).
`budget_probs` is indexed like `ElasticConfig.budgets` (descending, 1.0 first); None = uniform.
The Gumbel temperature and router logit scale follow `ElasticConfig` schedules over the whole run
(all stages), not per stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config_base import ConfigBase
from ..data.config import DataConfig
from ..model.policy import ComputePolicy
from ..sharding import MESH_AXES, rules_dict

SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class MeshConfig(ConfigBase):
    """Device mesh shape over the axes (data, fsdp, tensor, expert); the product must equal the
    number of devices (all processes). data/fsdp/expert split the batch; fsdp also shards
    parameters and optimizer state along `embed`; tensor splits heads / mlp / vocab; expert splits
    the routed experts (sharding.py holds the rules table)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        for a in MESH_AXES:
            v = getattr(self, a)
            if not isinstance(v, int) or v < 1:
                self.invalid(a, v, "must be an int >= 1")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.tensor, self.expert)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class OptimConfig(ConfigBase):
    """AdamW with two parameter groups (METHOD §6.3, §7.1): model (`lr`) and router (`router_lr`),
    each with `warmup_steps` linear warmup then `schedule` ("constant" | "cosine" | "linear" decay
    to `final_lr_ratio` · peak at the last step), global-norm clipping `clip_norm` (0 = off),
    decoupled weight decay on matrices only. `freeze_router` / `freeze_model` zero that group's
    updates (Megatron --freeze-router / --freeze-model)."""

    lr: float = 1e-4
    router_lr: float = 1e-2
    warmup_steps: int = 60
    schedule: str = "cosine"
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    clip_norm: float = 1.0
    freeze_router: bool = False
    freeze_model: bool = False

    def __post_init__(self):
        for name in ("lr", "router_lr"):
            if not (getattr(self, name) >= 0):
                self.invalid(name, getattr(self, name), "must be >= 0")
        if self.warmup_steps < 0:
            self.invalid("warmup_steps", self.warmup_steps, "must be >= 0")
        if self.schedule not in SCHEDULES:
            self.invalid("schedule", self.schedule, f"must be one of {SCHEDULES}")
        for name in ("b1", "b2"):
            if not (0.0 <= getattr(self, name) < 1.0):
                self.invalid(name, getattr(self, name), "must be in [0, 1)")
        if self.clip_norm < 0 or self.weight_decay < 0:
            self.invalid("clip_norm/weight_decay", (self.clip_norm, self.weight_decay), "must be >= 0")
        if not (0.0 <= self.final_lr_ratio <= 1.0):
            self.invalid("final_lr_ratio", self.final_lr_ratio, "must be in [0, 1]")


@dataclass(frozen=True)
class Stage(ConfigBase):
    """One curriculum stage: `batch_size` sequences (global, all hosts) of `seq_len` tokens per
    optimizer step, for `steps` steps or `tokens` tokens; `budget_probs` over the budgets.

    Long-context stages (METHOD §7: stage 2 trains on long documents, not on more short ones packed
    into a longer row): `data` gives this stage its own source (None = the run's dataset) and
    `min_doc_len` keeps only documents of at least that many tokens (e.g. stage 1's seq_len + 1)."""

    name: str = "stage"
    seq_len: int = 256
    batch_size: int = 8
    steps: int | None = None
    tokens: float | None = None
    budget_probs: tuple[float, ...] | None = None
    data: DataConfig | None = None
    min_doc_len: int | None = None

    def __post_init__(self):
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", DataConfig.from_dict(self.data))
        if self.data is not None and not isinstance(self.data, DataConfig):
            self.invalid("data", self.data, "must be a DataConfig (or its dict) or None")
        if self.min_doc_len is not None and (not isinstance(self.min_doc_len, int) or self.min_doc_len < 1):
            self.invalid("min_doc_len", self.min_doc_len, "must be a positive int or None")
        if isinstance(self.budget_probs, list):
            object.__setattr__(self, "budget_probs", tuple(float(p) for p in self.budget_probs))
        if self.seq_len < 1 or self.batch_size < 1:
            self.invalid("seq_len/batch_size", (self.seq_len, self.batch_size), "must be >= 1")
        if (self.steps is None) == (self.tokens is None):
            self.invalid("steps/tokens", (self.steps, self.tokens), "give exactly one of steps or tokens")
        if self.steps is not None and self.steps < 1:
            self.invalid("steps", self.steps, "must be >= 1")
        if self.tokens is not None and self.tokens <= 0:
            self.invalid("tokens", self.tokens, "must be > 0")
        if self.budget_probs is not None:
            p = self.budget_probs
            if any(x < 0 for x in p) or not sum(p) > 0:
                self.invalid("budget_probs", p, "must be non-negative with a positive sum")

    @property
    def num_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    def probs(self, n_budgets: int) -> tuple[float, ...]:
        """Normalized budget probabilities (uniform when None); length checked against the budgets."""
        if self.budget_probs is None:
            return (1.0 / n_budgets,) * n_budgets
        if len(self.budget_probs) != n_budgets:
            raise ValueError(f"Stage({self.name!r}).budget_probs={self.budget_probs!r}: needs one probability "
                             f"per budget ({n_budgets}, in ElasticConfig.budgets order)")
        s = sum(self.budget_probs)
        return tuple(p / s for p in self.budget_probs)


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """A whole training run. `microbatches` splits each stage batch for gradient accumulation; each
    micro-batch draws one budget (shared by every data shard, METHOD §7.2). `vocab_chunk`: columns of
    the lm_head per chunk of the KD / CE loss (None = the whole vocabulary in one chunk).
    Checkpoints every `checkpoint_every` steps (and at the end of each stage), `keep_checkpoints`
    kept; metrics every `log_every` steps. `policy`: the runtime knobs of the forward passes
    (scanned layers, remat, kernels; `ComputePolicy`, None = the default `ComputePolicy()`); they do not
    change the math, so a run may resume under another policy. `sharding_rules`: (logical axis,
    mesh axes) pairs that override entries of `elastic_jax.sharding.DEFAULT_RULES` for parameters
    and activations; `sharding_tolerance`: the fraction of parameter elements allowed to lose a
    split the rules ask for (a dimension that does not divide its mesh axes) before the run stops
    with an error."""

    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    stages: tuple[Stage, ...] = (Stage(steps=100),)
    kd_temperature: float = 1.0
    vocab_chunk: int | None = 8192
    microbatches: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    log_every: int = 1
    tensorboard: bool = True
    plot: bool = True
    activation_sharding: bool = True
    sharding_rules: tuple = ()
    sharding_tolerance: float = 0.02
    expert_bias_rate: float = 1e-3      # aux-loss-free MoE balancing u (0 = off; train/balance.py)
    # router samples per micro-batch, each on its own group of rows (Gumbel noise per data shard as the
    # official code; set it to the data-parallel size). None = 1: one sample for the whole micro-batch
    gumbel_groups: int | None = None
    # quantization-aware distillation (METHOD §10): "fp8" | "nvfp4" trains the fake-quantized student
    # (fixed scales from the parent, straight-through gradients) against the frozen teacher
    qad: str | None = None
    policy: ComputePolicy | None = None

    def __post_init__(self):
        if self.qad not in (None, "fp8", "nvfp4"):
            self.invalid("qad", self.qad, "must be None, 'fp8' or 'nvfp4'")
        try:
            rules = tuple(rules_dict(self.sharding_rules).items())
        except (TypeError, ValueError) as e:
            self.invalid("sharding_rules", self.sharding_rules, str(e))
        object.__setattr__(self, "sharding_rules", rules)
        if not 0.0 <= self.sharding_tolerance <= 1.0:
            self.invalid("sharding_tolerance", self.sharding_tolerance, "must be in [0, 1]")
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        if isinstance(self.stages, Stage):
            object.__setattr__(self, "stages", (self.stages,))
        if isinstance(self.policy, dict):
            object.__setattr__(self, "policy", ComputePolicy(**self.policy))
        if self.policy is not None and not isinstance(self.policy, ComputePolicy):
            self.invalid("policy", self.policy, "must be an elastic_jax.ComputePolicy or None")
        if not self.stages:
            self.invalid("stages", self.stages, "needs at least one Stage")
        if not self.kd_temperature > 0:
            self.invalid("kd_temperature", self.kd_temperature, "must be > 0")
        if self.vocab_chunk is not None and self.vocab_chunk < 1:
            self.invalid("vocab_chunk", self.vocab_chunk, "must be >= 1 or None")
        if not (self.expert_bias_rate >= 0 and math.isfinite(self.expert_bias_rate)):
            self.invalid("expert_bias_rate", self.expert_bias_rate, "must be >= 0 (0 = no balancing)")
        if self.microbatches < 1:
            self.invalid("microbatches", self.microbatches, "must be >= 1")
        for s in self.stages:
            if s.batch_size % self.microbatches:
                self.invalid("microbatches", self.microbatches,
                     f"must divide the batch size of stage {s.name!r} ({s.batch_size})")
        if self.gumbel_groups is not None:
            if not (isinstance(self.gumbel_groups, int) and self.gumbel_groups >= 1):
                self.invalid("gumbel_groups", self.gumbel_groups, "must be an int >= 1 or None")
            for s in self.stages:
                if s.batch_size % (self.microbatches * self.gumbel_groups):
                    self.invalid("gumbel_groups", self.gumbel_groups,
                         f"microbatches x gumbel_groups must divide the batch size of stage {s.name!r} "
                         f"({s.batch_size})")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                self.invalid(name, getattr(self, name), "must be >= 1")

    @property
    def total_steps(self) -> int:
        return sum(s.num_steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, first step of that stage) for a global step."""
        start = 0
        for i, s in enumerate(self.stages):
            if step < start + s.num_steps:
                return i, start
            start += s.num_steps
        return len(self.stages) - 1, start - self.stages[-1].num_steps

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cls.check_known_fields(d)
        d = dict(d)
        d["mesh"] = MeshConfig.from_dict(d.get("mesh", {}))
        d["optim"] = OptimConfig.from_dict(d.get("optim", {}))
        d["stages"] = tuple(Stage.from_dict(s) for s in d.get("stages", ()))
        return super().from_dict(d)


# The fields that may change between a run and its resumption (they do not change the math).
RESUMABLE_FIELDS = ("mesh", "checkpoint_every", "keep_checkpoints", "async_checkpointing", "log_every",
                    "tensorboard", "plot", "activation_sharding", "sharding_rules", "sharding_tolerance",
                    "policy")

__all__ = ["MeshConfig", "OptimConfig", "Stage", "TrainConfig", "DataConfig", "RESUMABLE_FIELDS"]

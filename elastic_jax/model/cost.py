"""The one cost model: FLOPs and bytes of a (nested) model for a call, summed over the layers from
what each layer kind declares (`flops`, `weights_read`, `state_traffic`, `cache_elems` in
`model/kinds/*.py`). The planner (`plan.py`), the latency model (`eval/latency.py`) and budget
control (`infer/budget.py`) all read it (METHOD §9: the latency of submodels; §8: their sizes).

A call runs `seq_len` tokens for each of `batch` rows on top of `context` cached positions:

* `Mode.prefill(seq_len, batch)`: a prompt into an empty (or a `context`-long) cache;
* `Mode.decode(context, batch)`: one token per row; `context` may be an array (one call per entry);
* `Mode.train(seq_len, batch)`: forward + backward of full sequences (FLOPs 3x the forward's).

FLOPs count what runs on a kind's own terms: "weights" (activation x weight products, 2 per
multiply-add: the weight elements a token multiplies; for MoE the top-k routed experts), "mixing"
(activation x activation contractions: attention QK^T / AV over the causally attended positions,
the SSD chunk products or the recurrence's read-out, MoE's gate-weighted sum of its k outputs) and
"elementwise" (the depthwise conv, the recurrence's state update). Norms, activations and the
softmax are not counted (a few % of XLA's count at tiny sizes, tests/test_cost.py). Bytes: the weights a call reads (MoE: only the experts its tokens can hit,
min(E, tokens x top-k) per layer; the embedding rows it looks up), the decode state read and
written (KV cache, SSM state and conv window), and a coarse activation traffic for training.

Widths are a `Widths` (None: the parent): a dropped layer (`layers`) costs nothing; every size is
that of the sliced model (`elastic.slice_params`), which the masked forward also computes as
(masked components are zeros, not skipped: cost the parent's widths for that).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import NemotronHConfig
from ..widths import Widths
from .kinds import kind_of
from .kinds.base import count

MODES = ("prefill", "decode", "train")


@dataclass(frozen=True)
class Mode:
    """One call: `kind` in MODES, `seq_len` new tokens per row (decode: 1), `batch` rows,
    `context` positions already cached (an int or an array: one call per entry)."""

    kind: str
    seq_len: int = 1
    batch: int = 1
    context: Any = 0

    def __post_init__(self):
        if self.kind not in MODES:
            raise ValueError(f"cost Mode.kind={self.kind!r}: must be one of {MODES}")
        for f in ("seq_len", "batch"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"cost Mode.{f}={v!r}: must be an int >= 1")
        ctx = np.asarray(self.context)
        if not np.issubdtype(ctx.dtype, np.number) or np.any(ctx < 0):
            raise ValueError(f"cost Mode.context={self.context!r}: must be >= 0 positions")
        if self.kind == "decode" and self.seq_len != 1:
            raise ValueError(f"cost Mode: decode runs one token per row, got seq_len={self.seq_len}")
        if self.kind == "train" and np.any(ctx != 0):
            raise ValueError("cost Mode: a training step has no cache (context must be 0)")

    @classmethod
    def prefill(cls, seq_len: int, batch: int = 1, context=0) -> "Mode":
        return cls("prefill", seq_len, batch, context)

    @classmethod
    def decode(cls, context, batch: int = 1) -> "Mode":
        return cls("decode", 1, batch, context)

    @classmethod
    def train(cls, seq_len: int, batch: int = 1) -> "Mode":
        return cls("train", seq_len, batch, 0)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def cached(self) -> bool:
        """Whether the call reads and writes a decode cache (prefill, decode)."""
        return self.kind != "train"

    @property
    def attended(self):
        """Mean positions a new token attends (causal): context + (seq_len + 1) / 2."""
        return np.asarray(self.context, np.float64) + (self.seq_len + 1) / 2.0


@dataclass(frozen=True)
class ElementBytes:
    """Bytes per element of each class: weights, KV cache, SSM state, conv window (bf16 / f32)."""

    weights: float = 2.0
    kv: float = 2.0
    ssm: float = 4.0
    conv: float = 2.0

    def of(self, cls: str) -> float:
        return getattr(self, cls)


@dataclass(frozen=True)
class Layer:
    kind: Any                 # the kind module
    sizes: dict               # named dimension sizes (all experts)
    active: dict              # the same with the experts one token touches


class CostModel:
    """Costs of `cfg` at `widths` (None: the parent). Build once per (cfg, widths); every method
    is a sum over the kept layers of the kinds' declarations plus the embedding and LM head."""

    def __init__(self, cfg: NemotronHConfig, widths: Widths | None = None):
        w = Widths() if widths is None else widths
        w.validate(cfg)
        self.cfg = cfg
        self.hidden = w.hidden_size(cfg)
        self.vocab = cfg.vocab_size
        keep = w.layer_mask(cfg)
        per_axis, layers = {}, []
        for i, k in enumerate(cfg.kind_index()):
            if not keep[i]:
                continue
            kind = kind_of(cfg, i)
            for a in kind.AXES:
                if a not in per_axis:
                    per_axis[a] = w.per_layer(cfg, a)
            lw = {a: per_axis[a][k] for a in kind.AXES}
            layers.append(Layer(kind, kind.dims(cfg, self.hidden, lw), kind.dims(cfg, self.hidden, lw, True)))
        self.layers = tuple(layers)

    # ------------------------------------------------------------------ parameters and memory
    def param_count(self, active: bool = False) -> int:
        """Parameters of the sliced model (== `elastic.param_count`): embedding + LM head + final
        norm + per layer its norm and its kind's declared parameters (`active`: top-k experts)."""
        D = self.hidden
        return int(2 * self.vocab * D + D + sum(
            D + count(L.kind.params(self.cfg), L.active if active else L.sizes) for L in self.layers))

    def cache_elems(self, batch: int, context) -> dict:
        """Resident decode-state elements by class ("kv", "ssm", "conv") at `context` positions."""
        out: dict = {}
        for L in self.layers:
            for cls, n in L.kind.cache_elems(self.cfg, L.sizes, batch, context).items():
                out[cls] = out.get(cls, 0.0) + n
        return out

    def memory_bytes(self, *, batch: int, context: int, nbytes: ElementBytes = ElementBytes()) -> dict:
        """Deployment memory: every weight resident + the decode state at `context` x `batch`."""
        state = {cls: float(n) * nbytes.of(cls) for cls, n in self.cache_elems(batch, context).items()}
        weights = float(self.param_count()) * nbytes.weights
        return {"weights": weights, **state, "total": weights + sum(state.values())}

    # ------------------------------------------------------------------ FLOPs
    def flops_terms(self, mode: Mode) -> dict:
        """Forward FLOPs per token of a call, by term (each an array shaped like the context):
        "head" (the LM head, 2·D·V), "weights", "mixing", "elementwise" summed over the layers."""
        out = {"head": np.asarray(2.0 * self.hidden * self.vocab)}
        for L in self.layers:
            for term, v in L.kind.flops(self.cfg, L.sizes, mode).items():
                out[term] = out.get(term, 0.0) + np.asarray(v, np.float64)
        return out

    def flops_per_token(self, mode: Mode):
        """Forward FLOPs per token (an array shaped like `mode.context`)."""
        return sum(self.flops_terms(mode).values())

    def flops(self, mode: Mode):
        """FLOPs of the whole call (all rows): forward, or forward + backward (3x) for training."""
        return (3.0 if mode.kind == "train" else 1.0) * mode.tokens * self.flops_per_token(mode)

    # ------------------------------------------------------------------ bytes
    def weight_elems_read(self, mode: Mode) -> float:
        """Weight elements one call reads: the LM head and final norm, each layer's norm and the
        weights its kind reads for `mode.tokens` tokens, and the embedding rows looked up."""
        D = self.hidden
        return float(D * self.vocab + D + mode.tokens * D +
                     sum(D + L.kind.weights_read(self.cfg, L.sizes, mode) for L in self.layers))

    def state_bytes(self, mode: Mode, nbytes: ElementBytes = ElementBytes()):
        """Decode-state bytes one call reads and writes (zero for training)."""
        total = 0.0
        for L in self.layers:
            for cls, n in L.kind.state_traffic(self.cfg, L.sizes, mode).items():
                total = total + np.asarray(n, np.float64) * nbytes.of(cls)
        return total

    def activation_bytes(self, tokens: int, per_element: float = 24.0) -> float:
        """Coarse activation traffic of training on `tokens` tokens: ~`per_element` bytes x hidden
        per token and layer (written and read in forward and backward, teacher and student)."""
        return float(tokens * len(self.layers) * self.hidden * per_element)

    def call_bytes(self, mode: Mode, nbytes: ElementBytes = ElementBytes()):
        """HBM bytes of one inference call: weights read + decode state read and written."""
        return self.weight_elems_read(mode) * nbytes.weights + self.state_bytes(mode, nbytes)


__all__ = ["MODES", "Mode", "ElementBytes", "CostModel"]

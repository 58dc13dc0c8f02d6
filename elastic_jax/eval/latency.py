"""Roofline latency model of generation (METHOD §9: the paper measures budget control on H100 GPUs).

A forward call that runs `new` tokens per row for `batch` rows, with `context` positions already
cached, costs

    max(FLOPs / peak_flops, bytes / hbm_bandwidth) + step_overhead_s

with FLOPs and bytes from the one cost model (`elastic_jax.model.cost`, each layer kind's own
declarations): bytes = the weights the call reads (routed experts: only those its tokens can hit,
min(E, batch * new * top-k) per MoE layer; the embedding rows it looks up) + the decode state read
and written (KV cache, SSM state, conv window); FLOPs = the forward's matmuls, attention score /
value products and SSD / recurrence work.
A decode step is one such call with new = 1 (memory-bound at small batch); a prefill is one call
with new = the prompt length (compute-bound). Activation traffic is ignored.

The model is a pure function of (config, widths, profile, phase lengths, batch): `forward_cost`,
`decode_cost`, `prefill_cost`, `generation_latency`. `scale_widths` maps a nested model's width
fractions onto a larger architecture (e.g. the paper's 30B-A3B parent, `NANO3_30B_A3B`), so the tiny
reproduction can be costed at the scale where the paper's claim lives.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..config import NemotronHConfig
from ..model.cost import CostModel, ElementBytes, Mode
from ..widths import PER_LAYER_AXES, Widths, divisor, full_size


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """Peak dense bf16 FLOP/s, HBM bandwidth (bytes/s), fixed cost of one forward call (launches,
    scheduling), bytes per weight / KV element (bf16 = 2) and per SSM state element (fp32 = 4)."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    step_overhead_s: float
    weight_bytes: float = 2.0
    cache_bytes: float = 2.0
    state_bytes: float = 4.0

    def __post_init__(self):
        for f in ("peak_flops", "hbm_bandwidth"):
            if not getattr(self, f) > 0:
                raise ValueError(f"HardwareProfile.{f}={getattr(self, f)!r}: must be > 0")
        if self.step_overhead_s < 0:
            raise ValueError(f"HardwareProfile.step_overhead_s={self.step_overhead_s}: must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Datasheet numbers (dense bf16 tensor-core peak, HBM bandwidth); the per-call overhead is a typical
# CUDA-graph / XLA step cost at batch 1, an assumption rather than a measurement.
PROFILES = {
    "h100": HardwareProfile("H100 SXM (bf16)", 989e12, 3.35e12, 15e-6),
    "h200": HardwareProfile("H200 SXM (bf16)", 989e12, 4.8e12, 15e-6),
    "tpu_v5p": HardwareProfile("TPU v5p chip (bf16)", 459e12, 2.765e12, 15e-6),
}


def get_profile(name_or_profile) -> HardwareProfile:
    if isinstance(name_or_profile, HardwareProfile):
        return name_or_profile
    if name_or_profile not in PROFILES:
        raise ValueError(f"unknown hardware profile {name_or_profile!r}; known: {sorted(PROFILES)} "
                         "(or pass a HardwareProfile)")
    return PROFILES[name_or_profile]


def measure_host_profile(size: int = 512, repeats: int = 5) -> HardwareProfile:
    """This machine, measured with JAX on its default device: matmul FLOP/s (f32, `size`^3), memory
    bandwidth (a reduction over a 64 MiB array) and the dispatch cost of a tiny jitted call (medians)."""
    import jax
    import jax.numpy as jnp

    def median_time(fn, *args):
        jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    a = jnp.ones((size, size), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    flops = 2.0 * size ** 3 / median_time(mm, a)
    big = jnp.ones((16 * 2 ** 20,), jnp.float32)
    red = jax.jit(lambda x: jnp.sum(x))
    bw = big.nbytes / median_time(red, big)
    tiny = jnp.ones((8,), jnp.float32)
    overhead = median_time(jax.jit(lambda x: x + 1), tiny)
    return HardwareProfile(f"this machine ({jax.default_backend()}, measured)", flops, bw, overhead,
                           weight_bytes=4.0, cache_bytes=4.0, state_bytes=4.0)


# ------------------------------------------------------------------------------ reference architectures
NANO3_30B_A3B = NemotronHConfig(
    vocab_size=131072, hidden_size=2688,
    hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=1856,
    mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
    n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
    routed_scaling_factor=2.5, max_position_embeddings=262144)
"""Nemotron 3 Nano 30B-A3B (METHOD §2.2): the Star Elastic parent, ~31.6B total / ~3.2B active."""

REFERENCE_MODELS = {"nano3_30b_a3b": NANO3_30B_A3B}


def scale_widths(cfg: NemotronHConfig, widths: Widths | None, target: NemotronHConfig) -> Widths:
    """The same width *fractions* as `widths` of `cfg`, on `target` (rounded to `target`'s group
    divisibility, at least one group; per-layer values averaged over the layers of each kind)."""
    widths = Widths() if widths is None else widths
    kw = {}
    for axis in ("hidden",) + tuple(PER_LAYER_AXES):
        char = PER_LAYER_AXES.get(axis)
        if char is not None and (not cfg.count(char) or not target.count(char)):
            continue
        if axis == "hidden":
            frac = widths.hidden_size(cfg) / cfg.hidden_size
        else:
            vals = widths.per_layer(cfg, axis)
            frac = float(np.mean([v / full_size(cfg, axis, i) for i, v in enumerate(vals)]))
        full = full_size(target, axis)
        div = divisor(target, axis)[0]
        n = max(div, int(round(frac * full / div)) * div)
        if axis == "moe_experts":
            n = max(n, target.num_experts_per_tok)
        kw[axis] = min(n, full)
    return Widths(**kw)


# ------------------------------------------------------------------------------ costs
@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs, bytes moved and modeled seconds (summed over the calls it covers)."""

    flops: float
    bytes: float
    seconds: float
    calls: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.seconds + other.seconds,
                    self.calls + other.calls)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ZERO = Cost(0.0, 0.0, 0.0, 0)


def _call_cost(cm: CostModel, profile: HardwareProfile, batch: int, new: int, context) -> Cost:
    """Cost of calls running `new` tokens per row on top of `context` cached positions (an array:
    one call per entry), from the one cost model (`model.cost`)."""
    ctx = np.asarray(context, np.float64).reshape(-1)
    mode = Mode("decode" if new == 1 else "prefill", new, batch, ctx)
    flops = np.broadcast_to(cm.flops(mode), ctx.shape)
    nbytes = np.broadcast_to(cm.call_bytes(mode, _element_bytes(profile)), ctx.shape)
    secs = np.maximum(flops / profile.peak_flops, nbytes / profile.hbm_bandwidth) + profile.step_overhead_s
    return Cost(float(np.sum(flops)), float(np.sum(nbytes)), float(np.sum(secs)), int(ctx.size))


def _element_bytes(profile: HardwareProfile) -> ElementBytes:
    """The profile's element sizes: weights; KV cache and conv window (`cache_bytes`); SSM state."""
    return ElementBytes(weights=profile.weight_bytes, kv=profile.cache_bytes, ssm=profile.state_bytes,
                        conv=profile.cache_bytes)


def forward_cost(cfg: NemotronHConfig, widths: Widths | None, profile, *, batch: int, new_tokens: int,
                 context: int = 0) -> Cost:
    """One forward call: `new_tokens` per row for `batch` rows after `context` cached positions."""
    if batch <= 0 or new_tokens <= 0 or context < 0:
        raise ValueError(f"forward_cost: batch={batch}, new_tokens={new_tokens} must be > 0 and "
                         f"context={context} >= 0")
    return _call_cost(CostModel(cfg, widths), get_profile(profile), batch, new_tokens, [context])


def prefill_cost(cfg: NemotronHConfig, widths: Widths | None, profile, *, batch: int, length: int) -> Cost:
    """Prefill `length` positions per row in one call (empty cache)."""
    if length <= 0:
        return ZERO
    return forward_cost(cfg, widths, profile, batch=batch, new_tokens=length, context=0)


def decode_cost(cfg: NemotronHConfig, widths: Widths | None, profile, *, batch: int, start: int,
                steps: int) -> Cost:
    """`steps` decode steps (one token per row each), the first with `start` cached positions."""
    if steps <= 0:
        return ZERO
    if batch <= 0 or start < 0:
        raise ValueError(f"decode_cost: batch={batch} must be > 0 and start={start} >= 0")
    return _call_cost(CostModel(cfg, widths), get_profile(profile), batch, 1, np.arange(start, start + steps))


def generation_latency(profile, *, think_cfg: NemotronHConfig, think_widths: Widths | None,
                       answer_cfg: NemotronHConfig | None = None, answer_widths: Widths | None = None,
                       batch: int = 1, prompt_len: int, think_steps: int, answer_steps: int,
                       reprefill_len: int = 0) -> dict:
    """Modeled seconds per phase of one budget-control request (METHOD §9).

    think: prefill the prompt, decode `think_steps` tokens (the trace and `</think>`).
    answer: when `reprefill_len` > 0 the answering model re-prefills that many positions (prompt +
    trace + `</think>`, bucketed as run) and decodes `answer_steps`; otherwise the thinking model
    continues from its own cache. Returns {"think_s", "answer_s", "total_s", "think_flops",
    "answer_flops", "think_bytes", "answer_bytes"}.
    """
    answer_cfg = think_cfg if answer_cfg is None else answer_cfg
    prof = get_profile(profile)
    think = (prefill_cost(think_cfg, think_widths, prof, batch=batch, length=prompt_len)
             + decode_cost(think_cfg, think_widths, prof, batch=batch, start=prompt_len, steps=think_steps))
    start = prompt_len + think_steps
    if reprefill_len > 0:
        answer = (prefill_cost(answer_cfg, answer_widths, prof, batch=batch, length=reprefill_len)
                  + decode_cost(answer_cfg, answer_widths, prof, batch=batch, start=reprefill_len,
                                steps=answer_steps))
    else:
        answer = decode_cost(answer_cfg, answer_widths, prof, batch=batch, start=start, steps=answer_steps)
    return {"think_s": think.seconds, "answer_s": answer.seconds, "total_s": think.seconds + answer.seconds,
            "think_flops": think.flops, "answer_flops": answer.flops, "think_bytes": think.bytes,
            "answer_bytes": answer.bytes}



# ------------------------------------------------------------------------------ per-request latency of a grid point
def _widths_key(cfg: NemotronHConfig, widths: Widths | None) -> tuple:
    w = Widths() if widths is None else widths
    per = tuple(w.per_layer(cfg, a) if cfg.count(c) else () for a, c in PER_LAYER_AXES.items())
    return (w.hidden_size(cfg), per, w.layer_mask(cfg))


_COST_CACHE: dict = {}


def _cost_model_cached(cfg: NemotronHConfig, widths: Widths | None) -> CostModel:
    key = (cfg, _widths_key(cfg, widths))
    if key not in _COST_CACHE:
        _COST_CACHE[key] = CostModel(cfg, widths)
    return _COST_CACHE[key]


@dataclasses.dataclass(frozen=True)
class LatencyTarget:
    """A named place to cost requests: a hardware profile, run either on the model itself
    (`reference=None`) or on a reference architecture with the same width fractions (`scale_widths`)."""

    key: str
    profile: HardwareProfile
    reference: NemotronHConfig | None = None
    reference_name: str | None = None

    @classmethod
    def make(cls, profile, reference: str | None = None) -> "LatencyTarget":
        prof = get_profile(profile)
        if reference is not None and reference not in REFERENCE_MODELS:
            raise ValueError(f"unknown reference architecture {reference!r}; known: {sorted(REFERENCE_MODELS)}")
        pname = profile if isinstance(profile, str) else prof.name
        return cls(key=pname + (f"@{reference}" if reference else ""), profile=prof,
                   reference=REFERENCE_MODELS.get(reference), reference_name=reference)

    def describe(self) -> str:
        return self.profile.name + (f", widths mapped onto {self.reference_name}" if self.reference_name else
                                    ", the model as trained")

    def request_latency(self, cfg: NemotronHConfig, think_widths, answer_widths, *, prompt_len: int,
                        think_steps: int, answer_steps: int, reprefill_len: int = 0) -> dict:
        """`generation_latency` of one request (batch 1) on this target."""
        if self.reference is not None:
            tw, aw = (scale_widths(cfg, w, self.reference) for w in (think_widths, answer_widths))
            cfg = self.reference
        else:
            tw, aw = think_widths, answer_widths
        prof = self.profile
        ta, aa = _cost_model_cached(cfg, tw), _cost_model_cached(cfg, aw)
        think = _call_cost(ta, prof, 1, prompt_len, [0]) + _call_cost(
            ta, prof, 1, 1, np.arange(prompt_len, prompt_len + think_steps))
        if reprefill_len > 0:
            answer = _call_cost(aa, prof, 1, reprefill_len, [0]) + (_call_cost(
                aa, prof, 1, 1, np.arange(reprefill_len, reprefill_len + answer_steps)) if answer_steps else ZERO)
        else:
            start = prompt_len + think_steps
            answer = _call_cost(aa, prof, 1, 1, np.arange(start, start + answer_steps)) if answer_steps else ZERO
        return {"think_s": think.seconds, "answer_s": answer.seconds, "total_s": think.seconds + answer.seconds,
                "think_flops": think.flops, "answer_flops": answer.flops}


def mean_request_latency(target: LatencyTarget, cfg: NemotronHConfig, think_widths, answer_widths, rows) -> dict:
    """Mean over `rows` = [(prompt_len, think_steps, answer_steps, reprefill_len)] of
    `target.request_latency` (identical rows are costed once)."""
    rows = [tuple(int(v) for v in r) for r in rows]
    if not rows:
        raise ValueError("mean_request_latency: no rows")
    uniq = {}
    for r in rows:
        if r not in uniq:
            uniq[r] = target.request_latency(cfg, think_widths, answer_widths, prompt_len=r[0], think_steps=r[1],
                                             answer_steps=r[2], reprefill_len=r[3])
    keys = next(iter(uniq.values())).keys()
    return {k: float(np.mean([uniq[r][k] for r in rows])) for k in keys}

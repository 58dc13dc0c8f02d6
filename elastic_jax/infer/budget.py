"""Elastic budget control (METHOD §9): submodel A thinks, submodel B answers.

Phase 1 (think): A decodes after the prompt (which ends with `<think>`) until it emits `</think>`
or has produced `thinking_budget` thinking tokens; in the latter case `</think>` is forced.
Phase 2 (answer):
  * B != A (the Star Elastic scheme): B re-prefills prompt + trace + `</think>` (left-padded
    batch, padded to the longest row rounded up to a multiple of 8: `bucket_length`) and decodes
    the answer. The re-prefill is counted in the answer phase's latency and
    FLOPs, as in the paper's measurements (vLLM cannot reuse the other model's cache).
  * B == A (the baseline, "standard budget control" by thinking-token truncation): the same model
    simply continues from its own cache after the forced `</think>`; no re-prefill.
  * `transplant=True` (experiment, §9 "cache reuse"): B continues from A's caches instead of
    re-prefilling. The caches only mean the same thing approximately (different residual streams;
    A's Mamba state covers only A's heads), so results are reported separately.

The submodels are nested views of ONE parameter set: `ElasticModel` holds the full params and one
`Widths` per trained budget, and runs the masked forward (`mode="masked"`, no copies at all). For
wall-clock speed, `mode="sliced"` builds standalone prefix copies once, at construction
(`ej.slice_params`), so a 50% model actually runs ~50% of the matmuls; the generated tokens are the
same (masked == sliced, up to float rounding). Transplant needs one cache layout, so it always uses
the masked views.

Batch rows finish at different times: a finished row keeps its cache frozen (per-row select) while
the other rows continue, and emits padding.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..config import NemotronHConfig
from ..elastic.slicing import param_count, slice_params
from ..model.cost import CostModel, Mode
from ..model.decoder import decode_step, prefill
from ..model.generate import sample_logits
from ..model.kinds import kind_of
from ..quant.state import qweight_params
from ..widths import Widths

MODES = ("masked", "sliced")


# ------------------------------------------------------------------------------ the model family
@dataclasses.dataclass(frozen=True)
class ElasticModel:
    """One parameter set and its named nested submodels (trained budgets -> Widths)."""

    cfg: NemotronHConfig
    params: dict
    budgets: Mapping[str, Widths]
    mode: str = "masked"
    quant: Any = None        # elastic_jax.quant.QuantState of `params`: every submodel runs fake-quantized
    _views: Mapping = dataclasses.field(default=None, repr=False, compare=False)
    _costs: dict = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.budgets:
            raise ValueError("budgets must name at least one trained submodel")
        views, quants = {}, {}
        for name, w in self.budgets.items():
            if not isinstance(w, Widths):
                raise ValueError(f"budgets[{name!r}] must be an ej.Widths, got {type(w).__name__}")
            if self.mode == "sliced":
                sub_cfg, sub_params = slice_params(self.params, self.cfg, w)
                views[name] = (sub_cfg, sub_params, None)
                if self.quant is not None:
                    from ..elastic.quant_slicing import slice_quant_state
                    quants[name] = slice_quant_state(self.quant, self.params, self.cfg, w)
            else:
                views[name] = (self.cfg, self.params, w.resolve(self.cfg))
                quants[name] = self.quant
        object.__setattr__(self, "_views", views)
        object.__setattr__(self, "_quants", quants)
        object.__setattr__(self, "_costs", {})

    def names(self) -> tuple[str, ...]:
        return tuple(self.budgets)

    def check_name(self, name: str) -> str:
        if name not in self.budgets:
            raise ValueError(f"submodel {name!r} is not a trained budget; trained budgets: {list(self.budgets)}")
        return name

    def view(self, name: str):
        """(cfg, params, widths-or-None) that run submodel `name`."""
        return self._views[self.check_name(name)]

    def masked_view(self, name: str):
        return self.cfg, self.params, self.budgets[self.check_name(name)].resolve(self.cfg)

    def quant_view(self, name: str, masked: bool = False):
        """The quantization state (None: high precision) of `view(name)` (`masked_view` if `masked`)."""
        self.check_name(name)
        return self.quant if masked or self.quant is None else self._quants[name]

    def active_params(self, name: str) -> int:
        return param_count(self.cfg, self.budgets[self.check_name(name)], active=True)

    def flops_per_token(self, name: str, context: np.ndarray | int) -> np.ndarray:
        """Forward FLOPs of one decoded token after `context` cached positions (it attends
        context + 1), from the one cost model (`model.cost`: every layer kind, Mamba included)."""
        return self.cost_model(name).flops_per_token(Mode.decode(np.asarray(context)))

    def cost_model(self, name: str) -> CostModel:
        """The cost model (`model.cost`) of submodel `name`."""
        if self.check_name(name) not in self._costs:
            self._costs[name] = CostModel(self.cfg, self.budgets[name])
        return self._costs[name]


# ------------------------------------------------------------------------------ jitted pieces
def _freeze(done, new, old, cfg: NemotronHConfig):
    """Per-row select: rows with done=True keep `old` (their cache stops changing). A kind's
    `SLOT_CACHE` entries (attention K / V) take `new` as is: what a finished row writes there lands in
    slots its frozen validity masks, and rewriting the whole KV cache every step is the decode loop's
    largest memory traffic."""
    def sel(n, o):
        if n.ndim == 0:
            return n
        d = done.reshape((-1,) + (1,) * (n.ndim - 1))
        return jnp.where(d, o, n)

    def layer(i, n, o):
        if not isinstance(n, dict):
            return jax.tree_util.tree_map(sel, n, o)
        slots = getattr(kind_of(cfg, i), "SLOT_CACHE", ())
        return {k: v if k in slots else jax.tree_util.tree_map(sel, v, o[k]) for k, v in n.items()}
    return dataclasses.replace(new, layers=[layer(i, n, o) for i, (n, o) in enumerate(zip(new.layers, old.layers))])


def _quantized(params, quant):
    """The params a quantized submodel runs: projections as `QWeight` leaves (METHOD §10)."""
    return params if quant is None else qweight_params(params, quant)


@partial(jax.jit, static_argnames=("cfg", "max_len"))
def _prefill(params, tokens, valid, widths, *, cfg, max_len, quant=None):
    logits, cache = prefill(_quantized(params, quant), tokens, cfg, widths, max_len=max_len, valid=valid)
    return logits[:, -1], cache


def _stops(stop_token):
    """The stop ids as an int32 vector: an id, a tuple of ids, or already an array (traced)."""
    if isinstance(stop_token, jax.Array):
        return stop_token.astype(jnp.int32).reshape(-1)
    return jnp.asarray(stop_token if isinstance(stop_token, tuple) else (stop_token,), jnp.int32)


def _decode_body(params, widths, key, s, *, cfg, stop_token, pad_token, temperature, top_p, quant=None):
    """One decode step of `_decode_loop` (shared with the per-token streaming path `_decode_one`)."""
    i, logits, cache, done, out, lengths, stopped = s
    tok = sample_logits(logits, jax.random.fold_in(key, i), temperature, top_p)
    tok = jnp.where(done, pad_token, tok)
    out = out.at[:, i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    hit = jnp.isin(tok, _stops(stop_token)) & ~done
    new_logits, new_cache = decode_step(_quantized(params, quant), tok[:, None], cache, cfg, widths)
    cache = _freeze(done, new_cache, cache, cfg)
    logits = jnp.where(done[:, None], logits, new_logits[:, -1])
    return i + 1, logits, cache, done | hit, out, lengths, stopped | hit


def _decode_init(last_logits, cache, done0, capacity, pad_token):
    B = last_logits.shape[0]
    return (jnp.zeros((), jnp.int32), last_logits, cache, done0, jnp.full((B, capacity), pad_token, jnp.int32),
            jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))


def _decode_loop(params, widths, cache, last_logits, done0, limit, key, *, cfg, capacity, stop_token, pad_token,
                 temperature, top_p, quant=None):
    """Decode up to `limit` (traced, <= capacity) tokens per row; a row stops after `stop_token`
    (an id or a tuple of ids). Returns (tokens [B, capacity], lengths [B], stopped [B], cache,
    last_logits). One compiled `lax.while_loop`, the cache in the carry; the stop ids are traced, so
    the thinking phase (stop at `</think>`) and the answer phase (stop at EOS) of one model share the
    compiled loop when their capacities match."""
    return _decode_loop_jit(params, widths, cache, last_logits, done0, limit, key, _stops(stop_token), cfg=cfg,
                            capacity=capacity, pad_token=pad_token, temperature=temperature, top_p=top_p,
                            quant=quant)


@partial(jax.jit, static_argnames=("cfg", "capacity", "pad_token", "temperature", "top_p"))
def _decode_loop_jit(params, widths, cache, last_logits, done0, limit, key, stops, *, cfg, capacity, pad_token,
                     temperature, top_p, quant=None):
    def cond(s):
        return (s[0] < limit) & ~jnp.all(s[3])

    body = partial(_decode_body, params, widths, key, cfg=cfg, stop_token=stops, pad_token=pad_token,
                   temperature=temperature, top_p=top_p, quant=quant)
    init = _decode_init(last_logits, cache, done0, capacity, pad_token)
    _, logits, cache, _, out, lengths, stopped = jax.lax.while_loop(cond, body, init)
    return out, lengths, stopped, cache, logits


_decode_one = jax.jit(_decode_body, static_argnames=("cfg", "stop_token", "pad_token", "temperature", "top_p"))


def decode_stream(params, widths, cache, last_logits, done0, limit: int, key, *, cfg, capacity, stop_token,
                  pad_token, temperature, top_p, quant=None, step=None):
    """The per-token fallback of `_decode_loop` (same arguments, same results): a Python loop over
    one jitted step (`step`, default `_decode_one`; same signature) that yields each step's tokens
    [B] (numpy) as soon as they exist, for streaming. The generator's return value
    (StopIteration.value) is `_decode_loop`'s tuple."""
    step = _decode_one if step is None else step
    s = _decode_init(last_logits, cache, done0, capacity, pad_token)
    for _ in range(int(limit)):
        if bool(np.all(np.asarray(s[3]))):
            break
        s = step(params, widths, key, s, cfg=cfg, stop_token=stop_token, pad_token=pad_token,
                 temperature=temperature, top_p=top_p, quant=quant)
        yield np.asarray(s[4][:, int(s[0]) - 1])
    _, logits, cache, _, out, lengths, stopped = s
    return out, lengths, stopped, cache, logits


@partial(jax.jit, static_argnames=("cfg",))
def _force(params, widths, cache, last_logits, tok, need, *, cfg, quant=None):
    """Feed `tok` [B] to rows with need=True (others frozen)."""
    new_logits, new_cache = decode_step(_quantized(params, quant), tok[:, None], cache, cfg, widths)
    cache = _freeze(~need, new_cache, cache, cfg)
    return jnp.where(need[:, None], new_logits[:, -1], last_logits), cache


def _block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


REPREFILL_BUCKET = 8


def bucket_length(n: int, multiple: int = REPREFILL_BUCKET) -> int:
    """`n` rounded up to a multiple of `multiple`: the padded length of a re-prefill (the batch's
    longest prompt + trace, not the decode capacity), so few shapes compile and little is padding."""
    if n <= 0 or multiple <= 0:
        raise ValueError(f"bucket_length: n={n} and multiple={multiple} must be > 0")
    return -(-int(n) // multiple) * multiple


def left_pad(seqs, length: int, pad: int):
    """Left-pad int sequences to `length`: (tokens [B, length] int32, valid [B, length] bool)."""
    toks = np.full((len(seqs), length), pad, np.int32)
    valid = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        s = list(s)
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens > the padded length {length}")
        if s:
            toks[i, length - len(s):] = s
            valid[i, length - len(s):] = True
    return toks, valid


# ------------------------------------------------------------------------------ results
@dataclasses.dataclass(frozen=True)
class PhaseStats:
    """One phase over the whole batch: wall-clock seconds, tokens (generated; `prefill_tokens`
    counts prompt positions run through the model), analytic FLOPs."""

    latency_s: float
    tokens: int
    prefill_tokens: int
    flops: float

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BudgetOutput:
    """Per row: thinking tokens (without `</think>`), whether `</think>` was forced, the answer
    tokens (from the first answer token, `<eos>` included when emitted); per phase: `PhaseStats`."""

    think_model: str
    answer_model: str
    thinking_budget: int
    think_tokens: list[list[int]]
    forced: np.ndarray
    answer_tokens: list[list[int]]
    think: PhaseStats
    answer: PhaseStats
    transplant: bool = False
    reprefill_length: int = 0       # padded length of the answering model's re-prefill (0: none)

    @property
    def latency_s(self) -> float:
        return self.think.latency_s + self.answer.latency_s

    @property
    def flops(self) -> float:
        return self.think.flops + self.answer.flops


@dataclasses.dataclass(frozen=True)
class Specials:
    """The token ids budget control needs."""

    end_think: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> "Specials":
        return cls(end_think=tok.end_think_id, eos=tok.eos_id, pad=tok.pad_id)


# ------------------------------------------------------------------------------ budget control
@dataclasses.dataclass(frozen=True)
class Thought:
    """Phase 1 of `budget_generate` (think) for one batch, kept in a `thoughts` dict so that every
    answering model of the same thinking model, budget and view reuses it: the trace, which rows were
    forced, and the cache / logits after the forced `</think>` was fed (for continuations)."""

    think_tokens: list
    forced: np.ndarray
    cache: Any
    logits: Any
    latency_s: float          # prefill + thinking decode
    force_s: float            # feeding the forced </think> (counted only when the same cache continues)


def budget_generate(model: ElasticModel, prompts, *, think_model: str, answer_model: str, thinking_budget: int,
                    specials: Specials, max_answer_tokens: int = 8, max_thinking: int | None = None,
                    context: int | None = None, transplant: bool = False, temperature: float = 0.0,
                    top_p: float = 1.0, key=None, prompt_length: int | None = None,
                    thoughts: dict | None = None) -> BudgetOutput:
    """Think with `think_model`, answer with `answer_model` (trained budget names of `model`).

    prompts: list of token-id sequences (different lengths allowed; each ends where thinking
    starts, e.g. with `<think>`). thinking_budget: the most thinking tokens per row (> 0); a row
    that reaches it gets `</think>` forced. max_thinking: the static decode capacity (>=
    thinking_budget; pass the largest budget of a sweep so one compiled program serves every
    budget). prompt_length: pad prompts to this length (a fixed shape for a sweep).
    context: the context length (cache capacity); a prompt that cannot fit with its budgets
    raises. Latency is measured with `block_until_ready` around each phase; call once first to
    exclude compilation. `thoughts`: a dict that keeps each thinking phase (`Thought`, keyed by the
    model, the thinking submodel, its view, the budget, the prompts and the sampling settings; one dict
    per `model`'s lifetime): a later call with the same key answers from it (its measured latency and
    tokens) instead of thinking again, as a sweep over answering models would recompute the same trace
    (greedy, or the same key).
    """
    if not isinstance(thinking_budget, (int, np.integer)) or thinking_budget <= 0:
        raise ValueError(f"thinking_budget must be a positive int, got {thinking_budget!r}")
    if max_answer_tokens <= 0:
        raise ValueError(f"max_answer_tokens must be > 0, got {max_answer_tokens}")
    model.check_name(think_model)
    model.check_name(answer_model)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    max_thinking = int(thinking_budget if max_thinking is None else max_thinking)
    if max_thinking < thinking_budget:
        raise ValueError(f"max_thinking={max_thinking} must be >= thinking_budget={thinking_budget}")
    P = max(len(p) for p in prompts) if prompt_length is None else int(prompt_length)
    if P < max(len(p) for p in prompts):
        raise ValueError(f"prompt_length={P} is shorter than the longest prompt ({max(len(p) for p in prompts)})")
    need = P + max_thinking + 1 + max_answer_tokens
    context = int(context or model.cfg.max_position_embeddings)
    if need > context:
        raise ValueError(f"prompt length {P} + max_thinking {max_thinking} + 1 + max_answer_tokens "
                         f"{max_answer_tokens} = {need} exceeds the context ({context} tokens)")
    key = jax.random.PRNGKey(0) if key is None else key
    k_think, k_answer = jax.random.split(key)
    same = think_model == answer_model
    B = len(prompts)
    sampling = dict(temperature=float(temperature), top_p=float(top_p))

    # ---------------- phase 1: think
    masked_a = transplant or model.mode == "masked"       # the view A thinks with (transplant: one cache layout)
    tkey = (id(model), think_model, masked_a, int(thinking_budget), max_thinking, P, need, tuple(map(tuple, prompts)),
            sampling["temperature"], sampling["top_p"], _key_bytes(k_think))
    thought = None if thoughts is None else thoughts.get(tkey)
    if thought is None:
        # a kept thought feeds the forced </think> too, whoever asked first, so that a continuation can reuse it
        thought = _think(model, think_model, masked_a, prompts, P, need, max_thinking, thinking_budget, specials,
                         k_think, sampling, cont=same or transplant or thoughts is not None)
        if thoughts is not None:
            thoughts[tkey] = thought
    think_tokens, forced, cache, logits = thought.think_tokens, thought.forced, thought.cache, thought.logits
    t_think = thought.latency_s + (thought.force_s if same or transplant else 0.0)

    # ---------------- phase 2: answer
    b_cfg, b_params, b_w = model.masked_view(answer_model) if transplant else model.view(answer_model)
    b_q = model.quant_view(answer_model, masked=transplant)
    t0 = time.perf_counter()
    prefill_tokens = reprefill_length = 0
    if not (same or transplant):
        full = [p + t + [specials.end_think] for p, t in zip(prompts, think_tokens)]
        L2 = min(bucket_length(max(len(f) for f in full), REPREFILL_BUCKET), need)   # actual length, bucketed
        reprefill_length = L2
        toks2, valid2 = left_pad(full, L2, specials.pad)
        logits, cache = _prefill(b_params, jnp.asarray(toks2), jnp.asarray(valid2), b_w, cfg=b_cfg, max_len=need,
                                 quant=b_q)
        prefill_tokens = sum(len(f) for f in full)
    ans, alen, _, _, _ = _decode_loop(          # the thinking loop's capacity: one compiled loop per model
        b_params, b_w, cache, logits, jnp.zeros((B,), bool), jnp.asarray(max_answer_tokens, jnp.int32), k_answer,
        cfg=b_cfg, capacity=max(max_thinking, max_answer_tokens), stop_token=specials.eos, pad_token=specials.pad,
        quant=b_q, **sampling)
    ans, alen = _block((ans, alen))
    t_answer = time.perf_counter() - t0
    ans, alen = np.asarray(ans), np.asarray(alen)
    answer_tokens = [list(ans[i, :alen[i]]) for i in range(B)]

    # ---------------- accounting
    plen = np.asarray([len(p) for p in prompts])
    n_think = np.asarray([len(t) for t in think_tokens])
    think_decoded = n_think + 1                      # the thinking tokens and </think> (emitted or forced)
    think_flops = float(sum(_prefill_flops(model, think_model, plen[i]) +
                            _span_flops(model, think_model, plen[i], plen[i] + think_decoded[i]) for i in range(B)))
    start = plen + think_decoded
    ans_flops = float(sum(_span_flops(model, answer_model, start[i], start[i] + alen[i]) for i in range(B)))
    if prefill_tokens:
        ans_flops += float(sum(_prefill_flops(model, answer_model, start[i]) for i in range(B)))
    think = PhaseStats(latency_s=t_think, tokens=int(think_decoded.sum()), prefill_tokens=int(plen.sum()),
                       flops=think_flops)
    answer = PhaseStats(latency_s=t_answer, tokens=int(alen.sum()), prefill_tokens=int(prefill_tokens),
                        flops=ans_flops)
    return BudgetOutput(think_model=think_model, answer_model=answer_model, thinking_budget=int(thinking_budget),
                        think_tokens=think_tokens, forced=forced, answer_tokens=answer_tokens, think=think,
                        answer=answer, transplant=bool(transplant), reprefill_length=int(reprefill_length))


def _key_bytes(key) -> bytes:
    """A PRNG key (typed or raw uint32) as bytes, for the thoughts' dict key."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(key) if typed else key).tobytes()


def _think(model: ElasticModel, think_model: str, masked: bool, prompts, P: int, need: int, max_thinking: int,
           thinking_budget: int, specials: Specials, key, sampling: dict, *, cont: bool) -> Thought:
    """Phase 1: prefill the prompts and decode up to `thinking_budget` thinking tokens; with `cont`, also
    feed the forced `</think>` to the truncated rows (timed apart), so the same cache can continue."""
    cfg, params, w = model.masked_view(think_model) if masked else model.view(think_model)
    q = model.quant_view(think_model, masked=masked)
    B = len(prompts)
    toks, valid = left_pad(prompts, P, specials.pad)
    t0 = time.perf_counter()
    logits, cache = _prefill(params, jnp.asarray(toks), jnp.asarray(valid), w, cfg=cfg, max_len=need, quant=q)
    out, lengths, stopped, cache, logits = _decode_loop(
        params, w, cache, logits, jnp.zeros((B,), bool), jnp.asarray(thinking_budget, jnp.int32), key,
        cfg=cfg, capacity=max_thinking, stop_token=specials.end_think, pad_token=specials.pad, quant=q, **sampling)
    out, lengths, forced = _block((out, lengths, ~stopped))
    t_think = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cont:   # continue from this cache: feed the forced </think> to the truncated rows
        logits, cache = _block(_force(params, w, cache, logits, jnp.full((B,), specials.end_think, jnp.int32),
                                      forced, cfg=cfg, quant=q))
    t_force = time.perf_counter() - t0
    out, lengths, forced = np.asarray(out), np.asarray(lengths), np.asarray(forced)
    return Thought(think_tokens=[list(out[i, :lengths[i] - (0 if forced[i] else 1)]) for i in range(B)],
                   forced=forced, cache=cache, logits=logits, latency_s=t_think, force_s=t_force)


def _span_flops(model: ElasticModel, name: str, start: int, stop: int) -> float:
    """FLOPs of running positions [start, stop), one token at a time (position t after t cached)."""
    if stop <= start:
        return 0.0
    return float(np.sum(model.flops_per_token(name, np.arange(start, stop))))


def _prefill_flops(model: ElasticModel, name: str, length: int) -> float:
    """FLOPs of prefilling `length` positions in one call."""
    return float(model.cost_model(name).flops(Mode.prefill(int(length)))) if length > 0 else 0.0


def truncation_generate(model: ElasticModel, prompts, *, submodel: str, thinking_budget: int, specials: Specials,
                        **kw) -> BudgetOutput:
    """The baseline: one submodel thinks, is cut at the budget (forced `</think>`) and answers."""
    return budget_generate(model, prompts, think_model=submodel, answer_model=submodel,
                           thinking_budget=thinking_budget, specials=specials, **kw)


def answer_generate(model: ElasticModel, prompts, *, submodel: str, specials: Specials, max_answer_tokens: int = 8,
                    prompt_length: int | None = None, cache_len: int | None = None, capacity: int | None = None
                    ) -> tuple[list[list[int]], PhaseStats]:
    """Answer directly after `prompts` (e.g. prompt + `</think>`: the no-thinking control, or a
    given trace). Greedy. `cache_len` and `capacity` (the decode loop's static output length, >=
    max_answer_tokens): default just enough; pass a `budget_generate` sweep's cache length and
    max_thinking to share its compiled decode loop. Returns (answer tokens per row, PhaseStats)."""
    model.check_name(submodel)
    if max_answer_tokens <= 0:
        raise ValueError(f"max_answer_tokens must be > 0, got {max_answer_tokens}")
    capacity = max_answer_tokens if capacity is None else int(capacity)
    if capacity < max_answer_tokens:
        raise ValueError(f"capacity={capacity} < max_answer_tokens={max_answer_tokens}")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    P = max(len(p) for p in prompts) if prompt_length is None else int(prompt_length)
    need = P + max_answer_tokens
    if cache_len is not None:
        if cache_len < need:
            raise ValueError(f"cache_len={cache_len} < prompt length {P} + max_answer_tokens {max_answer_tokens}")
        need = int(cache_len)
    if need > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt length {P} + max_answer_tokens {max_answer_tokens} exceeds the context "
                         f"({model.cfg.max_position_embeddings} tokens)")
    cfg, params, w = model.view(submodel)
    q = model.quant_view(submodel)
    toks, valid = left_pad(prompts, P, specials.pad)
    B = len(prompts)
    t0 = time.perf_counter()
    logits, cache = _prefill(params, jnp.asarray(toks), jnp.asarray(valid), w, cfg=cfg, max_len=need, quant=q)
    ans, alen, _, _, _ = _decode_loop(params, w, cache, logits, jnp.zeros((B,), bool),
                                      jnp.asarray(max_answer_tokens, jnp.int32), jax.random.PRNGKey(0), cfg=cfg,
                                      capacity=capacity, stop_token=specials.eos, pad_token=specials.pad,
                                      temperature=0.0, top_p=1.0, quant=q)
    ans, alen = _block((ans, alen))
    dt = time.perf_counter() - t0
    ans, alen = np.asarray(ans), np.asarray(alen)
    plen = [len(p) for p in prompts]
    flops = float(sum(_prefill_flops(model, submodel, plen[i]) + _span_flops(model, submodel, plen[i], plen[i] + int(alen[i]))
                      for i in range(B)))
    return ([list(ans[i, :alen[i]]) for i in range(B)],
            PhaseStats(latency_s=dt, tokens=int(alen.sum()), prefill_tokens=int(sum(plen)), flops=flops))

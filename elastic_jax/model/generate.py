"""Autoregressive generation over the decode cache: greedy or temperature / top-p sampling,
stop tokens, left-padded batches. The whole decode loop is one jitted `lax.while_loop`, run on
the checked path (decoder.py: `checked=True` under `checkify`), so an out-of-range token or a
step past the cache capacity raises instead of giving silently wrong tokens."""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from ..config import NemotronHConfig
from ..widths import Widths
from .decoder import decode_step, prefill


@dataclasses.dataclass(frozen=True)
class Generation:
    """tokens [B, max_new_tokens] (pad_token_id after a row stops), lengths [B] (tokens generated,
    the stop token included), stopped [B] (a stop token was produced)."""

    tokens: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def sample_logits(logits_BV, key, temperature, top_p):
    """Greedy when `temperature` is the Python number 0; else softmax(logits / T) restricted to the
    top-p nucleus (the smallest set of most likely tokens whose mass reaches top_p). `temperature`
    and `top_p` may be traced."""
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    p_sorted = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "max_len", "greedy", "stop_tokens"))
def _generate(params, prompt, valid, widths, key, temperature, top_p, *, cfg, max_new_tokens, max_len, greedy,
              stop_tokens):
    """(checkify error, (tokens, lengths, stopped)): the decode loop with the decoder's checks."""
    impl = partial(_generate_loop, cfg=cfg, max_new_tokens=max_new_tokens, max_len=max_len, greedy=greedy,
                   stop_tokens=stop_tokens)
    return checkify.checkify(impl, errors=checkify.user_checks)(params, prompt, valid, widths, key, temperature,
                                                                 top_p)


def _generate_loop(params, prompt, valid, widths, key, temperature, top_p, *, cfg, max_new_tokens, max_len, greedy,
                   stop_tokens):
    B = prompt.shape[0]
    logits, cache = prefill(params, prompt, cfg, widths, max_len=max_len, valid=valid, checked=True)
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    out = jnp.full((B, max_new_tokens), cfg.pad_token_id, jnp.int32)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, last_logits, cache, done, out, lengths = state
        tok = sample_logits(last_logits, jax.random.fold_in(key, i), 0 if greedy else temperature, top_p)
        tok = jnp.where(done, cfg.pad_token_id, tok)
        out = out.at[:, i].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        logits, cache = decode_step(params, tok[:, None], cache, cfg, widths, checked=True)
        return i + 1, logits[:, -1], cache, done, out, lengths

    init = (jnp.zeros((), jnp.int32), logits[:, -1], cache, jnp.zeros((B,), bool), out, jnp.zeros((B,), jnp.int32))
    _, _, _, done, out, lengths = jax.lax.while_loop(cond, body, init)
    stopped = jnp.any(jnp.isin(out, stops) & (jnp.arange(max_new_tokens)[None] < lengths[:, None]), axis=1)
    return out, lengths, stopped


def generate(params, prompt, cfg: NemotronHConfig, widths=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens=(), key=None,
             prompt_valid=None, max_len: int | None = None) -> Generation:
    """Generate up to `max_new_tokens` after `prompt` [B, L] (rows left-padded, `prompt_valid`
    False on padding). Widths: pass resolved `Widths` (or SoftWidths) for a nested submodel."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be int [batch, length >= 1], got shape {prompt.shape}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not (temperature >= 0.0):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    lo, hi = int(jnp.min(prompt)), int(jnp.max(prompt))
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={cfg.vocab_size}); got range [{lo}, {hi}]")
    if prompt.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"context max_position_embeddings={cfg.max_position_embeddings}")
    max_len = max_len or prompt.shape[1] + max_new_tokens
    if prompt.shape[1] + max_new_tokens > max_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                         f"context max_len={max_len}")
    if isinstance(widths, Widths):
        widths = widths.resolve(cfg)
    valid = jnp.ones(prompt.shape, bool) if prompt_valid is None else jnp.asarray(prompt_valid, bool)
    key = jax.random.PRNGKey(0) if key is None else key
    err, (toks, lengths, stopped) = _generate(params, prompt, valid, widths, key, jnp.float32(temperature),
                                       jnp.float32(top_p), cfg=cfg, max_new_tokens=int(max_new_tokens),
                                       max_len=int(max_len), greedy=float(temperature) == 0.0,
                                       stop_tokens=tuple(int(t) for t in stop_tokens))
    err.throw()
    return Generation(tokens=toks, lengths=lengths, stopped=stopped)

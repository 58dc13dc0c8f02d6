"""The decoder walk: embeddings -> [h + gate_l · mask(mixer_l(RMSNorm_l(h)))]_l -> norm_f -> lm_head.

`forward` is a pure function of (params, tokens, cfg, widths); `prefill` / `decode_step` run the
same blocks over a cache (attention KV, Mamba conv window and SSM state).

Checked path: concrete inputs are range-checked on the host. Under `jit` the tokens and the
cache position are traced, and an out-of-range token id (clamped by the gather) or a decode step
past the cache capacity (a dropped KV write) would give silently wrong numbers; pass
`checked=True` to insert `jax.experimental.checkify` checks for both, and run the function under
`checkify.checkify(fn, errors=checkify.user_checks)` then `err.throw()` (`generate` does).
Without `checked`, a traced step past the capacity returns NaN logits (never values computed on
an overwritten cache), so the caller's finiteness check sees it.
A cache records the concrete widths that filled it (`Cache.widths_key`); a later step at other
concrete widths is refused (the cache is only valid for the submodel that wrote it). Traced
widths (the budget loops, the cache-transplant experiment) are not recorded or checked.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from ..config import NemotronHConfig
from ..sharding import constrain
from ..widths import PER_LAYER_AXES, WIDTH_AXES, SoftWidths, Widths, as_soft, full_size, norm_correction, prefix_mask
from .kinds import KINDS, kind_of, layer_sizes, layers_with_aux
from .kinds.base import layer_sizes_of
from .layers import Context, rms_norm
from .policy import ComputePolicy, remat_policy, resolve_policy
from .scan import scan_blocks, stack_layers, unstack_layers, unstackable_reason


def _layer_masks(cfg: NemotronHConfig, sw: SoftWidths, char: str, k, mixer_params):
    """The masks record of the k-th layer of kind `char` (k may be traced: the scanned loop)."""
    return KINDS[char].masks(cfg, sw, k, mixer_params)


def constrain_hidden(h_BLD):
    """The residual stream's sharding at a block boundary (a no-op without a mesh in context)."""
    return constrain(h_BLD, ("batch", "length", "act_embed"))


def check_tokens(tokens, cfg: NemotronHConfig, checked: bool = False):
    """Shape / dtype checks, and a range check when the tokens are concrete (a checkify check when
    they are traced and `checked`)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] == 0:
        raise ValueError(f"tokens must hold at least one position (an empty sequence has no logits), "
                         f"got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        t = np.asarray(tokens)  # concrete (also when closed over inside a jit): range-check on host
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}); got range [{lo}, {hi}]")
    elif checked and tokens.size:
        checkify.check(jnp.all((tokens >= 0) & (tokens < cfg.vocab_size)),
                       f"token ids must be in [0, vocab_size={cfg.vocab_size}); got range [{{lo}}, {{hi}}]",
                       lo=jnp.min(tokens), hi=jnp.max(tokens))


def _scan_fallback(params, cfg: NemotronHConfig, ctx: Context, cache) -> str | None:
    """None when the layers run under `lax.scan`, else why they run unrolled."""
    if not ctx.policy.scan_layers:
        return "ComputePolicy.scan_layers is False"
    if cache is not None:
        return "decoding with a cache runs the unrolled loop"
    if ctx.collect:
        return "collecting intermediates runs the unrolled loop"
    reason = unstackable_reason(params["layers"], cfg)
    if reason is not None:
        warnings.warn(f"scan_layers: running the layers unrolled: {reason}", stacklevel=4)
    return reason


def check_segment_ids(segment_ids, tokens) -> None:
    if segment_ids is not None and tuple(jnp.shape(segment_ids)) != tuple(tokens.shape):
        raise ValueError(f"segment_ids must have the shape of tokens {tuple(tokens.shape)}, got "
                         f"{tuple(jnp.shape(segment_ids))}")


def _check_layer_gates(widths, cfg: NemotronHConfig) -> None:
    """Every layer dropped (concrete SoftWidths gates all 0) is refused, as slicing refuses it."""
    if isinstance(widths, SoftWidths) and not isinstance(widths.layers, jax.core.Tracer):
        g = np.asarray(widths.layers).reshape(-1)
        if g.size == cfg.num_hidden_layers and not np.any(g != 0):
            raise ValueError("widths drop every layer (all layer gates are 0); keep at least one")


def _check_traced_widths(widths, cfg: NemotronHConfig) -> None:
    """`checked`: traced `Widths` counts must lie in [1, full size] (0 or below gives NaN logits;
    concrete ones were already refused on the host by `Widths.validate`)."""
    if not isinstance(widths, Widths):
        return
    for axis in WIDTH_AXES:
        v = getattr(widths, axis)
        if not isinstance(v, jax.core.Tracer):
            continue
        if axis == "hidden":
            hi = jnp.asarray(cfg.hidden_size)
        else:
            hi = jnp.asarray([full_size(cfg, axis, i) for i in range(cfg.count(PER_LAYER_AXES[axis]))])
        checkify.check(jnp.all((v >= 1) & (v <= hi)),
                       f"Widths.{axis} must be in [1, full size] (traced value out of range)")


def _aux_of(char: str, c, aux: dict | None):
    """The auxiliary outputs `aux` asks for that this layer's kind declares (`AUX_OUTPUTS`)."""
    if aux is None:
        return None
    names = [n for n in aux if n in getattr(KINDS[char], "AUX_OUTPUTS", {})]
    return {n: c[n] for n in names} or None


def _run(params, tokens, cfg: NemotronHConfig, widths, ctx: Context, cache, return_hidden=False, head=True,
         checked=False, aux=None):
    """`aux`: None, or {name: []} of auxiliary outputs to collect (kind-declared `AUX_OUTPUTS`, e.g.
    "expert_load"), each list filled with one entry per layer that has it, in pattern order."""
    check_tokens(tokens, cfg, checked)
    _check_layer_gates(widths, cfg)
    if checked:
        _check_traced_widths(widths, cfg)
    sw = as_soft(cfg, widths)
    cdt = ctx.policy.dtype_for(params["embed"].dtype)          # residual stream in the compute dtype
    h = constrain_hidden(jnp.take(params["embed"], tokens, axis=0).astype(cdt))
    if sw is not None:
        D = params["embed"].shape[1]
        hc, hp = sw.hidden
        hmask = prefix_mask(D, hc, hp).astype(h.dtype)
        h_eps, h_scale = norm_correction(D, hc, hp)
        h = h * hmask
    else:
        hmask = h_eps = h_scale = None

    def block(h, lp, el, layer_cache, char):
        x = rms_norm(h, lp["norm"], cfg.layer_norm_epsilon, h_eps, h_scale).astype(cdt)
        if hmask is not None:
            x = x * hmask
        out, c = KINDS[char].apply(lp["mixer"], x, cfg, el, ctx, layer_cache)
        if hmask is not None:
            out = out * hmask
        if ctx.collect:
            c = {**(c or {}), "input": x}
        return out, c

    remat = ctx.policy.remat != "none" and cache is None
    policy = remat_policy(ctx.policy.remat)
    if _scan_fallback(params, cfg, ctx, cache) is None:
        def apply(char):
            def f(h, lp, k):
                el = None if sw is None else _layer_masks(cfg, sw, char, k, lp["mixer"])
                out, c = block(h, lp, el, None, char)
                return out, _aux_of(char, c, aux)
            return f
        # a per-layer list is stacked here, inside the traced function: one copy of the layer
        # parameters per call (its gradient: one slice per layer); pass stacked params to avoid it
        stacks = stack_layers(params, cfg)["layers"]
        # auxiliary outputs (e.g. the MoE per-expert routing counts): a row per layer, zeros for the
        # layers whose kind lacks it (every `lax.switch` branch returns one structure)
        aux_zeros = {n: KINDS[c].AUX_OUTPUTS[n](stacks[c]["mixer"]) for n in aux or () for c in stacks
                     if n in getattr(KINDS[c], "AUX_OUTPUTS", {})} or None
        h, hs, aux_rows = scan_blocks(h, stacks, cfg, None if sw is None else sw.layers,
                                 {c: apply(c) for c in set(cfg.pattern)}, remat_policy=policy, remat=remat,
                                 return_hidden=return_hidden, boundary=constrain_hidden, aux_zeros=aux_zeros)
        hiddens = [hs[i] for i in range(cfg.num_hidden_layers)] if return_hidden else []
        for n in (aux_zeros or {}):                         # the rows of the layers that have it
            aux[n].extend(aux_rows[n][i] for i in layers_with_aux(cfg, n))
        new_cache = None
    else:
        layers = unstack_layers(params, cfg)["layers"]
        kinds = cfg.kind_index()
        new_cache = [] if cache is not None else None
        hiddens = []
        collected = []
        for i, char in enumerate(cfg.pattern):
            lp = layers[i]
            el = None if sw is None else _layer_masks(cfg, sw, char, kinds[i], lp["mixer"])
            run = jax.checkpoint(block, policy=policy, static_argnums=(4,)) if remat else block
            out, c = run(h, lp, el, None if cache is None else cache[i], char)
            gate = None if sw is None else sw.layers[i].astype(out.dtype)
            h = constrain_hidden(h + (out if gate is None else gate * out).astype(cdt))
            if ctx.collect:
                collected.append(c)
            if new_cache is not None:
                new_cache.append(c)
            else:
                for n, v in (_aux_of(char, c, aux) or {}).items():     # e.g. the MoE routing counts
                    aux[n].append(v)
            hiddens.append(h)
    x = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon, h_eps, h_scale).astype(cdt)
    if hmask is not None:
        x = x * hmask
    if not head:                      # final normed (masked) hidden states, no lm_head (train/losses.py)
        return x, new_cache
    hdt = ctx.policy.dtype_for(params["lm_head"].dtype)
    logits = jnp.einsum("bld,dv->blv", x.astype(hdt), params["lm_head"].astype(hdt),
                        precision=ctx.policy.lax_precision(hdt), preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "length", "act_vocab"))
    if return_hidden:
        return logits, hiddens
    if ctx.collect:
        return logits, collected
    return logits, new_cache


def forward(params, tokens, cfg: NemotronHConfig, widths: Widths | SoftWidths | None = None, *,
            segment_ids=None, policy: ComputePolicy | None = None, checked: bool = False,
            intermediates: bool = False):
    """Logits f32 [B, L, vocab] of the (masked) model. `segment_ids` [B, L]: packed documents
    (attention, conv and SSM state do not cross boundaries); id 0 marks padding. Quantized
    projections are `QWeight` leaves of `params` (`elastic_jax.quant.qweight_params`: FP8 / NVFP4
    simulated with fixed scales, METHOD §10). `checked`: see the module docstring.

    `intermediates`: return (logits, per-layer list of dicts) instead, each layer's dict holding
    "input" (the normed block input [B, L, D]) and what its mixer records (Mamba "x_proj"
    [B, L, H, P]; attention "heads" [B, L, nH, hd], the o_proj input; MLP "neurons" [B, L, I];
    MoE the routing and per-row expert activations, see `kinds.moe.moe_mixer`). Returned, not
    stored anywhere; the layers then run unrolled."""
    check_segment_ids(segment_ids, tokens)
    valid = None if segment_ids is None else segment_ids > 0
    ctx = Context(segment_ids=segment_ids, valid=valid, policy=resolve_policy(cfg, policy), collect=intermediates)
    logits, inter = _run(params, tokens, cfg, widths, ctx, None, checked=checked)
    return (logits, inter) if intermediates else logits


# ------------------------------------------------------------------------------ caches
@dataclasses.dataclass(frozen=True)
class Cache:
    """Decode state: per-layer entries (attention {k, v, valid}, Mamba {conv, ssm}, else None),
    the number of positions written, and the static capacity."""

    layers: list
    pos: jax.Array
    max_len: int
    widths_key: str = ""      # the concrete widths that filled it ("" = none yet, or traced)


jax.tree_util.register_dataclass(Cache, data_fields=["layers", "pos"], meta_fields=["max_len", "widths_key"])


def _widths_key(cfg: NemotronHConfig, widths) -> str:
    """A text key of concrete widths (None = the full model, same key as full Widths); "" when
    any of them is traced or soft (not checkable on the host)."""
    if isinstance(widths, SoftWidths):
        return ""
    w = Widths() if widths is None else widths
    if not isinstance(w, Widths):
        return ""
    if any(isinstance(x, jax.core.Tracer) for f in dataclasses.fields(w) for x in jax.tree.leaves(getattr(w, f.name))):
        return ""
    with jax.ensure_compile_time_eval():       # concrete widths stay concrete inside a trace
        r = w.resolve(cfg)
    return ";".join(f"{a}={np.asarray(getattr(r, a)).tolist()}" for a in ("hidden",) + tuple(
        f.name for f in dataclasses.fields(r) if f.name != "hidden"))


def init_cache(cfg: NemotronHConfig, batch: int, max_len: int, params=None, dtype=jnp.float32) -> dict:
    """Empty decode cache: attention KV [B, S, nKV, hd] + validity, Mamba conv window and f32 SSM state."""
    layers = []
    for i in range(cfg.num_hidden_layers):
        sizes = layer_sizes(cfg, i)
        if params is not None:     # the parameters' own sizes (a model whose arrays differ from cfg)
            sizes.update(layer_sizes_of(params["layers"][i]["mixer"], kind_of(cfg, i).params(cfg)))
        layers.append(kind_of(cfg, i).init_cache(cfg, sizes, batch, max_len, dtype))
    return Cache(layers=layers, pos=jnp.zeros((), jnp.int32), max_len=max_len)


def _cached(params, tokens, cfg, widths, cache: "Cache", valid, policy=None, checked=False):
    L = tokens.shape[1]
    if not isinstance(cache.pos, jax.core.Tracer):
        if int(cache.pos) + L > cache.max_len:
            raise ValueError(f"cache overflow: position {int(cache.pos)} + {L} new tokens > max_len={cache.max_len}")
    elif checked:
        checkify.check(cache.pos + L <= cache.max_len,
                       f"cache overflow: position {{pos}} + {L} new tokens > max_len={cache.max_len}", pos=cache.pos)
    key = _widths_key(cfg, widths)
    if cache.widths_key and key and key != cache.widths_key:
        raise ValueError(f"this cache was filled by the submodel at widths [{cache.widths_key}] but the step runs at "
                         f"[{key}]; a cache is only valid for the submodel that wrote it (prefill again)")
    ctx = Context(valid=valid, positions=cache.pos + jnp.arange(L), decoding=True,
                  policy=resolve_policy(cfg, policy))
    logits, layers = _run(params, tokens, cfg, widths, ctx, cache.layers, checked=checked)
    if isinstance(cache.pos, jax.core.Tracer) and not checked:     # past the capacity: NaN, never values
        logits = jnp.where(cache.pos + L <= cache.max_len, logits, jnp.nan)
    return logits, Cache(layers=layers, pos=cache.pos + L, max_len=cache.max_len, widths_key=cache.widths_key or key)


def prefill(params, tokens, cfg: NemotronHConfig, widths=None, *, max_len: int, valid=None, cache=None,
            policy: ComputePolicy | None = None, checked: bool = False):
    """Run the prompt [B, L] (left-padded rows marked by `valid` False) into a fresh cache of
    `max_len` positions. Returns (logits [B, L, V], cache)."""
    if tokens.shape[1] > max_len:
        raise ValueError(f"prompt length {tokens.shape[1]} exceeds the context max_len={max_len}")
    if cache is None:
        cache = init_cache(cfg, tokens.shape[0], max_len, params, dtype=params["embed"].dtype)
    return _cached(params, tokens, cfg, widths, cache, valid, policy, checked)


def decode_step(params, tokens, cache, cfg: NemotronHConfig, widths=None, *, policy: ComputePolicy | None = None,
                checked: bool = False):
    """Append tokens [B, T] (usually T = 1) to the cache. Returns (logits [B, T, V], cache).
    `checked`: see the module docstring (a step past the capacity is otherwise silent under jit)."""
    return _cached(params, tokens, cfg, widths, cache, None, policy, checked)


def final_hidden(params, tokens, cfg: NemotronHConfig, widths: Widths | SoftWidths | None = None, *,
                 segment_ids=None, policy: ComputePolicy | None = None, return_expert_load: bool = False):
    """Final normed (and hidden-masked) states [B, L, D] in the compute dtype: `forward` without
    the lm_head, so a loss can apply `params["lm_head"]` in vocabulary chunks (elastic_jax/train).
    `return_expert_load`: also the per-MoE-layer routing counts (list of [E] f32, in MoE-layer
    order) of the (masked) routing, for aux-loss-free load balancing."""
    check_segment_ids(segment_ids, tokens)
    valid = None if segment_ids is None else segment_ids > 0
    ctx = Context(segment_ids=segment_ids, valid=valid, policy=resolve_policy(cfg, policy))
    aux = {"expert_load": []} if return_expert_load else None
    x, _ = _run(params, tokens, cfg, widths, ctx, None, head=False, aux=aux)
    return (x, aux["expert_load"]) if return_expert_load else x


def hidden_states(params, tokens, cfg: NemotronHConfig, widths=None, *, policy: ComputePolicy | None = None):
    """Residual stream after every layer (list of [B, L, D]) and the logits."""
    ctx = Context(policy=resolve_policy(cfg, policy))
    logits, hiddens = _run(params, tokens, cfg, widths, ctx, None, return_hidden=True)
    return logits, hiddens

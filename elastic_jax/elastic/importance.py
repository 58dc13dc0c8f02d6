"""Importance estimation and depth ranking (METHOD §3.1-§3.3; the statistics of NVIDIA Model-Optimizer's Minitron).

Everything is computed from forward passes over calibration batches: the model's own
`forward(..., intermediates=True)` returns every layer's normed input and its mixer's activations
(a dict per layer, returned like any output: no hooks, no global state), and `collect_stats`
reduces them to additive statistics under `jit`.

Aggregation (Minitron "batch = L2, sequence = mean", METHOD §3.2): per channel
``a_b = mean over the (valid) tokens of sequence b of |act|``, score ``= sqrt(Σ_b a_b²)`` over all
calibration sequences.

* hidden channels: Σ over layers of that score on every pre-norm output LN_l(X);
* FFN neurons: the score on the fc2 input relu²(X W₁) (Model-Optimizer's choice; [NE] Eq. 2 uses
  the pre-activation, which ranks neurons whose relu² is zero just as high);
* Mamba: s = LN(X) W_x (x projection, [heads, head_dim]); channel score = L2 over heads of the
  per-(head, channel) score (channel consistency: one channel order for every head); head score
  = L2 over the top `mamba_channel_frac` channels; heads ranked within each group;
* attention: the per-head output (o_proj input), head score = L2 over head_dim, ranked within
  each KV group;
* MoE experts: REAP saliency S_j = mean over tokens routed to j of g_j(x)·‖f_j(x)‖₂ (g_j the top-k
  renormalized gate, f_j the expert output), ranked within each routing group; expert width: the
  score on the routed experts' fc2 input over all routed tokens, one ranking shared by all experts;
* depth (`rank_layers`): normalized MSE of the logits with a layer bypassed, iterative removal.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import NemotronHConfig
from ..model.decoder import forward
from ..model.kinds import kind_of, layer_sizes
from ..model.kinds.base import rank_within_groups, seq_sumsq, take_dims  # noqa: F401  (part of this module's API)
from ..sharding import host_value
from ..widths import AXES, WIDTH_AXES, Widths, full_size

RANK_AXES = WIDTH_AXES


def config_fingerprint(cfg: NemotronHConfig) -> str:
    """Stable hash of every field of the model config (they all determine parameter shapes and
    the function; runtime knobs live on `ComputePolicy`)."""
    d = cfg.to_dict()
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- Importance
@dataclass(frozen=True)
class Importance:
    """Per-axis scores and rankings of one parent.

    `scores[axis]` / `rankings[axis]`: "hidden" one array [D]; the per-layer axes a list with one
    array per layer of that kind, in pattern order ("mamba_heads" [H], "mamba_channels" [P],
    "attn_heads" [nH], "ffn" [I], "moe_experts" [E], "moe_ffn" [Ie]). A ranking lists component
    indices from most to least important (within groups where the axis has groups): after
    `permute_params`, new index i holds old component ranking[i]. `layers`: optional depth ranking
    (most important first). `fingerprint`: `config_fingerprint` of the parent config.
    """

    scores: dict
    rankings: dict
    fingerprint: str
    layers: tuple[int, ...] | None = None

    def check(self, cfg: NemotronHConfig) -> None:
        """ValueError unless these rankings were computed for `cfg`."""
        fp = config_fingerprint(cfg)
        if self.fingerprint != fp:
            raise ValueError(f"Importance.fingerprint={self.fingerprint!r} does not match the config "
                             f"({fp!r}): this ranking was computed for a different model config")
        want = {"hidden": 1, **{a: cfg.count(AXES[a].kind) for a in RANK_AXES if a != "hidden"}}
        for axis, n in want.items():
            r = self.rankings.get(axis)
            got = 1 if axis == "hidden" and r is not None else (0 if r is None else len(r))
            if got != n:
                raise ValueError(f"Importance.rankings[{axis!r}] has {got} entries; the config needs {n}")
        if self.layers is not None and sorted(self.layers) != list(range(cfg.num_hidden_layers)):
            raise ValueError(f"Importance.layers={self.layers!r}: must be a permutation of the "
                             f"{cfg.num_hidden_layers} layers")

    def to_dict(self) -> dict:
        """JSON-able dict (lists of ints / floats)."""
        def conv(v):
            if isinstance(v, list):
                return [np.asarray(x).tolist() for x in v]
            return np.asarray(v).tolist()
        return {"fingerprint": self.fingerprint,
                "scores": {k: conv(v) for k, v in self.scores.items()},
                "rankings": {k: conv(v) for k, v in self.rankings.items()},
                "layers": None if self.layers is None else list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "Importance":
        missing = {"fingerprint", "scores", "rankings"} - set(d)
        if missing:
            raise ValueError(f"Importance.from_dict: missing fields {sorted(missing)}")
        def conv(k, v, dtype):
            if k == "hidden":
                return np.asarray(v, dtype)
            return [np.asarray(x, dtype) for x in v]
        return cls(scores={k: conv(k, v, np.float64) for k, v in d["scores"].items()},
                   rankings={k: conv(k, v, np.int64) for k, v in d["rankings"].items()},
                   fingerprint=d["fingerprint"],
                   layers=None if d.get("layers") is None else tuple(int(x) for x in d["layers"]))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Importance":
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ------------------------------------------------------------------- statistics walk
@partial(jax.jit, static_argnums=(2,))
def collect_stats(params, tokens, cfg: NemotronHConfig, segment_ids=None) -> dict:
    """One calibration batch -> additive statistics (sums of squared per-sequence means, REAP sums),
    read from the intermediates of the model's own forward (`forward(..., intermediates=True)`).

    Pure and jittable; returns {"hidden": [n_layers, D], "layers": [per layer: its kind's
    `importance_stats` (a dict of arrays), {} for a kind without one]}.
    """
    valid = None if segment_ids is None else segment_ids > 0
    _, inter = forward(params, tokens, cfg, segment_ids=segment_ids, intermediates=True)
    hidden, layers = [], []
    for i, it in enumerate(inter):
        hidden.append(seq_sumsq(it["input"], valid))
        stats = getattr(kind_of(cfg, i), "importance_stats", None)
        layers.append({} if stats is None else stats(it, cfg, valid, tokens.shape[1]))
    return {"hidden": jnp.stack(hidden), "layers": layers}


def _as_batch(b):
    if isinstance(b, dict):
        if "tokens" not in b:
            raise ValueError("a calibration batch dict needs a 'tokens' entry")
        return jnp.asarray(b["tokens"]), (None if b.get("segment_ids") is None else jnp.asarray(b["segment_ids"]))
    return jnp.asarray(b), None


def _check_tokens(tokens, cfg):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"calibration batches must be int [batch, length]; got {tokens.dtype} {tokens.shape}")
    if int(jnp.min(tokens)) < 0 or int(jnp.max(tokens)) >= cfg.vocab_size:
        raise ValueError(f"calibration token ids must be in [0, vocab_size={cfg.vocab_size})")


def estimate_importance(params, cfg: NemotronHConfig, batches: Iterable, *, mamba_channel_frac: float = 1.0,
                        depth: bool = False) -> Importance:
    """Rankings for every width axis from forward passes over `batches` (METHOD §3.2).

    `batches`: iterable of int32 [B, L] token arrays (or dicts with "tokens" and optional
    "segment_ids", 0 = padding, excluded from the statistics). `mamba_channel_frac`: fraction of
    head channels (the top-ranked ones) used to score Mamba heads ([NE] D_top). `depth`: also rank
    layers with `rank_layers` (extra O(n_layers²) forward passes).
    """
    if not 0.0 < mamba_channel_frac <= 1.0:
        raise ValueError(f"mamba_channel_frac={mamba_channel_frac!r}: must be in (0, 1]")
    total = None
    n = 0
    cached = [] if depth else None
    for b in batches:
        tokens, seg = _as_batch(b)
        _check_tokens(tokens, cfg)
        s = collect_stats(params, tokens, cfg, seg)
        total = s if total is None else jax.tree.map(jnp.add, total, s)
        n += 1
        if cached is not None:
            cached.append(b)
    if total is None:
        raise ValueError("estimate_importance: `batches` is empty; need at least one calibration batch")
    st = jax.tree.map(host_value, total)
    scores, rankings = {}, {}
    hid = np.sqrt(np.asarray(st["hidden"], np.float64)).sum(0)
    scores["hidden"], rankings["hidden"] = hid, rank_within_groups(hid)
    scores.update({axis: [] for axis in AXES})
    rankings.update({axis: [] for axis in AXES})
    for i, st_i in enumerate(st["layers"]):        # each kind's statistic -> scores per axis (METHOD §3.2)
        score = getattr(kind_of(cfg, i), "importance_scores", None)
        for axis, s in ({} if score is None else score(st_i, cfg, mamba_channel_frac=mamba_channel_frac)).items():
            scores[axis].append(s)
            rankings[axis].append(rank_within_groups(s, AXES[axis].groups(cfg)))
    layers = tuple(rank_layers(params, cfg, cached)) if depth else None
    return Importance(scores=scores, rankings=rankings, fingerprint=config_fingerprint(cfg), layers=layers)


# ------------------------------------------------------------------------------ depth
@partial(jax.jit, static_argnums=(2,))
def _masked_logits(params, tokens, cfg, layers, segment_ids):
    return forward(params, tokens, cfg, Widths(layers=layers).resolve(cfg), segment_ids=segment_ids)


def _nmse_parts(full_logits, logits, segment_ids):
    """(Σ (M_full − M)², Σ M_full²) over the valid tokens."""
    err = jnp.square(full_logits - logits)
    ref = jnp.square(full_logits)
    if segment_ids is not None:
        w = (segment_ids > 0).astype(jnp.float32)[..., None]
        err, ref = err * w, ref * w
    return float(jnp.sum(err)), float(jnp.sum(ref))


def rank_layers(params, cfg: NemotronHConfig, batches: Iterable) -> list[int]:
    """Depth ranking by normalized MSE of logits with iterative removal (METHOD §3.3).

    s_j = Σ (M_full − M_{−j})² / Σ M_full² over all calibration tokens, M_{−j} = logits with the
    already-removed layers and layer j bypassed (identity through the residual). The layer with
    the smallest s_j is removed, and the scores are recomputed over the remaining layers against
    the full model's logits. Returns the layers from most to least important (the reverse of the
    removal order); keeping the first n of the list is the depth-n submodel.
    """
    data = [_as_batch(b) for b in batches]
    if not data:
        raise ValueError("rank_layers: `batches` is empty; need at least one calibration batch")
    n = cfg.num_hidden_layers
    full_mask = jnp.ones((n,), bool)
    fulls = [_masked_logits(params, t, cfg, full_mask, s) for t, s in data]
    keep = np.ones(n, bool)
    removed: list[int] = []
    while keep.sum() > 1:
        best, best_s = None, np.inf
        for j in np.flatnonzero(keep):
            m = keep.copy()
            m[j] = False
            num = den = 0.0
            for (t, s), f in zip(data, fulls):
                e, r = _nmse_parts(f, _masked_logits(params, t, cfg, jnp.asarray(m), s), s)
                num += e
                den += r
            score = num / max(den, 1e-30)
            if score < best_s:
                best, best_s = int(j), score
        keep[best] = False
        removed.append(best)
    removed.append(int(np.flatnonzero(keep)[0]))
    return removed[::-1]


# ------------------------------------------------------------------------ permutation
def _is_perm(r, n) -> bool:
    r = np.asarray(r)
    return r.shape == (n,) and np.array_equal(np.sort(r), np.arange(n))


def _checked_ranking(importance: Importance, cfg: NemotronHConfig, axis: str, k: int, layer: int) -> np.ndarray:
    """rankings[axis][k], refused unless it permutes the layer's components within their groups."""
    spec = AXES[axis]
    r, n, g = np.asarray(importance.rankings[axis][k]), full_size(cfg, axis, k), spec.groups(cfg)
    if not _is_perm(r, n):
        raise ValueError(f"Importance.rankings[{axis!r}][{k}] is not a permutation of the {n} {spec.unit} of "
                         f"layer {layer}")
    if g > 1 and not np.array_equal(r // (n // g), np.arange(n) // (n // g)):
        raise ValueError(f"Importance.rankings[{axis!r}][{k}] moves {spec.unit} across {spec.group_name} "
                         f"({spec.group_field}={g}); they must stay in their group")
    return r


def permute_params(params, cfg: NemotronHConfig, importance: Importance) -> dict:
    """The same function with every elastic axis reordered by importance (METHOD §3.4), so every
    nested model is a prefix:

    * hidden: every parameter dimension named "embed" (embedding columns, every residual-stream
      reader and writer, every RMSNorm, the LM head rows);
    * per-layer axes: the dimensions each kind's `select` maps the ranking to (Mamba: heads within
      groups and one head-channel order for every head: z/x/conv_x/norm/out_proj channels and the
      per-head dt/A_log/D/dt_bias, B/C untouched; attention: query heads within KV groups; MLP:
      neurons; MoE: experts within routing groups and the routed-expert width, the shared expert
      untouched).

    Raises ValueError when `importance` belongs to a different config.
    """
    importance.check(cfg)
    D = cfg.hidden_size
    sig_d = np.asarray(importance.rankings["hidden"])
    if not _is_perm(sig_d, D):
        raise ValueError(f"Importance.rankings['hidden'] is not a permutation of {D} channels")
    sig_d = jnp.asarray(sig_d)
    out = {"embed": jnp.take(params["embed"], sig_d, axis=1), "norm_f": jnp.take(params["norm_f"], sig_d, axis=0),
           "lm_head": jnp.take(params["lm_head"], sig_d, axis=0), "layers": []}
    kinds = cfg.kind_index()
    for i in range(cfg.num_hidden_layers):
        kind, k, lp = kind_of(cfg, i), kinds[i], params["layers"][i]
        sel = {a: _checked_ranking(importance, cfg, a, k, i) for a in kind.AXES}
        idx = {d: jnp.asarray(v) for d, v in kind.select(cfg, layer_sizes(cfg, i), sel).items()}
        idx["embed"] = sig_d
        out["layers"].append({"norm": jnp.take(lp["norm"], sig_d, axis=0),
                              "mixer": take_dims(lp["mixer"], kind.params(cfg), idx)})
    return out


def identity_importance(cfg: NemotronHConfig) -> Importance:
    """Rankings that leave every axis in place (scores = descending ramps); handy for tests and for
    models that are already permuted."""
    def ramp(n):
        return np.arange(n, 0, -1, dtype=np.float64)
    sc: dict[str, Any] = {a: [] for a in RANK_AXES}
    sc["hidden"] = ramp(cfg.hidden_size)
    kinds = cfg.kind_index()
    for i in range(cfg.num_hidden_layers):
        for a in kind_of(cfg, i).AXES:
            sc[a].append(ramp(full_size(cfg, a, kinds[i])))
    rk = {a: (np.arange(v.size) if a == "hidden" else [np.arange(x.size) for x in v]) for a, v in sc.items()}
    return Importance(scores=sc, rankings=rk, fingerprint=config_fingerprint(cfg))


def elastify(params, cfg: NemotronHConfig, batches: Iterable, **kw) -> tuple[dict, Importance]:
    """Model preparation in one call (METHOD §3): `estimate_importance` then `permute_params`.
    Returns (permuted params, importance); save the importance with the checkpoint."""
    imp = estimate_importance(params, cfg, batches, **kw)
    return permute_params(params, cfg, imp), imp

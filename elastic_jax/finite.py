"""Finiteness of weight trees: the one check used on loaded, saved and exported weights, on a
checkpoint's state and (in the step's NaN guard) on the new training state.

`nonfinite_leaves(tree)` names each floating leaf holding NaN / inf (jax arrays are reduced on
their devices, one jitted call per tree; numpy arrays in chunks, so no full-size temporary);
`check_finite(tree, what)` raises `NonFiniteError` listing them, unless `allow=True` (the explicit
debugging escape hatch, e.g. the CLI's `--allow-nonfinite`), where it only warns.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .errors import NonFiniteError

_CHUNK = 1 << 22      # elements per host chunk


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _host_finite(x: np.ndarray) -> bool:
    flat = x.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + _CHUNK]).all()) for i in range(0, flat.size, _CHUNK))


_device_all_finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])


def _is_float(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.inexact)


def nonfinite_leaves(tree) -> list[str]:
    """Names (`keystr` paths) of the floating leaves of `tree` that hold a NaN or an inf."""
    named = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if _is_float(x)]
    host = [(p, x) for p, x in named if isinstance(x, np.ndarray)]
    dev = [(p, x) for p, x in named if not isinstance(x, np.ndarray)]
    bad = [_leaf_name(p) for p, x in host if not _host_finite(x)]
    if dev:
        flags = jax.device_get(_device_all_finite([x for _, x in dev]))
        bad += [_leaf_name(p) for (p, _), ok in zip(dev, flags) if not bool(ok)]
    return sorted(bad)


def check_finite(tree, what: str, *, allow: bool = False, hint: str = "") -> None:
    """Raise `NonFiniteError` naming the leaves of `tree` with NaN / inf (`what` says whose);
    with `allow` the same message is a warning instead."""
    bad = nonfinite_leaves(tree)
    if not bad:
        return
    msg = (f"{what}: non-finite values (NaN / inf) in {len(bad)} tensor(s): {', '.join(bad[:8])}"
           + (" ..." if len(bad) > 8 else ""))
    if allow:
        warnings.warn(msg + " (allowed for debugging)", stacklevel=2)
        return
    raise NonFiniteError(msg + (f"; {hint}" if hint else ""))


def check_logits(logits, what: str) -> None:
    """Raise `NonFiniteError` when any row of `logits` [B, ..., V] holds NaN / inf (generation
    would sample garbage, e.g. `<pad>` forever), naming `what` and the rows."""
    ok = np.asarray(jax.device_get(jnp.all(jnp.isfinite(jnp.asarray(logits)).reshape(logits.shape[0], -1), axis=1)))
    if not ok.all():
        rows = np.flatnonzero(~ok).tolist()
        raise NonFiniteError(f"{what}: the logits are not finite (NaN / inf) for batch row(s) {rows[:10]}; "
                             "the weights or activations overflowed, so nothing meaningful can be sampled")

"""Vocabulary-chunked losses over final hidden states (METHOD §6.1).

The lm_head is applied `chunk` columns at a time inside a `lax.scan` whose body is rematerialized
(`jax.checkpoint`), carrying online log-sum-exp statistics of shape [B, L]. Neither the forward nor
the backward pass ever holds more than one [B, L, chunk] block of teacher and student logits, so
a 131k vocabulary never materializes [B, L, V] in f32 (the gradient of the lm_head accumulates
per chunk).

Forward KL at temperature T, teacher first (METHOD §6.1), per token:
    KL = Σ_v p_v (t_v − s_v) − lse(t) + lse(s),   p = softmax(t),  t = z_teacher / T, s = z_student / T
accumulated online: with running maxima m_t, m_s, sums S_t = Σ e^{t−m_t}, S_s = Σ e^{s−m_s} and
A = Σ e^{t−m_t} (t − s) (rescaled by e^{m_old − m_new} when a maximum grows),
    KL = A / S_t − (m_t + log S_t) + (m_s + log S_s).
No T² factor (the official default, T = 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..model.policy import ComputePolicy

HIGHEST = jax.lax.Precision.HIGHEST
_DEFAULT_POLICY = ComputePolicy()


def _chunks(w, chunk: int | None):
    """lm_head [D, V] -> ([n, D, C], valid-column mask [n, C]); zero-padded to a multiple of C."""
    D, V = w.shape
    C = V if chunk is None or chunk >= V else int(chunk)
    n = -(-V // C)
    pad = n * C - V
    if pad:
        w = jnp.pad(w, ((0, 0), (0, pad)))
    valid = (jnp.arange(n * C) < V).reshape(n, C)
    return w.reshape(D, n, C).transpose(1, 0, 2), valid


def _logits(x, w, policy: ComputePolicy):
    """x [B, L, D] @ w [D, C] in the policy's compute dtype / precision, f32 logits."""
    dt = policy.dtype_for(w.dtype)
    return jnp.einsum("bld,dc->blc", x.astype(dt), w.astype(dt), precision=policy.lax_precision(dt),
                      preferred_element_type=jnp.float32)


def chunked_kl(x_teacher, w_teacher, x_student, w_student, *, temperature: float = 1.0,
               chunk: int | None = 8192, policy: ComputePolicy | None = None) -> jax.Array:
    """Per-token KL(teacher ‖ student) [B, L] f32 from final hidden states [B, L, D_t] / [B, L, D_s]
    and lm_heads [D_t, V] / [D_s, V] (teacher and student may differ in width). The lm_head
    matmuls follow `policy` (compute dtype, precision); the softmax statistics are f32."""
    pol = _DEFAULT_POLICY if policy is None else policy
    if w_teacher.shape[1] != w_student.shape[1]:
        raise ValueError(f"teacher vocabulary {w_teacher.shape[1]} != student vocabulary {w_student.shape[1]}")
    wt, valid = _chunks(w_teacher, chunk)
    ws, _ = _chunks(w_student, chunk)
    inv_t = 1.0 / temperature
    B, L = x_student.shape[:2]
    neg = jnp.full((B, L), -jnp.inf, jnp.float32)
    zero = jnp.zeros((B, L), jnp.float32)

    @jax.checkpoint
    def body(carry, inp):
        m_t, s_t, m_s, s_s, acc = carry
        wt_c, ws_c, ok = inp
        t = jnp.where(ok, _logits(x_teacher, wt_c, pol) * inv_t, -jnp.inf)
        s = jnp.where(ok, _logits(x_student, ws_c, pol) * inv_t, -jnp.inf)
        nm_t = jnp.maximum(m_t, jnp.max(t, -1))
        nm_s = jnp.maximum(m_s, jnp.max(s, -1))
        r_t = jnp.exp(m_t - nm_t)
        e_t = jnp.exp(t - nm_t[..., None])
        diff = jnp.where(ok, t - s, 0.0)
        s_t = s_t * r_t + jnp.sum(e_t, -1)
        acc = acc * r_t + jnp.sum(e_t * diff, -1)
        s_s = s_s * jnp.exp(m_s - nm_s) + jnp.sum(jnp.exp(s - nm_s[..., None]), -1)
        return (nm_t, s_t, nm_s, s_s, acc), None

    (m_t, s_t, m_s, s_s, acc), _ = jax.lax.scan(body, (neg, zero, neg, zero, zero), (wt, ws, valid))
    return acc / s_t - (m_t + jnp.log(s_t)) + (m_s + jnp.log(s_s))


def chunked_ce(x, w, targets, *, chunk: int | None = 8192, policy: ComputePolicy | None = None) -> jax.Array:
    """Per-token cross-entropy [B, L] f32 of `targets` [B, L] from hidden states and lm_head."""
    pol = _DEFAULT_POLICY if policy is None else policy
    wc, valid = _chunks(w, chunk)
    B, L = x.shape[:2]

    @jax.checkpoint
    def body(carry, inp):
        m, s = carry
        w_c, ok = inp
        z = jnp.where(ok, _logits(x, w_c, pol), -jnp.inf)
        nm = jnp.maximum(m, jnp.max(z, -1))
        s = s * jnp.exp(m - nm) + jnp.sum(jnp.exp(z - nm[..., None]), -1)
        return (nm, s), None

    (m, s), _ = jax.lax.scan(body, (jnp.full((B, L), -jnp.inf, jnp.float32), jnp.zeros((B, L), jnp.float32)),
                             (wc, valid))
    w_tgt = jnp.take(w.T, targets, axis=0)                                  # [B, L, D]
    dt = pol.dtype_for(w.dtype)
    z_tgt = jnp.einsum("bld,bld->bl", x.astype(dt), w_tgt.astype(dt), precision=pol.lax_precision(dt),
                       preferred_element_type=jnp.float32)
    return m + jnp.log(s) - z_tgt


def next_token_targets(tokens, segment_ids):
    """(targets [B, L], mask [B, L]): position i predicts token i+1 of the same document."""
    tgt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    nseg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    mask = (segment_ids > 0) & (nseg == segment_ids)
    return tgt, mask


def masked_mean(values, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)

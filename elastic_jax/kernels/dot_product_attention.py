"""Scaled dot-product attention kernels (the attention layer kind that calls them is
`model/kinds/attention.py`): GQA, causal + packed-segment masking, in four implementations.

    o[b, l, k, r] = Σ_s softmax_s(scale · q[b, l, k, r] · k[b, s, k])  v[b, s, k]
    over keys s allowed by: k_pos[s] <= q_pos[l]  (causal),  seg_q[b, l] == seg_k[b, s]  (packed
    documents; padding, id 0, attends to padding as before),  k_valid[b, s]  (decode cache).
A row with no allowed key gives 0 (not NaN).

impl:
  "xla"      the reference: f32 scores [B, kv, rep, L, S] in one einsum (what the model always did).
  "blocked"  causal self-attention in query blocks, block i against keys [0, end of block i] only
             (the causal triangle: ~(n+1)/2n of the scores of "xla" for n blocks), the kv-group's
             R query heads folded into the matmul rows ([R·block, D] x [D, S]); exact softmax per
             block (every key of a block's rows is present). Unrolled: at most MAX_BLOCKS blocks.
  "chunked"  flash-style: online softmax over key blocks under `lax.scan`, with a custom VJP that
             recomputes each block in the backward pass; never holds more than [B, kv, rep, L, block]
             scores, forward or backward. Pure XLA, any platform.
  "splash"   Pallas TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention) over kv
             groups (MQA kernel per group = GQA), with segment ids; interpret mode off TPU.
  "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16, no segments).
  "auto"     splash on TPU, cuDNN on GPU where it applies, else chunked; on CPU "blocked" for
             self-attention with L·S <= AUTO_BLOCKED_MAX and the reference for other short calls
             (L·S <= AUTO_DIRECT_MAX, where [L, S] is small and one einsum is faster).
Shapes: q [B, L, K, R, D] (K kv heads, R = heads per kv head), k / v [B, S, K, D]; output f32
[B, L, K, R, D].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from ._common import target_platform

IMPLS = ("auto", "xla", "blocked", "chunked", "splash", "cudnn")
AUTO_DIRECT_MAX = 1024 * 1024      # L·S below which "auto" on CPU keeps the one-einsum reference
AUTO_BLOCKED_MAX = 4096 * 4096     # L·S below which "auto" on CPU runs self-attention "blocked"
BLOCKED_QUERY_BLOCK = 64           # query rows per block of "blocked" (more when L > 64·MAX_BLOCKS)
MAX_BLOCKS = 16
DEFAULT_BLOCK = 512                # key block of the chunked path
HIGHEST = jax.lax.Precision.HIGHEST


def _allowed(q_pos, k_pos, seg_q, seg_k, k_valid):
    """Mask [B or 1, L, S] from query positions [L], key positions [S], segments, key validity."""
    a = (k_pos[None, :] <= q_pos[:, None])[None]
    if seg_q is not None:
        a = a & (seg_q[:, :, None] == seg_k[:, None, :])
    if k_valid is not None:
        a = a & k_valid[:, None, :]
    return a


def reference_attention(q, k, v, q_pos, k_pos, seg_q=None, seg_k=None, k_valid=None, *, scale,
                        precision=HIGHEST, kv_layout="bskd"):
    """The direct path: full scores, softmax, masked rows -> 0. `kv_layout="bksd"`: k / v are
    [B, K, S, D] (a head-major KV cache: the batched dots read it without a transposed copy)."""
    if kv_layout not in ("bskd", "bksd"):
        raise ValueError(f"kv_layout must be 'bskd' or 'bksd', got {kv_layout!r}")
    allowed = _allowed(q_pos, k_pos, seg_q, seg_k, k_valid)[:, None, None]       # [B, 1, 1, L, S]
    scores = jnp.einsum(f"blkrd,{kv_layout}->bkrls", q, k, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(allowed, probs, 0.0)   # rows with no allowed key -> 0, not NaN
    return jnp.einsum(f"bkrls,{kv_layout}->blkrd", probs.astype(v.dtype), v, precision=precision,
                      preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------ blocked (causal)
def blocked_attention(q, k, v, seg=None, *, scale, precision=HIGHEST):
    """Causal self-attention (q_pos = k_pos = arange(L), see the module docstring), f32 output
    [B, L, K, R, D]. Every row sees itself, so no row is empty."""
    B, L, K, R, D = q.shape
    bq = max(BLOCKED_QUERY_BLOCK, -(-L // MAX_BLOCKS))
    q_BKLRD = jnp.transpose(q, (0, 2, 1, 3, 4))
    k_BKSD, v_BKSD = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    outs = []
    for start in range(0, L, bq):
        end = min(L, start + bq)
        q_BKMD = rearrange(q_BKLRD[:, :, start:end], "b kv l r d -> b kv (l r) d")   # M = (query, head) rows
        s = rearrange(jnp.einsum("bkmd,bksd->bkms", q_BKMD, k_BKSD[:, :, :end], precision=precision,
                                 preferred_element_type=jnp.float32), "b kv (l r) s -> b kv l r s", r=R) * scale
        allowed = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None]     # [1, n, end]
        if seg is not None:
            allowed = allowed & (seg[:, start:end, None] == seg[:, None, :end])
        s = jnp.where(allowed[:, None, :, None, :], s, -jnp.inf)
        p = rearrange(jax.nn.softmax(s, axis=-1), "b kv l r s -> b kv (l r) s")
        o = jnp.einsum("bkms,bksd->bkmd", p.astype(v.dtype), v_BKSD[:, :, :end], precision=precision,
                       preferred_element_type=jnp.float32)
        outs.append(rearrange(o, "b kv (l r) d -> b kv l r d", r=R))
    return jnp.transpose(jnp.concatenate(outs, axis=2), (0, 2, 1, 3, 4))


# ------------------------------------------------------------------------------ chunked
def _blocks(x, n, blk, axis):
    """Split `axis` (padded to n·blk with zeros) into a leading block axis."""
    pad = n * blk - x.shape[axis]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
    x = x.reshape(x.shape[:axis] + (n, blk) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _key_blocks(k, v, k_pos, seg_k, k_valid, blk):
    S = k.shape[1]
    n = -(-S // blk)
    valid = jnp.ones((k.shape[0], S), bool) if k_valid is None else k_valid
    kb, vb = _blocks(k, n, blk, 1), _blocks(v, n, blk, 1)                      # [n, B, blk, K, D]
    pb = _blocks(k_pos, n, blk, 0)                                              # [n, blk]
    validb = _blocks(valid, n, blk, 1)                                          # padded keys invalid
    segb = None if seg_k is None else _blocks(seg_k, n, blk, 1)
    return kb, vb, pb, segb, validb


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def chunked_attention(q, k, v, q_pos, k_pos, seg_q, seg_k, k_valid, scale, block, precision):
    """Flash-style attention (see the module docstring); f32 output [B, L, K, R, D]."""
    return _chunked_fwd(q, k, v, q_pos, k_pos, seg_q, seg_k, k_valid, scale, block, precision)[0]


def _scores(q, kb, pos_b, seg_b, valid_b, q_pos, seg_q, scale, precision):
    s = jnp.einsum("blkrd,bskd->bkrls", q, kb, precision=precision, preferred_element_type=jnp.float32) * scale
    allowed = _allowed(q_pos, pos_b, seg_q, seg_b, valid_b)[:, None, None]
    return s, allowed


def _chunked_fwd(q, k, v, q_pos, k_pos, seg_q, seg_k, k_valid, scale, block, precision):
    B, L, K, R, D = q.shape
    blocks = _key_blocks(k, v, k_pos, seg_k, k_valid, min(block, k.shape[1]))

    def body(carry, xs):
        m, l, acc = carry                                          # [B,K,R,L], [B,K,R,L], [B,L,K,R,D]
        kb, vb, pb, sb, validb = xs
        s, allowed = _scores(q, kb, pb, sb, validb, q_pos, seg_q, scale, precision)
        s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)       # a row with nothing yet: no NaN
        p = jnp.exp(s - m_safe[..., None])                         # masked entries: exp(-inf) = 0
        corr = jnp.exp(m - m_safe)
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkrls,bskd->blkrd", p.astype(vb.dtype), vb, precision=precision,
                        preferred_element_type=jnp.float32)
        acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
        return (m_new, l, acc), None

    init = (jnp.full((B, K, R, L), -jnp.inf, jnp.float32), jnp.zeros((B, K, R, L), jnp.float32),
            jnp.zeros((B, L, K, R, D), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, blocks)
    has = l > 0
    o = acc / jnp.moveaxis(jnp.where(has, l, 1.0), -1, 1)[..., None]
    lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), jnp.inf)  # +inf: p = 0 in the backward
    return o, (q, k, v, q_pos, k_pos, seg_q, seg_k, k_valid, o, lse)


def _chunked_bwd(scale, block, precision, res, do):
    q, k, v, q_pos, k_pos, seg_q, seg_k, k_valid, o, lse = res
    S = k.shape[1]
    blk = min(block, S)
    blocks = _key_blocks(k, v, k_pos, seg_k, k_valid, blk)
    do = do.astype(jnp.float32)
    delta = jnp.moveaxis(jnp.sum(do * o, axis=-1), 1, -1)                        # [B,K,R,L]
    do_c = do.astype(q.dtype)

    def body(dq, xs):
        kb, vb, pb, sb, validb = xs
        s, allowed = _scores(q, kb, pb, sb, validb, q_pos, seg_q, scale, precision)
        p = jnp.where(allowed, jnp.exp(s - lse[..., None]), 0.0)                 # [B,K,R,L,blk]
        dv = jnp.einsum("bkrls,blkrd->bskd", p.astype(q.dtype), do_c, precision=precision,
                        preferred_element_type=jnp.float32)
        dp = jnp.einsum("blkrd,bskd->bkrls", do_c, vb, precision=precision, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None])).astype(q.dtype)
        dq = dq + jnp.einsum("bkrls,bskd->blkrd", ds, kb, precision=precision,
                             preferred_element_type=jnp.float32) * scale
        dk = jnp.einsum("bkrls,blkrd->bskd", ds, q, precision=precision, preferred_element_type=jnp.float32) * scale
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), blocks)
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:])[:, :S]
    return (dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
            None, None, None, None, None)


chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)


# ------------------------------------------------------------------------------ splash (TPU)
def _splash_block(L: int) -> int | None:
    for b in (512, 256, 128):
        if L % b == 0:
            return b
    return None


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """Mesh axes (in mesh order) whose product divides the batch: the data-parallel split."""
    axes, n = [], 1
    for name, size in mesh.shape.items():
        if size > 1 and batch % (n * size) == 0:
            axes.append(name)
            n *= size
    return tuple(axes)


def splash_attention(q, k, v, seg=None, *, scale, interpret: bool | None = None):
    """Causal self-attention (q_pos = k_pos = arange(L)) through the Pallas TPU splash kernel:
    one MQA kernel per kv group (GQA), vmapped over batch and kv heads. L must be a multiple of 128.
    `interpret` defaults to True off TPU. Under a context mesh (`jax.set_mesh`) of several devices
    the kernel runs per shard inside `shard_map` (a Mosaic call cannot be partitioned by GSPMD),
    the batch split over the mesh axes that divide it, heads and sequence whole on every shard."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and mesh.size > 1:
        from jax.sharding import PartitionSpec as P
        axes = _batch_axes(mesh, q.shape[0])
        b = None if not axes else axes[0] if len(axes) == 1 else axes
        local = functools.partial(_splash_local, scale=scale, interpret=interpret)
        seg_spec = None if seg is None else P(b, None)
        fn = jax.shard_map(lambda q, k, v, s: local(q, k, v, s), mesh=mesh,
                           in_specs=(P(b, None, None, None, None), P(b, None, None, None), P(b, None, None, None),
                                     seg_spec),
                           out_specs=P(b, None, None, None, None), check_vma=False)
        return fn(q, k, v, seg)
    return _splash_local(q, k, v, seg, scale=scale, interpret=interpret)


def _splash_local(q, k, v, seg, *, scale, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, L, K, R, D = q.shape
    blk = _splash_block(L)
    if blk is None or k.shape[1] != L:
        raise ValueError(f"splash attention needs self-attention with L a multiple of 128, got L={L}, S={k.shape[1]}")
    if interpret is None:
        interpret = target_platform() != "tpu"
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = sa.MultiHeadMask([sa.CausalMask((L, L))] * R)
    kernel = sa.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)
    q_KRLD = jnp.moveaxis((q * jnp.asarray(scale, q.dtype)), 1, 3)           # [B, K, R, L, D]
    k_KSD = jnp.moveaxis(k, 1, 2)                                            # [B, K, S, D]
    v_KSD = jnp.moveaxis(v, 1, 2)

    def one(q_RLD, k_SD, v_SD, seg_L):
        ids = None if seg_L is None else sa.SegmentIds(q=seg_L, kv=seg_L)
        return kernel(q_RLD, k_SD, v_SD, ids)

    over_heads = jax.vmap(one, in_axes=(0, 0, 0, None))
    seg_i = None if seg is None else seg.astype(jnp.int32)
    o = jax.vmap(over_heads, in_axes=(0, 0, 0, None if seg is None else 0))(q_KRLD, k_KSD, v_KSD, seg_i)
    return jnp.moveaxis(o, 3, 1).astype(jnp.float32)                          # [B, L, K, R, D]


# ------------------------------------------------------------------------------ cuDNN (GPU)
def cudnn_attention(q, k, v, *, scale):
    """Causal self-attention through cuDNN (no segments): q [B, L, K, R, D] -> f32 [B, L, K, R, D]."""
    K = q.shape[2]
    # GQA head order: query head kv * R + r uses KV head kv (the grouping slicing keeps per KV group)
    o = jax.nn.dot_product_attention(rearrange(q, "b l kv r d -> b l (kv r) d"), k, v, scale=scale, is_causal=True,
                                     implementation="cudnn")
    return rearrange(o, "b l (kv r) d -> b l kv r d", kv=K).astype(jnp.float32)


# ------------------------------------------------------------------------------ dispatch
def pick_impl(impl: str, *, L: int, S: int, self_attention: bool, segments: bool, dtype) -> str:
    """The implementation "auto" stands for on this platform, for this call (see module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = target_platform()
    if backend == "tpu" and self_attention and _splash_block(L) is not None:
        return "splash"
    if (backend in ("gpu", "cuda") and self_attention and not segments
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
        return "cudnn"
    if backend == "cpu" and self_attention and L * S <= AUTO_BLOCKED_MAX:
        return "blocked"
    if backend == "cpu" and L * S <= AUTO_DIRECT_MAX:
        return "xla"
    return "chunked"


def attend(q, k, v, *, q_pos, k_pos, seg_q=None, seg_k=None, k_valid=None, impl="auto",
           precision=HIGHEST, block: int = DEFAULT_BLOCK):
    """Dispatch (module docstring). Self-attention = the full-sequence case: q_pos is k_pos, no
    cache validity, same segments; splash and cuDNN only serve that case."""
    L, S, D = q.shape[1], k.shape[1], q.shape[-1]
    scale = D ** -0.5
    self_attention = k_valid is None and L == S and seg_q is seg_k
    which = pick_impl(impl, L=L, S=S, self_attention=self_attention, segments=seg_q is not None, dtype=q.dtype)
    if which in ("splash", "cudnn", "blocked") and not self_attention:
        which = "chunked"
    if which == "xla":
        return reference_attention(q, k, v, q_pos, k_pos, seg_q, seg_k, k_valid, scale=scale, precision=precision)
    if which == "blocked":
        return blocked_attention(q, k, v, seg_q, scale=scale, precision=precision)
    if which == "chunked":
        return chunked_attention(q, k, v, q_pos, k_pos, seg_q, seg_k, k_valid, scale, int(block), precision)
    if which == "splash":
        return splash_attention(q, k, v, seg_q, scale=scale)
    if seg_q is not None:
        raise ValueError("attention_impl='cudnn' does not take packed segment_ids; use 'chunked' or 'auto'")
    return cudnn_attention(q, k, v, scale=scale)


__all__ = ["attend", "reference_attention", "blocked_attention", "chunked_attention", "splash_attention", "cudnn_attention",
           "pick_impl", "IMPLS"]

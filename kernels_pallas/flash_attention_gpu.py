"""Flash-attention kernels for NVIDIA GPUs, written for the Pallas Triton lowering.

Backend choice (DESIGN.md, Kernels): jax 0.11 deprecates the Triton lowering in favour of Mosaic GPU, whose
Hopper kernels need warp specialisation and TMA pipelines to pay off. These kernels use Triton because it runs
on every NVIDIA GPU jax supports and lowers without a GPU (a test lowers them for "cuda" on CPU); a Mosaic GPU
forward for Hopper belongs here, behind this module's `forward`/`backward`, once the benchmark says it wins.

Layout: the model's [batch, length, heads, head_dim], read with strided blocks (no transposes). Triton needs
power-of-two tiles, so head_dim is zero-padded to a power of two (at least 16) and sequences to whole blocks;
padded keys are masked and padded queries dropped. Each program owns one query block (forward, dq) or one key
block (dk, dv) and loops over the other axis with `fori_loop`, visiting only the blocks the mask can reach.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.attention_mask import MASK_VALUE, MaskSpec
from kernels_pallas.common import pad_to

_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a [m, d] · b [n, d] -> [m, n]
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))  # a [m, n] · b [m, d] -> [n, d]
_MATMUL = (((1,), (0,)), ((), ()))  # a [m, n] · b [n, d] -> [m, d]


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


class _Geometry:
    def __init__(self, q, k, call, block_q: int, block_k: int):
        for name, block in (("block_q", block_q), ("block_k", block_k)):
            if block < 16 or block & (block - 1):
                raise ValueError(f"flash_attention (gpu): {name}={block} must be a power of two >= 16")
        self.batch, self.q_len, self.num_heads, self.head_dim = q.shape
        self.kv_len, self.num_kv_heads = k.shape[1], k.shape[2]
        self.groups = self.num_heads // self.num_kv_heads
        self.padded_dim = max(16, _next_pow2(self.head_dim))
        self.block_q = min(block_q, max(16, _next_pow2(self.q_len)))
        self.block_k = min(block_k, max(16, _next_pow2(self.kv_len)))
        self.num_q_blocks = -(-self.q_len // self.block_q)
        self.num_kv_blocks = -(-self.kv_len // self.block_k)
        self.mask = MaskSpec(call.causal, call.sliding_window, self.kv_len, self.num_kv_blocks * self.block_k)
        self.warps = 4 if self.padded_dim <= 64 else 8

    def pad(self, x: jax.Array, block: int) -> jax.Array:
        return pad_to(pad_to(x, 3, self.padded_dim), 1, block)

    def params(self, stages: int) -> pltriton.CompilerParams:
        return pltriton.CompilerParams(num_warps=self.warps, num_stages=stages)


def _logits(q, k, q_start, k_start, geo: _Geometry, call, q_seg, kv_seg):
    """(s [bq, bk] f32 after scale and soft-cap, visibility mask or None) for one pair of blocks."""
    s = _dot(q, k, _CONTRACT_LAST) * call.scale
    if call.softcap is not None:
        s = call.softcap * jnp.tanh(s / call.softcap)
    bq, bk = q.shape[0], k.shape[0]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = geo.mask.visible(q_pos, k_pos)
    if q_seg is not None:
        same = q_seg[:, None] == kv_seg[None, :]
        mask = same if mask is None else mask & same
    return s, mask


def _flash_tile(q, k, q_start, k_start, geo: _Geometry, call, q_seg, kv_seg, m_prev):
    """One forward step's weights for a pair of blocks: (p = exp(s - m_next) [bq, bk], the new running max m_next
    [bq], the row sums of p to add to l). The landmark kernel supplies its own (same contract)."""
    s, mask = _logits(q, k, q_start, k_start, geo, call, q_seg, kv_seg)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # junk from fully masked blocks before a row's first visible key is wiped by exp(MASK_VALUE - m) = 0
    p = jnp.exp(s - m_next[:, None])
    return p, m_next, jnp.sum(p, axis=1)


def _forward_kernel(*refs, geo: _Geometry, call, has_segments: bool, tile):
    if has_segments:
        q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), q_seg_ref, kv_seg_ref = refs, None, None
    q_block = pl.program_id(0)
    bq, bk = geo.block_q, geo.block_k
    q = q_ref[...]
    q_seg = q_seg_ref[...] if has_segments else None
    first, last = geo.mask.kv_blocks(q_block, bq, bk, geo.num_kv_blocks)

    def body(kv_block, carry):
        acc, m, l = carry
        start = pl.multiple_of(kv_block * bk, bk)
        kv_seg = kv_seg_ref[pl.ds(start, bk)] if has_segments else None
        p, m_next, added = tile(q, k_ref[pl.ds(start, bk), :], q_block * bq, start, geo, call, q_seg, kv_seg, m)
        correction = jnp.exp(m - m_next)
        v = v_ref[pl.ds(start, bk), :]
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, _MATMUL)
        return acc, m_next, correction * l + added

    init = (
        jnp.zeros((bq, geo.padded_dim), jnp.float32),
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(first, last + 1, body, init)
    l = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def split_segments(segment_ids) -> tuple[jax.Array, jax.Array]:
    """One [B, T] array (self-attention) or a (query [B, Tq], key [B, Tk]) pair of segment ids, as int32."""
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def forward(
    q, k, v, segment_ids, call, *, geo: _Geometry | None = None, tile=_flash_tile, name: str = "flash_attention"
) -> tuple[jax.Array, jax.Array]:
    """q [B, Tq, H, D], k/v [B, Tk, K, D] -> (out [B, Tq, H, D], lse [B, H, Tq] f32). `geo` and `tile` let another
    attention (landmark) run its own per-tile weights on this grid."""
    geo = geo or _Geometry(q, k, call, call.blocks.block_q, call.blocks.block_k)
    bq, dp, groups = geo.block_q, geo.padded_dim, geo.groups
    kv_padded, q_padded = geo.num_kv_blocks * geo.block_k, geo.num_q_blocks * bq
    in_specs = [pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))]
    in_specs += [pl.BlockSpec((None, kv_padded, None, dp), lambda i, b, h: (b, 0, h // groups, 0))] * 2
    args = [geo.pad(q, bq), geo.pad(k, geo.block_k), geo.pad(v, geo.block_k)]
    if segment_ids is not None:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, kv_padded), lambda i, b, h: (b, 0)),
        ]
        q_seg, kv_seg = split_segments(segment_ids)
        args += [pad_to(q_seg, 1, bq, -1), pad_to(kv_seg, 1, geo.block_k, -1)]
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo, call=call, has_segments=segment_ids is not None, tile=tile),
        grid=(geo.num_q_blocks, geo.batch, geo.num_heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((geo.batch, q_padded, geo.num_heads, dp), q.dtype),
            jax.ShapeDtypeStruct((geo.batch, geo.num_heads, q_padded), jnp.float32),
        ],
        compiler_params=geo.params(stages=2),
        interpret=call.interpret,
        name=f"{name}_fwd",
    )(*args)
    return out[:, : geo.q_len, :, : geo.head_dim], lse[:, :, : geo.q_len]


def _probs_and_dscores(q, k, v, do, lse, delta, q_start, k_start, geo, call, q_seg, kv_seg):
    s, mask = _logits(q, k, q_start, k_start, geo, call, q_seg, kv_seg)
    p = jnp.exp(s - lse[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (_dot(do, v, _CONTRACT_LAST) - delta[:, None])
    if call.softcap is not None:
        ds = ds * (1.0 - (s / call.softcap) ** 2)
    return p, ds


def _dkv_kernel(*refs, geo: _Geometry, call, has_segments: bool, tile_grads):
    """One key block of one KV head: loops over (group member, query block) pairs that can see it."""
    if has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), q_seg_ref, kv_seg_ref = refs, None, None
    kv_block = pl.program_id(0)
    bq, bk = geo.block_q, geo.block_k
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...] if has_segments else None
    first, last = geo.mask.q_blocks(kv_block, bq, bk, geo.num_q_blocks)
    span = last - first + 1

    def body(step, carry):
        dk, dv = carry
        member, q_block = step // span, first + step % span
        start = pl.multiple_of(q_block * bq, bq)
        rows = pl.ds(start, bq)
        q, do = q_ref[rows, member, :], do_ref[rows, member, :]
        q_seg = q_seg_ref[rows] if has_segments else None
        p, ds = tile_grads(
            q, k, v, do, lse_ref[member, rows], delta_ref[member, rows], start, kv_block * bk, geo, call, q_seg, kv_seg
        )
        dv = dv + _dot(p.astype(do.dtype), do, _CONTRACT_FIRST)
        return dk + _dot(ds.astype(q.dtype), q, _CONTRACT_FIRST), dv

    zeros = jnp.zeros((bk, geo.padded_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, geo.groups * span, body, (zeros, zeros))
    dk_ref[...] = (dk * call.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, geo: _Geometry, call, has_segments: bool, tile_grads):
    if has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), q_seg_ref, kv_seg_ref = refs, None, None
    q_block = pl.program_id(0)
    bq, bk = geo.block_q, geo.block_k
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = q_seg_ref[...] if has_segments else None
    first, last = geo.mask.kv_blocks(q_block, bq, bk, geo.num_kv_blocks)

    def body(kv_block, dq):
        start = pl.multiple_of(kv_block * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        kv_seg = kv_seg_ref[pl.ds(start, bk)] if has_segments else None
        _, ds = tile_grads(
            q, k, v_ref[pl.ds(start, bk), :], do, lse, delta, q_block * bq, start, geo, call, q_seg, kv_seg
        )
        return dq + _dot(ds.astype(k.dtype), k, _MATMUL)

    dq = lax.fori_loop(first, last + 1, body, jnp.zeros((bq, geo.padded_dim), jnp.float32))
    dq_ref[...] = (dq * call.scale).astype(dq_ref.dtype)


def backward(
    q,
    k,
    v,
    segment_ids,
    lse,
    dout,
    delta,
    call,
    *,
    geo: _Geometry | None = None,
    tile_grads=_probs_and_dscores,
    name: str = "flash_attention",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) given lse and Δ [B, H, Tq] from the forward pass. `geo` and `tile_grads` (the tile's
    weights and dL/d(scores)) as in `forward`."""
    geo = geo or _Geometry(q, k, call, call.blocks.block_q_bwd, call.blocks.block_k_bwd)
    bq, bk, dp, groups = geo.block_q, geo.block_k, geo.padded_dim, geo.groups
    q_padded, kv_padded = geo.num_q_blocks * bq, geo.num_kv_blocks * bk
    qp, dop = geo.pad(q, bq), geo.pad(dout, bq)
    kp, vp = geo.pad(k, bk), geo.pad(v, bk)
    lse_p, delta_p = pad_to(lse, 2, bq), pad_to(delta.astype(jnp.float32), 2, bq)
    has_segments = segment_ids is not None
    if has_segments:
        q_seg, kv_seg = split_segments(segment_ids)
        q_seg, kv_seg = pad_to(q_seg, 1, bq, -1), pad_to(kv_seg, 1, bk, -1)
    kernel_args = dict(geo=geo, call=call, has_segments=has_segments, tile_grads=tile_grads)

    # dk, dv: grid (kv block, batch, kv head); a program reads its group's query heads whole.
    group_rows = pl.BlockSpec((None, q_padded, groups, dp), lambda j, b, kh: (b, 0, kh, 0))
    group_stats = pl.BlockSpec((None, groups, q_padded), lambda j, b, kh: (b, kh, 0))
    key_block = pl.BlockSpec((None, bk, None, dp), lambda j, b, kh: (b, j, kh, 0))
    specs = [group_rows, key_block, key_block, group_rows, group_stats, group_stats]
    args = [qp, kp, vp, dop, lse_p, delta_p]
    if has_segments:
        specs += [
            pl.BlockSpec((None, q_padded), lambda j, b, kh: (b, 0)),
            pl.BlockSpec((None, bk), lambda j, b, kh: (b, j)),
        ]
        args += [q_seg, kv_seg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kernel_args),
        grid=(geo.num_kv_blocks, geo.batch, geo.num_kv_heads),
        in_specs=specs,
        out_specs=[key_block, key_block],
        out_shape=[jax.ShapeDtypeStruct((geo.batch, kv_padded, geo.num_kv_heads, dp), k.dtype)] * 2,
        compiler_params=geo.params(stages=2),
        interpret=call.interpret,
        name=f"{name}_dkv",
    )(*args)

    # dq: grid (q block, batch, head), looping over key blocks.
    query_block = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    all_keys = pl.BlockSpec((None, kv_padded, None, dp), lambda i, b, h: (b, 0, h // groups, 0))
    row_stats = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    specs = [query_block, all_keys, all_keys, query_block, row_stats, row_stats]
    args = [qp, kp, vp, dop, lse_p, delta_p]
    if has_segments:
        specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, kv_padded), lambda i, b, h: (b, 0)),
        ]
        args += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kernel_args),
        grid=(geo.num_q_blocks, geo.batch, geo.num_heads),
        in_specs=specs,
        out_specs=query_block,
        out_shape=jax.ShapeDtypeStruct((geo.batch, q_padded, geo.num_heads, dp), q.dtype),
        compiler_params=geo.params(stages=2),
        interpret=call.interpret,
        name=f"{name}_dq",
    )(*args)
    unpad = lambda x, length: x[:, :length, :, : geo.head_dim]
    return unpad(dq, geo.q_len), unpad(dk, geo.kv_len), unpad(dv, geo.kv_len)

"""Flash-attention kernels for TPU (Mosaic, `pltpu`); also what `impl="interpret"` runs on CPU by default.

Layout inside: [batch, heads, length, head_dim], so a block's last two dims are (length block, head_dim). Blocks are
multiples of 128 (the lane width) and sequences are zero-padded to whole blocks; padded keys are masked, padded
query rows are computed and dropped. Row statistics (m, l, lse, Δ) live lane-broadcast as [rows, 128] f32, the
layout Mosaic stores densely; segment ids come pre-broadcast as [B, T, 128] (queries) and [B, 8, T] (keys).

Forward: grid (batch, heads, q blocks, kv blocks), the last axis sequential with m, l and the f32 accumulator in
VMEM scratch; key blocks a query block does not need are skipped, and their index map repeats a needed block so no
DMA is issued for them. Backward: one kernel for dk, dv over grid (batch, kv heads, kv blocks, groups · q blocks),
so the query heads of a GQA group accumulate into one scratch, and one for dq over the forward's grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.attention_mask import MASK_VALUE, MaskSpec
from kernels_pallas.common import pad_to

LANES = 128
SUBLANES = 8
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a [m, d] · b [n, d] -> [m, n]
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))  # a [m, n] · b [m, d] -> [n, d]


def _block(block: int, length: int, multiple: int = LANES) -> int:
    """The block used for `length`: at most `block`, a multiple of `multiple` (the lane width, or a multiple of it
    that the landmark kernel's groups divide)."""
    if block % multiple or multiple % LANES:
        raise ValueError(f"attention kernel (tpu): block {block} must be a multiple of {multiple} (and of {LANES})")
    return min(block, -(-length // multiple) * multiple)


class _Geometry:
    """Padded shapes, blocks and the index maps shared by the three kernels (and the landmark kernels)."""

    def __init__(self, q, k, call, block_q: int, block_k: int, multiple: int = LANES):
        self.batch, self.q_len, self.num_heads, self.head_dim = q.shape
        self.kv_len, self.num_kv_heads = k.shape[1], k.shape[2]
        self.groups = self.num_heads // self.num_kv_heads
        self.block_q = _block(block_q, self.q_len, multiple)
        self.block_k = _block(block_k, self.kv_len, multiple)
        self.num_q_blocks = -(-self.q_len // self.block_q)
        self.num_kv_blocks = -(-self.kv_len // self.block_k)
        self.mask = MaskSpec(call.causal, call.sliding_window, self.kv_len, self.num_kv_blocks * self.block_k)

    def heads_major(self, x: jax.Array, block: int) -> jax.Array:
        """[B, T, heads, D] -> [B, heads, T_padded, D]."""
        return pad_to(jnp.swapaxes(x, 1, 2), 2, block)

    def rows(self, x: jax.Array) -> jax.Array:
        """A [B, H, Tq] f32 row statistic -> lane-broadcast [B, H, Tq_padded, 128]."""
        x = pad_to(x.astype(jnp.float32), 2, self.block_q)
        return jnp.broadcast_to(x[..., None], (*x.shape, LANES))

    def segments(self, segment_ids) -> tuple[jax.Array, jax.Array]:
        """One [B, T] array (self-attention) or a (query [B, Tq], key [B, Tk]) pair of segment ids."""
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        q_seg = pad_to(q_seg.astype(jnp.int32), 1, self.block_q, value=-1)
        kv_seg = pad_to(kv_seg.astype(jnp.int32), 1, self.block_k, value=-1)
        return (
            jnp.broadcast_to(q_seg[:, :, None], (*q_seg.shape, LANES)),
            jnp.broadcast_to(kv_seg[:, None, :], (kv_seg.shape[0], SUBLANES, kv_seg.shape[1])),
        )

    def kv_block(self, q_block, kv_block):
        """The kv block to fetch at grid step kv_block: itself if needed, else the nearest needed one."""
        first, last = self.mask.kv_blocks(q_block, self.block_q, self.block_k, self.num_kv_blocks)
        return jnp.clip(kv_block, first, last)

    def q_block(self, kv_block, q_block):
        first, last = self.mask.q_blocks(kv_block, self.block_q, self.block_k, self.num_q_blocks)
        return jnp.clip(q_block, first, last)


def _params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _logits(q, k, q_block, kv_block, geo: _Geometry, call, seg_refs):
    """(s [bq, bk] f32 after scale and soft-cap, visibility mask or None) for one pair of blocks."""
    s = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * call.scale
    if call.softcap is not None:
        s = call.softcap * jnp.tanh(s / call.softcap)
    shape = (geo.block_q, geo.block_k)
    q_pos = q_block * geo.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = kv_block * geo.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = geo.mask.visible(q_pos, k_pos)
    if seg_refs is not None:
        q_seg_ref, kv_seg_ref = seg_refs
        same = q_seg_ref[:, :1] == kv_seg_ref[:1, :]
        mask = same if mask is None else mask & same
    return s, mask


def _flash_tile(q, k, q_block, kv_block, geo: _Geometry, call, seg_refs, m_prev):
    """One forward step's weights for a pair of blocks: (p = exp(s - m_next) [bq, bk], the new running max m_next
    [bq, 128], the row sums of p to add to l). The landmark kernel supplies its own (same contract)."""
    s, mask = _logits(q, k, q_block, kv_block, geo, call, seg_refs)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
    # A row that has seen only masked logits carries junk (m = MASK_VALUE) until its first visible key, whose
    # correction factor exp(MASK_VALUE - m) = 0 wipes it; every real row sees at least itself.
    p = jnp.exp(s - m_next[:, :1])
    return p, m_next, jnp.sum(p, axis=1, keepdims=True)


def _forward_kernel(*refs, geo: _Geometry, call, has_segments: bool, tile):
    if has_segments:
        q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
        seg_refs = (q_seg_ref, kv_seg_ref)
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
        seg_refs = None
    q_block, kv_block = pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(geo.kv_block(q_block, kv_block) == kv_block)
    def _step():
        m_prev = m_ref[...]
        p, m_next, added = tile(q_ref[...], k_ref[...], q_block, kv_block, geo, call, seg_refs, m_prev)
        correction = jnp.exp(m_prev - m_next)
        l_ref[...] = correction * l_ref[...] + added
        m_ref[...] = m_next
        v = v_ref[...]
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_ref[...] = acc_ref[...] * correction[:, :1] + pv

    @pl.when(kv_block == geo.num_kv_blocks - 1)
    def _finish():
        l = l_ref[...]
        l = jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = (acc_ref[...] * (1.0 / l)[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log(l)


def forward(q, k, v, segment_ids, call, *, geo=None, tile=_flash_tile, name="flash_attention"):
    """q [B, Tq, H, D], k/v [B, Tk, K, D] -> (out [B, Tq, H, D], lse [B, H, Tq] f32). `geo`, `tile`: another
    kernel's blocks and per-tile weights on this grid (the landmark kernel's)."""
    geo = geo or _Geometry(q, k, call, call.blocks.block_q, call.blocks.block_k)
    bq, bk, d = geo.block_q, geo.block_k, geo.head_dim
    q_map = lambda b, h, i, j: (b, h, i, 0)
    kv_map = lambda b, h, i, j: (b, h // geo.groups, geo.kv_block(i, j), 0)
    in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map)] + [
        pl.BlockSpec((None, None, bk, d), kv_map)
    ]
    args = [geo.heads_major(q, bq), geo.heads_major(k, bk), geo.heads_major(v, bk)]
    if segment_ids is not None:
        in_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, geo.kv_block(i, j))),
        ]
        args += list(geo.segments(segment_ids))
    q_padded = geo.num_q_blocks * bq
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, geo=geo, call=call, has_segments=segment_ids is not None, tile=tile),
        grid=(geo.batch, geo.num_heads, geo.num_q_blocks, geo.num_kv_blocks),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bq, LANES), q_map)],
        out_shape=[
            jax.ShapeDtypeStruct((geo.batch, geo.num_heads, q_padded, d), q.dtype),
            jax.ShapeDtypeStruct((geo.batch, geo.num_heads, q_padded, LANES), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
        compiler_params=_params(),
        interpret=call.interpret,
        name=f"{name}_fwd",
    )(*args)
    return jnp.swapaxes(out[:, :, : geo.q_len], 1, 2), lse[:, :, : geo.q_len, 0]


def _probs_and_dscores(q, k, v, do, lse, delta, q_block, kv_block, geo, call, seg_refs):
    """Recomputes p = exp(s - lse) for a pair of blocks and returns (p, ds), ds = dL/d(scaled logits)."""
    s, mask = _logits(q, k, q_block, kv_block, geo, call, seg_refs)
    p = jnp.exp(s - lse[:, :1])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = lax.dot_general(do, v, _CONTRACT_LAST, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, :1])
    if call.softcap is not None:
        ds = ds * (1.0 - (s / call.softcap) ** 2)
    return p, ds


def _dkv_kernel(*refs, geo: _Geometry, call, has_segments: bool, tile_grads):
    if has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
        seg_refs = (q_seg_ref, kv_seg_ref)
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
        seg_refs = None
    kv_block, step = pl.program_id(2), pl.program_id(3)
    q_block = step % geo.num_q_blocks

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(geo.q_block(kv_block, q_block) == q_block)
    def _step():
        q, do = q_ref[...], do_ref[...]
        p, ds = tile_grads(
            q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], q_block, kv_block, geo, call, seg_refs
        )
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, _CONTRACT_FIRST, preferred_element_type=jnp.float32)
        dk_acc[...] += call.scale * lax.dot_general(
            ds.astype(q.dtype), q, _CONTRACT_FIRST, preferred_element_type=jnp.float32
        )

    @pl.when(step == geo.groups * geo.num_q_blocks - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, geo: _Geometry, call, has_segments: bool, tile_grads):
    if has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref, dq_acc = refs
        seg_refs = (q_seg_ref, kv_seg_ref)
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc = refs
        seg_refs = None
    q_block, kv_block = pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    @pl.when(geo.kv_block(q_block, kv_block) == kv_block)
    def _step():
        k = k_ref[...]
        _, ds = tile_grads(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], q_block, kv_block, geo, call, seg_refs
        )
        dq_acc[...] += call.scale * lax.dot_general(
            ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    @pl.when(kv_block == geo.num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def backward(
    q, k, v, segment_ids, lse, dout, delta, call, *, geo=None, tile_grads=None, name="flash_attention"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) in the input layout, given lse and Δ [B, H, Tq] from the forward pass. `geo`,
    `tile_grads`: another kernel's blocks and per-tile (weights, ds) on these grids (the landmark kernel's)."""
    geo = geo or _Geometry(q, k, call, call.blocks.block_q_bwd, call.blocks.block_k_bwd)
    bq, bk, d, nq = geo.block_q, geo.block_k, geo.head_dim, geo.num_q_blocks
    tensors = [geo.heads_major(q, bq), geo.heads_major(k, bk), geo.heads_major(v, bk), geo.heads_major(dout, bq)]
    tensors += [geo.rows(lse), geo.rows(delta)]
    segs = list(geo.segments(segment_ids)) if segment_ids is not None else []
    has_segments = bool(segs)
    kernel_args = dict(geo=geo, call=call, has_segments=has_segments, tile_grads=tile_grads or _probs_and_dscores)

    # dk, dv: grid (b, kv head, kv block, group * nq + q block)
    q_rows = lambda b, kh, j, t: (b, kh * geo.groups + t // nq, geo.q_block(j, t % nq), 0)
    kv_rows = lambda b, kh, j, t: (b, kh, j, 0)
    dkv_specs = [pl.BlockSpec((None, None, bq, d), q_rows)] + [pl.BlockSpec((None, None, bk, d), kv_rows)] * 2
    dkv_specs += [pl.BlockSpec((None, None, bq, d), q_rows)] + [pl.BlockSpec((None, None, bq, LANES), q_rows)] * 2
    if has_segments:
        dkv_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b, kh, j, t: (b, geo.q_block(j, t % nq), 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, kh, j, t: (b, 0, j)),
        ]
    kv_padded = geo.num_kv_blocks * bk
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kernel_args),
        grid=(geo.batch, geo.num_kv_heads, geo.num_kv_blocks, geo.groups * nq),
        in_specs=dkv_specs,
        out_specs=[pl.BlockSpec((None, None, bk, d), kv_rows)] * 2,
        out_shape=[jax.ShapeDtypeStruct((geo.batch, geo.num_kv_heads, kv_padded, d), k.dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params(),
        interpret=call.interpret,
        name=f"{name}_dkv",
    )(*tensors, *segs)

    # dq: the forward's grid (b, head, q block, kv block)
    q_map = lambda b, h, i, j: (b, h, i, 0)
    kv_map = lambda b, h, i, j: (b, h // geo.groups, geo.kv_block(i, j), 0)
    dq_specs = [pl.BlockSpec((None, None, bq, d), q_map)] + [pl.BlockSpec((None, None, bk, d), kv_map)] * 2
    dq_specs += [pl.BlockSpec((None, None, bq, d), q_map)] + [pl.BlockSpec((None, None, bq, LANES), q_map)] * 2
    if has_segments:
        dq_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, geo.kv_block(i, j))),
        ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kernel_args),
        grid=(geo.batch, geo.num_heads, nq, geo.num_kv_blocks),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((None, None, bq, d), q_map),
        out_shape=jax.ShapeDtypeStruct((geo.batch, geo.num_heads, nq * bq, d), q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(),
        interpret=call.interpret,
        name=f"{name}_dq",
    )(*tensors, *segs)
    unpad = lambda x, length: jnp.swapaxes(x[:, :, :length], 1, 2)
    return unpad(dq, geo.q_len), unpad(dk, geo.kv_len), unpad(dv, geo.kv_len)

"""Landmark attention's grouped softmax for NVIDIA GPUs (Pallas Triton lowering; interpret on CPU).

The same tile mathematics as the TPU kernels (`kernels_pallas.landmark_attention`'s docstring has the forward and
the backward), run on `flash_attention_gpu`'s grids: its forward, dk/dv and dq kernels call this module's per-tile
weights (`_forward_tile`) and gradients (`_weights_and_dscores`) with row statistics as [rows] vectors. The custom
VJP and the input checks are `kernels_pallas.landmark_attention`'s (`target="gpu"`), which regroups around them.

Layout. Triton tiles are powers of two, so a tile can hold whole landmark blocks only if the block size is one. The
expanded sequence is therefore regrouped before the kernels: each block of L = mem_freq + 1 slots is zero-padded to
P = next_pow2(L) slots (the trailing partial block too), so slot s of the input sits at (s // L) · P + s % L. Padded
slots are masked as keys and dropped as queries; the regrouping is plain jnp (its transpose routes gradients back),
and costs P / L of the memory and FLOPs (1.25× at the paper's mem_freq = 50, 1× when L is a power of two).
Tiles are powers of two >= max(16, P), so each holds block_k / P whole groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import flash_attention_gpu as flash_gpu
from kernels_pallas.attention_mask import MASK_VALUE
from kernels_pallas.common import pad_to
from kernels_pallas.flash_attention_gpu import _CONTRACT_LAST, _Geometry, _next_pow2
from kernels_pallas.landmark_attention import _groups

MAX_GROUP = 256  # next_pow2(mem_freq + 1) above this is refused (model.attention.mem_freq)
DEFAULT_BLOCK = 64


def group_slots(mem_freq: int) -> int:
    """P: the slots a landmark block occupies in the kernel's layout, next_pow2(mem_freq + 1)."""
    return _next_pow2(mem_freq + 1)


@dataclasses.dataclass(frozen=True)
class Call:
    """The static part of one call (the fields `flash_attention_gpu._Geometry` reads, and the landmark layout)."""

    mem_freq: int
    length: int  # slots of the expanded sequence before regrouping
    scale: float
    interpret: bool
    block_q: int
    block_k: int
    causal: bool = True
    sliding_window: None = None
    softcap: None = None

    @property
    def group(self) -> int:
        return group_slots(self.mem_freq)


def check(mem_freq: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """The blocks a call uses (default max(64, P)), or a ValueError saying what was expected."""
    group = group_slots(mem_freq)
    if group > MAX_GROUP:
        raise ValueError(
            f"landmark_attention (gpu): mem_freq={mem_freq} needs blocks of next_pow2({mem_freq + 1}) = {group} > "
            f"{MAX_GROUP} slots; choose mem_freq < {MAX_GROUP}"
        )
    blocks = []
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        block = block or max(DEFAULT_BLOCK, group)
        if block < 16 or block & (block - 1) or block % group:
            raise ValueError(
                f"landmark_attention (gpu): {name}={block} must be a power of two >= 16 and a multiple of "
                f"next_pow2(mem_freq+1)={group}"
            )
        blocks.append(block)
    return blocks[0], blocks[1]


def regroup(x: jax.Array, call: Call, value=0) -> jax.Array:
    """[B, S, ...] -> [B, ceil(S / L) · P, ...]: every block of L slots padded to P."""
    size, group = call.mem_freq + 1, call.group
    x = pad_to(x, 1, size, value)
    if group == size:
        return x
    blocks = x.reshape(x.shape[0], -1, size, *x.shape[2:])
    return pad_to(blocks, 2, group, value).reshape(x.shape[0], -1, *x.shape[2:])


def ungroup(x: jax.Array, call: Call) -> jax.Array:
    """The inverse of `regroup` on [B, G · P, ...]."""
    size, group = call.mem_freq + 1, call.group
    blocks = x.reshape(x.shape[0], -1, group, *x.shape[2:])[:, :, :size]
    return blocks.reshape(x.shape[0], -1, *x.shape[2:])[:, : call.length]


def _tile(q, k, q_start, k_start, geo: _Geometry, call: Call, q_seg, kv_seg):
    """Scores s [bq, bk] f32 of one tile pair and the grouped softmax's masks: (s, group of each key lane within
    the tile, local keys, gates (earlier landmarks), members (regular keys of earlier groups))."""
    size, group = call.mem_freq + 1, call.group
    s = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * call.scale
    shape = s.shape
    row = lax.broadcasted_iota(jnp.int32, shape, 0)
    lane = lax.broadcasted_iota(jnp.int32, shape, 1)
    q_pos, k_pos = q_start + row, k_start + lane
    q_group, k_group = lax.div(q_pos, group), lax.div(k_pos, group)
    lane_group = lax.div(lane, group)
    slot = k_pos - k_group * group
    landmark = slot == call.mem_freq
    visible = (slot < size) & (k_group * size + slot < call.length)  # padding slots and the padded tail
    if q_seg is not None:
        visible &= q_seg[:, None] == kv_seg[None, :]
    earlier = visible & (k_group < q_group)
    local = visible & (k_group == q_group) & (k_pos <= q_pos) & ~landmark
    return s, lane_group, local, earlier & landmark, earlier & ~landmark


def _forward_tile(q, k, q_start, k_start, geo: _Geometry, call: Call, q_seg, kv_seg, m_prev):
    """`flash_attention_gpu._flash_tile`'s contract: (w [bq, bk] relative to the new running max, that max [bq],
    the outer-softmax sums to add [bq])."""
    s, lane_group, local, gates, members = _tile(q, k, q_start, k_start, geo, call, q_seg, kv_seg)
    outer = jnp.where(local | gates, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(outer, axis=1))
    m = m_next[:, None]
    w = jnp.where(local, jnp.exp(s - m), 0.0)
    added = jnp.sum(w, axis=1) + jnp.sum(jnp.where(gates, jnp.exp(s - m), 0.0), axis=1)
    for _, e, total, gate in _groups(s, lane_group, gates, members, geo.block_k // call.group):
        w = w + e * (jnp.exp(gate - m) / jnp.where(total > 0.0, total, 1.0))
    return w, m_next, added


def _weights_and_dscores(q, k, v, do, lse, delta, q_start, k_start, geo, call: Call, q_seg, kv_seg):
    """`flash_attention_gpu._probs_and_dscores`'s contract: one tile's weights w and ds = dL/d(scaled scores)."""
    s, lane_group, local, gates, members = _tile(q, k, q_start, k_start, geo, call, q_seg, kv_seg)
    lse, delta = lse[:, None], delta[:, None]
    dp = lax.dot_general(do, v, _CONTRACT_LAST, preferred_element_type=jnp.float32)
    w = jnp.where(local, jnp.exp(s - lse), 0.0)
    ds = w * (dp - delta)
    for lanes, e, total, gate in _groups(s, lane_group, gates, members, geo.block_k // call.group):
        pi = e / jnp.where(total > 0.0, total, 1.0)
        p_gate = jnp.exp(gate - lse)  # 0 where the group is not an earlier block of the row
        u = jnp.sum(pi * dp, axis=1)[:, None]
        w = w + p_gate * pi
        ds = ds + p_gate * pi * (dp - u) + jnp.where(gates & lanes, p_gate * (u - delta), 0.0)
    return w, ds


def _geometry(q, k, call: Call) -> _Geometry:
    return _Geometry(q, k, call, call.block_q, call.block_k)


def forward(q, k, v, segment_ids, call: Call) -> tuple[jax.Array, jax.Array]:
    """Regrouped q [B, G·P, H, D], k/v [B, G·P, K, D] -> (out, lse [B, H, G·P] f32)."""
    geo = _geometry(q, k, call)
    return flash_gpu.forward(q, k, v, segment_ids, call, geo=geo, tile=_forward_tile, name="landmark_attention")


def backward(q, k, v, segment_ids, lse, dout, delta, call: Call):
    geo = _geometry(q, k, call)
    return flash_gpu.backward(
        q,
        k,
        v,
        segment_ids,
        lse,
        dout,
        delta,
        call,
        geo=geo,
        tile_grads=_weights_and_dscores,
        name="landmark_attention",
    )

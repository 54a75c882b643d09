"""Landmark attention's grouped softmax, blockwise: forward and backward Pallas kernels (TPU Mosaic here; the GPU
Triton version, `target="gpu"`, in `landmark_attention_gpu`; interpret mode on CPU).

The specification is the dense form in `lcjax.layers.landmark_attention` (its docstring has the formula). Here the
expanded sequence (a landmark at the last slot of every block of L = mem_freq + 1 slots) is walked in tiles of
`block_q` queries × `block_k` keys; both are multiples of lcm(L, 128), so every tile holds whole landmark blocks
("groups", block_k / L of them) and is lane-aligned. Per query row the kernel keeps the running max m and sum l of
the outer softmax (local keys and gates) and an unnormalised f32 accumulator; for each group of a key tile it also
takes the group's own max and sum of its regular keys (a masked reduction per group, exact however far apart the
groups' scores are), so a key j of an earlier group c contributes with weight e^{g_c − m} · e^{s_j − max_c} / sum_c,
where g_c is the score of c's landmark key; local keys contribute e^{s_j − m} as in flash attention.

Backward (residual: lse = m + log l per row; Δ_i = do_i · o_i): with dp_ij = do_i · v_j,
  local keys        ds_ij = p_ij (dp_ij − Δ_i),                 p_ij = e^{s_ij − lse_i}
  earlier group c   π_ij = softmax over c's regular keys, P_ic = e^{g_ic − lse_i}, u_ic = Σ_j π_ij dp_ij,
                    ds_ij = P_ic π_ij (dp_ij − u_ic)  (members),  ds_{i,lm(c)} = P_ic (u_ic − Δ_i)  (the gate)
  dv = wᵀ do (w the attention weights), dq = scale · ds k, dk = scale · dsᵀ q.
The grids, padding, lane-broadcast row statistics, GQA and causal skip of key tiles are `flash_attention_tpu`'s: its
kernels run here with this module's per-tile weights (`_forward_tile`) and gradients (`_weights_and_dscores`).
Shapes at the boundary: q [B, S, H, D], k/v [B, S, K, D].
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import common
from kernels_pallas import flash_attention_tpu as flash_tpu
from kernels_pallas.attention_mask import MASK_VALUE
from kernels_pallas.flash_attention_tpu import _CONTRACT_LAST, LANES, _Geometry

KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
MAX_TILE = 1024  # lcm(mem_freq + 1, 128) above this is refused (model.attention.mem_freq)


def tile_multiple(mem_freq: int) -> int:
    """The granularity of the kernel's tiles: lcm(L, 128), L = mem_freq + 1."""
    return math.lcm(mem_freq + 1, LANES)


@dataclasses.dataclass(frozen=True)
class Call:
    """The static part of one call (the fields `_Geometry` reads, and the landmark block)."""

    mem_freq: int
    scale: float
    interpret: bool
    block_q: int
    block_k: int
    causal: bool = True
    sliding_window: None = None


def landmark_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mem_freq: int,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    target: str | None = None,
) -> jax.Array:
    """The grouped softmax over one expanded sequence (landmark at slot s iff s % (mem_freq+1) == mem_freq):
    q [B, S, H, D], k/v [B, S, K, D] -> [B, S, H, D]. `segment_ids` [B, S] keep attention inside a document.
    target: the kernel family, "tpu" (Mosaic; blocks default to lcm(mem_freq + 1, 128) and must be multiples of it)
    or "gpu" (Triton, `landmark_attention_gpu`; blocks powers of two, multiples of next_pow2(mem_freq + 1));
    default: "gpu" on a GPU, else "tpu"."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"landmark_attention: q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, S, H, D] and "
            "k, v [B, S, K, D] with H a multiple of K"
        )
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"landmark_attention: dtypes {q.dtype}/{k.dtype}/{v.dtype}; the kernel takes float32 or bfloat16, all alike"
        )
    if mem_freq < 1:
        raise ValueError(f"landmark_attention: mem_freq={mem_freq} must be >= 1")
    target = target or ("gpu" if common.backend() == "gpu" else "tpu")
    if target not in ("tpu", "gpu"):
        raise ValueError(f"landmark_attention: target={target!r}; expected 'tpu' or 'gpu'")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if target == "gpu":
        from kernels_pallas import landmark_attention_gpu as gpu

        block_q, block_k = gpu.check(mem_freq, block_q, block_k)
        call = gpu.Call(mem_freq, q.shape[1], scale, interpret, block_q, block_k)
        seg = None if segment_ids is None else gpu.regroup(segment_ids.astype(jnp.int32), call, value=-1)
        out = _landmark(gpu.regroup(q, call), gpu.regroup(k, call), gpu.regroup(v, call), seg, call)
        return gpu.ungroup(out, call)
    multiple = tile_multiple(mem_freq)
    if multiple > MAX_TILE:
        raise ValueError(
            f"landmark_attention: mem_freq={mem_freq} needs tiles of lcm({mem_freq + 1}, {LANES}) = {multiple} > "
            f"{MAX_TILE} slots; choose mem_freq + 1 dividing a multiple of {LANES} (e.g. 127, 63, 31, 15)"
        )
    call = Call(
        mem_freq=mem_freq,
        scale=scale,
        interpret=interpret,
        block_q=block_q or multiple,
        block_k=block_k or multiple,
    )
    for name, block in (("block_q", call.block_q), ("block_k", call.block_k)):
        if block % multiple:
            raise ValueError(
                f"landmark_attention: {name}={block} must be a multiple of lcm(mem_freq+1, 128)={multiple}"
            )
    return _landmark(q, k, v, segment_ids, call)


def _geometry(q, k, call: Call) -> _Geometry:
    return _Geometry(q, k, call, call.block_q, call.block_k, multiple=tile_multiple(call.mem_freq))


def _group_of(index: jax.Array, size: int, count: int) -> jax.Array:
    """index // size for 0 <= index < size · count, by comparisons (no vector integer division in the kernel)."""
    group = jnp.zeros(index.shape, jnp.int32)
    for c in range(1, count):
        group += (index >= c * size).astype(jnp.int32)
    return group


def _tile(q, k, q_block, kv_block, geo: _Geometry, call: Call, seg_refs):
    """Scores s [bq, bk] f32 of one tile pair and the masks of the grouped softmax: (s, group of each key lane
    within the tile, local keys, gates (earlier landmarks), members (regular keys of earlier groups))."""
    size = call.mem_freq + 1
    bq, bk = geo.block_q, geo.block_k
    s = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * call.scale
    row = lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    lane = lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_pos, k_pos = q_block * bq + row, kv_block * bk + lane
    q_group = q_block * (bq // size) + _group_of(row, size, bq // size)
    lane_group = _group_of(lane, size, bk // size)
    k_group = kv_block * (bk // size) + lane_group
    landmark = lane - lane_group * size == call.mem_freq
    visible = k_pos < geo.kv_len
    if seg_refs is not None:
        q_seg_ref, kv_seg_ref = seg_refs
        visible &= q_seg_ref[:, :1] == kv_seg_ref[:1, :]
    earlier = visible & (k_group < q_group)
    local = visible & (k_group == q_group) & (k_pos <= q_pos) & ~landmark
    return s, lane_group, local, earlier & landmark, earlier & ~landmark


def _groups(s, lane_group, gates, members, num_groups: int):
    """Per group of the key tile: (its lanes, member softmax numerators e [bq, bk], their sums [bq, 1], the gate
    score [bq, 1] (MASK_VALUE where the group is not an earlier block of the row))."""
    for c in range(num_groups):
        lanes = lane_group == c
        mine = members & lanes
        top = jnp.max(jnp.where(mine, s, MASK_VALUE), axis=1, keepdims=True)
        e = jnp.where(mine, jnp.exp(s - top), 0.0)
        total = jnp.sum(e, axis=1, keepdims=True)
        gate = jnp.max(jnp.where(gates & lanes, s, MASK_VALUE), axis=1, keepdims=True)
        yield lanes, e, total, gate


def _forward_tile(q, k, q_block, kv_block, geo: _Geometry, call: Call, seg_refs, m_prev):
    """The forward step's weights of one tile pair on flash attention's grid (`flash_attention_tpu._flash_tile`'s
    contract): (w [bq, bk] relative to the new running max, that max [bq, 128], the outer-softmax sums to add)."""
    s, lane_group, local, gates, members = _tile(q, k, q_block, kv_block, geo, call, seg_refs)
    outer = jnp.where(local | gates, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(outer, axis=1, keepdims=True))  # [bq, 128]
    m = m_next[:, :1]
    w = jnp.where(local, jnp.exp(s - m), 0.0)
    added = jnp.sum(w, axis=1, keepdims=True) + jnp.sum(jnp.where(gates, jnp.exp(s - m), 0.0), axis=1, keepdims=True)
    for _, e, total, gate in _groups(s, lane_group, gates, members, geo.block_k // (call.mem_freq + 1)):
        w = w + e * (jnp.exp(gate - m) / jnp.where(total > 0.0, total, 1.0))
    return w, m_next, added


def forward(q, k, v, segment_ids, call: Call) -> tuple[jax.Array, jax.Array]:
    """-> (out [B, S, H, D], lse [B, H, S] f32), on flash attention's forward grid."""
    geo = _geometry(q, k, call)
    return flash_tpu.forward(q, k, v, segment_ids, call, geo=geo, tile=_forward_tile, name="landmark_attention")


def _weights_and_dscores(q, k, v, do, lse, delta, q_block, kv_block, geo, call, seg_refs):
    """Recomputes one tile's attention weights w and ds = dL/d(scaled scores) (module docstring)."""
    s, lane_group, local, gates, members = _tile(q, k, q_block, kv_block, geo, call, seg_refs)
    lse, delta = lse[:, :1], delta[:, :1]
    dp = lax.dot_general(do, v, _CONTRACT_LAST, preferred_element_type=jnp.float32)
    w = jnp.where(local, jnp.exp(s - lse), 0.0)
    ds = w * (dp - delta)
    for lanes, e, total, gate in _groups(s, lane_group, gates, members, geo.block_k // (call.mem_freq + 1)):
        pi = e / jnp.where(total > 0.0, total, 1.0)
        p_gate = jnp.exp(gate - lse)  # 0 where the group is not an earlier block of the row
        u = jnp.sum(pi * dp, axis=1, keepdims=True)
        w = w + p_gate * pi
        ds = ds + p_gate * pi * (dp - u) + jnp.where(gates & lanes, p_gate * (u - delta), 0.0)
    return w, ds


def backward(q, k, v, segment_ids, lse, dout, delta, call: Call) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) in the input layout, given lse and Δ [B, H, S], on flash attention's backward grids."""
    geo = _geometry(q, k, call)
    return flash_tpu.backward(
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


def _kernels(call):
    """(forward, backward) of the call's kernel family: this module's (TPU) or `landmark_attention_gpu`'s."""
    if isinstance(call, Call):
        return forward, backward
    from kernels_pallas import landmark_attention_gpu as gpu

    return gpu.forward, gpu.backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _landmark(q, k, v, segment_ids, call):
    return _kernels(call)[0](q, k, v, segment_ids, call)[0]


def _landmark_fwd(q, k, v, segment_ids, call):
    out, lse = _kernels(call)[0](q, k, v, segment_ids, call)
    return out, (q, k, v, segment_ids, out, lse)


def _landmark_bwd(call, residuals, dout):
    q, k, v, segment_ids, out, lse = residuals
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    dq, dk, dv = _kernels(call)[1](q, k, v, segment_ids, lse, dout, delta, call)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_landmark.defvjp(_landmark_fwd, _landmark_bwd)

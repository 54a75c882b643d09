"""Ring attention: exact softmax attention with the sequence sharded over a mesh axis.

Each of the N devices on `axis_name` keeps its query block; the key/value blocks travel around the ring with
`lax.ppermute`, one hop per step, and every device merges the blockwise results with an online softmax:

    per block:  m_b = rowmax(S),  l_b = Σ exp(S - m_b),  o_b = exp(S - m_b) V        S = Q K^T · scale, masked
    merge:      m = max(m_1, m_2),  l = e^{m_1 - m} l_1 + e^{m_2 - m} l_2,  o = e^{m_1 - m} o_1 + e^{m_2 - m} o_2
    finally:    out = o / l,  lse = m + log l.

The send of step t+1's block is issued before step t's compute, so XLA can overlap the two. The backward pass
(`custom_vjp`) recomputes P = exp(S - lse) block by block; K, V and their accumulating gradients dK, dV travel
together (dQ stays), and after N hops dK, dV are back on their owner. With GQA only the KV heads travel.

Masks use *global* token indices ("slots"): a key is visible to a query iff (not causal or k_slot <= q_slot) and,
with `segment_ids`, both belong to the same packed document; the segment ids travel with their block.

Causal load balancing is a permutation of the sequence ("layout", `lcjax.parallel.ring_layout`): contiguous,
zigzag (default) or striped.

Entry points: `ring_attention` takes global arrays in natural order and applies and undoes the layout itself;
`ring_attention_local` is the per-device body for callers already inside `shard_map` with data in layout order
(the model path: `permute_for_ring` permutes a batch once, every layer works in layout order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from kernels_pallas import common as kernel_common
from kernels_pallas import flash_attention as flash
from lcjax.parallel.ring_layout import from_layout, local_slots, permutation, step_plan, to_layout

ENGINES = ("auto", "jnp", "pallas")  # how each ring step computes its block: jnp einsums or the flash kernel

# -- blockwise math ---------------------------------------------------------------------------------------------
# q [B, cq, K, G, D] (query heads grouped by their KV head), k/v [B, ck, K, D]; statistics m, l [B, K, G, cq],
# numerators o [B, cq, K, G, D] (float32).


def _mask(q_slots, k_slots, q_seg, k_seg, causal):
    visible = q_seg[:, :, None] == k_seg[:, None, :]  # [B, cq, ck]
    if causal:
        visible &= k_slots[None, None, :] <= q_slots[None, :, None]
    return visible[:, None, None]  # [B, 1, 1, cq, ck]


def _block_stats(q, k, v, q_slots, k_slots, q_seg, k_seg, *, causal, scale):
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    visible = _mask(q_slots, k_slots, q_seg, k_seg, causal)
    s = jnp.where(visible, s, -jnp.inf)
    m = s.max(axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    o = jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(jnp.float32))
    return m, p.sum(axis=-1), o


def _empty_stats(q):
    batch, cq, kv, groups, _ = q.shape
    m = jnp.full((batch, kv, groups, cq), -jnp.inf, jnp.float32)
    return m, jnp.zeros_like(m), jnp.zeros(q.shape, jnp.float32)


def _merge(a, b):
    m1, l1, o1 = a
    m2, l2, o2 = b
    m = jnp.maximum(m1, m2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    a1, a2 = jnp.exp(m1 - m_safe), jnp.exp(m2 - m_safe)
    rows = lambda a: jnp.moveaxis(a, -1, 1)[..., None]  # [B, K, G, q] -> [B, q, K, G, 1]
    return m, a1 * l1 + a2 * l2, rows(a1) * o1 + rows(a2) * o2


def _kernel_call(causal: bool, scale: float, head_dim: int):
    """The flash kernel's static call for one ring block: this backend's kernel family (interpret mode on CPU)."""
    platform = kernel_common.backend()
    target = "gpu" if platform == "gpu" else "tpu"
    return flash.Call(
        causal=causal,
        sliding_window=None,
        softcap=None,
        scale=scale,
        target=target,
        interpret=platform not in ("tpu", "gpu"),
        blocks=flash.BlockSizes.default(target, head_dim),
    )


def _kernel_stats(q, k, v, q_slots, k_slots, q_seg, k_seg, *, causal, scale):
    """`_block_stats` by the Pallas flash kernel: (m, l, o) = (lse, 1, out). `causal` is in local order here (the
    ring's first step); later blocks are non-causal. A row with no visible key gets lse ~ -1e38: weight 0 in the
    merge, since every row sees itself at the first step."""
    del q_slots, k_slots
    batch, cq, kv_heads, groups, head_dim = q.shape
    call = _kernel_call(causal, scale, head_dim)
    out, lse = flash._backend(call.target).forward(
        q.reshape(batch, cq, kv_heads * groups, head_dim), k, v, (q_seg, k_seg), call
    )
    m = lse.reshape(batch, kv_heads, groups, cq)
    return m, jnp.ones_like(m), out.reshape(q.shape).astype(jnp.float32)


def _kernel_grads(q, k, v, do, lse, delta, q_slots, k_slots, q_seg, k_seg, *, causal, scale):
    """`_block_grads` by the Pallas flash kernel's backward (it takes the global lse and delta)."""
    del q_slots, k_slots
    batch, cq, kv_heads, groups, head_dim = q.shape
    heads = kv_heads * groups
    call = _kernel_call(causal, scale, head_dim)
    dq, dk, dv = flash._backend(call.target).backward(
        q.reshape(batch, cq, heads, head_dim),
        k,
        v,
        (q_seg, k_seg),
        lse.reshape(batch, heads, cq),
        do.reshape(batch, cq, heads, head_dim).astype(q.dtype),
        delta.reshape(batch, heads, cq),
        call,
    )
    f32 = lambda x: x.astype(jnp.float32)
    return f32(dq).reshape(q.shape), f32(dk), f32(dv)


def _block_fns(engine, causal, scale, jnp_fn, kernel_fn):
    """(off-diagonal, diagonal) block functions: the kernel needs its causal flag (local order) on the diagonal
    block only; the jnp blocks mask by global slots everywhere."""
    if engine == "pallas":
        return functools.partial(kernel_fn, causal=False, scale=scale), functools.partial(
            kernel_fn, causal=True, scale=scale
        )
    same = functools.partial(jnp_fn, causal=causal, scale=scale)
    return same, same


def _planned_stats(plan, q, k, v, q_slots, k_slots, q_seg, k_seg, *, causal, scale, engine="jnp"):
    half_q, half_k = q.shape[1] // 2, k.shape[1] // 2
    stats, diagonal = _block_fns(engine, causal, scale, _block_stats, _kernel_stats)

    def full(*_):
        return stats(q, k, v, q_slots, k_slots, q_seg, k_seg)

    def local(*_):
        return diagonal(q, k, v, q_slots, k_slots, q_seg, k_seg)

    def key_first_half(*_):
        return stats(q, k[:, :half_k], v[:, :half_k], q_slots, k_slots[:half_k], q_seg, k_seg[:, :half_k])

    def query_second_half(*_):
        m, l, o = stats(q[:, half_q:], k, v, q_slots[half_q:], k_slots, q_seg[:, half_q:], k_seg)
        m0, l0, o0 = _empty_stats(q[:, :half_q])
        return jnp.concatenate([m0, m], -1), jnp.concatenate([l0, l], -1), jnp.concatenate([o0, o], 1)

    def skip(*_):
        return _empty_stats(q)

    return jax.lax.switch(plan, (full, key_first_half, query_second_half, skip, local))


def _block_grads(q, k, v, do, lse, delta, q_slots, k_slots, q_seg, k_seg, *, causal, scale):
    """(dq, dk, dv) contributions of one block, from the final lse and delta = rowsum(dO ∘ O) [B, K, G, q]."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    visible = _mask(q_slots, k_slots, q_seg, k_seg, causal)
    p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
    dv = jnp.einsum("bkgqs,bqkgd->bskd", p, do)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do, v.astype(jnp.float32))
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bkgqs,bskd->bqkgd", ds, k.astype(jnp.float32)) * scale
    dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q.astype(jnp.float32)) * scale
    return dq, dk, dv


def _planned_grads(plan, q, k, v, do, lse, delta, q_slots, k_slots, q_seg, k_seg, *, causal, scale, engine="jnp"):
    half_q, half_k = q.shape[1] // 2, k.shape[1] // 2
    grads, diagonal = _block_fns(engine, causal, scale, _block_grads, _kernel_grads)
    f32 = lambda x: jnp.zeros(x.shape, jnp.float32)

    def full(*_):
        return grads(q, k, v, do, lse, delta, q_slots, k_slots, q_seg, k_seg)

    def local(*_):
        return diagonal(q, k, v, do, lse, delta, q_slots, k_slots, q_seg, k_seg)

    def key_first_half(*_):
        dq, dk, dv = grads(
            q, k[:, :half_k], v[:, :half_k], do, lse, delta, q_slots, k_slots[:half_k], q_seg, k_seg[:, :half_k]
        )
        return dq, jnp.concatenate([dk, f32(dk)], 1), jnp.concatenate([dv, f32(dv)], 1)

    def query_second_half(*_):
        dq, dk, dv = grads(
            q[:, half_q:], k, v, do[:, half_q:], lse[..., half_q:], delta[..., half_q:], q_slots[half_q:], k_slots,
            q_seg[:, half_q:], k_seg,
        )  # fmt: skip
        return jnp.concatenate([f32(dq), dq], 1), dk, dv

    def skip(*_):
        return f32(q), f32(k), f32(v)

    return jax.lax.switch(plan, (full, key_first_half, query_second_half, skip, local))


# -- the ring ---------------------------------------------------------------------------------------------------


def _shift(tree, axis_name, num_shards):
    return jax.lax.ppermute(tree, axis_name, [(i, (i + 1) % num_shards) for i in range(num_shards)])


def _forward(q, k, v, q_seg, k_seg, axis_name, num_shards, layout, causal, scale, engine):
    rank = jax.lax.axis_index(axis_name)
    block = q.shape[1]
    q_slots = local_slots(layout, rank, num_shards, block)

    def compute(stats, step, kv):
        k, v, k_seg = kv
        source = (rank - step) % num_shards
        k_slots = local_slots(layout, source, num_shards, block)
        plan = step_plan(layout, causal, step, rank, num_shards)
        new = _planned_stats(plan, q, k, v, q_slots, k_slots, q_seg, k_seg, causal=causal, scale=scale, engine=engine)
        return _merge(stats, new)

    def body(carry, step):
        stats, kv = carry
        incoming = _shift(kv, axis_name, num_shards)  # issued before this step's compute: they can overlap
        return (compute(stats, step, kv), incoming), None

    stats = _empty_stats(q)
    (stats, kv), _ = jax.lax.scan(body, (stats, (k, v, k_seg)), jnp.arange(num_shards - 1))
    m, l, o = compute(stats, num_shards - 1, kv)
    l_safe = jnp.where(l > 0, l, 1.0)
    out = o / jnp.moveaxis(l_safe, -1, 1)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _ring(q, k, v, q_seg, k_seg, axis_name, num_shards, layout, causal, scale, engine):
    return _forward(q, k, v, q_seg, k_seg, axis_name, num_shards, layout, causal, scale, engine)


def _ring_fwd(q, k, v, q_seg, k_seg, axis_name, num_shards, layout, causal, scale, engine):
    out, lse = _forward(q, k, v, q_seg, k_seg, axis_name, num_shards, layout, causal, scale, engine)
    return (out, lse), (q, k, v, q_seg, k_seg, out, lse)


def _ring_bwd(axis_name, num_shards, layout, causal, scale, engine, residuals, cotangents):
    q, k, v, q_seg, k_seg, out, lse = residuals
    do, dlse = cotangents
    do = do.astype(jnp.float32)
    # d/dS of Σ dlse·lse is dlse·P: folding it into delta gives dS = P ∘ (dP - (delta - dlse))
    delta = jnp.moveaxis(jnp.sum(do * out.astype(jnp.float32), axis=-1), 1, -1) - dlse
    rank = jax.lax.axis_index(axis_name)
    block = q.shape[1]
    q_slots = local_slots(layout, rank, num_shards, block)

    def compute(dq, step, kv, dkv):
        k, v, k_seg = kv
        source = (rank - step) % num_shards
        k_slots = local_slots(layout, source, num_shards, block)
        plan = step_plan(layout, causal, step, rank, num_shards)
        dq_b, dk_b, dv_b = _planned_grads(
            plan, q, k, v, do, lse, delta, q_slots, k_slots, q_seg, k_seg, causal=causal, scale=scale, engine=engine
        )
        return dq + dq_b, (dkv[0] + dk_b, dkv[1] + dv_b)

    def body(carry, step):
        dq, kv, dkv = carry
        incoming = _shift(kv, axis_name, num_shards)
        dq, dkv = compute(dq, step, kv, dkv)
        return (dq, incoming, _shift(dkv, axis_name, num_shards)), None

    dq = jnp.zeros(q.shape, jnp.float32)
    dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dq, kv, dkv), _ = jax.lax.scan(body, (dq, (k, v, k_seg), dkv), jnp.arange(num_shards - 1))
    dq, dkv = compute(dq, num_shards - 1, kv, dkv)
    dk, dv = _shift(dkv, axis_name, num_shards)  # the N-th hop brings dK, dV home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    axis_name: str,
    num_shards: int,
    layout: str = "zigzag",
    causal: bool = False,
    scale: float | None = None,
    engine: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Per-device ring attention, called inside `shard_map` over `axis_name` with data in `layout` order.

    q [B, c, H, D], k/v [B, c, K, D] (H % K == 0), segment_ids [B, c] or None: this device's blocks. `engine`
    computes each block: "jnp" (einsums), "pallas" (the flash kernel's forward and backward, interpret mode on CPU;
    the striped layout's strictly-causal blocks have no kernel mask, so striped uses jnp) or "auto" (pallas on TPU,
    where it needs far less memory than jnp blocks, jnp elsewhere).
    Returns (out [B, c, H, D] in q's dtype, lse [B, H, c] float32, natural log).
    """
    batch, block, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of KV heads {kv_heads}")
    if layout == "zigzag" and block % 2:
        raise ValueError(f"the zigzag layout needs an even block per device, got {block}")
    if engine not in ENGINES:
        raise ValueError(f"unknown ring engine {engine!r}; expected one of {ENGINES}")
    if engine == "auto":
        engine = "pallas" if kernel_common.backend() == "tpu" else "jnp"
    if engine == "pallas" and causal and layout == "striped":
        kernel_common.say_once("ring attention: the striped layout has no Pallas block engine; using jnp blocks")
        engine = "jnp"
    scale = head_dim**-0.5 if scale is None else float(scale)
    seg = jnp.zeros((batch, block), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    qg = q.reshape(batch, block, kv_heads, heads // kv_heads, head_dim)
    out, lse = _ring(qg, k, v, seg, seg, axis_name, num_shards, layout, causal, scale, engine)
    return out.reshape(q.shape), lse.reshape(batch, heads, block)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str = "sequence",
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    layout: str = "zigzag",
    scale: float | None = None,
    batch_axes: str | tuple[str, ...] | None = None,
    head_axis: str | None = None,
    engine: str = "auto",
) -> jax.Array:
    """Exact attention with the sequence sharded over `mesh`'s `axis_name`, on global arrays in natural order.

    q [batch, length, heads, head_dim], k/v [batch, length, kv_heads, head_dim]; segment_ids [batch, length]
    (packed documents: attention stays within a document) or None; `scale=None` means head_dim ** -0.5. The
    layout permutation is applied to the inputs and undone on the output. `batch_axes` / `head_axis` optionally
    shard batch and heads over other mesh axes as well. `engine` computes each block: "auto", "jnp" or "pallas" (see
    `ring_attention_local`). Returns [batch, length, heads, head_dim].
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"expected q [B, T, H, D] and k, v [B, T, K, D] with the same B, T, D; got {q.shape}, {k.shape}, {v.shape}"
        )
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis_name!r}; its axes are {mesh.axis_names}")
    num_shards = mesh.shape[axis_name]
    perm = permutation(q.shape[1], num_shards, layout)
    spec = PartitionSpec(batch_axes, axis_name, head_axis, None)
    seg_spec = PartitionSpec(batch_axes, axis_name)
    explicit = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis_name] == jax.sharding.AxisType.Explicit
    place = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint
    put = lambda x, s: place(x, NamedSharding(mesh, s))
    body = functools.partial(
        ring_attention_local,
        axis_name=axis_name,
        num_shards=num_shards,
        layout=layout,
        causal=causal,
        scale=scale,
        engine=engine,
    )
    args = [put(to_layout(x, perm), spec) for x in (q, k, v)]
    if segment_ids is None:
        fn = lambda q, k, v: body(q, k, v)[0]
        in_specs = (spec, spec, spec)
    else:
        fn = lambda q, k, v, seg: body(q, k, v, seg)[0]
        in_specs = (spec, spec, spec, seg_spec)
        args.append(put(to_layout(segment_ids, perm), seg_spec))
    out = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)
    if explicit:  # an Explicit axis cannot gather along itself implicitly: undo the layout with the sequence gathered
        out = put(out, PartitionSpec(batch_axes, None, head_axis, None))
    return from_layout(out, perm)

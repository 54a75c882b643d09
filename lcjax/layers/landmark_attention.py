"""Landmark attention (Mohtashami & Jaggi, 2023): the grouped softmax, and the token layout it needs.

Layout. After every `mem_freq` regular tokens the model inserts one landmark (a learned embedding), so slot s of the
expanded sequence is in block s // L, L = mem_freq + 1, and the last slot of a complete block is its landmark. A row
of T regular tokens becomes T + T // mem_freq slots (a trailing partial block has no landmark). The insertion is the
model's (`insert`, `remove`): batches, losses, bits/byte and every eval task keep regular tokens only.

Grouped softmax (the specification; scores s_ij = scale · q_i·k_j after RoPE). For query slot i in block b:
  local keys   A_i = {j in block b, j <= i, j not a landmark}           (a query never reads its own landmark)
  gates        s_{i, lm(c)} for every complete earlier block c < b      (the landmark key of block c)
  Z_i          = Σ_{j in A_i} e^{s_ij} + Σ_{c<b} e^{s_{i,lm(c)}}
  w_ij         = e^{s_ij} / Z_i                                          j in A_i
  w_ij         = e^{s_{i,lm(c)}} / Z_i · softmax_{j' in R(c)}(s_ij')_j   j a regular token of block c < b
  w_{i,lm(c)}  = 0                                                       (landmark values are never read)
  o_i          = Σ_j w_ij v_j;  every row of w sums to 1.
Packed documents: a key is visible only inside the query's document (`segment_ids`), gates included. A landmark
carries the document of the token before it, so a block that straddles a document boundary is split: the later
document sees its own part of it gated by the block's landmark, the earlier one never sees the block as an earlier
block, and no document reads another (`tests/layers/test_landmark_attention.py`).

`weights` / `attend` are the dense form over explicit slots (the parallel form and the KV-cache form share them);
`causal_landmark_attention` is the parallel core that `attention.impl=landmark` runs: this dense form
(`landmark_impl=xla`) or the blockwise Pallas kernel (`kernels_pallas.landmark_attention`: Mosaic on TPU, Triton on
GPU; `auto`: the kernel on TPU when mem_freq allows it, else the dense form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def num_slots(num_tokens: int, mem_freq: int) -> int:
    """Slots of the expanded sequence for `num_tokens` regular tokens."""
    return num_tokens + num_tokens // mem_freq


def token_slots(tokens: jax.Array, mem_freq: int) -> jax.Array:
    """The expanded slot of regular token index t: t + t // mem_freq."""
    return tokens + tokens // mem_freq


def is_landmark_slot(slots: jax.Array, mem_freq: int) -> jax.Array:
    return slots % (mem_freq + 1) == mem_freq


def insert(
    x: jax.Array, landmark: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, mem_freq: int
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Regular inputs x [B, T, d] -> the expanded sequence [B, T + T // mem_freq, d] with `landmark` [d] after every
    `mem_freq` tokens; positions restart at each document start as in the batch (counting landmarks), and each
    landmark takes the document of the token before it."""
    batch, length = x.shape[:2]
    total = num_slots(length, mem_freq)
    slots = jnp.arange(total)
    lm = is_landmark_slot(slots, mem_freq)
    # the regular token at each slot; a landmark points at the token before it (its document, its position)
    source = jnp.where(lm, slots - slots // (mem_freq + 1) - 1, slots - slots // (mem_freq + 1))
    out = jnp.where(lm[None, :, None], landmark.astype(x.dtype), jnp.take(x, source, axis=1))
    # positions: the slot minus the slot of the document's first token
    doc_start = jnp.arange(length)[None, :] - positions  # [B, T] regular index of each token's document start
    start_slot = token_slots(jnp.take(doc_start, source, axis=1), mem_freq)
    new_positions = slots[None, :] - start_slot
    new_segments = None if segment_ids is None else jnp.take(segment_ids, source, axis=1)
    return out, new_positions.astype(positions.dtype), new_segments


def remove(h: jax.Array, num_tokens: int, mem_freq: int) -> jax.Array:
    """The expanded hidden states [B, S, ...] back at the regular tokens' slots: [B, num_tokens, ...]."""
    return jnp.take(h, token_slots(jnp.arange(num_tokens), mem_freq), axis=1)


def weights(
    q: jax.Array,
    k: jax.Array,
    q_slots: jax.Array,
    *,
    mem_freq: int,
    scale: float,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    num_keys: int | None = None,
) -> jax.Array:
    """The grouped-softmax weights [B, kv_heads, groups, Tq, S] (f32; f64 for f64 inputs) of queries
    q [B, Tq, H, D] at expanded slots `q_slots` [B, Tq] over keys k [B, S, K, D] at slots 0..S-1 (H % K == 0).
    Keys at slots >= `num_keys` (default S) and later than a query are invisible; `*_segments` [B, Tq] / [B, S]
    restrict attention to a document."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    block = mem_freq + 1
    num_blocks = -(-kv_len // block)
    pad = num_blocks * block - kv_len
    kf = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qg = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # f32, or f64 for the float64 oracles
    s = jnp.einsum("btkgd,bskd->bkgts", qg, kf, preferred_element_type=acc) * scale
    s = s.reshape(*s.shape[:-1], num_blocks, block)  # [B, K, G, Tq, blocks, L]

    k_slot = jnp.arange(num_blocks * block).reshape(num_blocks, block)
    valid = k_slot < (kv_len if num_keys is None else num_keys)  # [blocks, L]
    q_block = (q_slots // block)[:, :, None, None]  # [B, Tq, 1, 1]
    k_block = jnp.arange(num_blocks)[:, None]
    regular = jnp.arange(block) < mem_freq  # [L]
    same = True
    if q_segments is not None:
        k_seg = jnp.pad(k_segments, ((0, 0), (0, pad)), constant_values=-1).reshape(batch, num_blocks, block)
        same = q_segments[:, :, None, None] == k_seg[:, None]  # [B, Tq, blocks, L]
    visible = valid & same
    local = visible & regular & (k_block == q_block) & (k_slot <= q_slots[:, :, None, None])
    members = visible & regular & (k_block < q_block)
    gates = (visible & ~regular & (k_block < q_block))[..., block - 1]  # [B, Tq, blocks]
    local, members, gates = (m[:, None, None] for m in (local, members, gates))  # broadcast over heads

    gate_s = jnp.where(gates, s[..., block - 1], _MASK_VALUE)
    local_s = jnp.where(local, s, _MASK_VALUE)
    m = jnp.maximum(gate_s.max(axis=-1), local_s.max(axis=(-2, -1)))[..., None]
    e_gate = jnp.where(gates, jnp.exp(gate_s - m), 0.0)  # [..., blocks]
    e_local = jnp.where(local, jnp.exp(local_s - m[..., None]), 0.0)  # [..., blocks, L]
    z = e_gate.sum(-1) + e_local.sum(axis=(-2, -1))
    z = jnp.where(z == 0.0, 1.0, z)[..., None]  # a padding query that sees nothing
    member_s = jnp.where(members, s, _MASK_VALUE)
    e_member = jnp.where(members, jnp.exp(member_s - member_s.max(-1, keepdims=True)), 0.0)
    group_sum = e_member.sum(-1, keepdims=True)
    pi = e_member / jnp.where(group_sum == 0.0, 1.0, group_sum)
    w = e_local / z[..., None] + (e_gate / z)[..., None] * pi
    return w.reshape(*w.shape[:-2], num_blocks * block)[..., :kv_len]


def attend(w: jax.Array, v: jax.Array) -> jax.Array:
    """Weights [B, K, G, Tq, S] from `weights` and values [B, S, K, D] -> outputs [B, Tq, K·G, D] in v's dtype."""
    acc = jnp.promote_types(w.dtype, v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", w, v.astype(acc), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(*out.shape[:2], -1, out.shape[-1]).astype(v.dtype)


def reference(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, mem_freq: int, scale: float
) -> jax.Array:
    """The dense grouped softmax over one expanded sequence: q [B, S, H, D], k/v [B, S, K, D] -> [B, S, H, D]."""
    slots = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    w = weights(q, k, slots, mem_freq=mem_freq, scale=scale, q_segments=segment_ids, k_segments=segment_ids)
    return attend(w, v).astype(q.dtype)


IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str, mem_freq: int) -> str:
    """`attention.landmark_impl` -> "xla" or "pallas": auto is the kernel on TPU when its tiles can hold whole
    blocks of mem_freq + 1 slots, else the dense form. On GPU auto stays the dense form: the Triton kernel is
    checked in interpret mode and lowered for CUDA here, but has not yet been compiled and timed on a GPU
    (`landmark_impl=pallas` runs it)."""
    if impl != "auto":
        return impl
    from kernels_pallas import common
    from kernels_pallas.landmark_attention import MAX_TILE, tile_multiple

    return "pallas" if common.backend() == "tpu" and tile_multiple(mem_freq) <= MAX_TILE else "xla"


def causal_landmark_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    mem_freq: int,
    scale: float,
    impl: str,
) -> jax.Array:
    """The parallel core of `attention.impl=landmark` on the expanded sequence: `impl` "xla" (the dense form
    above) or "pallas" (the blockwise kernel: Mosaic on TPU, Triton on GPU, interpret mode on CPU)."""
    if resolve_impl(impl, mem_freq) == "xla":
        return reference(q, k, v, segment_ids, mem_freq=mem_freq, scale=scale)
    from kernels_pallas import common
    from kernels_pallas.landmark_attention import landmark_attention

    platform = common.backend()
    if platform == "cpu":
        common.say_once("model.attention.landmark_impl=pallas: no TPU or GPU; running the kernel in interpret mode")
    return landmark_attention(
        q, k, v, segment_ids=segment_ids, mem_freq=mem_freq, scale=scale, interpret=platform not in ("tpu", "gpu")
    )


RETRIEVAL_MODES = ("per_token_and_head", "max_over_tokens")


def retrieval_attention(
    q: jax.Array,
    q_raw: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_slots: jax.Array,
    *,
    mem_freq: int,
    scale: float,
    top_k: int,
    mode: str,
    rope,
) -> jax.Array:
    """Inference with retrieval (the paper's §3.2): each query attends to its own block (locally, as in training)
    and to the `top_k` earlier complete blocks whose landmark keys score highest for it, gated by those landmarks
    in the same grouped softmax. q [B, n, H, D] is rotated at the queries' slots, q_raw the same queries before
    RoPE; the caches hold keys *before* RoPE [B, S, K, D] and values, at expanded slots 0..S-1.

    Selection (`select_blocks`): the score of block c is q · k_lm(c) with every landmark key one block (L slots)
    behind the query, so distance does not bias it; `mode` "per_token_and_head" picks per query and head,
    "max_over_tokens" once per head for the whole chunk (each block's best score over the chunk's queries; a query
    uses those of the chosen blocks that are earlier than its own, so early queries of a long chunk may read fewer
    than k). Fewer earlier blocks than `top_k`: all of them (clamped). Positions ("stingy"): the chosen blocks, in
    their original order, take the k block slots just before the query's own block, so no key sits farther back
    than k blocks. With `top_k` >= every block, the chosen blocks are all of them at their own positions and the
    output is the training form's. The host-offloaded cache runs the same selection and `attend_blocks` on the
    blocks `fetch_blocks` copied to the device."""
    block = mem_freq + 1
    batch = q.shape[0]
    kc, vc = as_blocks(k_cache, block), as_blocks(v_cache, block)
    num_blocks = kc.shape[1]
    chosen, usable, new_block = select_blocks(
        q_raw, kc[:, :, mem_freq], q_slots, mem_freq=mem_freq, top_k=top_k, mode=mode, rope=rope
    )
    where = jnp.broadcast_to(jnp.arange(num_blocks), (batch, num_blocks))
    return attend_blocks(
        q, kc, vc, where, chosen, usable, new_block, q_slots, mem_freq=mem_freq, scale=scale, rope=rope
    )


def as_blocks(cache: jax.Array, block: int) -> jax.Array:
    """A cache [B, S, K, D] of expanded slots as blocks [B, ceil(S / L), L, K, D] (the last one padded)."""
    num_blocks = -(-cache.shape[1] // block)
    pad = num_blocks * block - cache.shape[1]
    cache = jnp.pad(cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return cache.reshape(cache.shape[0], num_blocks, block, *cache.shape[2:])


def select_blocks(q_raw, lm_keys, q_slots, *, mem_freq: int, top_k: int, mode: str, rope):
    """Top-k selection from the landmark keys alone (`retrieval_attention`): queries before RoPE q_raw [B, n, H, D],
    every block's landmark key before RoPE lm_keys [B, blocks, K, D]. Returns (chosen, usable, new_block), each
    [B, n, H, k] with k = min(top_k, blocks): the chosen block ids in ascending order (unusable ones last, clamped to a
    valid id), whether each is an earlier complete block of the query, and the block slot it is read at."""
    block = mem_freq + 1
    num_heads = q_raw.shape[2]
    num_blocks, kv_heads = lm_keys.shape[1], lm_keys.shape[2]
    acc = jnp.promote_types(q_raw.dtype, jnp.float32)
    q_block = q_slots // block  # [B, n]
    q_sel = rope(q_raw, jnp.full(q_raw.shape[:2], block, jnp.int32))  # q one block ahead of every landmark key
    lm = jnp.repeat(lm_keys, num_heads // kv_heads, axis=-2)  # [B, blocks, H, D]
    sel = jnp.einsum("bnhd,bchd->bnhc", q_sel, lm, preferred_element_type=acc)
    earlier = jnp.arange(num_blocks)[None, None, :] < q_block[:, :, None]  # [B, n, blocks] complete, earlier
    sel = jnp.where(earlier[:, :, None, :], sel, -jnp.inf)
    if mode == "max_over_tokens":
        sel = jnp.broadcast_to(sel.max(axis=1, keepdims=True), sel.shape)
    k = min(top_k, num_blocks)
    best, chosen = jax.lax.top_k(sel, k)  # [B, n, H, k]
    # a chosen block is used only if it is an earlier block of this query (clamping k to what exists)
    usable = jnp.isfinite(best) & jnp.take_along_axis(
        jnp.broadcast_to(earlier[:, :, None, :], sel.shape), chosen, axis=-1
    )
    chosen = jnp.where(usable, chosen, num_blocks)  # unusable ones sort last
    order = jnp.argsort(chosen, axis=-1)
    chosen, usable = jnp.take_along_axis(chosen, order, -1), jnp.take_along_axis(usable, order, -1)
    chosen = jnp.minimum(chosen, num_blocks - 1)
    count = usable.sum(-1, keepdims=True)  # [B, n, H, 1]
    new_block = q_block[:, :, None, None] - count + jnp.arange(k)  # the k block slots before the own block
    return chosen, usable, new_block


def attend_blocks(q, kb, vb, where, chosen, usable, new_block, q_slots, *, mem_freq: int, scale: float, rope):
    """The retrieval softmax (`retrieval_attention`) over blocks kb/vb [B, U, L, K, D] (keys before RoPE), where
    `where` [B, blocks] is the row of kb holding each block id (every block the queries read: their chosen ones and
    their own)."""
    block = mem_freq + 1
    batch, n, num_heads, head_dim = q.shape
    groups = num_heads // kb.shape[3]
    num_blocks = where.shape[1]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    heads_of = lambda x: jnp.repeat(x, groups, axis=-2)  # [..., K, D] -> [..., H, D]
    q_block = q_slots // block
    rows = jnp.arange(batch)[:, None, None, None]
    # the chosen blocks' keys and values [B, n, H, k, L, D], keys rotated at their new slots
    head_idx = (jnp.arange(num_heads) // groups)[None, None, :, None]
    gather = lambda cache: cache[rows, where[rows, chosen], :, head_idx]
    k_ret, v_ret = gather(kb), gather(vb)
    k_pos = new_block[..., None] * block + jnp.arange(block)  # [B, n, H, k, L]
    k_ret = rope(k_ret.reshape(batch, -1, 1, head_dim), k_pos.reshape(batch, -1)).reshape(k_ret.shape)
    s_ret = jnp.einsum("bnhd,bnhkld->bnhkl", q, k_ret, preferred_element_type=acc) * scale
    # the own block: keys at their own slots, causal, landmark excluded
    own_slots = q_block[..., None] * block + jnp.arange(block)  # [B, n, L]
    own_row = where[jnp.arange(batch)[:, None], jnp.minimum(q_block, num_blocks - 1)]  # [B, n]
    k_own = heads_of(kb[jnp.arange(batch)[:, None], own_row])  # [B, n, L, H, D]
    v_own = heads_of(vb[jnp.arange(batch)[:, None], own_row])
    k_own = rope(k_own.reshape(batch, -1, num_heads, head_dim), own_slots.reshape(batch, -1)).reshape(k_own.shape)
    s_own = jnp.einsum("bnhd,bnlhd->bnhl", q, k_own, preferred_element_type=acc) * scale
    local = (own_slots <= q_slots[..., None]) & (jnp.arange(block) < mem_freq)  # [B, n, L]
    local = local[:, :, None, :]

    gate = jnp.where(usable, s_ret[..., mem_freq], _MASK_VALUE)  # [B, n, H, k]
    own = jnp.where(local, s_own, _MASK_VALUE)
    m = jnp.maximum(gate.max(-1), own.max(-1))[..., None]
    e_gate = jnp.where(usable, jnp.exp(gate - m), 0.0)
    e_own = jnp.where(local, jnp.exp(own - m), 0.0)
    z = e_gate.sum(-1, keepdims=True) + e_own.sum(-1, keepdims=True)
    z = jnp.where(z == 0.0, 1.0, z)
    members = s_ret[..., :mem_freq]
    pi = jax.nn.softmax(members, axis=-1)  # [B, n, H, k, mem_freq]
    read = jnp.einsum("bnhkl,bnhkld->bnhkd", pi, v_ret[..., :mem_freq, :].astype(acc))
    out = jnp.einsum("bnhk,bnhkd->bnhd", e_gate / z, read)
    out = out + jnp.einsum("bnhl,bnlhd->bnhd", e_own / z, v_own.astype(acc))
    return out.astype(q.dtype)


# The host-offloaded block cache (`attention.offload_cache`): keys (before RoPE) and values of every slot live in
# host memory (`pinned_host`), the landmark keys [B, blocks, K, D] (1/L of the keys) on the device. Each layer's
# selection reads only the landmark keys; then the blocks its queries chose, and their own blocks, are copied to the
# device, so device memory per token of context is the landmark keys' alone, and each step moves a bounded number
# of blocks. XLA places the writes in host memory (`compute_on("device_host")`) and the copies with `device_put`.
HOST = jax.memory.Space.Host
DEVICE = jax.memory.Space.Device


def offload(cache: dict[str, jax.Array], mem_freq: int) -> dict[str, jax.Array]:
    """A layer cache {"k", "v"} [..., S, K, D] (S a multiple of mem_freq + 1) -> the offloaded layout: "k", "v" in
    host memory and "lm" [..., S / L, K, D] on the device."""
    k = cache["k"]
    lm = jnp.zeros((*k.shape[:-3], k.shape[-3] // (mem_freq + 1), *k.shape[-2:]), k.dtype)
    return {"k": jax.device_put(cache["k"], HOST), "v": jax.device_put(cache["v"], HOST), "lm": lm}


def write_host(k_host, v_host, k, v, index):
    """The chunk's keys and values [B, n, K, D] written into the host caches at slot `index`."""
    from jax.experimental.compute_on import compute_on

    k_new, v_new = jax.device_put(k.astype(k_host.dtype), HOST), jax.device_put(v.astype(v_host.dtype), HOST)
    at = jax.device_put(jnp.asarray(index, jnp.int32), HOST)
    zero = jax.device_put(jnp.zeros((), jnp.int32), HOST)
    with compute_on("device_host"):
        k_host = jax.lax.dynamic_update_slice(k_host, k_new, (zero, at, zero, zero))
        v_host = jax.lax.dynamic_update_slice(v_host, v_new, (zero, at, zero, zero))
    return k_host, v_host


def write_landmark_keys(lm, k, index, mem_freq: int):
    """The device's landmark keys [B, blocks, K, D] with those of the chunk's landmark slots (keys k [B, n, K, D] at
    slots index..index+n-1) written in."""
    slots = index + jnp.arange(k.shape[1])
    target = jnp.where(is_landmark_slot(slots, mem_freq), slots // (mem_freq + 1), lm.shape[1])  # else dropped
    return lm.at[:, target].set(k.astype(lm.dtype), mode="drop")


def fetch_budget(n: int, num_heads: int, k: int, block: int, num_blocks: int, mode: str) -> int:
    """Blocks one row of a chunk of n slots may read: the chosen ones of every query and head (of every head,
    once, with max_over_tokens) and the blocks the chunk's own slots fall in."""
    chosen = (1 if mode == "max_over_tokens" else n) * num_heads * k
    return min(num_blocks, chosen + -(-n // block) + 1)


def fetch_blocks(k_host, v_host, chosen, usable, q_slots, *, block: int, mode: str = "per_token_and_head"):
    """Copies from the host caches [B, S, K, D] to the device the blocks a chunk reads: every usable chosen block
    [B, n, H, k] and each query's own block. Returns (kb, vb) [B, U, L, K, D] and `where` [B, blocks], the row of kb
    holding each block id that was fetched (U: `fetch_budget`)."""
    batch, n, num_heads, k = chosen.shape
    num_blocks = k_host.shape[1] // block
    budget = fetch_budget(n, num_heads, k, block, num_blocks, mode)
    own = jnp.minimum(q_slots // block, num_blocks - 1)
    ids = jnp.concatenate([jnp.where(usable, chosen, num_blocks).reshape(batch, -1), own], axis=1)
    rows = jnp.arange(batch)[:, None]
    needed = jnp.zeros((batch, num_blocks + 1), bool).at[rows, ids].set(True)[:, :num_blocks]
    # the needed block ids of each row in ascending order, padded with block 0 (fetched as block 0's rows: the
    # duplicates hold the same data, so whichever `where` keeps is right)
    fetched = jax.vmap(lambda m: jnp.nonzero(m, size=budget, fill_value=0)[0])(needed).astype(jnp.int32)
    where = jnp.zeros((batch, num_blocks), jnp.int32).at[rows, fetched].set(jnp.arange(budget, dtype=jnp.int32))
    tail = k_host.shape[2:]

    def copy(j, bufs):
        b, u = j // budget, j % budget
        start = (b, fetched[b, u] * block, 0, 0)
        out = []
        for host, buf in zip((k_host, v_host), bufs, strict=True):
            piece = jax.device_put(jax.lax.dynamic_slice(host, start, (1, block, *tail)), DEVICE)
            out.append(jax.lax.dynamic_update_slice(buf, piece[:, None], (b, u, 0, 0, 0)))
        return tuple(out)

    empty = jnp.zeros((batch, budget, block, *tail), k_host.dtype)
    kb, vb = jax.lax.fori_loop(0, batch * budget, copy, (empty, empty))
    return kb, vb, where

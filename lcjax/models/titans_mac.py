"""Titans' memory-as-context (MAC) mixing, Fig. 3a and Eq. 21–25 of arXiv 2501.00663: per segment, read the memory
as the previous segment left it, attend inside the segment over persistent ‖ reads ‖ tokens (`segment_mask`), store
the attention output (or the block's residual, `mac_store`) in the memory. The parallel form (`mac_parallel`) scans
the segments; the recurrent form (`mac_step`) runs one token at a time. Both take a Titans `Block` of variant mac
(its memory `mixer`, attention `attn`, norms and per-layer persistent tokens); `lcjax.models.titans` states the math.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.layers.attention import dot_product_attention
from lcjax.layers.documents import document_starts


def segment_mask(q_index, *, size: int, prefix: int, q_segments=None, k_segments=None) -> jax.Array:
    """MAC's attention mask, [B, n, prefix + 2 size] bool, over the context P ‖ h ‖ S of one segment.

    q_index [B, n]: each query's token index i in the segment. Key slots: `prefix` persistent tokens (always
    visible), then the retrieved vectors h_0..h_(size−1), then the tokens S_0..S_(size−1). h_j is read with token j's
    query, so it counts as being at token j: the query i sees h_j and S_j iff j <= i (and, with segment ids
    [B, size], only within its document)."""
    k_index = jnp.arange(2 * size) % size
    visible = k_index[None, None, :] <= q_index[:, :, None]
    if q_segments is not None:
        k_segments = jnp.concatenate([k_segments, k_segments], axis=1)
        visible &= q_segments[:, :, None] == k_segments[:, None, :]
    always = jnp.ones((*q_index.shape, prefix), bool)
    return jnp.concatenate([always, visible], axis=-1)


def mac_context(block, h, r, positions):
    """q, k, v of the context P ‖ r ‖ h (RoPE at `positions` [B, N_p + 2n]); q only for the h part."""
    prefix = jnp.broadcast_to(block.persistent[...].astype(h.dtype), (h.shape[0], *block.persistent.shape))
    q, k, v = block.attn._project(jnp.concatenate([prefix, r, h], axis=1), positions)
    return q[:, block.num_persistent + r.shape[1] :], k, v


def mac_parallel(block, h, segment_ids):
    """Parallel form over segments of `segment` tokens: h [B, T, d] (normalized) -> (attention output y,
    memory output m), each [B, T, d]."""
    batch, length, _ = h.shape
    size, prefix, mixer = block.segment, block.num_persistent, block.mixer
    count = -(-length // size)
    pad = count * size - length  # trailing padding: causal, so it never reaches a real token
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    taps = mixer.conv_size - 1
    history = jnp.zeros((batch, taps, 1, mixer.num_heads, mixer.head_dim), h.dtype)
    q_read, _ = mixer.read_queries(h, history, segment_ids)  # the read queries depend on h alone

    def split(a, axis):  # [..., count * size, ...] -> [count, ..., size, ...]
        a = a.reshape(*a.shape[:axis], count, size, *a.shape[axis + 1 :])
        return jnp.moveaxis(a, axis, 0)

    positions = jnp.broadcast_to(jnp.arange(prefix + 2 * size), (batch, prefix + 2 * size))
    q_index = jnp.broadcast_to(jnp.arange(size), (batch, size))
    segments = None if segment_ids is None else split(segment_ids, 1)

    def body(carry, inputs):
        store_history, history_segments, state, chunk_gates = carry
        h_s, q_s, seg_s, index = inputs
        r = mixer.read(q_s, state[1], h_s)  # M*_(t−1)(q_t): the memory before the segment
        if seg_s is not None and mixer.document_resets:  # tokens of a document begun since then read M_0
            fresh = jax.lax.cummax(document_starts(seg_s, history_segments).astype(jnp.int32), axis=1)
            r = jnp.where(fresh[..., None] > 0, mixer.read(q_s, mixer._initial_state(batch)[1], h_s), r)
        r = block.read_norm(r)
        q, k, v = mac_context(block, h_s, r, positions)
        mask = segment_mask(q_index, size=size, prefix=prefix, q_segments=seg_s, k_segments=seg_s)
        y = block.attn._output(dot_product_attention(q, k, v, mask, scale=block.attn.head_dim**-0.5))
        offset = 0 if size % mixer.chunk_size == 0 else index * size % mixer.chunk_size
        stored = h_s + y if block.store_residual else y
        m, (store_history, state, chunk_gates) = mixer._run(
            stored, store_history, state, offset, seg_s, history_segments, chunk_gates
        )
        if seg_s is not None:
            history_segments = jnp.concatenate([history_segments, seg_s], axis=1)[:, size:]
        return (store_history, history_segments, state, chunk_gates), (y, m)

    store_history = jnp.zeros((batch, taps, 3, mixer.num_heads, mixer.head_dim), h.dtype)
    # The (all-zero) history belongs to the first token's document, so token 0 starts no document: the memory
    # kernel then skips its restart terms on batches without a document start inside them.
    history_segments = None if segment_ids is None else jnp.broadcast_to(segment_ids[:, :1], (batch, taps))
    chunk_gates = jnp.zeros((batch, 3, mixer.num_heads), jnp.float32)  # gates="chunk": a chunk across segments
    carry = (store_history, history_segments, mixer._initial_state(batch), chunk_gates)
    xs = (split(h, 1), split(q_read, 2), segments, jnp.arange(count))
    _, (y, m) = jax.lax.scan(body, carry, xs)
    join = lambda a: jnp.moveaxis(a, 0, 1).reshape(batch, count * size, -1)[:, :length]
    return join(y), join(m), None


def mac_step(block, h, cache, index):
    """Recurrent form, one token at a time: h [B, n, d] (normalized) after `index` tokens."""
    size, prefix, mixer = block.segment, block.num_persistent, block.mixer
    batch = h.shape[0]

    def body(carry, h_t):
        cache, index = carry
        h_t = h_t[:, None]
        j = index % size
        read = cache["read"]
        weights = [
            jnp.where(j == 0, now, before)  # a new segment reads the memory as the last one left it
            for now, before in zip(cache["memory"]["weights"], read["weights"], strict=True)
        ]
        q, conv = mixer.read_queries(h_t, read["conv"].astype(h_t.dtype))
        r = block.read_norm(mixer.read(q, weights, h_t))
        slots = jnp.concatenate([jnp.arange(prefix), prefix + j + jnp.array([0, size])])
        q, k, v = mac_context(block, h_t, r, jnp.broadcast_to(slots, (batch, prefix + 2)))
        kv = {}
        for name, new in (("k", k), ("v", v)):
            stored = cache["attn"][name].at[:, j].set(new[:, prefix].astype(cache["attn"][name].dtype))
            kv[name] = stored.at[:, size + j].set(new[:, prefix + 1].astype(stored.dtype))
        keys, values = (jnp.concatenate([a[:, :prefix], kv[n].astype(a.dtype)], 1) for n, a in (("k", k), ("v", v)))
        mask = segment_mask(jnp.full((batch, 1), j), size=size, prefix=prefix)
        y = block.attn._output(dot_product_attention(q, keys, values, mask, scale=block.attn.head_dim**-0.5))
        m, memory = mixer.step(h_t + y if block.store_residual else y, cache["memory"])
        read = {"conv": conv.astype(read["conv"].dtype), "weights": weights}
        return ({"memory": memory, "read": read, "attn": kv}, index + 1), (y[:, 0], m[:, 0])

    (cache, _), (y, m) = jax.lax.scan(body, (cache, index), jnp.swapaxes(h, 0, 1))
    return jnp.swapaxes(y, 0, 1), jnp.swapaxes(m, 0, 1), cache

"""The attention masks of the Titans models (`lcjax.models.titans`): MAG/MAL's sliding window with an always-visible
persistent prefix, dense (`window_mask`) and in blocks for long inputs (`window_attention`), and MAC's mask over one
segment's context (`segment_mask`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.layers.attention import dot_product_attention


def window_mask(q_slots, k_slots, q_segments, k_segments, *, window: int, prefix: int) -> jax.Array:
    """[B, Tq, Tk] bool: key slot j visible to query slot i iff j <= i and either j is one of the `prefix`
    persistent slots, or i - j < window within the same document."""
    causal = k_slots[:, None, :] <= q_slots[:, :, None]
    near = q_slots[:, :, None] - k_slots[:, None, :] < window
    if q_segments is not None:
        near &= q_segments[:, :, None] == k_segments[:, None, :]
    return causal & (near | (k_slots[:, None, :] < prefix))


def window_attention(q, k, v, segment_ids, *, window: int, prefix: int, scale: float) -> jax.Array:
    """Sliding-window attention in blocks, equal to `dot_product_attention` with `window_mask` over slots 0..T−1:
    q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T] or None -> [B, T, H, D].

    The queries of block i (slots [i w, (i+1) w), w = `window`) see only the keys of blocks i−1 and i, where all of
    their window lies, and the persistent slots before block i−1 (those inside it are among its keys already, so no
    key is counted twice). Memory and work are O(T (2 w + prefix)) instead of the dense mask's O(T²)."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    count = -(-length // window)
    pad = count * window - length
    slots = jnp.arange(count * window)
    beyond = jnp.int32(2**30)  # the slot of a padding key: after every query, so causality hides it

    def blocks(a, front):  # [B, T, ...] -> [B, count + front, w, ...], `front` padding blocks first
        a = jnp.pad(a, ((0, 0), (front * window, pad)) + ((0, 0),) * (a.ndim - 2))
        return a.reshape(batch, count + front, window, *a.shape[2:])

    def local(a):  # [B, T, ...] -> the keys of blocks i−1 and i, [B * count, 2 w, ...]
        a = blocks(a, 1)
        a = jnp.concatenate([a[:, :-1], a[:, 1:]], axis=2)
        return a.reshape(batch * count, 2 * window, *a.shape[3:])

    k_slots = jnp.concatenate([jnp.full((window,), beyond), jnp.where(slots < length, slots, beyond)])
    k_slots = jnp.concatenate([k_slots[:-window].reshape(count, window), k_slots[window:].reshape(count, window)], 1)
    q_slots = jnp.broadcast_to(slots.reshape(count, window), (batch, count, window)).reshape(batch * count, window)
    k_slots = jnp.broadcast_to(k_slots, (batch, count, 2 * window)).reshape(batch * count, 2 * window)
    if segment_ids is None:
        q_segments = k_segments = None
    else:
        q_segments = blocks(segment_ids, 0).reshape(batch * count, window)
        k_segments = local(segment_ids)
    mask = window_mask(q_slots, k_slots, q_segments, k_segments, window=window, prefix=prefix)
    keys, values = local(k), local(v)
    if prefix:  # persistent slots p < (i−1) w, outside block i's local keys
        far = jnp.arange(prefix)[None, :] < (jnp.arange(count)[:, None] - 1) * window  # [count, prefix]
        far = jnp.broadcast_to(far[None, :, None, :], (batch, count, window, prefix))
        mask = jnp.concatenate([far.reshape(batch * count, window, prefix), mask], axis=-1)
        keys, values = (
            jnp.concatenate([jnp.repeat(a[:, None, :prefix], count, axis=1).reshape(-1, prefix, kv_heads, dim), b], 1)
            for a, b in ((k, keys), (v, values))
        )
    out = dot_product_attention(
        blocks(q, 0).reshape(batch * count, window, heads, dim), keys, values, mask, scale=scale
    )
    return out.reshape(batch, count * window, heads, dim)[:, :length]


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

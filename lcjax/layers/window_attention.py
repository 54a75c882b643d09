"""Sliding-window attention with an always-visible prefix (Titans' MAG/MAL, Fig. 3b of arXiv 2501.00663).

Key slot j is visible to query slot i iff j <= i and either j is one of the `prefix` persistent slots, or
i − j < window within the same document (`window_mask`). Three cores compute it, chosen by `attention.impl`:

- xla, dense: `dot_product_attention` with `window_mask` (short inputs);
- xla, in blocks (`window_attention`): over more than 2 window + prefix slots, queries in blocks of `window` see
  only their own and the previous block and the prefix: memory and work O(T · window), not O(T²);
- pallas (`flash_window_attention`): the flash-attention kernel with `sliding_window` over the document tokens (the
  persistent slots in a segment of their own, so no token sees them there), merged by log-sum-exp with a dense
  attention of every query to the `prefix` persistent keys; a persistent query reads the prefix part alone.

The KV-cache form (`WindowAttention.step`) is `SelfAttention.step` with the window mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.flash_attention import flash_attention
from lcjax.layers.attention import SelfAttention, dot_product_attention

IMPLS = ("xla", "pallas")  # the `attention.impl` values window attention offers
_PREFIX_SEGMENT = jnp.iinfo(jnp.int32).min  # the persistent slots' segment in the kernel (no document has it)


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


def flash_window_attention(q, k, v, segment_ids, *, window: int, prefix: int, scale: float, impl: str = "pallas"):
    """`window_mask` attention through the flash-attention kernel (module docstring): q [B, T, H, D], k/v
    [B, T, K, D], segment_ids [B, T] or None -> [B, T, H, D]. `impl` is the kernel's (`flash_attention`)."""
    batch, length = q.shape[:2]
    slots = jnp.arange(length)
    documents = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    local_segments = jnp.where(slots[None, :] < prefix, _PREFIX_SEGMENT, documents)
    out, lse = flash_attention(
        q, k, v, causal=True, segment_ids=local_segments, sliding_window=window, scale=scale, return_lse=True, impl=impl
    )
    if not prefix:
        return out
    visible = jnp.broadcast_to(jnp.arange(prefix)[None, None, :] <= slots[None, :, None], (batch, length, prefix))
    prefix_out, prefix_lse = _attention_with_lse(q, k[:, :prefix], v[:, :prefix], visible, scale)
    lse = jnp.where(slots[None, None, :] < prefix, -jnp.inf, lse)  # [B, H, T]; persistent queries: prefix part only
    top = jnp.maximum(lse, prefix_lse)  # finite: every query sees persistent slot 0
    w_local, w_prefix = jnp.exp(lse - top), jnp.exp(prefix_lse - top)
    as_out = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [B, H, T] -> [B, T, H, 1]
    merged = as_out(w_local) * out.astype(jnp.float32) + as_out(w_prefix) * prefix_out
    return (merged / as_out(w_local + w_prefix)).astype(q.dtype)


def _attention_with_lse(q, k, v, mask, scale):
    """Dense attention returning (out [B, T, H, D] float32, lse [B, H, T]): q [B, T, H, D], k/v [B, S, K, D],
    mask [B, T, S] bool with at least one visible key per query."""
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, q_len, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    weights = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(jnp.float32)).reshape(batch, q_len, heads, dim)
    return out, lse.reshape(batch, heads, q_len)


class WindowAttention(SelfAttention):
    """Sliding-window attention with an always-visible persistent prefix (parameters as `SelfAttention`)."""

    def __init__(self, *args, window: int, prefix: int, **kwargs):
        """`window`: the latest slots a token sees in its document; `prefix`: the always-visible persistent slots;
        the rest as `SelfAttention`."""
        super().__init__(*args, **kwargs)
        self.window = window
        self.prefix = prefix

    def __call__(self, x, positions, segment_ids):
        """Parallel form; `positions` are the slot indices 0..T−1 (the model's parallel form passes them)."""
        q, k, v = self._project(x, positions)
        scale = self.head_dim**-0.5
        if self.config.impl == "pallas":
            out = flash_window_attention(q, k, v, segment_ids, window=self.window, prefix=self.prefix, scale=scale)
        elif x.shape[1] > 2 * self.window + self.prefix:  # long: O(T · window), not O(T²), memory and work
            out = window_attention(q, k, v, segment_ids, window=self.window, prefix=self.prefix, scale=scale)
        else:
            mask = window_mask(positions, positions, segment_ids, segment_ids, window=self.window, prefix=self.prefix)
            out = dot_product_attention(q, k, v, mask, scale=scale)
        return self._output(out)

    def _cache_mask(self, q_slots, k_slots):  # `SelfAttention.step` writes the cache and attends with this mask
        return window_mask(q_slots, k_slots, None, None, window=self.window, prefix=self.prefix)

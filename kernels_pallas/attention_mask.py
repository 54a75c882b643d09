"""Which keys a query sees, for the flash-attention kernels and the ring/landmark kernels built on them.

Slot i of the query and slot j of the key (0-based, same sequence) are visible to each other iff
  j < kv_len                          (the sequence was padded to a whole number of blocks)
  j <= i              when causal
  i - j < window      when causal and sliding_window = window (the query and window - 1 keys before it)
  |i - j| < window    when not causal and sliding_window = window
  seg_q[i] == seg_k[j] when segment ids are given (packed documents).
Every real query sees at least itself when causal, windowed or segmented, so no real row is fully masked.
Block ranges below bound the key blocks a query block needs (and the reverse) so the kernels skip the rest.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    causal: bool
    sliding_window: int | None
    kv_len: int  # true key length; slots at or past it are padding
    padded_kv_len: int

    def visible(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array | None:
        """Bool visibility of broadcastable int32 slot arrays, or None when every pair is visible."""
        mask = None

        def both(a, b):
            return b if a is None else a & b

        if self.kv_len < self.padded_kv_len:
            mask = both(mask, k_pos < self.kv_len)
        if self.causal:
            mask = both(mask, k_pos <= q_pos)
        if self.sliding_window is not None:
            if self.causal:
                mask = both(mask, q_pos - k_pos < self.sliding_window)
            else:
                mask = both(mask, jnp.abs(q_pos - k_pos) < self.sliding_window)
        return mask

    def kv_blocks(self, q_block, block_q: int, block_k: int, num_kv_blocks: int):
        """(first, last) key-block indices that query block `q_block` needs (traced int32 scalars)."""
        first_key = jnp.int32(0)
        last_key = (q_block + 1) * block_q - 1
        if self.sliding_window is not None:
            first_key = jnp.maximum(q_block * block_q - (self.sliding_window - 1), 0)
            if not self.causal:
                last_key = last_key + self.sliding_window - 1
        elif not self.causal:
            last_key = jnp.int32(num_kv_blocks * block_k - 1)
        last_key = jnp.minimum(last_key, self.kv_len - 1)
        last = last_key // block_k
        return jnp.minimum(first_key // block_k, last), last

    def q_blocks(self, kv_block, block_q: int, block_k: int, num_q_blocks: int):
        """(first, last) query-block indices that read key block `kv_block` (traced int32 scalars)."""
        first_query = jnp.int32(0)
        last_query = jnp.int32(num_q_blocks * block_q - 1)
        if self.causal:
            first_query = kv_block * block_k
        elif self.sliding_window is not None:
            first_query = jnp.maximum(kv_block * block_k - (self.sliding_window - 1), 0)
        if self.sliding_window is not None:
            last_query = jnp.minimum((kv_block + 1) * block_k - 1 + self.sliding_window - 1, last_query)
        last = last_query // block_q
        return jnp.minimum(first_query // block_q, last), last

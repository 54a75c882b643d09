"""Packed documents: where a new one starts. Every mixer that resets its state at a document boundary reads this."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_starts(segment_ids: jax.Array, history_segments: jax.Array | None = None) -> jax.Array:
    """[batch, n] bool: True where a token's document (`segment_ids` [batch, n]) differs from the previous token's.
    The token before the first is the last of `history_segments` [batch, taps] (a streaming call's past); without
    history the first token starts none (the state handed in belongs to its document)."""
    previous = segment_ids[:, :1] if history_segments is None else history_segments[:, -1:]
    return segment_ids != jnp.concatenate([previous, segment_ids[:, :-1]], axis=1)

"""Pieces every model's parallel form shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def at_logit_positions(x: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """x [B, T, D] at `batch["logit_positions"]` [B, K] when the batch has them, giving [B, K, D]; else x.

    The training step passes them with `train.sparse_logits` > 0 so that the vocabulary projection runs only where
    there are labels (MQAR has D labels in L positions)."""
    index = batch.get("logit_positions")
    return x if index is None else jnp.take_along_axis(x, index[..., None], axis=1)

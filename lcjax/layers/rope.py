"""Rotary position embedding (RoPE), rotate-half convention, for explicit per-token positions.

For head_dim D and frequencies w_i = theta^(-2i/D), i < D/2, the pair (x_i, x_{i+D/2}) at position p is rotated
by angle p * w_i. Positions are passed explicitly so packed documents restart at 0 and ring attention can use
global positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """x: [batch, length, heads, head_dim]; positions: [batch, length] int. Returns x rotated, same dtype."""
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [batch, length, head_dim/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)

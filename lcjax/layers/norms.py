"""Normalizations, reductions in float32: RMSNorm y = x / sqrt(mean(x²) + eps) · scale; the per-head LayerNorm
without bias (`head_norm`) and its weight-offset form (scale 1 + w, the NeurIPS xLSTM convention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.layers.params import ones, param, zeros


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def head_norm(h: jax.Array, weight: jax.Array, eps: float, offset: bool) -> jax.Array:
    """LayerNorm over the last axis (weight only, no bias), reductions in float32: h `[..., heads, dim]` with weight
    `[heads, dim]` (or `[dim]`); scale `1 + weight` when `offset`, else `weight`."""
    h32 = h.astype(jnp.float32)
    h32 = h32 - jnp.mean(h32, axis=-1, keepdims=True)
    h32 = h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    w = weight.astype(jnp.float32)
    return (h32 * (1.0 + w if offset else w)).astype(h.dtype)


class OffsetLayerNorm(nnx.Module):
    """LayerNorm with a weight offset and no bias (the NeurIPS xLSTM convention): scale = 1 + w, w = 0 at init."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), ("embed",), zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        return head_norm(x, self.weight[...], self.eps, offset=True)

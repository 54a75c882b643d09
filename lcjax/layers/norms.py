"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.layers.params import ones, param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)

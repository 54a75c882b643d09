"""SwiGLU feed-forward: y = W_down (silu(x W_gate) * (x W_up))."""

from __future__ import annotations

import jax
from flax import nnx

from lcjax.layers.params import normal, param
from lcjax.parallel.sharding import constrain


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, mlp_dim: int, *, init_std: float, out_std: float, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), normal(init_std))
        self.w_up = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), normal(init_std))
        self.w_down = param(rngs, (mlp_dim, d_model), ("mlp", "embed"), normal(out_std))

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        return hidden @ self.w_down[...]

"""Parameter creation with logical axis names, the metadata the sharding rules read."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def normal(stddev: float) -> Initializer:
    return lambda key, shape, dtype: stddev * jax.random.normal(key, shape, dtype)


def ones(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def zeros(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


def small_init(d_model: int) -> Initializer:
    """N(0, 2 / (5 d)): the "small init" of projections from the model width (xLSTM, Nguyen & Salazar 2019)."""
    return normal(math.sqrt(2 / (5 * d_model)))


def wang_init(d_model: int, blocks: int) -> Initializer:
    """N(0, (2 / (blocks · √d))²): the "Wang init" of projections back into the residual stream (xLSTM, GPT-J)."""
    return normal(2 / (blocks * math.sqrt(d_model)))


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], init: Initializer) -> nnx.Param:
    """An fp32 `nnx.Param` with `axes` metadata naming each dimension logically."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), axes=tuple(axes))


def logical_axes(module: nnx.Module) -> dict:
    """Nested dict (same layout as `nnx.to_pure_dict(nnx.state(module))`) of each parameter's logical axes."""
    from flax import traverse_util

    flat = {path: var.get_metadata()["axes"] for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    return traverse_util.unflatten_dict(flat)

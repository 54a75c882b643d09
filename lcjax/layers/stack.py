"""A stack of identical blocks stored with a leading `layers` axis and applied with `lax.scan`.

Every model's repeating unit goes through this one class, so compile time does not grow with depth and remat
is applied per unit. `scan=False` runs the same stacked parameters in a Python loop (for debugging); the
parameter layout is identical either way, so checkpoints do not depend on the switch.

A block is an `nnx.Module` whose `__call__(x, cache, **kwargs)` returns `(x, new_cache)`; `cache` is None in the
parallel form, and a per-layer pytree (stacked along `layers` here) in the recurrent form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nnx.Module):
    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        num_layers: int,
        *,
        rngs: nnx.Rngs,
        scan: bool = True,
        remat: str = "none",
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        self.num_layers = num_layers
        self.scan = scan
        self.remat = remat
        keys = jax.random.split(rngs.params(), num_layers)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_block(nnx.Rngs(0))))
        stacked = jax.vmap(lambda key: nnx.state(make_block(nnx.Rngs(params=key))))(keys)
        self.blocks = nnx.merge(graphdef, stacked)
        for _, variable in nnx.to_flat_state(nnx.state(self.blocks, nnx.Param)):
            variable.set_metadata(axes=("layers", *variable.get_metadata()["axes"]))

    def __call__(self, x: jax.Array, cache: Any = None, **kwargs) -> tuple[jax.Array, Any]:
        graphdef, state = nnx.split(self.blocks)

        def body(x, layer):
            layer_state, layer_cache = layer
            return nnx.merge(graphdef, layer_state)(x, layer_cache, **kwargs)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        if self.scan:
            return jax.lax.scan(body, x, (state, cache))
        new_caches = []
        for i in range(self.num_layers):
            x, layer_cache = body(x, jax.tree.map(lambda a, i=i: a[i], (state, cache)))
            new_caches.append(layer_cache)
        return x, jax.tree.map(lambda *a: jax.numpy.stack(a), *new_caches) if cache is not None else None

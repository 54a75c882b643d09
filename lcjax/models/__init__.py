"""`build(config, rngs)`: the model named by `config.model.name`, built from its config section."""

from __future__ import annotations

from flax import nnx

from lcjax.models import registry


def build(config, rngs: nnx.Rngs) -> nnx.Module:
    return registry.model_class(config.model.name)(config.model, config.attention, rngs=rngs)

"""`build(config, rngs)`: the model named by `config.model.name`, built from its config section."""

from __future__ import annotations

from flax import nnx

from lcjax.models import registry
from lcjax.models.lm import CausalLM


def build(config, rngs: nnx.Rngs) -> CausalLM:
    """`config`: a run `Config` (its `model` section is used)."""
    return registry.model_class(config.model.name)(config.model, rngs=rngs)

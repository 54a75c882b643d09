"""A throwaway model for the tests of the shared machinery: an embedding, one position-wise block and the shared
head; it reads `prefix_mask` (adding a learned vector where it is 1), so a test can see that field arrive."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal, param
from lcjax.layers.stack import LayerStack
from lcjax.models import registry
from lcjax.models.lm import CausalLM, ModelConfig


@dataclasses.dataclass(frozen=True)
class ProbeConfig(ModelConfig):
    name: str = "probe"
    vocab_size: int = 64
    d_model: int = 16
    num_layers: int = 1


class Block(nnx.Module):
    def __init__(self, cfg: ProbeConfig, *, rngs: nnx.Rngs):
        self.w = param(rngs, (cfg.d_model, cfg.d_model), ("embed", "mlp"), normal(0.3))

    def __call__(self, x, cache, *, positions=None, segment_ids=None, index=None):
        del positions, segment_ids, index
        return x + jnp.tanh(x @ self.w[...]), cache


class Probe(CausalLM):
    def __init__(self, cfg: ProbeConfig, *, rngs: nnx.Rngs):
        self._init_embedding(cfg, rngs, normal(1.0))
        self.prefix_embed = param(rngs, (cfg.d_model,), ("embed",), normal(1.0))
        self.layers = LayerStack(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs=rngs)
        self._init_head(RMSNorm(cfg.d_model, rngs=rngs), rngs, normal(0.02))

    def hidden(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = self.embed_tokens(batch["inputs"], None)
        if "prefix_mask" in batch:
            x = x + batch["prefix_mask"][..., None].astype(x.dtype) * self.prefix_embed[...]
        return self.layers(x, None)[0], {}

    def layer_cache(self, batch_size, max_len, dtype):
        return {}


@contextmanager
def registered():
    """The probe in the registry for the duration of a `with` block."""
    registry.register("probe", ProbeConfig, Probe)
    try:
        yield
    finally:
        registry._MODELS.pop("probe")


def pytest_configure(config):  # as a plugin (`-p tests.models.probe`): registered before collection
    del config
    registry.register("probe", ProbeConfig, Probe)

"""Titans (arXiv 2501.00663): language models around the neural long-term memory of `lcjax.layers.neural_memory`.

Variants (`model.variant`):
  lmm  "Titans (LMM)": x_0 = P ‖ E[tokens] with N_p learned persistent tokens P (Eq. 19);
       x <- x + LMM(RMSNorm(x));  x <- x + MLP(RMSNorm(x));  logits = RMSNorm(x) E^T on the token positions.
MAC, MAG and MAL (attention around the memory) are the next step of the Titans issue.

The recurrent form (`init_cache`/`decode`) carries each layer's memory state; `init_cache` already holds the
persistent tokens, so decoding a sequence in any pieces gives the logits of the parallel form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers.mlp import SwiGLU
from lcjax.layers.neural_memory import NeuralMemory
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal, param
from lcjax.layers.stack import REMAT_POLICIES, LayerStack
from lcjax.parallel.sharding import constrain

VARIANTS = ("lmm",)


@dataclasses.dataclass(frozen=True)
class TitansConfig:
    name: str = "titans"
    variant: str = "lmm"
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    mlp_dim: int = 384
    memory_heads: int = 4
    memory_head_dim: int = 0  # 0: d_model // memory_heads
    # Layers of the memory MLP (1: a linear matrix memory). Depth 2 diverges on the default corpus after ~35 steps of
    # lmm-tiny (the hidden layer's curvature grows with the second layer's weights); 1 trains stably.
    memory_depth: int = 1
    memory_expansion: int = 2  # hidden width of a deep memory, in multiples of memory_head_dim
    chunk_size: int = 16  # tokens per chunk: gradients inside a chunk are taken at its start memory
    conv_size: int = 4
    # θ = max_lr * sigmoid(...). 0: 1 / chunk_size, so that a chunk of identical keys (all its gradients taken at
    # the chunk start, e.g. a run of spaces) cannot overshoot: 2θ * chunk_size <= 2. Larger values diverge on text.
    memory_max_lr: float = 0.0
    num_persistent: int = 4  # learned persistent-memory tokens prepended to every sequence
    norm_eps: float = 1e-5
    init_std: float = 0.02
    embed_init_std: float = 1.0
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots

    @property
    def resolved_head_dim(self) -> int:
        return self.memory_head_dim or self.d_model // self.memory_heads

    @property
    def resolved_max_lr(self) -> float:
        return self.memory_max_lr or 1.0 / self.chunk_size

    def validate(self, config: Any, mesh: dict[str, int]) -> None:
        del config
        if self.variant not in VARIANTS:
            raise ConfigError("model.variant", f"={self.variant!r}; expected one of {list(VARIANTS)}")
        for name in ("vocab_size", "d_model", "num_layers", "mlp_dim", "memory_heads", "memory_depth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("memory_expansion", "chunk_size", "conv_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.num_persistent < 0:
            raise ConfigError("model.num_persistent", f"must be >= 0, got {self.num_persistent}")
        if not self.memory_head_dim and self.d_model % self.memory_heads:
            raise ConfigError("model.memory_heads", f"={self.memory_heads} must divide model.d_model={self.d_model}")
        if self.memory_max_lr < 0:
            raise ConfigError("model.memory_max_lr", f"must be >= 0 (0: 1/chunk_size), got {self.memory_max_lr}")
        for name in ("memory_heads", "mlp_dim", "vocab_size"):
            if getattr(self, name) % mesh["tensor"]:
                raise ConfigError(
                    f"model.{name}", f"={getattr(self, name)} must be divisible by mesh.tensor={mesh['tensor']}"
                )
        if self.d_model % mesh["fsdp"]:
            raise ConfigError("model.d_model", f"={self.d_model} must be divisible by mesh.fsdp={mesh['fsdp']}")
        if mesh["sequence"] > 1:
            raise ConfigError("mesh.sequence", "Titans' memory is sequential over the sequence; use mesh.sequence=1")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")

    def memory_widths(self) -> list[int]:
        hd = self.resolved_head_dim
        return [hd] + [self.memory_expansion * hd] * (self.memory_depth - 1) + [hd]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (an estimate): 6 * matmul params, plus per layer and head the memory's
        gradient at the chunk start, its update and its read (~8 |W|) and the dual-form chunk mixing
        (~4 * chunk_size * sum of widths), times 3 for forward + backward."""
        del seq_len
        hd, heads = self.resolved_head_dim, self.memory_heads
        widths = self.memory_widths()
        memory_size = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
        mixer = self.d_model * heads * hd * 5 + self.d_model * heads * 3
        matmul_params = self.num_layers * (mixer + 3 * self.d_model * self.mlp_dim) + self.d_model * self.vocab_size
        memory = self.num_layers * heads * (8 * memory_size + 4 * self.chunk_size * sum(widths))
        return 6 * matmul_params + 3 * memory


class Block(nnx.Module):
    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mixer = NeuralMemory(
            cfg.d_model,
            num_heads=cfg.memory_heads,
            head_dim=cfg.resolved_head_dim,
            depth=cfg.memory_depth,
            expansion=cfg.memory_expansion,
            chunk_size=cfg.chunk_size,
            conv_size=cfg.conv_size,
            max_lr=cfg.resolved_max_lr,
            init_std=cfg.init_std,
            out_std=out_std,
            rngs=rngs,
        )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, init_std=cfg.init_std, out_std=out_std, rngs=rngs)

    def __call__(self, x, cache, *, segment_ids=None):
        h = self.mixer_norm(x)
        if cache is None:
            h = self.mixer(h, segment_ids)
        else:
            h, cache = self.mixer.step(h, cache)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "embed")), cache


class Titans(nnx.Module):
    def __init__(self, cfg: TitansConfig, attention=None, *, rngs: nnx.Rngs):
        del attention  # the LMM variant has no attention
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), normal(cfg.embed_init_std))
        self.persistent = param(rngs, (cfg.num_persistent, cfg.d_model), (None, "embed"), normal(cfg.embed_init_std))
        self.layers = LayerStack(
            lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs=rngs, scan=cfg.scan_layers, remat=cfg.remat
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return constrain(jnp.take(self.embed[...], tokens, axis=0), ("batch", "length", "embed"))

    def _with_persistent(self, x: jax.Array) -> jax.Array:
        prefix = jnp.broadcast_to(self.persistent[...].astype(x.dtype), (x.shape[0], *self.persistent.shape))
        return jnp.concatenate([prefix, x], axis=1)

    def _logits(self, x: jax.Array) -> jax.Array:
        logits = (self.final_norm(x) @ self.embed[...].T) * self.cfg.d_model**-0.5
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Parallel form. batch: inputs [B, T] int32, optional segment_ids. -> logits [B, T, V]."""
        tokens = batch["inputs"]
        segment_ids = batch.get("segment_ids")
        prefix = self.cfg.num_persistent
        if segment_ids is not None:  # the persistent tokens belong to the first document of the row
            segment_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], prefix, axis=1), segment_ids], axis=1)
        x, _ = self.layers(self._with_persistent(self._embed(tokens)), None, segment_ids=segment_ids)
        return self._logits(x[:, prefix:]), {}

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
        """Per-layer memory state (stacked along `layers`) after the persistent tokens; its size is fixed, so
        `max_len` is not needed."""
        del max_len, dtype
        layers = self.layers.blocks.mixer.init_cache(batch_size)  # parameters stacked on `layers`: so is this
        if self.cfg.num_persistent:
            empty = jnp.zeros((batch_size, 0, self.cfg.d_model), self.embed[...].dtype)
            _, layers = self.layers(self._with_persistent(empty), layers)
        return {"layers": layers}

    def decode(self, tokens: jax.Array, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """Recurrent form: consumes tokens [B, n] after the cached ones; returns (logits [B, n, V], cache)."""
        x, layers = self.layers(self._embed(tokens), cache["layers"])
        return self._logits(x), {"layers": layers}

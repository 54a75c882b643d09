"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, optional tied embeddings.

x_0 = E[tokens];  x <- x + Attn(RMSNorm(x));  x <- x + MLP(RMSNorm(x));  logits = RMSNorm(x) W_out,
with W_out = E^T when embeddings are tied. Packed documents (`segment_ids`) never attend across a boundary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers.attention import SelfAttention, ring_shards
from lcjax.layers.mlp import SwiGLU
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal, param
from lcjax.layers.stack import REMAT_POLICIES, LayerStack
from lcjax.models.common import at_logit_positions
from lcjax.parallel import ring_attention as ring
from lcjax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    name: str = "transformer"
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 384
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen-style)
    position_embedding: str = "rope"  # rope | learned (absolute, GPT-2 style, added to the token embedding)
    max_seq_len: int = 0  # learned positions: table size (>= every sequence length the model sees)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    embed_init_std: float = 1.0  # token (and learned position) embeddings; tied logits are scaled by d_model^-0.5
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def validate(self, config: Any, mesh: dict[str, int]) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "model.num_kv_heads", f"={self.num_kv_heads} must divide model.num_heads={self.num_heads}"
            )
        if not self.head_dim and self.d_model % self.num_heads:
            raise ConfigError("model.num_heads", f"={self.num_heads} must divide model.d_model={self.d_model}")
        if self.resolved_head_dim % 2:
            raise ConfigError("model.head_dim", f"={self.resolved_head_dim} must be even for RoPE")
        tensor = mesh["tensor"]
        for name in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
            if getattr(self, name) % tensor:
                raise ConfigError(f"model.{name}", f"={getattr(self, name)} must be divisible by mesh.tensor={tensor}")
        if self.d_model % mesh["fsdp"]:
            raise ConfigError("model.d_model", f"={self.d_model} must be divisible by mesh.fsdp={mesh['fsdp']}")
        if self.position_embedding not in ("rope", "learned"):
            raise ConfigError("model.position_embedding", f"={self.position_embedding!r}; expected rope or learned")
        if self.position_embedding == "learned":
            longest = config.train.seq_len * (2 if config.eval.jrt_prompt else 1)
            if self.max_seq_len < longest:
                raise ConfigError(
                    "model.max_seq_len",
                    f"={self.max_seq_len} must be >= {longest} (train.seq_len, doubled by eval.jrt_prompt) "
                    "for learned position embeddings",
                )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params + 12 * layers * seq_len * heads*head_dim / 2 (causal)."""
        hd = self.resolved_head_dim
        attn = self.d_model * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.d_model * self.mlp_dim
        matmul_params = self.num_layers * (attn + mlp) + self.d_model * self.vocab_size
        return 6 * matmul_params + 6 * self.num_layers * seq_len * self.num_heads * hd


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, attention, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.attn = SelfAttention(
            cfg.d_model,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.resolved_head_dim,
            rope_theta=cfg.rope_theta if cfg.position_embedding == "rope" else 0.0,
            config=attention,
            init_std=cfg.init_std,
            out_std=out_std,
            rngs=rngs,
            qkv_bias=cfg.qkv_bias,
        )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, init_std=cfg.init_std, out_std=out_std, rngs=rngs)

    def __call__(self, x, cache, *, positions, segment_ids=None, index=None):
        h = self.attn_norm(x)
        if cache is None:
            h = self.attn(h, positions, segment_ids)
        else:
            h, cache = self.attn.step(h, positions, cache, index)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "embed")), cache


class Transformer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, attention, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention = attention
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), normal(cfg.embed_init_std))
        self.layers = LayerStack(
            lambda r: Block(cfg, attention, rngs=r),
            cfg.num_layers,
            rngs=rngs,
            scan=cfg.scan_layers,
            remat=cfg.remat,
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        if cfg.position_embedding == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), (None, "embed"), normal(cfg.embed_init_std))
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), normal(cfg.init_std))

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0)
        if self.cfg.position_embedding == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0)
        return constrain(x, ("batch", "length", "embed"))

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            # Tied: reuse the embedding array; scale keeps initial logits O(1) with unit-variance embeddings.
            logits = (x @ self.embed[...].T) * self.cfg.d_model**-0.5
        else:
            logits = x @ self.lm_head[...]
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Parallel form. batch: inputs [B, T] int32, optional positions, segment_ids. -> logits [B, T, V].

        With ring attention over a `sequence` axis of N > 1 devices, the tokens, positions and segment ids are
        permuted once into the ring layout (device r holds block r of the permuted sequence), every layer works in
        that order (RoPE sees the global positions), and the hidden states return to natural order before the
        logits, so callers never see the layout."""
        tokens = batch["inputs"]
        positions = batch.get("positions")
        segment_ids = batch.get("segment_ids")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        shards = ring_shards(self.attention)
        perm = ring.permutation(tokens.shape[1], shards, self.attention.ring_layout) if shards > 1 else None
        if perm is not None:
            tokens, positions = ring.to_layout(tokens, perm), ring.to_layout(positions, perm)
            segment_ids = None if segment_ids is None else ring.to_layout(segment_ids, perm)
        x, _ = self.layers(self._embed(tokens, positions), None, positions=positions, segment_ids=segment_ids)
        if perm is not None:
            x = ring.from_layout(x, perm)
        return self._logits(at_logit_positions(x, batch)), {}

    def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
        """KV cache for `max_len` tokens: per-layer k/v stacked along `layers`, plus the next write index."""
        layer = self.layers.blocks.attn
        one = {
            "k": jnp.zeros((batch_size, max_len, layer.num_kv_heads, layer.head_dim), dtype),
            "v": jnp.zeros((batch_size, max_len, layer.num_kv_heads, layer.head_dim), dtype),
        }
        stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (self.cfg.num_layers, *a.shape)), one)
        return {"index": jnp.zeros((), jnp.int32), "layers": stacked}

    def decode(self, tokens: jax.Array, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """Recurrent form: consumes tokens [B, n] after the cached ones; returns (logits [B, n, V], cache)."""
        index = cache["index"]
        positions = jnp.broadcast_to(index + jnp.arange(tokens.shape[1]), tokens.shape)
        x, layers = self.layers(self._embed(tokens, positions), cache["layers"], positions=positions, index=index)
        return self._logits(x), {"index": index + tokens.shape[1], "layers": layers}

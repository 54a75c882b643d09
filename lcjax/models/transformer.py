"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, optional tied embeddings.

x_0 = E[tokens];  x <- x + Attn(RMSNorm(x));  x <- x + MLP(RMSNorm(x));  logits = RMSNorm(x) W_out,
with W_out = E^T when embeddings are tied. Packed documents (`segment_ids`) never attend across a boundary.

With `attention.impl=landmark` (landmark attention, `configs/landmark.py`) the model inserts a learned landmark
vector `landmark` after every `attention.mem_freq` tokens before the first block and removes those slots after the
last (`lcjax.layers.landmark_attention`), in the parallel form and in `decode` alike: inputs, logits, losses and
every metric stay per regular token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers import landmark_attention as landmark
from lcjax.layers.attention import AttentionConfig, SelfAttention, ring_permutation
from lcjax.layers.mlp import SwiGLU
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal, param
from lcjax.layers.stack import LayerStack
from lcjax.models.lm import CausalLM, ModelConfig
from lcjax.parallel import ring_layout as ring
from lcjax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    name: str = "transformer"
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 384
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen-style)
    position_embedding: str = "rope"  # rope | learned (absolute, GPT-2 style, added to the token embedding)
    max_seq_len: int = 0  # learned positions: table size (>= every sequence length the model sees)
    init_std: float = 0.02
    embed_init_std: float = 1.0  # token (and learned position) embeddings; tied logits are scaled by d_model^-0.5
    attention: AttentionConfig = AttentionConfig()

    sequence_parallel: ClassVar[bool] = True  # ring attention (attention.impl=ring) shards the sequence

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def validate(self, *, mesh: dict[str, int], seq_len: int, max_len: int) -> None:
        super().validate(mesh=mesh, seq_len=seq_len, max_len=max_len)
        for name in ("num_heads", "num_kv_heads", "mlp_dim"):
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
        self.check_divisible("tensor", mesh, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)
        self.check_divisible("tensor", mesh, mlp_dim=self.mlp_dim)
        if self.position_embedding not in ("rope", "learned"):
            raise ConfigError("model.position_embedding", f"={self.position_embedding!r}; expected rope or learned")
        if self.position_embedding == "learned" and self.max_seq_len < max_len:
            raise ConfigError(
                "model.max_seq_len",
                f"={self.max_seq_len} must be >= {max_len} (train.seq_len, doubled by eval.jrt_prompt) "
                "for learned position embeddings",
            )
        self.attention.validate(mesh=mesh, seq_len=seq_len)
        if self.landmarks and self.position_embedding != "rope":
            raise ConfigError(
                "model.position_embedding", f"={self.position_embedding!r}; landmark attention needs rope"
            )

    @property
    def landmarks(self) -> bool:
        """Whether the model inserts landmark tokens (attention.impl=landmark)."""
        return self.attention.impl == "landmark"

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params + 12 * layers * seq_len * heads*head_dim / 2 (causal); with
        landmarks, over the expanded sequence (the grouped softmax's extra elementwise work is not counted)."""
        hd = self.resolved_head_dim
        attn = self.d_model * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.d_model * self.mlp_dim
        # landmarks: every regular token brings 1/mem_freq landmark slots through the blocks (not the head)
        slots = 1 + 1 / self.attention.mem_freq if self.landmarks else 1.0
        blocks = self.num_layers * (attn + mlp) * slots
        attention = self.num_layers * seq_len * slots * self.num_heads * hd * slots
        return 6 * (blocks + self.d_model * self.vocab_size) + 6 * attention


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, attention: AttentionConfig, *, rngs: nnx.Rngs):
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


class Transformer(CausalLM):
    scale_tied_logits = True

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self._init_embedding(cfg, rngs, normal(cfg.embed_init_std))
        self.layers = LayerStack(
            lambda r: Block(cfg, cfg.attention, rngs=r),
            cfg.num_layers,
            rngs=rngs,
            scan=cfg.scan_layers,
            remat=cfg.remat,
        )
        final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        if cfg.position_embedding == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), (None, "embed"), normal(cfg.embed_init_std))
        if cfg.landmarks:  # the landmark token's embedding: an input only, never predicted
            self.landmark = param(rngs, (cfg.d_model,), ("embed",), normal(cfg.embed_init_std))
        self._init_head(final_norm, rngs, normal(cfg.init_std))

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0)
        if self.cfg.position_embedding == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0)
        return constrain(x, ("batch", "length", "embed"))

    def hidden_embedded(self, x, *, positions, segment_ids=None):
        """Parallel form on embedded inputs x [B, T, d_model] at `positions` [B, T] (RoPE) -> hidden [B, T, d_model].

        With ring attention over a `sequence` axis of N > 1 devices, the inputs, positions and segment ids are
        permuted once into the ring layout (device r holds block r of the permuted sequence), every layer works in
        that order (RoPE sees the global positions), and the hidden states return to natural order, so callers
        never see the layout."""
        if self.cfg.landmarks:
            mem_freq, length = self.cfg.attention.mem_freq, x.shape[1]
            x, positions, segment_ids = landmark.insert(x, self.landmark[...], positions, segment_ids, mem_freq)
            x, _ = self.layers(
                constrain(x, ("batch", "length", "embed")), None, positions=positions, segment_ids=segment_ids
            )
            return landmark.remove(x, length, mem_freq), {}
        perm = ring_permutation(self.cfg.attention, x.shape[1])
        if perm is not None:
            x, positions = ring.to_layout(x, perm), ring.to_layout(positions, perm)
            segment_ids = None if segment_ids is None else ring.to_layout(segment_ids, perm)
        x, _ = self.layers(
            constrain(x, ("batch", "length", "embed")), None, positions=positions, segment_ids=segment_ids
        )
        return (x if perm is None else ring.from_layout(x, perm)), {}

    def layer_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
        """One layer's KV cache for `max_len` tokens."""
        if max_len <= 0:
            raise ValueError(f"init_cache: the transformer's KV cache needs max_len > 0, got {max_len}")
        if self.cfg.landmarks:  # the expanded slots, and room for the padding slots of `decode_embedded`
            mem_freq = self.cfg.attention.mem_freq
            max_len = landmark.num_slots(max_len, mem_freq) + -(-max_len // mem_freq) + 1
            max_len = -(-max_len // (mem_freq + 1)) * (mem_freq + 1)  # whole blocks
        shape = (batch_size, max_len, self.cfg.num_kv_heads, self.cfg.resolved_head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: jnp.dtype = jnp.float32) -> dict:
        """The skeleton's cache; with `attention.offload_cache` the keys and values sit in host memory and the
        device keeps the landmark keys (`landmark.offload`)."""
        cache = super().init_cache(batch_size, max_len, dtype)
        if self.cfg.landmarks and self.cfg.attention.offload_cache:
            cache = {**cache, "layers": landmark.offload(cache["layers"], self.cfg.attention.mem_freq)}
        return cache

    def decode_embedded(self, x, cache):
        """The recurrent form; with landmarks, the n new tokens and the landmarks that fall among them run as one
        chunk of n + ceil(n / mem_freq) slots of the expanded sequence (the count varies with the cache index, so
        the chunk ends in padding slots; they are written past the last real slot, overwritten by the next call
        before any query can see them, and dropped from the outputs). `cache["index"]` counts regular tokens."""
        if not self.cfg.landmarks:
            return super().decode_embedded(x, cache)
        mem_freq, n = self.cfg.attention.mem_freq, x.shape[1]
        index = cache["index"]
        first = landmark.token_slots(index, mem_freq)
        slots = first + jnp.arange(n + -(-n // mem_freq))
        is_landmark = landmark.is_landmark_slot(slots, mem_freq)
        source = jnp.clip(slots - slots // (mem_freq + 1) - index, 0, n - 1)
        chunk = jnp.where(is_landmark[None, :, None], self.landmark[...].astype(x.dtype), jnp.take(x, source, axis=1))
        positions = jnp.broadcast_to(slots, chunk.shape[:2])
        h, layers = self.layers(chunk, cache["layers"], positions=positions, index=first)
        h = jnp.take(h, landmark.token_slots(index + jnp.arange(n), mem_freq) - first, axis=1)
        return h, {"index": index + n, "layers": layers}

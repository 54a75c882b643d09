"""JRT-RNN (Arora et al. 2024, arXiv 2407.05483): a Based-style stack with prefix linear attention.
`reference/xlstm_ssm_birdie_jrt.md` §4.2–4.3.

Every layer is pre-RMSNorm: x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) (hidden `mlp_expansion`·D, no biases).
The mixers repeat `layer_pattern` (the paper's: "cpwcc"): c BaseConv (`lcjax.layers.prefix_linear_attention`,
conv 3), p prefix linear attention (PLA: `num_heads` heads, feature dim `feature_dim`, no decay, the encoder over
the first `prefix_len` = M tokens or the batch's `prefix_mask`), w causal sliding-window softmax attention
(`window`, RoPE) over each document. So PLA sits at layers 1, 6, 11, ... and the window attention at 2, 7, 12, ...
(0-based), as in the paper's configs; `num_layers` is a multiple of the pattern's length (the paper's 26-layer
360M adds one BaseConv at the end, which this stack does not model).

Decode: BaseConv carries its conv history, PLA one linear-attention state [heads, F, dv + 1] (the encoder state
built from the first call, the prompt, plus every decoded token's φ(k)[v; 1]ᵀ), the window attention a KV cache.
The prefix is read non-causally, so decode == the parallel form when the first call holds the encoder's tokens
(the first M, or the whole first document when it is shorter).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.layers import prefix_linear_attention as pla
from lcjax.layers.attention import AttentionConfig
from lcjax.layers.mlp import SwiGLU
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal
from lcjax.layers.stack import LayerStack
from lcjax.layers.window_attention import WindowAttention
from lcjax.models.lm import CausalLM, ModelConfig, parallel_positions
from lcjax.parallel.sharding import constrain

MIXERS = {"c": "baseconv", "p": "pla", "w": "window"}


@dataclasses.dataclass(frozen=True)
class JRTConfig(ModelConfig):
    name: str = "jrt"
    layer_pattern: str = "cpwcc"  # c BaseConv, p PLA, w sliding-window attention (module docstring)
    num_layers: int = 5
    num_heads: int = 4  # PLA and window-attention heads (the paper: 16)
    num_kv_heads: int = 4  # window attention
    feature_dim: int = 16  # PLA's q/k width before the Taylor feature map
    head_dim: int = 0  # 0: d_model // num_heads (PLA values, window attention)
    prefix_len: int = 128  # M: the encoder's tokens (the paper: 1024 of 2048)
    window: int = 64  # the sliding window (the paper: 256)
    conv_taps: int = 3
    mlp_expansion: int = 2
    chunk_size: int = 64  # PLA's chunkwise kernel
    pla_impl: str = "auto"  # auto (the kernel on TPU/GPU) | xla | pallas | interpret (`kernels_pallas`)
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # The training objective (`train_batch`): next token where the encoder does not read the target, plus
    # `mlm_weight` × the masked-token loss
    # on the encoder's tokens, `mlm_rate` of them replaced by `mask_token` (-1: vocab_size − 1, byte 0xFF, which no
    # UTF-8 text holds) and predicted at their own positions. mlm_weight 0: next token past the encoder only.
    mlm_rate: float = 0.15
    mlm_weight: float = 0.25
    mask_token: int = -1
    attention: AttentionConfig = AttentionConfig()

    sequence_parallel: ClassVar[bool] = False

    @property
    def resolved_mask_token(self) -> int:
        return self.vocab_size - 1 if self.mask_token < 0 else self.mask_token

    def encoder_region(self, batch: dict[str, Any]) -> np.ndarray:
        """[batch, length] bool: the tokens the encoder reads (`pla.encoder_weights` > 0), on host arrays."""
        inputs = np.asarray(batch["inputs"])
        positions = batch.get("positions")
        positions = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape) if positions is None else positions
        segments = None if batch.get("segment_ids") is None else np.asarray(batch["segment_ids"])
        prefix = None if batch.get("prefix_mask") is None else np.asarray(batch["prefix_mask"])
        docs = pla.documents(np.asarray(positions), segments, xp=np)
        return pla.encoder_weights(docs, self.prefix_len, prefix, segments, xp=np) > 0

    def reads_its_target(self, batch: dict[str, Any]) -> np.ndarray:
        """[batch, length] bool: positions whose next-token target the encoder reads (the next token is one of its
        own). The paper drops the next-token loss on all M encoder positions; this drops it where it leaks, which
        differs only at an encoder's last token (its target is past the encoder) and keeps a task's answer scored
        when the answer sits inside a short document's M tokens."""
        region = self.encoder_region(batch)
        return np.concatenate([region[:, 1:], np.zeros_like(region[:, :1])], axis=1)

    def train_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The paper's objective (§4.3): no next-token loss where the encoder reads the target
        (`reads_its_target`); `mlm_rate` of the encoder's tokens (never token 0) masked and predicted at their own
        positions with weight `mlm_weight`. The choice is seeded by the batch's own tokens: a pure function of the
        batch. (A synthetic task's prompt is masked too: fine-tune tasks with model.mlm_weight=0.)"""
        batch = super().train_batch(batch)
        region = self.encoder_region(batch)
        inputs, targets = np.array(batch["inputs"]), np.array(batch["targets"])
        loss_mask = np.where(self.reads_its_target(batch), 0.0, batch["loss_mask"]).astype(np.float32)
        if self.mlm_weight > 0 and self.mlm_rate > 0:
            rng = np.random.default_rng(zlib.crc32(inputs.tobytes()))
            chosen = region & (rng.random(inputs.shape) < self.mlm_rate) & (inputs != 0)
            targets[chosen] = inputs[chosen]
            inputs[chosen] = self.resolved_mask_token
            loss_mask[chosen] = self.mlm_weight
        return {**batch, "inputs": inputs, "targets": targets, "loss_mask": loss_mask}

    def eval_loss_mask(self, batch: dict[str, Any]) -> Any:
        """Next-token scores only where the encoder does not read the target (`reads_its_target`)."""
        return np.where(self.reads_its_target(batch), 0.0, batch["loss_mask"]).astype(np.float32)


class Layer(nnx.Module):
    def __init__(self, cfg: JRTConfig, mixer: str, *, rngs: nnx.Rngs):
        d = cfg.d_model
        out = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.cfg, self.mixer_kind = cfg, mixer
        self.norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
        if mixer == "c":
            self.mixer = pla.BaseConv(d, taps=cfg.conv_taps, init_std=cfg.init_std, out_std=out, rngs=rngs)
        elif mixer == "p":
            self.mixer = pla.PrefixLinearAttention(
                d,
                cfg.num_heads,
                cfg.feature_dim,
                cfg.resolved_head_dim,
                prefix_len=cfg.prefix_len,
                chunk_size=cfg.chunk_size,
                impl=cfg.pla_impl,
                init_std=cfg.init_std,
                out_std=out,
                rngs=rngs,
            )
        else:
            self.mixer = WindowAttention(
                d,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.resolved_head_dim,
                window=cfg.window,
                prefix=0,
                rope_theta=cfg.rope_theta,
                config=cfg.attention,
                init_std=cfg.init_std,
                out_std=out,
                rngs=rngs,
            )
        self.mlp_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(d, cfg.mlp_expansion * d, init_std=cfg.init_std, out_std=out, rngs=rngs)

    def init_cache(self, batch: int, max_len: int) -> Any:
        if self.mixer_kind == "w":
            shape = (batch, max_len, self.cfg.num_kv_heads, self.cfg.resolved_head_dim)
            return {"k": jnp.zeros(shape), "v": jnp.zeros(shape)}
        return self.mixer.init_cache(batch)

    def __call__(self, x, cache, *, positions, segment_ids, prefix_mask, index):
        h = self.norm(x)
        if self.mixer_kind == "c":
            h, cache = self.mixer(h, cache, segment_ids=segment_ids)
        elif self.mixer_kind == "p":
            h, cache = self.mixer(
                h, cache, positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask, index=index
            )
        elif cache is None:
            h = self.mixer(h, positions, segment_ids)
        else:
            h, cache = self.mixer.step(h, positions, cache, index)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "embed")), cache


class Unit(nnx.Module):
    """One repeat of `layer_pattern`: layers named l0, l1, ..."""

    def __init__(self, cfg: JRTConfig, *, rngs: nnx.Rngs):
        self.names = [f"l{i}" for i in range(len(cfg.layer_pattern))]
        for name, mixer in zip(self.names, cfg.layer_pattern, strict=True):
            setattr(self, name, Layer(cfg, mixer, rngs=rngs))

    def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
        return {name: getattr(self, name).init_cache(batch, max_len) for name in self.names}

    def __call__(self, x, cache, *, positions, segment_ids=None, index=None, prefix_mask=None):
        new = {}
        for name in self.names:
            x, new[name] = getattr(self, name)(
                x,
                None if cache is None else cache[name],
                positions=positions,
                segment_ids=segment_ids,
                prefix_mask=prefix_mask,
                index=index,
            )
        return x, (None if cache is None else new)


class JRT(CausalLM):
    def __init__(self, cfg: JRTConfig, *, rngs: nnx.Rngs):
        self._init_embedding(cfg, rngs, normal(cfg.init_std))
        units = cfg.num_layers // len(cfg.layer_pattern)
        self.layers = LayerStack(lambda r: Unit(cfg, rngs=r), units, rngs=rngs, scan=cfg.scan_layers, remat=cfg.remat)
        self._init_head(RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs), rngs, normal(cfg.init_std))

    def hidden(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The parallel form; reads `prefix_mask` (1: the encoder's tokens) besides the skeleton's fields."""
        positions = parallel_positions(batch)
        x = self.embed_tokens(batch["inputs"], positions)
        return self.hidden_embedded(
            x, positions=positions, segment_ids=batch.get("segment_ids"), prefix_mask=batch.get("prefix_mask")
        )

    def hidden_embedded(self, x, *, positions, segment_ids=None, prefix_mask=None):
        """x [B, T, d_model] at `positions` [B, T]; `prefix_mask` [B, T] or None (the first `prefix_len` tokens).
        -> ([B, T, d_model], {})."""
        x, _ = self.layers(x, None, positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask)
        return x, {}

    def layer_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> dict[str, Any]:
        """Conv histories, PLA states (float32) and window KV caches of `max_len` slots."""
        del dtype
        if max_len <= 0 and "w" in self.cfg.layer_pattern:
            raise ValueError(f"init_cache: JRT's window attention needs max_len > 0, got {max_len}")
        return nnx.eval_shape(lambda: Unit(self.cfg, rngs=nnx.Rngs(0))).init_cache(batch_size, max(max_len, 1))

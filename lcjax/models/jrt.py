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
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers import prefix_linear_attention as pla
from lcjax.layers.attention import AttentionConfig
from lcjax.layers.mlp import SwiGLU
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal
from lcjax.layers.stack import LayerStack
from lcjax.layers.window_attention import WindowAttention
from lcjax.models.lm import CausalLM, ModelConfig
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
    # `mlm_weight` × the masked-token loss on the encoder's tokens, `mlm_rate` of them replaced by `mask_token` (-1:
    # vocab_size − 1, byte 0xFF, which no UTF-8 text holds) and predicted at their own positions. mlm_weight 0: the
    # next-token loss alone.
    mlm_rate: float = 0.15
    mlm_weight: float = 0.25
    mask_token: int = -1
    attention: AttentionConfig = AttentionConfig()

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

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def validate(self, *, mesh: dict[str, int], seq_len: int, max_len: int) -> None:
        super().validate(mesh=mesh, seq_len=seq_len, max_len=max_len)
        for name in ("num_heads", "num_kv_heads", "window", "conv_taps", "mlp_expansion", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        if not isinstance(self.feature_dim, int) or isinstance(self.feature_dim, bool) or self.feature_dim <= 0:
            raise ConfigError("model.feature_dim", f"must be a positive integer, got {self.feature_dim!r}")
        if not 0 < self.prefix_len < seq_len:
            raise ConfigError(
                "model.prefix_len",
                f"={self.prefix_len} must be in [1, train.seq_len={seq_len}): the encoder's M tokens leave the "
                "next-token loss the rest of the row",
            )
        if not self.layer_pattern or set(self.layer_pattern) - set(MIXERS):
            raise ConfigError(
                "model.layer_pattern", f"={self.layer_pattern!r}; expected letters of {sorted(MIXERS)} ({MIXERS})"
            )
        if self.num_layers % len(self.layer_pattern):
            raise ConfigError(
                "model.num_layers",
                f"={self.num_layers} must be a multiple of len(model.layer_pattern={self.layer_pattern!r})",
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "model.num_kv_heads", f"={self.num_kv_heads} must divide model.num_heads={self.num_heads}"
            )
        if not self.head_dim and self.d_model % self.num_heads:
            raise ConfigError("model.num_heads", f"={self.num_heads} must divide model.d_model={self.d_model}")
        if "w" in self.layer_pattern and self.resolved_head_dim % 2:
            raise ConfigError("model.head_dim", f"={self.resolved_head_dim} must be even for RoPE")
        if not 0.0 <= self.mlm_rate <= 1.0:
            raise ConfigError("model.mlm_rate", f"must be in [0, 1], got {self.mlm_rate}")
        if self.mlm_weight < 0:
            raise ConfigError("model.mlm_weight", f"must be >= 0, got {self.mlm_weight}")
        if not -1 <= self.mask_token < self.vocab_size:
            raise ConfigError("model.mask_token", f"={self.mask_token} must be -1 or a token id < {self.vocab_size}")
        if self.pla_impl not in pla.IMPLS:
            raise ConfigError("model.pla_impl", f"={self.pla_impl!r}; expected one of {list(pla.IMPLS)}")
        self.check_divisible("tensor", mesh, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)
        self.attention.validate(mesh=mesh, seq_len=seq_len)

    def flops_per_token(self, seq_len: int) -> float:
        """6 × matmul parameters per token, plus PLA's state update and read (4·F·dv per head) and the window's
        attention (12 · heads · head_dim · window / 2 per window layer)."""
        d, hd, heads = self.d_model, self.resolved_head_dim, self.num_heads
        features = pla.num_features(self.feature_dim)
        counts = {m: self.layer_pattern.count(m) * self.num_layers // len(self.layer_pattern) for m in MIXERS}
        mlp = 3 * d * self.mlp_expansion * d
        per_layer = {
            "c": d * 4 * d + 2 * d * d,
            "p": d * heads * (3 * self.feature_dim + 2 * hd) + heads * hd * d,
            "w": d * hd * (2 * heads + 2 * self.num_kv_heads),
        }
        params = sum(counts[m] * (per_layer[m] + mlp) for m in MIXERS) + d * self.vocab_size
        mixing = counts["p"] * heads * 4 * features * (hd + 1) + counts["w"] * 6 * heads * hd * min(
            self.window, seq_len
        )
        return 6 * params + mixing


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
    reads_prefix_mask = True

    def __init__(self, cfg: JRTConfig, *, rngs: nnx.Rngs):
        self._init_embedding(cfg, rngs, normal(cfg.init_std))
        units = cfg.num_layers // len(cfg.layer_pattern)
        self.layers = LayerStack(lambda r: Unit(cfg, rngs=r), units, rngs=rngs, scan=cfg.scan_layers, remat=cfg.remat)
        self._init_head(RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs), rngs, normal(cfg.init_std))

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

"""Birdie's models (Blouir et al., EMNLP 2024): Hawk (RG-LRU) and Gated-SSM stacks where every other layer is
bidirectional over the prefix. `reference/xlstm_ssm_birdie_jrt.md` §2.2–2.3 and §3.3.

Hawk residual block (De et al. 2024), width D, RG-LRU width W (`lru_width`, 0: D):

    x += W_o( RG-LRU(Conv1D_4(W_x n)) ⊙ GELU(W_y n) ),   n = RMSNorm(x)
    x += W_down( GELU(n W_gate) ⊙ (n W_up) ),             n = RMSNorm(x), hidden `mlp_expansion`·D

Gated-SSM block (Birdie §3.4, the SSM and MLP fused): x += GatedSSM(RMSNorm(x)) (`lcjax.layers.rglru.GatedSSM`).

`bidirectional=True` makes the layers alternate (bidirectional, causal), as the paper repeats them: a bidirectional
layer splits its recurrence's state in half (`rglru.bidirectional_scan`): the forward half is the causal scan over
the whole row, the reverse half scans right to left over the prefix only (`prefix_mask` 1 in the batch) and is the
scan's input b_t alone over the causal suffix, so no target leaks backwards. Parameters and FLOPs equal a causal
layer's. Without a `prefix_mask` the whole row is causal. Packed documents (`segment_ids`, or `positions` restarting
at 0) are exact resets: the decay is 0 at a document start, the conv reads no other document, and the reverse scan
stops at a document's last token.

Decode carries per layer the conv history [B, 3, W] and the forward state ([B, W], or [B, W/2] in a bidirectional
layer): constant memory per token. `prefill(tokens, prefix_len)` consumes a prompt from a fresh cache with its
first `prefix_len` tokens read both ways, as in training, once; `decode` then goes on causally with the same fixed
state (every decoded token is in the causal region, where the reverse half is b_t alone and carries no state). The
prefix's last position reads the first causal token (Birdie's start-generating token, `rglru.bidirectional_scan`),
so that token must be in the prompt: `prefix_len` < the prompt's length. `decode` alone is the all-causal model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers import rglru
from lcjax.layers.conv import causal_conv
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal, param, zeros
from lcjax.layers.stack import LayerStack
from lcjax.models.lm import CausalLM, ModelConfig
from lcjax.parallel.sharding import constrain

MIXERS = ("hawk", "gated_ssm")


@dataclasses.dataclass(frozen=True)
class BirdieConfig(ModelConfig):
    name: str = "birdie"
    mixer: str = "hawk"  # hawk (RG-LRU block + gated GELU MLP) | gated_ssm (Birdie's fused Gated SSM)
    lru_width: int = 0  # the recurrence's width W (0: d_model)
    num_gate_blocks: int = 4  # RG-LRU gates: block-diagonal with this many blocks
    d_conv: int = 4
    mlp_expansion: int = 3
    bidirectional: bool = True  # layers alternate (bidirectional, causal); False: every layer causal
    scan_impl: str = "auto"  # auto (the Pallas kernel on TPU, associative elsewhere) | linear | associative | pallas
    init_std: float = 0.02

    @property
    def width(self) -> int:
        return self.lru_width or self.d_model

    def validate(self, *, mesh: dict[str, int], seq_len: int, max_len: int) -> None:
        super().validate(mesh=mesh, seq_len=seq_len, max_len=max_len)
        if self.mixer not in MIXERS:
            raise ConfigError("model.mixer", f"={self.mixer!r}; expected one of {list(MIXERS)}")
        if self.scan_impl not in rglru.SCANS:
            raise ConfigError("model.scan_impl", f"={self.scan_impl!r}; expected one of {list(rglru.SCANS)}")
        for name, least in (("lru_width", 0), ("num_gate_blocks", 1), ("d_conv", 1), ("mlp_expansion", 1)):
            if getattr(self, name) < least:
                raise ConfigError(f"model.{name}", f"must be >= {least}, got {getattr(self, name)}")
        if self.width % self.num_gate_blocks:
            raise ConfigError(
                "model.num_gate_blocks", f"={self.num_gate_blocks} must divide the RG-LRU width {self.width}"
            )
        if self.bidirectional and self.num_layers % 2:
            raise ConfigError(
                "model.num_layers", f"={self.num_layers} must be even: bidirectional layers alternate with causal ones"
            )
        if self.bidirectional and self.width % 2:
            raise ConfigError(
                "model.lru_width", f"the width {self.width} must be even: a bidirectional state splits in half"
            )

    def flops_per_token(self, seq_len: int) -> float:
        """6 * matmul params (the scans' elementwise work is not counted)."""
        del seq_len
        d, w = self.d_model, self.width
        if self.mixer == "hawk":
            per_layer = 3 * d * w + 2 * w * w // self.num_gate_blocks + 3 * d * self.mlp_expansion * d
        else:
            per_layer = 5 * d * w
        return 6 * (self.num_layers * per_layer + d * self.vocab_size)


class HawkBlock(nnx.Module):
    def __init__(self, cfg: BirdieConfig, bidirectional: bool, *, rngs: nnx.Rngs):
        d, w, hidden = cfg.d_model, cfg.width, cfg.mlp_expansion * cfg.d_model
        self.cfg, self.bidirectional = cfg, bidirectional
        out = 1 / math.sqrt(2 * cfg.num_layers)
        self.norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.w_x = param(rngs, (d, w), ("embed", "mlp"), normal(1 / math.sqrt(d)))
        self.w_y = param(rngs, (d, w), ("embed", "mlp"), normal(1 / math.sqrt(d)))
        self.conv = param(rngs, (cfg.d_conv, w), (None, "mlp"), normal(1 / math.sqrt(cfg.d_conv)))
        self.conv_bias = param(rngs, (w,), ("mlp",), zeros)
        self.rglru = rglru.RGLRU(w, cfg.num_gate_blocks, rngs, impl=cfg.scan_impl)
        self.w_o = param(rngs, (w, d), ("mlp", "embed"), normal(out / math.sqrt(w)))
        self.mlp_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.w_gate = param(rngs, (d, hidden), ("embed", "mlp"), normal(1 / math.sqrt(d)))
        self.w_up = param(rngs, (d, hidden), ("embed", "mlp"), normal(1 / math.sqrt(d)))
        self.w_down = param(rngs, (hidden, d), ("mlp", "embed"), normal(out / math.sqrt(hidden)))

    def init_cache(self, batch: int) -> dict[str, jax.Array]:
        w = self.cfg.width
        return {
            "conv": jnp.zeros((batch, self.cfg.d_conv - 1, w)),
            "h": jnp.zeros((batch, w // 2 if self.bidirectional else w)),
        }

    def __call__(self, x, cache, *, resets, segment_ids, causal):
        dtype = x.dtype
        n = self.norm(x)
        y = jax.nn.gelu(n @ self.w_y[...].astype(dtype))
        u, history = causal_conv(
            n @ self.w_x[...].astype(dtype),
            self.conv[...],
            self.conv_bias[...],
            history=None if cache is None else cache["conv"],
            segment_ids=segment_ids,
        )
        a, b = self.rglru.coefficients(u, resets, self.cfg.width // 2 if self.bidirectional else None)
        h0 = None if cache is None else cache["h"]
        if self.bidirectional:
            h, last = rglru.bidirectional_scan(a, b, resets, causal, h0, impl=self.cfg.scan_impl)
        else:
            h, last = rglru.scan(a, b, h0, impl=self.cfg.scan_impl)
        h = constrain(h.astype(dtype), ("batch", "length", "mlp"))
        x = x + (h * y) @ self.w_o[...].astype(dtype)
        n = self.mlp_norm(x)
        hidden = jax.nn.gelu(n @ self.w_gate[...].astype(dtype)) * (n @ self.w_up[...].astype(dtype))
        x = x + constrain(hidden, ("batch", "length", "mlp")) @ self.w_down[...].astype(dtype)
        return x, (None if cache is None else {"conv": history, "h": last})


class GatedSSMBlock(nnx.Module):
    def __init__(self, cfg: BirdieConfig, bidirectional: bool, *, rngs: nnx.Rngs):
        self.cfg, self.bidirectional = cfg, bidirectional
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.ssm = rglru.GatedSSM(cfg.d_model, cfg.width, rngs, bidirectional=bidirectional, impl=cfg.scan_impl)

    def init_cache(self, batch: int) -> dict[str, jax.Array]:
        w = self.cfg.width
        return {"h": jnp.zeros((batch, w // 2 if self.bidirectional else w))}

    def __call__(self, x, cache, *, resets, segment_ids, causal):
        del segment_ids  # the gates read the token alone: a reset isolates documents
        y, last = self.ssm(self.norm(x), None if cache is None else cache["h"], resets, causal)
        return x + y, (None if cache is None else {"h": last})


class Unit(nnx.Module):
    """The repeating unit: (bidirectional, causal) blocks, or one causal block."""

    def __init__(self, cfg: BirdieConfig, *, rngs: nnx.Rngs):
        block = HawkBlock if cfg.mixer == "hawk" else GatedSSMBlock
        self.bidirectional = cfg.bidirectional
        if cfg.bidirectional:
            self.bidir = block(cfg, True, rngs=rngs)
        self.causal = block(cfg, False, rngs=rngs)

    def init_cache(self, batch: int) -> dict[str, Any]:
        cache = {"causal": self.causal.init_cache(batch)}
        if self.bidirectional:
            cache["bidir"] = self.bidir.init_cache(batch)
        return cache

    def __call__(self, x, cache, *, positions, segment_ids=None, index=None, prefix_mask=None):
        del index
        resets = positions == 0  # a row's and a document's first token
        if segment_ids is not None:
            resets = resets | rglru.segment_resets(segment_ids)
        causal = jnp.ones(x.shape[:2], bool) if prefix_mask is None else prefix_mask == 0
        new = {}
        kwargs = {"resets": resets, "segment_ids": segment_ids, "causal": causal}
        if self.bidirectional:
            x, new["bidir"] = self.bidir(x, None if cache is None else cache["bidir"], **kwargs)
        x, new["causal"] = self.causal(x, None if cache is None else cache["causal"], **kwargs)
        return constrain(x, ("batch", "length", "embed")), (None if cache is None else new)


class Birdie(CausalLM):
    final_norm_name = "norm_f"
    reads_prefix_mask = True

    def __init__(self, cfg: BirdieConfig, *, rngs: nnx.Rngs):
        self._init_embedding(cfg, rngs, normal(cfg.init_std))
        units = cfg.num_layers // 2 if cfg.bidirectional else cfg.num_layers
        self.layers = LayerStack(lambda r: Unit(cfg, rngs=r), units, rngs=rngs, scan=cfg.scan_layers, remat=cfg.remat)
        self._init_head(RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs), rngs, normal(cfg.init_std))

    def hidden_embedded(self, x, *, positions, segment_ids=None, prefix_mask=None):
        """x [B, T, d_model]; positions restart at 0 at a document start (a reset), as do segment_id changes;
        prefix_mask [B, T] (1: prefix) or None (all causal). -> ([B, T, d_model], {})."""
        x, _ = self.layers(x, None, positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask)
        return x, {}

    def prefill(self, tokens: jax.Array, prefix_len: int) -> tuple[jax.Array, dict[str, Any]]:
        """tokens [B, n] from a fresh cache, the first `prefix_len` (0 <= prefix_len < n, a Python int) read
        bidirectionally and the rest causally (module docstring). -> (logits [B, n, V], the cache `decode` goes on
        from); the logits equal the parallel form's on the same row with that `prefix_mask`."""
        batch, n = tokens.shape
        if not 0 <= prefix_len < n:
            raise ValueError(
                f"Birdie.prefill: prefix_len must be in [0, {n}) for a prompt of {n} tokens, got {prefix_len}: the "
                "prefix's last position reads the next (start-generating) token, which must be in the prompt"
            )
        positions = jnp.broadcast_to(jnp.arange(n), (batch, n))
        prefix_mask = (positions < prefix_len).astype(jnp.int32)
        cache = self.init_cache(batch)
        x, layers = self.layers(
            self.embed_tokens(tokens, positions), cache["layers"], positions=positions, prefix_mask=prefix_mask
        )
        return self.head(x), {"index": cache["index"] + n, "layers": layers}

    def layer_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> dict[str, Any]:
        """Conv histories and forward states, float32; independent of `max_len` and `dtype`."""
        del max_len, dtype
        return nnx.eval_shape(lambda: Unit(self.cfg, rngs=nnx.Rngs(0))).init_cache(batch_size)

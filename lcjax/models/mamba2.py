"""Mamba-2 (Dao & Gu 2024): a stack of x += Mixer(RMSNorm(x)) blocks around the SSD scan.

`reference/xlstm_ssm_birdie_jrt.md` §2.1. The mixer, with d_inner = expand·D, H = d_inner / head_dim heads and G
groups of B/C of state size N:

    z, x, B, C, dt = u W_z, u W_x, u W_B, u W_C, u W_dt          (one in_proj in the reference, split here by part)
    x, B, C = silu(conv4(x)), silu(conv4(B)), silu(conv4(C))     (causal depthwise, with bias)
    Δ = softplus(dt + dt_bias),  A = −exp(A_log)
    y = SSD(x, Δ, A, B, C) + D ⊙ x
    out = W_out (RMSNorm_group(y ⊙ silu(z)) ⊙ w)                 (gated RMSNorm, norm after the gate, per group)

Logits = RMSNorm(x) Eᵀ (tied; `tie_embeddings=False` adds an lm_head). Packed documents (`segment_ids`) are exact
resets (the SSD decay is 0 at a document start; the convolutions restart). Decoding carries the SSM state
[B, H, head_dim, N] and the conv histories per layer: constant memory per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers.conv import causal_conv
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal, ones, param
from lcjax.layers.ssd import IMPLS as SSD_IMPLS
from lcjax.layers.ssd import ssd_scan
from lcjax.layers.stack import LayerStack
from lcjax.models.lm import CausalLM, ModelConfig
from lcjax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Mamba2Config(ModelConfig):
    name: str = "mamba2"
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 32
    n_groups: int = 1
    chunk_size: int = 64
    ssd_impl: str = "xla"  # the chunked SSD in XLA, or the Pallas kernel: pallas | interpret | auto
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    init_std: float = 0.02

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.head_dim

    def validate(self, *, mesh: dict[str, int], seq_len: int, max_len: int) -> None:
        super().validate(mesh=mesh, seq_len=seq_len, max_len=max_len)
        for name in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.ssd_impl not in SSD_IMPLS:
            raise ConfigError("model.ssd_impl", f"={self.ssd_impl!r}; expected one of {list(SSD_IMPLS)}")
        if self.d_inner % self.head_dim:
            raise ConfigError(
                "model.head_dim", f"={self.head_dim} must divide d_inner = expand*d_model = {self.d_inner}"
            )
        if self.num_heads % self.n_groups:
            raise ConfigError("model.n_groups", f"={self.n_groups} must divide the {self.num_heads} heads")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError("model.dt_min", f"need 0 < dt_min={self.dt_min} <= dt_max={self.dt_max}")
        if self.num_heads % mesh["tensor"]:
            raise ConfigError(
                "mesh.tensor", f"={mesh['tensor']} must divide the {self.num_heads} heads (expand*d_model/head_dim)"
            )

    def flops_per_token(self, seq_len: int) -> float:
        """6 * matmul params + 3x the SSD per head and token: intra-chunk 2·Q·(N + P), state read/update 4·P·N."""
        d, inner, gn, heads = self.d_model, self.d_inner, self.n_groups * self.d_state, self.num_heads
        params = self.num_layers * (d * (2 * inner + 2 * gn + heads) + inner * d) + d * self.vocab_size
        q = min(self.chunk_size, seq_len)
        ssd = self.num_layers * heads * (2 * q * (self.d_state + self.head_dim) + 4 * self.head_dim * self.d_state)
        return 6 * params + 3 * ssd


def _uniform(low: float, high: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, low, high)


class Mixer(nnx.Module):
    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        d, heads, p, g, n, k = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.d_state, cfg.d_conv
        self.cfg = cfg
        std = normal(cfg.init_std)
        self.w_z = param(rngs, (d, heads, p), ("embed", "heads", "head_dim"), std)
        self.w_x = param(rngs, (d, heads, p), ("embed", "heads", "head_dim"), std)
        self.w_b = param(rngs, (d, g, n), ("embed", None, None), std)
        self.w_c = param(rngs, (d, g, n), ("embed", None, None), std)
        self.w_dt = param(rngs, (d, heads), ("embed", "heads"), std)
        conv = _uniform(-(k**-0.5), k**-0.5)  # PyTorch's depthwise Conv1d default
        self.conv_x = param(rngs, (k, heads, p), (None, "heads", "head_dim"), conv)
        self.conv_x_bias = param(rngs, (heads, p), ("heads", "head_dim"), conv)
        self.conv_b = param(rngs, (k, g, n), (None, None, None), conv)
        self.conv_b_bias = param(rngs, (g, n), (None, None), conv)
        self.conv_c = param(rngs, (k, g, n), (None, None, None), conv)
        self.conv_c_bias = param(rngs, (g, n), (None, None), conv)

        def dt_bias(key, shape, dtype):  # softplus⁻¹ of Δ ~ log-uniform [dt_min, dt_max], floored
            log_dt = jax.random.uniform(key, shape, dtype, math.log(cfg.dt_min), math.log(cfg.dt_max))
            dt = jnp.maximum(jnp.exp(log_dt), cfg.dt_floor)
            return dt + jnp.log(-jnp.expm1(-dt))

        self.dt_bias = param(rngs, (heads,), ("heads",), dt_bias)
        self.a_log = param(rngs, (heads,), ("heads",), lambda key, s, t: jnp.log(_uniform(1.0, 16.0)(key, s, t)))
        self.d_skip = param(rngs, (heads,), ("heads",), ones)
        self.norm = param(rngs, (heads, p), ("heads", "head_dim"), ones)
        self.w_out = param(
            rngs, (heads, p, d), ("heads", "head_dim", "embed"), normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        )

    def init_cache(self, batch: int) -> dict[str, Any]:
        cfg = self.cfg
        heads, p, g, n, taps = cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.d_state, cfg.d_conv - 1
        return {
            "conv_x": jnp.zeros((batch, taps, heads, p)),
            "conv_b": jnp.zeros((batch, taps, g, n)),
            "conv_c": jnp.zeros((batch, taps, g, n)),
            "ssm": jnp.zeros((batch, heads, p, n)),
        }

    def __call__(self, u, cache, segment_ids=None):
        cfg, dtype = self.cfg, u.dtype

        def proj(w):
            return jnp.einsum("btd,d...->bt...", u, w[...].astype(dtype))

        z, dt = proj(self.w_z), proj(self.w_dt)
        parts, histories = {}, {}
        for name, w, kernel, bias in (
            ("x", self.w_x, self.conv_x, self.conv_x_bias),
            ("b", self.w_b, self.conv_b, self.conv_b_bias),
            ("c", self.w_c, self.conv_c, self.conv_c_bias),
        ):
            history = None if cache is None else cache[f"conv_{name}"]
            out, histories[f"conv_{name}"] = causal_conv(
                proj(w), kernel[...], bias[...], history=history, segment_ids=segment_ids
            )
            parts[name] = jax.nn.silu(out.astype(jnp.float32))
        x = constrain(parts["x"], ("batch", "length", "heads", "head_dim"))
        delta = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        a = -jnp.exp(self.a_log[...].astype(jnp.float32))
        length = u.shape[1]
        chunk = cfg.chunk_size if cache is None else min(cfg.chunk_size, length)
        y, ssm = ssd_scan(
            x,
            delta,
            a,
            parts["b"],
            parts["c"],
            chunk_size=chunk,
            initial_state=None if cache is None else cache["ssm"],
            segment_ids=segment_ids,
            impl=cfg.ssd_impl,
        )
        y = y + self.d_skip[...].astype(jnp.float32)[:, None] * x
        y = y * jax.nn.silu(z.astype(jnp.float32))
        grouped = y.reshape(*y.shape[:2], cfg.n_groups, -1)  # RMSNorm per group of heads
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + cfg.norm_eps)
        y = (grouped.reshape(y.shape) * self.norm[...].astype(jnp.float32)).astype(dtype)
        out = jnp.einsum("bthp,hpd->btd", y, self.w_out[...].astype(dtype))
        new = None if cache is None else {**histories, "ssm": ssm}
        return out, new


class Block(nnx.Module):
    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mixer = Mixer(cfg, rngs=rngs)

    def __call__(self, x, cache, *, positions=None, segment_ids=None, index=None):
        del positions, index  # the state carries the order
        h, cache = self.mixer(self.norm(x), cache, segment_ids)
        return constrain(x + h, ("batch", "length", "embed")), cache


class Mamba2(CausalLM):
    final_norm_name = "norm_f"

    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        self._init_embedding(cfg, rngs, normal(cfg.init_std))
        self.layers = LayerStack(
            lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs=rngs, scan=cfg.scan_layers, remat=cfg.remat
        )
        self._init_head(RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs), rngs, normal(cfg.init_std))

    def hidden_embedded(self, x, *, positions, segment_ids=None):
        """Parallel form on embedded inputs x [B, T, d_model]; segment_ids (exact resets) or None. `positions` is not
        used (the recurrence orders the tokens). -> [B, T, d_model]."""
        del positions
        x, _ = self.layers(x, None, segment_ids=segment_ids)
        return x, {}

    def layer_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
        """SSM state and conv histories, float32; independent of `max_len` and `dtype`."""
        del max_len, dtype
        return nnx.eval_shape(lambda: Mixer(self.cfg, rngs=nnx.Rngs(0))).init_cache(batch_size)

"""xLSTM language models (Beck et al. 2024): the xLSTM-Large block (the 7B design) and the NeurIPS block stacks.

`reference/xlstm_ssm_birdie_jrt.md` §1.5–1.7. Two variants, one config:

- **large** (xLSTM-7B, `xLSTMForCausalLM` in transformers): pure mLSTM, per block
  x += mLSTMLayer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)); logits = cap·tanh(W RMSNorm(x) / cap), cap 30. The layer:
  q, k = x W_q, x W_k (D·qk_dim_factor wide), v, õ = x W_v, x W_o (D·v_dim_factor); ĩ, f̃ = 15·tanh((x W + b)/15)
  per head; h = mLSTM cell; out = W_out (σ(õ) ⊙ LayerNorm_head(h)). No conv, no skip.
- **neurips** (`xLSTM[a:b]`): a repeating group of blocks, `pattern` ("m" mLSTM, "s" sLSTM; "mmmmmmms" is
  xLSTM[7:1]). mLSTM block, "pre-up-projection", no FFN: [x_m, z] = LN(x) W_up (E = round_up(2D, 64) each);
  x_c = silu(conv4(x_m)); q, k = HW(x_c), v = HW(x_m) (headwise 4×4 blocks); ĩ, f̃ = [q;k;v] W + b;
  h = (GN_head(cell) + skip ⊙ x_c) ⊙ silu(z); x += h W_down. sLSTM block, "post-up-projection":
  x_c = silu(conv4(LN(x))); the cell's i and f slots take the **f** and **i** headwise projections of x_c (the
  reference's swap, kept for weight compatibility: §1.4), z and o those of LN(x); x += GN_head(sLSTM);
  x += W_down(gelu(LN(x) W_g) ⊙ LN(x) W_u) (width round_up(1.3 D, 64)). LN is the weight-offset LayerNorm
  (scale 1 + w, no bias) and the stack ends with one.

Packed documents (`segment_ids`) are exact resets: the mLSTM cell masks across documents, the sLSTM and the
convolutions restart. Decoding carries each block's cell state (and conv history): constant memory per token.
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
from lcjax.layers.mlp import SwiGLU
from lcjax.layers.mlstm import FORMS, mlstm_cell, mlstm_step
from lcjax.layers.mlstm import IMPLS as MLSTM_IMPLS
from lcjax.layers.norms import OffsetLayerNorm, RMSNorm, head_norm
from lcjax.layers.params import normal, ones, param, small_init, wang_init, zeros
from lcjax.layers.slstm import slstm_scan
from lcjax.layers.stack import LayerStack
from lcjax.models.lm import CausalLM, ModelConfig
from lcjax.parallel.sharding import constrain

VARIANTS = ("large", "neurips")


def round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class XLSTMConfig(ModelConfig):
    name: str = "xlstm"
    variant: str = "large"  # large (xLSTM-7B block) | neurips (xLSTM[a:b] block stacks)
    num_layers: int = 2  # blocks
    num_heads: int = 4
    # large
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667  # SwiGLU width round_up(D * factor, ffn_multiple) (transformers' 2.667)
    ffn_multiple: int = 64
    gate_soft_cap: float = 15.0  # 0: no cap
    logit_soft_cap: float = 30.0  # the large variant's; 0: no cap
    igate_bias_init: float = -10.0
    # neurips
    pattern: str = "m"  # the repeating group of blocks: m mLSTM, s sLSTM ("mmmmmmms": xLSTM[7:1])
    proj_factor: float = 2.0  # mLSTM up-projection E = round_up(D * proj_factor, 64)
    slstm_ffn_factor: float = 1.3
    conv_size: int = 4
    qkv_block: int = 4  # mLSTM headwise q/k/v block size
    # both
    norm_eps: float = 1e-6
    cell_eps: float = 1e-6
    cell_form: str = "chunkwise"  # parallel | chunkwise | recurrent (training and prefill)
    mlstm_impl: str = "xla"  # the chunkwise form in XLA, or the Pallas kernel: pallas | interpret | auto
    chunk_size: int = 64
    tie_embeddings: bool = False

    @property
    def qk_dim(self) -> int:
        return int(self.d_model * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.d_model * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.d_model * self.ffn_proj_factor, self.ffn_multiple)

    @property
    def inner_dim(self) -> int:  # neurips mLSTM E
        return round_up(self.d_model * self.proj_factor, 64)

    @property
    def slstm_ffn_dim(self) -> int:
        return round_up(self.d_model * self.slstm_ffn_factor, 64)

    def validate(self, *, mesh: dict[str, int], seq_len: int, max_len: int) -> None:
        super().validate(mesh=mesh, seq_len=seq_len, max_len=max_len)
        if self.variant not in VARIANTS:
            raise ConfigError("model.variant", f"={self.variant!r}; expected one of {list(VARIANTS)}")
        for name in ("num_heads", "chunk_size", "conv_size", "qkv_block"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        if not self.pattern or set(self.pattern) - {"m", "s"}:
            raise ConfigError("model.pattern", f"={self.pattern!r}; expected a string of m (mLSTM) and s (sLSTM)")
        if self.variant == "large" and self.pattern != "m":
            raise ConfigError("model.pattern", f"={self.pattern!r}: the large variant is pure mLSTM; use pattern=m")
        if self.num_layers % len(self.pattern):
            raise ConfigError(
                "model.num_layers", f"={self.num_layers} must be a multiple of len(model.pattern)={len(self.pattern)}"
            )
        heads = self.num_heads
        if self.variant == "large":
            for name, width in (("qk_dim_factor", self.qk_dim), ("v_dim_factor", self.v_dim)):
                if width <= 0 or width % heads:
                    raise ConfigError(
                        f"model.{name}", f"gives width {width}; it must be a positive multiple of num_heads={heads}"
                    )
        else:
            if self.inner_dim % heads or (self.inner_dim // heads) % self.qkv_block:
                raise ConfigError(
                    "model.num_heads",
                    f"={heads}: the mLSTM width {self.inner_dim} must split into heads of whole "
                    f"{self.qkv_block}-blocks (model.qkv_block)",
                )
            if "s" in self.pattern and self.d_model % heads:
                raise ConfigError("model.num_heads", f"={heads} must divide model.d_model={self.d_model} (sLSTM)")
        if self.cell_form not in FORMS:
            raise ConfigError("model.cell_form", f"={self.cell_form!r}; expected one of {list(FORMS)}")
        if self.mlstm_impl not in MLSTM_IMPLS:
            raise ConfigError("model.mlstm_impl", f"={self.mlstm_impl!r}; expected one of {list(MLSTM_IMPLS)}")
        if self.mlstm_impl != "xla" and self.cell_form != "chunkwise":
            raise ConfigError(
                "model.mlstm_impl", f"={self.mlstm_impl!r} needs model.cell_form='chunkwise', got {self.cell_form!r}"
            )
        ffn = ("ffn_proj_factor", self.ffn_dim) if self.variant == "large" else ("slstm_ffn_factor", self.slstm_ffn_dim)
        self.check_divisible("tensor", mesh, num_heads=heads, **dict([ffn]))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (an estimate): 6 * matmul params, plus 3x the cell's chunkwise work per head:
        intra-chunk 2·L·(dqk + dv) and the state's read and update 4·dqk·dv, with L = min(chunk, seq_len)."""
        d, heads, chunk = self.d_model, self.num_heads, min(self.chunk_size, seq_len)
        params, cell = d * self.vocab_size, 0.0
        for kind in self.pattern * (self.num_layers // len(self.pattern)):
            if self.variant == "large":
                dqk, dv = self.qk_dim // heads, self.v_dim // heads
                params += d * (2 * self.qk_dim + 3 * self.v_dim + 2 * heads) + 3 * d * self.ffn_dim
            elif kind == "m":
                e = self.inner_dim
                dqk = dv = e // heads
                params += 3 * d * e + 3 * e * self.qkv_block + 6 * e * heads
            else:
                dh = d // heads
                params += 4 * d * dh + 4 * d * dh + 3 * d * self.slstm_ffn_dim  # W and R (block-diagonal), FFN
                continue
            cell += heads * (2 * chunk * (dqk + dv) + 4 * dqk * dv)
        return 6 * params + 3 * cell


def _cap(x: jax.Array, cap: float) -> jax.Array:
    return cap * jnp.tanh(x / cap) if cap > 0 else x


def _run_cell(cfg: XLSTMConfig, q, k, v, i, f, state, segment_ids):
    """The mLSTM cell on `[batch, length, heads, ·]` inputs (float32 inside): parallel (state None) or continuing
    `state` (one token: the recurrent step)."""
    q, k, v = (jnp.swapaxes(z, 1, 2).astype(jnp.float32) for z in (q, k, v))
    i, f = (jnp.swapaxes(z, 1, 2).astype(jnp.float32) for z in (i, f))
    if state is None:
        h, state = mlstm_cell(
            q,
            k,
            v,
            i,
            f,
            form=cfg.cell_form,
            chunk_size=cfg.chunk_size,
            eps=cfg.cell_eps,
            segment_ids=segment_ids,
            impl=cfg.mlstm_impl,
        )
    elif q.shape[2] == 1:
        h, state = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], state, eps=cfg.cell_eps)
        h = h[:, :, None]
    else:
        h, state = mlstm_cell(
            q,
            k,
            v,
            i,
            f,
            form=cfg.cell_form,
            chunk_size=cfg.chunk_size,
            eps=cfg.cell_eps,
            initial_state=state,
            impl=cfg.mlstm_impl,
        )
    return jnp.swapaxes(h, 1, 2), state  # [batch, length, heads, dv]


class LargeMLSTM(nnx.Module):
    """The xLSTM-Large mLSTM layer (module docstring)."""

    def __init__(self, cfg: XLSTMConfig, *, rngs: nnx.Rngs):
        d, heads = cfg.d_model, cfg.num_heads
        dqk, dv = cfg.qk_dim // heads, cfg.v_dim // heads
        self.cfg = cfg
        small = small_init(d)
        self.w_q = param(rngs, (d, heads, dqk), ("embed", "heads", "head_dim"), small)
        self.w_k = param(rngs, (d, heads, dqk), ("embed", "heads", "head_dim"), small)
        self.w_v = param(rngs, (d, heads, dv), ("embed", "heads", "head_dim"), small)
        self.w_o = param(rngs, (d, heads, dv), ("embed", "heads", "head_dim"), small)
        self.w_i = param(rngs, (d, heads), ("embed", "heads"), zeros)
        self.w_f = param(rngs, (d, heads), ("embed", "heads"), zeros)
        self.b_i = param(rngs, (heads,), ("heads",), lambda k, s, t: jnp.full(s, cfg.igate_bias_init, t))
        self.b_f = param(rngs, (heads,), ("heads",), lambda k, s, t: jnp.linspace(3.0, 6.0, s[0], dtype=t))
        self.norm = param(rngs, (heads, dv), ("heads", "head_dim"), ones)
        self.w_out = param(rngs, (heads, dv, d), ("heads", "head_dim", "embed"), wang_init(d, cfg.num_layers))

    def __call__(self, x, state, segment_ids=None):
        cfg = self.cfg

        def proj(w):
            return jnp.einsum("btd,dhe->bthe", x, w[...].astype(x.dtype))

        q, k, v, o = proj(self.w_q), proj(self.w_k), proj(self.w_v), proj(self.w_o)
        i = _cap(x @ self.w_i[...].astype(x.dtype) + self.b_i[...].astype(x.dtype), cfg.gate_soft_cap)
        f = _cap(x @ self.w_f[...].astype(x.dtype) + self.b_f[...].astype(x.dtype), cfg.gate_soft_cap)
        h, state = _run_cell(cfg, q, k, v, i, f, state, segment_ids)
        h = head_norm(h, self.norm[...], cfg.norm_eps, offset=False).astype(x.dtype)
        h = constrain(jax.nn.sigmoid(o) * h, ("batch", "length", "heads", "head_dim"))
        return jnp.einsum("bthe,hed->btd", h, self.w_out[...].astype(x.dtype)), state


class LargeBlock(nnx.Module):
    def __init__(self, cfg: XLSTMConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.norm_mlstm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.mlstm = LargeMLSTM(cfg, rngs=rngs)
        self.norm_ffn = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.ffn = SwiGLU(
            d, cfg.ffn_dim, init_std=math.sqrt(2 / (5 * d)), out_std=2 / (cfg.num_layers * math.sqrt(d)), rngs=rngs
        )

    def __call__(self, x, cache, *, positions=None, segment_ids=None, index=None):
        del positions, index  # the state carries the order
        h, cell = self.mlstm(self.norm_mlstm(x), None if cache is None else cache["cell"], segment_ids)
        x = x + h
        x = x + self.ffn(self.norm_ffn(x))
        return constrain(x, ("batch", "length", "embed")), None if cache is None else {"cell": cell}


class NeurIPSMLSTMBlock(nnx.Module):
    """x += mLSTM layer(LN(x)), pre-up-projection (module docstring)."""

    def __init__(self, cfg: XLSTMConfig, *, rngs: nnx.Rngs):
        d, heads, e = cfg.d_model, cfg.num_heads, cfg.inner_dim
        dh, blk = e // heads, cfg.qkv_block
        self.cfg = cfg
        self.norm = OffsetLayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.w_up = param(rngs, (d, heads, dh), ("embed", "heads", "head_dim"), small_init(d))
        self.w_z = param(rngs, (d, heads, dh), ("embed", "heads", "head_dim"), small_init(d))
        self.conv = param(rngs, (cfg.conv_size, heads, dh), (None, "heads", "head_dim"), normal(cfg.conv_size**-0.5))
        self.conv_bias = param(rngs, (heads, dh), ("heads", "head_dim"), zeros)
        block = (heads, dh // blk, blk, blk)  # headwise blocks: [head, block, in, out]
        axes = ("heads", None, None, None)
        self.w_q = param(rngs, block, axes, small_init(d))
        self.w_k = param(rngs, block, axes, small_init(d))
        self.w_v = param(rngs, block, axes, small_init(d))
        gate_axes = (None, "heads", "head_dim", None)  # [q|k|v, head, dim, gate head]
        self.w_i = param(rngs, (3, heads, dh, heads), gate_axes, zeros)
        self.w_f = param(rngs, (3, heads, dh, heads), gate_axes, zeros)
        self.b_i = param(rngs, (heads,), (None,), normal(0.1))
        self.b_f = param(rngs, (heads,), (None,), lambda k, s, t: jnp.linspace(3.0, 6.0, s[0], dtype=t))
        self.out_norm = param(rngs, (heads, dh), ("heads", "head_dim"), zeros)
        self.skip = param(rngs, (heads, dh), ("heads", "head_dim"), ones)
        self.w_down = param(rngs, (heads, dh, d), ("heads", "head_dim", "embed"), wang_init(d, cfg.num_layers))

    def init_cache(self, batch: int) -> dict[str, Any]:
        heads, dh = self.skip.shape
        cell = (
            jnp.zeros((batch, heads, dh, dh)),
            jnp.zeros((batch, heads, dh)),
            jnp.zeros((batch, heads)),
        )
        return {"conv": jnp.zeros((batch, self.cfg.conv_size - 1, heads, dh)), "cell": cell}

    def __call__(self, x, cache, *, segment_ids=None):
        cfg, dtype = self.cfg, x.dtype
        u = self.norm(x)
        x_m = jnp.einsum("btd,dhe->bthe", u, self.w_up[...].astype(dtype))
        z = jnp.einsum("btd,dhe->bthe", u, self.w_z[...].astype(dtype))
        history = None if cache is None else cache["conv"]
        x_c, history = causal_conv(x_m, self.conv[...], self.conv_bias[...], history=history, segment_ids=segment_ids)
        x_c = jax.nn.silu(x_c)

        def headwise(w, a):
            blocks = a.reshape(*a.shape[:3], -1, cfg.qkv_block)
            return jnp.einsum("bthni,hnio->bthno", blocks, w[...].astype(dtype)).reshape(a.shape)

        q, k, v = headwise(self.w_q, x_c), headwise(self.w_k, x_c), headwise(self.w_v, x_m)
        qkv = jnp.stack([q, k, v], axis=2)  # [batch, length, 3, heads, dh]
        i = jnp.einsum("btshe,shen->btn", qkv, self.w_i[...].astype(dtype)) + self.b_i[...].astype(dtype)
        f = jnp.einsum("btshe,shen->btn", qkv, self.w_f[...].astype(dtype)) + self.b_f[...].astype(dtype)
        h, cell = _run_cell(cfg, q, k, v, i, f, None if cache is None else cache["cell"], segment_ids)
        h = head_norm(h, self.out_norm[...], cfg.norm_eps, offset=True).astype(dtype)
        h = (h + self.skip[...].astype(dtype) * x_c) * jax.nn.silu(z)
        h = constrain(h, ("batch", "length", "heads", "head_dim"))
        x = x + jnp.einsum("bthe,hed->btd", h, self.w_down[...].astype(dtype))
        return constrain(x, ("batch", "length", "embed")), None if cache is None else {"conv": history, "cell": cell}


def slstm_forget_bias(head_dim: int, block: int, num_blocks: int) -> jax.Array:
    """The "powerlaw_blockdependent" forget-gate bias of sLSTM block `block` of `num_blocks` (§1.5), per feature."""
    ratio = jnp.arange(head_dim) / max(head_dim - 1, 1)
    power = 0.3 + 1.3 * block / max(num_blocks - 1, 1)
    return -(-5.0 + 12.0 * ratio**power)


class NeurIPSSLSTMBlock(nnx.Module):
    """x += GN(sLSTM(LN(x))); x += gated GELU FFN(LN(x)), post-up-projection (module docstring)."""

    def __init__(self, cfg: XLSTMConfig, *, rngs: nnx.Rngs):
        d, heads = cfg.d_model, cfg.num_heads
        dh, f = d // heads, cfg.slstm_ffn_dim
        self.cfg = cfg
        self.norm = OffsetLayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.conv = param(rngs, (cfg.conv_size, heads, dh), (None, "heads", "head_dim"), normal(cfg.conv_size**-0.5))
        self.conv_bias = param(rngs, (heads, dh), ("heads", "head_dim"), zeros)
        axes = (None, "heads", "head_dim", None)
        # the reference's igate, fgate (from the conv branch) and zgate, ogate (from LN(x)), headwise [in, out]
        self.w_if = param(rngs, (2, heads, dh, dh), axes, small_init(d))
        self.w_zo = param(rngs, (2, heads, dh, dh), axes, small_init(d))
        self.recurrent = param(rngs, (heads, dh, 4, dh), ("heads", "head_dim", None, None), zeros)
        # in the cell's slot order i, f, z, o; the f slot's power-law bias is set per block by the model
        self.bias = param(rngs, (4, heads, dh), (None, "heads", "head_dim"), zeros)
        self.out_norm = param(rngs, (heads, dh), ("heads", "head_dim"), zeros)
        self.ffn_norm = OffsetLayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), small_init(d))
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), small_init(d))
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), wang_init(d, cfg.num_layers))

    def init_cache(self, batch: int) -> dict[str, Any]:
        heads, dh = self.out_norm.shape
        zeros = jnp.zeros((batch, heads, dh))
        return {"conv": jnp.zeros((batch, self.cfg.conv_size - 1, heads, dh)), "cell": (zeros,) * 4}

    def __call__(self, x, cache, *, segment_ids=None):
        cfg, dtype = self.cfg, x.dtype
        u = self.norm(x)
        heads, dh = self.out_norm.shape
        u_heads = u.reshape(*u.shape[:2], heads, dh)
        history = None if cache is None else cache["conv"]
        x_c, history = causal_conv(
            u_heads, self.conv[...], self.conv_bias[...], history=history, segment_ids=segment_ids
        )
        x_c = jax.nn.silu(x_c)
        i_ref, f_ref = jnp.einsum("bthd,ghde->gbthe", x_c, self.w_if[...].astype(dtype))
        z, o = jnp.einsum("bthd,ghde->gbthe", u_heads, self.w_zo[...].astype(dtype))
        wx = jnp.stack([f_ref, i_ref, z, o], axis=2)  # the swap: slot i <- fgate, slot f <- igate
        wx = (wx + self.bias[...].astype(dtype)).astype(jnp.float32)
        state = None if cache is None else cache["cell"]
        y, state = slstm_scan(wx, self.recurrent[...].astype(jnp.float32), state, segment_ids)
        y = head_norm(y, self.out_norm[...], cfg.norm_eps, offset=True).astype(dtype)
        x = x + y.reshape(x.shape)
        g = self.ffn_norm(x)
        hidden = jax.nn.gelu(g @ self.w_gate[...].astype(dtype), approximate=False) * (g @ self.w_up[...].astype(dtype))
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        x = x + hidden @ self.w_down[...].astype(dtype)
        return constrain(x, ("batch", "length", "embed")), None if cache is None else {"conv": history, "cell": state}


class Group(nnx.Module):
    """One repeat of `pattern`: blocks named m0, m1, ..., s7 (kind and position in the group)."""

    def __init__(self, cfg: XLSTMConfig, *, rngs: nnx.Rngs):
        self.names = tuple(f"{kind}{j}" for j, kind in enumerate(cfg.pattern))
        for name in self.names:
            block = NeurIPSMLSTMBlock if name[0] == "m" else NeurIPSSLSTMBlock
            setattr(self, name, block(cfg, rngs=rngs))

    def init_cache(self, batch: int) -> dict[str, Any]:
        return {name: getattr(self, name).init_cache(batch) for name in self.names}

    def __call__(self, x, cache, *, positions=None, segment_ids=None, index=None):
        del positions, index  # the state carries the order
        new = {}
        for name in self.names:
            x, new[name] = getattr(self, name)(x, None if cache is None else cache[name], segment_ids=segment_ids)
        return x, None if cache is None else new


class XLSTM(CausalLM):
    final_norm_name = "out_norm"

    def __init__(self, cfg: XLSTMConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self._init_embedding(cfg, rngs, small_init(d))
        large = cfg.variant == "large"
        units = cfg.num_layers // len(cfg.pattern)
        make = (lambda r: LargeBlock(cfg, rngs=r)) if large else (lambda r: Group(cfg, rngs=r))
        self.layers = LayerStack(make, units, rngs=rngs, scan=cfg.scan_layers, remat=cfg.remat)
        if not large:  # the sLSTM forget bias depends on the block's depth
            for j, kind in enumerate(cfg.pattern):
                if kind != "s":
                    continue
                bias = getattr(self.layers.blocks, f"s{j}").bias
                dh = bias.shape[-1]
                per_unit = jnp.stack(
                    [slstm_forget_bias(dh, u * len(cfg.pattern) + j, cfg.num_layers) for u in range(units)]
                )
                bias[...] = bias[...].at[:, 1].set(jnp.broadcast_to(per_unit[:, None], bias[...][:, 1].shape))
        norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs) if large else OffsetLayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
        self._init_head(norm, rngs, small_init(d))

    def hidden_embedded(self, x, *, positions, segment_ids=None):
        """Parallel form on embedded inputs x [B, T, d_model]; segment_ids (exact resets) or None. `positions` is not
        used (the recurrence orders the tokens). -> [B, T, d_model]."""
        del positions
        x, _ = self.layers(x, None, segment_ids=segment_ids)
        return x, {}

    def layer_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> dict[str, Any]:
        """One unit's state: the mLSTM (C̄, n̄, m), the sLSTM (y, c, n, m) and the conv histories, float32; its size
        does not depend on `max_len` or `dtype`."""
        del max_len, dtype
        cfg = self.cfg
        if cfg.variant == "large":
            heads = cfg.num_heads
            dqk, dv = cfg.qk_dim // heads, cfg.v_dim // heads
            return {
                "cell": (
                    jnp.zeros((batch_size, heads, dqk, dv)),
                    jnp.zeros((batch_size, heads, dqk)),
                    jnp.zeros((batch_size, heads)),
                )
            }
        return nnx.eval_shape(lambda: Group(cfg, rngs=nnx.Rngs(0))).init_cache(batch_size)

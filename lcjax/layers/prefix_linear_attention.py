"""JRT-RNN's prefix linear attention (PLA; Arora et al. 2024, `reference/xlstm_ssm_birdie_jrt.md` §4.2) and Based's
BaseConv.

Feature map (Based's second-order Taylor expansion of exp), feature dim d:
    φ(x) = [1, x / d^¼, vec(x xᵀ) / (√2 √d)]    so   φ(q)·φ(k) = 1 + s + s²/2,  s = q·k / √d,
1 + d + d² features (273 at d = 16), zero-padded to a multiple of 8 (zeros change no dot product).

Per head, with shared decoder projections q = W_q x, k = W_k x, v = W_v x and encoder projections k^e = W_ke x,
v^e = W_ve x, every position i of the encoder's document reads
    y_i = [Σ_{j≤i} φ(q_i)·φ(k_j) v_j + Σ_j w_j φ(q_i)·φ(k^e_j) v^e_j]
          / [Σ_{j≤i} φ(q_i)·φ(k_j) + Σ_j w_j φ(q_i)·φ(k^e_j) + ε]
(output W_o y): a causal linear attention over the whole row plus a non-causal encoder term over the prefix. The
encoder term is the state S_enc = Σ_j w_j φ(k^e_j) [v^e_j; 1]ᵀ, so the layer is the chunkwise linear-attention
kernel (`kernels_pallas.chunked_linear_attention`, mode "ssd" with no decay, v augmented with a ones column for the
denominator) started from S_enc; decode adds φ(k_t)[v_t; 1]ᵀ to that one state, as the paper's prefill does.

The encoder weights w_j (`encoder_weights`):
- with a `prefix_mask` (1: the prefix), 1 on the prefix tokens of the row's first document;
- without one, the first M = `prefix_len` tokens of the row's first document. A document (or a decode prompt)
  of n < M tokens is encoded as if repeated to fill the M positions, w_j = ⌈(M − j) / n⌉ (the paper's finding:
  padding the prefix region by repeating the context beats padding tokens, so that is the only choice here); the
  layer's inputs are repeated, so this is exact for every layer, not only the first.
Only the row's first document reads the encoder state (later packed documents start from an empty state, as the
kernel's documents do): the encoder is the row's prompt. In decode the first call is the prompt: it builds S_enc
from its own tokens, and later calls never change it.

BaseConv (Based's default layer): u = W_in x split into u1, u2 (2d each); y = W_out(SiLU(conv_3(u1)) ⊙ u2), with
biases, the short causal conv per channel and per document.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import chunked_linear_attention as kernel
from kernels_pallas import common
from lcjax.layers import chunkwise
from lcjax.layers.conv import causal_conv
from lcjax.layers.params import normal, param, zeros
from lcjax.parallel.sharding import constrain

EPS = 1e-12
IMPLS = ("auto", "xla", "pallas", "interpret")  # auto: the kernel on TPU and GPU, the XLA reference elsewhere


def _wide(x: jax.Array) -> jax.Array:
    """float32, or float64 for float64 inputs (the oracle tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def num_features(feature_dim: int) -> int:
    """Features of `feature_map` for feature dim d: 1 + d + d², padded to a multiple of 8."""
    return -(-(1 + feature_dim + feature_dim**2) // 8) * 8


def feature_map(x: jax.Array) -> jax.Array:
    """x [..., d] -> φ(x) [..., num_features(d)] (module docstring)."""
    d = x.shape[-1]
    square = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d) / (math.sqrt(2) * math.sqrt(d))
    parts = [jnp.ones((*x.shape[:-1], 1), x.dtype), x / d**0.25, square]
    pad = num_features(d) - (1 + d + d * d)
    if pad:
        parts.append(jnp.zeros((*x.shape[:-1], pad), x.dtype))
    return jnp.concatenate(parts, axis=-1)


def documents(positions, segment_ids=None, xp=jnp):
    """[batch, T] int32: each token's document, 0 for the row's first one (and any padding before it: a left-padded
    prompt); a document starts where the segment id changes or `positions` restarts at 0. `xp`: jnp, or numpy for
    host batches (`lcjax.models.jrt`)."""
    length = positions.shape[1]
    starts = positions == 0
    if segment_ids is not None:
        previous = xp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
        starts = starts | (segment_ids != previous)
    docs = xp.cumsum(starts & (xp.arange(length) > 0)[None, :], axis=1)
    if segment_ids is not None:  # left padding joins the first document (it writes nothing: `valid`)
        first = xp.min(xp.where(segment_ids > 0, docs, length), axis=1, keepdims=True)
        docs = xp.maximum(docs - first, 0)
    return docs.astype(xp.int32)


def encoder_weights(docs, prefix_len: int, prefix_mask=None, segment_ids=None, xp=jnp):
    """[batch, T] float32 encoder weights w_j (module docstring) from `documents` `docs` [batch, T]."""
    first = docs == 0
    if segment_ids is not None:
        first = first & (segment_ids > 0)  # padding is never encoded
    if prefix_mask is not None:
        return (first & (prefix_mask > 0)).astype(xp.float32)
    n = xp.sum(first, axis=1, keepdims=True)  # the first document's length in the row (≥ 1 unless all padding)
    j = xp.arange(docs.shape[1])[None, :] - xp.argmax(first, axis=1, keepdims=True)  # from the document's start
    repeats = (prefix_len - j + n - 1) // xp.maximum(n, 1)  # ⌈(M − j) / n⌉: how often token j fills 0..M−1
    return xp.where(first & (j < prefix_len), repeats, 0).astype(xp.float32)


def encoder_state(phi_ke: jax.Array, ve: jax.Array, weights: jax.Array) -> jax.Array:
    """S_enc [batch, heads, F, dv + 1] = Σ_j w_j φ(k^e_j) [v^e_j; 1]ᵀ from φ(k^e) [batch, T, heads, F], v^e
    [batch, T, heads, dv] and weights [batch, T]."""
    ve1 = jnp.concatenate([ve, jnp.ones((*ve.shape[:-1], 1), ve.dtype)], axis=-1)
    return jnp.einsum("bthf,bthv,bt->bhfv", phi_ke, ve1, weights.astype(phi_ke.dtype))


def prefix_linear_attention(
    phi_q, phi_k, v, docs, s_enc, valid=None, *, chunk_size: int, impl: str = "auto", eps: float = EPS
):
    """The causal term plus the encoder term (module docstring) through the chunkwise kernel: φ(q), φ(k) [batch, T,
    heads, F], v [batch, T, heads, dv], docs [batch, T] (`documents`), s_enc [batch, heads, F, dv + 1] (the state
    the row's first document starts from), valid [batch, T] bool or None (False: padding, which writes nothing).
    Returns (y [batch, T, heads, dv], the last document's state [batch,
    heads, F, dv + 1])."""
    batch, length, heads, features = phi_q.shape
    dv = v.shape[-1]
    given, gpu = features, impl != "xla" and common.backend() == "gpu"
    pow2 = lambda n: max(16, 1 << (n - 1).bit_length())
    chunk = pow2(min(chunk_size, length)) if gpu else min(chunk_size, length)
    pad = -length % chunk
    v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    log_input = jnp.zeros((batch, length), _wide(phi_q).dtype)
    if valid is not None:
        log_input = jnp.where(valid, log_input, -jnp.inf)
    if pad:  # padding tokens write nothing (log input weight −∞) and stay in the last document
        widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
        phi_q, phi_k, v1 = (jnp.pad(x, widths) for x in (phi_q, phi_k, v1))
        log_input = jnp.pad(log_input, [(0, 0), (0, pad)], constant_values=-jnp.inf)
        docs = jnp.pad(docs, [(0, 0), (0, pad)], mode="edge")
    if gpu:  # Triton: powers of two >= 16 (zero features and value columns change nothing)
        extra_f, extra_v = pow2(features) - features, pow2(dv + 1) - (dv + 1)
        phi_q, phi_k = (jnp.pad(x, [(0, 0)] * 3 + [(0, extra_f)]) for x in (phi_q, phi_k))
        v1 = jnp.pad(v1, [(0, 0)] * 3 + [(0, extra_v)])
        s_enc = jnp.pad(s_enc, [(0, 0), (0, 0), (0, extra_f), (0, extra_v)])
        features = features + extra_f
    chunks = (length + pad) // chunk
    per_chunk = lambda x: jnp.moveaxis(x, 2, 1).reshape(batch, heads, chunks, chunk, x.shape[-1])
    per_token = lambda x: jnp.broadcast_to(x[:, None], (batch, heads, length + pad)).reshape(
        batch, heads, chunks, chunk
    )
    cols = kernel.pack_columns(per_token(jnp.zeros_like(log_input)), per_token(log_input), per_token(docs))
    state = (
        _wide(s_enc),
        jnp.zeros((batch, heads, 1, features), _wide(s_enc).dtype),
        jnp.zeros((batch, heads, 1, 1), _wide(s_enc).dtype),
    )
    args = (per_chunk(phi_q), per_chunk(phi_k), per_chunk(v1), cols, state)
    if impl == "xla":
        h, (c, _, _) = kernel.chunked_linear_attention(*args, mode="ssd", impl="reference")
    else:
        h, (c, _, _) = chunkwise.chunked_linear_attention(*args, mode="ssd", impl=impl)
    h = _wide(jnp.moveaxis(h.reshape(batch, heads, length + pad, h.shape[-1])[:, :, :length], 1, 2))
    return h[..., :dv] / (h[..., dv : dv + 1] + eps), c[..., :given, : dv + 1]


class PrefixLinearAttention(nnx.Module):
    """PLA (module docstring) on [batch, T, d_model]: `num_heads` heads of feature dim `feature_dim` and value
    width `head_dim`; `prefix_len` M."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        feature_dim: int,
        head_dim: int,
        *,
        prefix_len: int,
        chunk_size: int = 64,
        impl: str = "auto",
        init_std: float = 0.02,
        out_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.num_heads, self.feature_dim, self.head_dim = num_heads, feature_dim, head_dim
        self.prefix_len, self.chunk_size, self.impl = prefix_len, chunk_size, impl
        shape = lambda width: (d_model, num_heads, width)
        axes = ("embed", "heads", None)
        self.w_q = param(rngs, shape(feature_dim), axes, normal(init_std))
        self.w_k = param(rngs, shape(feature_dim), axes, normal(init_std))
        self.w_v = param(rngs, shape(head_dim), axes, normal(init_std))
        self.w_ke = param(rngs, shape(feature_dim), axes, normal(init_std))
        self.w_ve = param(rngs, shape(head_dim), axes, normal(init_std))
        self.w_o = param(rngs, (num_heads, head_dim, d_model), ("heads", None, "embed"), normal(out_std))

    def init_cache(self, batch: int) -> jax.Array:
        """The one linear-attention state [batch, heads, F, head_dim + 1] (numerator and denominator)."""
        return jnp.zeros((batch, self.num_heads, num_features(self.feature_dim), self.head_dim + 1), jnp.float32)

    def _project(self, x, name):
        return _wide(jnp.einsum("btd,dhf->bthf", x, getattr(self, name)[...].astype(x.dtype)))

    def __call__(self, x, cache=None, *, positions, segment_ids=None, prefix_mask=None, index=None):
        """x [batch, T, d_model]. Parallel form (cache None): `positions` and `segment_ids` as in the batch,
        `prefix_mask` or the first `prefix_len` tokens the encoder's. Decode (cache, `index` the tokens already
        consumed): the first call (index 0) is the prompt and builds S_enc. -> (y [batch, T, d_model], cache)."""
        phi_q, phi_k = feature_map(self._project(x, "w_q")), feature_map(self._project(x, "w_k"))
        v = self._project(x, "w_v")
        if cache is None:
            docs = documents(positions, segment_ids)
        else:  # decode: one document, continuing the cached state
            docs = jnp.zeros(x.shape[:2], jnp.int32)
        weights = encoder_weights(docs, self.prefix_len, prefix_mask, segment_ids)
        s_enc = encoder_state(feature_map(self._project(x, "w_ke")), self._project(x, "w_ve"), weights)
        if cache is not None:
            s_enc = cache + jnp.where(index == 0, 1.0, 0.0) * s_enc
        valid = None if segment_ids is None else segment_ids > 0
        y, last = prefix_linear_attention(
            phi_q, phi_k, v, docs, s_enc, valid, chunk_size=self.chunk_size, impl=self.impl
        )
        y = constrain(y.astype(x.dtype), ("batch", "length", "heads", None))
        out = jnp.einsum("bthv,hvd->btd", y, self.w_o[...].astype(x.dtype))
        return out, (None if cache is None else last)


class BaseConv(nnx.Module):
    """Based's BaseConv (module docstring): in_proj to 4·d_model, a causal conv of `taps` on the first half, SiLU,
    times the second half, out_proj; with biases."""

    def __init__(self, d_model: int, *, taps: int = 3, init_std: float = 0.02, out_std: float = 0.02, rngs: nnx.Rngs):
        width = 2 * d_model
        self.w_in = param(rngs, (d_model, 2, width), ("embed", None, "mlp"), normal(init_std))
        self.b_in = param(rngs, (2, width), (None, "mlp"), zeros)
        self.conv = param(rngs, (taps, width), (None, "mlp"), normal(1 / math.sqrt(taps)))
        self.conv_bias = param(rngs, (width,), ("mlp",), zeros)
        self.w_out = param(rngs, (width, d_model), ("mlp", "embed"), normal(out_std))
        self.b_out = param(rngs, (d_model,), ("embed",), zeros)
        self.taps = taps

    def init_cache(self, batch: int) -> jax.Array:
        """The conv history [batch, taps − 1, 2·d_model]."""
        return jnp.zeros((batch, self.taps - 1, self.conv.shape[1]))

    def __call__(self, x, cache=None, *, segment_ids=None):
        dtype = x.dtype
        u = jnp.einsum("btd,dgw->btgw", x, self.w_in[...].astype(dtype)) + self.b_in[...].astype(dtype)
        u = constrain(u, ("batch", "length", None, "mlp"))
        conv, history = causal_conv(
            u[:, :, 0], self.conv[...], self.conv_bias[...], history=cache, segment_ids=segment_ids
        )
        y = jax.nn.silu(conv) * u[:, :, 1]
        return y @ self.w_out[...].astype(dtype) + self.b_out[...].astype(dtype), (None if cache is None else history)

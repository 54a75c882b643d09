"""Flash attention: softmax(scale · Q Kᵀ + mask) V without materialising the [Tq, Tk] matrix, forward and backward.

For query i of head h (KV head h // (H / K) under GQA/MQA):
  s_ij = scale · q_i · k_j, optionally soft-capped: s_ij ← softcap · tanh(s_ij / softcap)
  lse_i = log Σ_{j visible} exp(s_ij)         (natural log; `attention_mask.MaskSpec` says which j are visible)
  out_i = Σ_{j visible} exp(s_ij − lse_i) v_j
The kernels walk key blocks with an online softmax (running max m, sum l, f32 accumulator) and return (out, lse);
the backward pass recomputes p = exp(s − lse) per block: dv = pᵀ do, ds = p ⊙ (do vᵀ − Δ), Δ_i = do_i · out_i − dlse_i,
dq = scale · ds k, dk = scale · dsᵀ q (times 1 − (s/softcap)² under the soft-cap). The lse cotangent enters through
Δ, so ring attention can merge blocks by their lse and still differentiate through the merge.

`reference` is the specification. `flash_attention` is the public entry point; `impl` picks the reference or a
Pallas kernel family: "tpu" (Mosaic, `flash_attention_tpu`) or "gpu" (`flash_attention_gpu`). Shapes at the
boundary: q [batch, length, heads, head_dim], k and v [batch, length, kv_heads, head_dim].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels_pallas import common
from kernels_pallas.attention_mask import MASK_VALUE

KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query/key block lengths of the forward and backward kernels (rounded down for short sequences)."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int

    @classmethod
    def default(cls, target: str, head_dim: int = 64) -> BlockSizes:
        if target == "tpu":  # multiples of 128 (lane width): legal Mosaic blocks for every length after padding
            return cls(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=512)
        if 64 < head_dim <= 128:  # measured on H100 (docs/benchmarks.md): fwd+bwd 1.3-1.6x the 64-row backward blocks
            return cls(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
        return cls(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)  # head_dim <= 64: best measured on H100


@dataclasses.dataclass(frozen=True)
class Call:
    """The static part of one call: what to compute and with which kernel."""

    causal: bool
    sliding_window: int | None
    softcap: float | None
    scale: float
    target: str  # kernel family: "tpu" or "gpu"
    interpret: bool
    blocks: BlockSizes


def reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense attention in f32: (out [B, Tq, H, D] in q's dtype, lse [B, H, Tq] f32)."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    groups = num_heads // num_kv_heads
    qf = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, groups, head_dim)
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32), precision=hi) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    i = jnp.arange(q_len)[:, None]
    j = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), bool)[None]
    if causal:
        mask &= j <= i
    if sliding_window is not None:
        mask &= (i - j < sliding_window) if causal else (jnp.abs(i - j) < sliding_window)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32), precision=hi)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype), lse.reshape(batch, num_heads, q_len)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    target: str | None = None,
    block_sizes: BlockSizes | None = None,
):
    """Attention over q [B, Tq, H, D], k/v [B, Tk, K, D] (H % K == 0); returns out [B, Tq, H, D] (and lse [B, H, Tq]).

    causal: query i sees keys j <= i. segment_ids [B, T] int: attention stays inside a document. sliding_window=w:
    keys with i - j < w (causal) or |i - j| < w. softcap=c: logits become c · tanh(logits / c). scale: logit scale,
    head_dim ** -0.5 when None. impl: "auto" | "pallas" | "interpret" | "reference" (`kernels_pallas.common`).
    target: the Pallas kernel family, "tpu" or "gpu" (default: this backend's; "tpu" on CPU). block_sizes: kernel
    blocks (default `BlockSizes.default(target, head_dim)`). An input the kernels do not support falls back to the
    reference and says so once in the log.
    """
    _check_inputs(q, k, v, causal, segment_ids, sliding_window, softcap)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mode = common.resolve_impl(impl, "flash_attention")
    if mode != "reference":
        target = target or ("gpu" if common.backend() == "gpu" else "tpu")
        if target not in ("tpu", "gpu"):
            raise ValueError(f"flash_attention: target={target!r}; expected 'tpu' or 'gpu'")
        reason = _unsupported(q, k, target)
        if reason:
            common.say_once(f"flash_attention: {reason}; using the reference implementation")
            mode = "reference"
    if mode == "reference":
        out, lse = reference(
            q, k, v, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window, softcap=softcap, scale=scale
        )
    else:
        call = Call(
            causal=causal,
            sliding_window=sliding_window,
            softcap=None if softcap is None else float(softcap),
            scale=scale,
            target=target,
            interpret=mode == "interpret",
            blocks=block_sizes or BlockSizes.default(target, q.shape[-1]),
        )
        out, lse = _flash(q, k, v, segment_ids, call)
    return (out, lse) if return_lse else out


def _check_inputs(q, k, v, causal, segment_ids, sliding_window, softcap) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"flash_attention: expected q [batch, length, heads, head_dim] and k, v [batch, length, kv_heads, head_dim]"
            f" of one shape; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"flash_attention: q {q.shape} and k {k.shape} must share batch and head_dim, and heads must be a multiple"
            " of kv_heads"
        )
    if (causal or sliding_window is not None or segment_ids is not None) and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"flash_attention: causal, sliding_window and segment_ids need equal query and key lengths; got"
            f" {q.shape[1]} and {k.shape[1]}"
        )
    if segment_ids is not None and (
        segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
    ):
        raise ValueError(
            f"flash_attention: segment_ids must be int [batch, length] = {q.shape[:2]}; got "
            f"{segment_ids.dtype} {segment_ids.shape}"
        )
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"flash_attention: sliding_window={sliding_window!r} must be a positive int")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"flash_attention: softcap={softcap!r} must be positive")


def _unsupported(q: jax.Array, k: jax.Array, target: str) -> str | None:
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype} (the kernels take float32 or bfloat16, q and k alike)"
    if target == "gpu" and q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 on GPU"
    return None


def _backend(target: str):
    if target == "tpu":
        from kernels_pallas import flash_attention_tpu as module
    else:
        from kernels_pallas import flash_attention_gpu as module
    return module


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, call: Call):
    return _backend(call.target).forward(q, k, v, segment_ids, call)


def _flash_fwd(q, k, v, segment_ids, call: Call):
    out, lse = _backend(call.target).forward(q, k, v, segment_ids, call)
    return (out, lse), (q, k, v, segment_ids, out, lse)


def _flash_bwd(call: Call, residuals, cotangents):
    q, k, v, segment_ids, out, lse = residuals
    dout, dlse = cotangents
    # Δ_i = do_i · out_i − dlse_i, in f32, [B, H, T]
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32)) - dlse
    dq, dk, dv = _backend(call.target).backward(q, k, v, segment_ids, lse, dout, delta, call)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)

"""Mamba-2's state-space duality (SSD) scan (Dao & Gu 2024), chunked and sequential.

Per head (head dim P, state N), with a_t = Δ_t A (A < 0 a scalar per head, Δ_t > 0 after softplus) and x̂_t = Δ_t x_t
(`reference/xlstm_ssm_birdie_jrt.md` §2.1):

    h_t = exp(a_t) h_(t−1) + x̂_t B_tᵀ   (h ∈ R^(P×N)),   y_t = h_t C_t      (the D·x skip term is the block's)

B and C are shared by the heads of a group (heads / groups consecutive heads per group). The chunked form, chunk Q:
within a chunk, y_t = Σ_(s≤t) (C_t·B_s) exp(Σ_(s<r≤t) a_r) x̂_s + exp(Σ_(r≤t) a_r) H_(c−1) C_t, with the chunk-end
states H_c = exp(Σ_(r∈c) a_r) H_(c−1) + Σ_s exp(Σ_(r>s) a_r) x̂_s B_sᵀ from a scan over chunks. Segment sums are
masked cumulative sums (never differences of cumsums), so every exponent is ≤ 0. A length that is not a multiple of
Q is padded with Δ = 0 (no decay, no write), so the final state is exact. `impl` runs the chunked form in XLA ("xla")
or as the Pallas kernel `kernels_pallas.chunked_linear_attention` (mode "ssd": q = C, k = B, v = Δx, the state
transposed; "pallas" | "interpret" | "auto", per device shard under a mesh, float32 inside).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import chunked_linear_attention as kernel
from lcjax.layers import chunkwise
from lcjax.layers.documents import document_starts

IMPLS = ("xla", "pallas", "interpret", "auto")


def _check(x, dt, a, b, c, initial_state):
    batch, length, heads, head_dim = x.shape
    if dt.shape != (batch, length, heads) or a.shape != (heads,):
        raise ValueError(
            f"ssd_scan: x {x.shape}, dt {dt.shape}, a {a.shape}; expected x [batch, length, heads, head_dim], dt "
            f"[batch, length, heads] and a [heads]"
        )
    if b.shape != c.shape or b.shape[:2] != (batch, length) or b.ndim != 4 or heads % b.shape[2]:
        raise ValueError(
            f"ssd_scan: b {b.shape} and c {c.shape} must both be [batch, length, groups, state] with groups dividing "
            f"heads={heads}"
        )
    if initial_state is not None and initial_state.shape != (batch, heads, head_dim, b.shape[3]):
        raise ValueError(
            f"ssd_scan: initial_state {initial_state.shape}; expected [batch, heads, head_dim, state] = "
            f"{(batch, heads, head_dim, b.shape[3])}"
        )


def _per_head(b, heads):
    return jnp.repeat(b, heads // b.shape[2], axis=2)  # [batch, length, heads, state]


def _segsum(a):
    """[..., Q] -> [..., Q, Q]: Σ_(s<r≤t) a_r for s ≤ t, −∞ above the diagonal (a masked cumsum)."""
    size = a.shape[-1]
    strict = jnp.tril(jnp.ones((size, size), bool), -1)
    sums = jnp.cumsum(jnp.where(strict, a[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((size, size), bool)), sums, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl"))
def ssd_scan(x, dt, a, b, c, *, chunk_size: int = 64, initial_state=None, segment_ids=None, impl: str = "xla"):
    """y `[batch, length, heads, head_dim]` and the final state `[batch, heads, head_dim, state]`.

    x `[batch, length, heads, head_dim]`; dt `[batch, length, heads]` (Δ, after softplus); a `[heads]` (negative);
    b, c `[batch, length, groups, state]`; initial_state `[batch, heads, head_dim, state]` (zeros when None).
    segment_ids `[batch, length]`: packed documents; where the id changes, the decay is exp(−∞) = 0, so a document
    starts from the zero state exactly (the initial state belongs to the first token's document). impl: `IMPLS`.
    """
    _check(x, dt, a, b, c, initial_state)
    if chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size={chunk_size} must be >= 1")
    if impl not in IMPLS:
        raise ValueError(f"ssd_scan: impl={impl!r}; expected one of {IMPLS}")
    batch, length, heads, head_dim = x.shape
    state = b.shape[3]
    dtype = jnp.result_type(x, dt, a, b, c)
    b, c = _per_head(b, heads).astype(dtype), _per_head(c, heads).astype(dtype)
    x, dt = x.astype(dtype), dt.astype(dtype)
    h0 = jnp.zeros((batch, heads, head_dim, state), dtype) if initial_state is None else initial_state.astype(dtype)
    count = -(-length // chunk_size)
    pad = count * chunk_size - length
    if pad:  # Δ = 0: no decay and no write
        x, dt, b, c = (jnp.pad(z, ((0, 0), (0, pad)) + ((0, 0),) * (z.ndim - 2)) for z in (x, dt, b, c))

    def chunks(z):  # [batch, count * Q, heads, ...] -> [count, batch, heads, Q, ...]
        z = z.reshape(batch, count, chunk_size, *z.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(z, 1, 0), 3, 2)

    log_a = dt * a.astype(dtype)
    starts = None
    if segment_ids is not None:
        if segment_ids.shape != (batch, length):
            raise ValueError(f"ssd_scan: segment_ids {segment_ids.shape}; expected [batch, length] {(batch, length)}")
        starts = document_starts(segment_ids)
        starts = jnp.pad(starts, ((0, 0), (0, pad)))
    if impl != "xla":
        y, final = _kernel_scan(x * dt[..., None], log_a, b, c, h0, starts, chunk_size, impl)
        return y[:, :length].astype(dtype), final.astype(dtype)
    if starts is not None:
        log_a = jnp.where(starts[..., None], -jnp.inf, log_a)
    log_a = chunks(log_a)  # [count, batch, heads, Q]
    xh = chunks(x * dt[..., None])  # x̂: [count, batch, heads, Q, P]
    bh, ch = chunks(b), chunks(c)  # [count, batch, heads, Q, N]
    seg = _segsum(log_a)  # [count, batch, heads, Q, Q]
    decay_to_end = jnp.exp(seg[..., -1, :])  # exp(Σ_(r>s) a_r) [.., Q]
    local = jnp.einsum("...s,...sp,...sn->...pn", decay_to_end, xh, bh)  # the chunk's own end state
    total = jnp.exp(jnp.sum(log_a, axis=-1))  # [count, batch, heads]

    def inter(h, inputs):
        decay, own = inputs
        return decay[..., None, None] * h + own, h

    final, starts = jax.lax.scan(inter, h0, (total, local))  # starts: the state before each chunk
    scores = jnp.einsum("...tn,...sn->...ts", ch, bh) * jnp.exp(seg)
    y = scores @ xh  # the diagonal blocks
    y = y + jnp.exp(jnp.cumsum(log_a, axis=-1))[..., None] * jnp.einsum("...pn,...tn->...tp", starts, ch)
    y = jnp.moveaxis(y, 0, 1)  # [batch, count, heads, Q, P]
    y = jnp.moveaxis(y, 3, 2).reshape(batch, count * chunk_size, heads, head_dim)
    return y[:, :length], final


def _kernel_scan(xh, log_a, b, c, h0, starts, chunk_size, impl):
    """The chunked form as the kernel's mode "ssd" (padded inputs `[batch, count * Q, heads, ...]`)."""
    batch, padded, heads, _ = xh.shape
    count = padded // chunk_size

    def chunks(z):  # [batch, count * Q, heads, ...] -> [batch, heads, count, Q, ...]
        z = jnp.moveaxis(z, 2, 1)
        return z.reshape(batch, heads, count, chunk_size, *z.shape[3:])

    docs = None
    if starts is not None:  # documents counted from the initial state's; the masks, not −∞ decays, cut them
        docs = jnp.broadcast_to(jnp.cumsum(starts.astype(jnp.int32), axis=1)[..., None], log_a.shape)
        docs = chunks(docs)
    log_a = chunks(log_a)
    cols = kernel.pack_columns(log_a, jnp.zeros_like(log_a), docs)
    state = (jnp.swapaxes(h0, -1, -2), jnp.zeros((batch, heads, 1, b.shape[-1])), jnp.zeros((batch, heads, 1, 1)))

    y, (final, _, _) = chunkwise.chunked_linear_attention(
        chunks(c), chunks(b), chunks(xh), cols, state, mode="ssd", impl=impl
    )
    y = jnp.moveaxis(y.reshape(batch, heads, padded, -1), 1, 2)
    return y, jnp.swapaxes(final, -1, -2)


@jax.jit
def ssd_sequential(x, dt, a, b, c, initial_state=None):
    """The oracle: h_t = exp(Δ_t A) h_(t−1) + Δ_t x_t B_tᵀ, y_t = h_t C_t, one `lax.scan` step per token."""
    _check(x, dt, a, b, c, initial_state)
    batch, _, heads, head_dim = x.shape
    b, c = _per_head(b, heads), _per_head(c, heads)
    h0 = jnp.zeros((batch, heads, head_dim, b.shape[3]), x.dtype) if initial_state is None else initial_state

    def step(h, inputs):
        x_t, dt_t, b_t, c_t = inputs
        h = jnp.exp(dt_t * a)[..., None, None] * h + (dt_t[..., None] * x_t)[..., None] * b_t[..., None, :]
        return h, jnp.einsum("bhpn,bhn->bhp", h, c_t)

    final, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(z, 1, 0) for z in (x, dt, b, c)))
    return jnp.moveaxis(y, 0, 1), final

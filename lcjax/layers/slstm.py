"""The sLSTM cell (xLSTM, Beck et al. 2024): scalar memory with memory mixing, a `lax.scan` over time.

Notation of `reference/xlstm_ssm_birdie_jrt.md` §1.4. The hidden size is split into heads of size DH; the gate
groups are in the order i, f, z, o. Per step, with W x_t + b given (`wx`) and R block-diagonal per head,

    raw_g = wx_(t,g) + Σ_d y_(t−1)[h, d] R[h, d, g, :]          (per head h; only y feeds back)
    m_t = max(ĩ, log σ(f̃) + m_(t−1)),  i' = min(exp(ĩ − m_t), 1),  f' = min(exp(log σ(f̃) + m_(t−1) − m_t), 1)
    c_t = f' c_(t−1) + i' tanh(z̃),  n_t = f' n_(t−1) + i',  y_t = σ(õ) c_t / n_t

State (y, c, n, m), zeros unless given. The outputs and c/n do not depend on the stabilizer convention (the vanilla
backend sets m = ĩ on its first step; here m_0 = 0), only m does. The layer-level gate-slot swap of the reference
`sLSTMLayer` (§1.4, "porting traps") belongs to the block that builds `wx`, not to this cell.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.layers.documents import document_starts

GATES = ("i", "f", "z", "o")
State = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # y, c, n, m: each [batch, heads, head_dim]


def slstm_step(wx_t: jax.Array, recurrent: jax.Array, state: State) -> tuple[jax.Array, State]:
    """One step: wx_t `[batch, 4, heads, head_dim]`, recurrent R `[heads, head_dim, 4, head_dim]`."""
    y, c, n, m = state
    raw = wx_t + jnp.einsum("bhd,hdge->bghe", y, recurrent)
    i, f, z, o = (raw[:, g] for g in range(4))
    log_f = jax.nn.log_sigmoid(f)
    m_new = jnp.maximum(i, log_f + m)
    i_ = jnp.minimum(jnp.exp(i - m_new), 1.0)
    f_ = jnp.minimum(jnp.exp(log_f + m - m_new), 1.0)
    c = f_ * c + i_ * jnp.tanh(z)
    n = f_ * n + i_
    y = jax.nn.sigmoid(o) * c / n
    return y, (y, c, n, m_new)


@jax.jit
def slstm_scan(
    wx: jax.Array, recurrent: jax.Array, initial_state: State | None = None, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, State]:
    """y `[batch, length, heads, head_dim]` and the final state, for wx `[batch, length, 4, heads, head_dim]` (the
    input pre-activations W x + b, gates i, f, z, o) and R `[heads, head_dim, 4, head_dim]`. segment_ids
    `[batch, length]`: packed documents; a token whose id differs from the previous token's starts from the zero
    state (the initial state belongs to the first token's document)."""
    batch, _, gates, heads, head_dim = wx.shape
    if gates != 4 or recurrent.shape != (heads, head_dim, 4, head_dim):
        raise ValueError(
            f"slstm_scan: wx {wx.shape}, recurrent {recurrent.shape}; expected wx [batch, length, 4, heads, head_dim]"
            f" and recurrent [heads, head_dim, 4, head_dim] (gates {GATES})"
        )
    if initial_state is None:
        zeros = jnp.zeros((batch, heads, head_dim), wx.dtype)
        initial_state = (zeros, zeros, zeros, zeros)
    if segment_ids is None:
        fresh = jnp.zeros(wx.shape[:2], bool)
    else:
        fresh = document_starts(segment_ids)

    def step(state, inputs):
        wx_t, fresh_t = inputs
        state = tuple(jnp.where(fresh_t[:, None, None], 0.0, s) for s in state)
        y, state = slstm_step(wx_t, recurrent, state)
        return state, y

    final, y = jax.lax.scan(step, initial_state, (jnp.moveaxis(wx, 1, 0), jnp.moveaxis(fresh, 1, 0)))
    return jnp.moveaxis(y, 0, 1), final

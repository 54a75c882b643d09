"""Causal depthwise convolution over time, with a streaming history and packed-document masks.

y_t[c] = bias[c] + Σ_(j<K) kernel[j, c] · x_(t−K+1+j)[c]: tap K − 1 is the current token (PyTorch's
`Conv1d(groups=C, padding=K−1)` truncated to the first T outputs, with kernel[j, c] = weight[c, 0, j]). Taps before
the first token read the history (the last K − 1 inputs of the previous call; zeros for a fresh sequence), and with
`segment_ids` a tap that reaches into another packed document reads zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    history: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    history_segments: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """x `[batch, length, *channels]`, kernel `[taps, *channels]`, bias `[*channels]`; history `[batch, taps − 1,
    *channels]` (zeros when None). segment_ids `[batch, length]`: the history's documents are `history_segments`
    `[batch, taps − 1]`, or when None the first token's (the history continues that document). Returns
    (y like x, the new history: the last taps − 1 inputs)."""
    taps = kernel.shape[0]
    if kernel.shape[1:] != x.shape[2:]:
        raise ValueError(f"causal_conv: kernel {kernel.shape}; expected [taps, *channels] with channels {x.shape[2:]}")
    if history is None:
        history = jnp.zeros((x.shape[0], taps - 1, *x.shape[2:]), x.dtype)
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    length = x.shape[1]
    if segment_ids is not None:
        if history_segments is None:  # the history belongs to the first token's document
            history_segments = jnp.repeat(segment_ids[:, :1], taps - 1, axis=1)
        seg = jnp.concatenate([history_segments.astype(segment_ids.dtype), segment_ids], axis=1)
    kernel = kernel.astype(x.dtype)
    trailing = (1,) * (x.ndim - 2)
    y = 0
    for tap in range(taps):
        window = padded[:, tap : tap + length]
        if segment_ids is not None and tap < taps - 1:
            same = seg[:, tap : tap + length] == segment_ids
            window = jnp.where(same.reshape(*same.shape, *trailing), window, 0)
        y = y + kernel[tap] * window
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y, padded[:, padded.shape[1] - (taps - 1) :]

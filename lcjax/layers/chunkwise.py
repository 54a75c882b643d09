"""The chunkwise gated linear-attention kernel (`kernels_pallas.chunked_linear_attention`) as the layers call it:
the mLSTM (mode "mlstm") and Mamba-2's SSD (mode "ssd") both run it once per shard of the mesh's batch and heads
axes, each shard on its own rows (the recurrence never mixes them, so nothing is gathered)."""

from __future__ import annotations

from kernels_pallas import chunked_linear_attention as kernel
from lcjax.parallel.sharding import per_shard

_PER_CHUNK = ("batch", "heads", None, None, None)  # q, k, v, cols: [batch, heads, chunks, L, ...]
_PER_STATE = ("batch", "heads", None, None)  # C [batch, heads, dk, dv], n [.., 1, dk], m [.., 1, 1]


def chunked_linear_attention(q, k, v, cols, state, *, mode: str, impl: str, eps: float = 0.0):
    """(h [batch, heads, chunks, L, dv], final (C, n, m)) of `kernel.chunked_linear_attention`, per shard."""

    def run(q, k, v, cols, state):
        return kernel.chunked_linear_attention(q, k, v, cols, state, mode=mode, eps=eps, impl=impl)

    return per_shard(
        run, (q, k, v, cols, state), (_PER_CHUNK,) * 4 + ((_PER_STATE,) * 3,), (_PER_CHUNK, (_PER_STATE,) * 3)
    )

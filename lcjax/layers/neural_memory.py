"""Titans neural long-term memory (LMM, arXiv 2501.00663 §3–§4): the `NeuralMemory` sequence mixer.

The memory itself (the update rule, the chunk-parallel dual form, the per-token oracle) is the functional core in
`lcjax.layers.memory_scan`, re-exported here: `lcjax.layers.neural_memory.memory_scan(init_weights, q, k, v, lr,
momentum, decay, chunk_size=...)` is the entry point for researchers who want test-time memorization without the
layer (its docstring states the update equations and the memory MLP's activation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.layers.conv import causal_conv
from lcjax.layers.documents import document_starts
from lcjax.layers.memory_scan import (
    GATES,
    IMPLS,
    Weights,
    memory_read,
    memory_scan,
    memory_scan_from,
    memory_scan_reference,
    memory_widths,
)
from lcjax.layers.params import normal, ones, param
from lcjax.parallel.sharding import constrain

# The memory's momentum: "paper", S_t = η_t S_(t−1) − θ_t ∇ℓ_t (Eq. 10); "ema", S_t = η_t S_(t−1) −
# (1 − η_t) θ_t ∇ℓ_t (an exponential moving average of the scaled gradients); "chunk", one momentum step per chunk
# (`memory_scan`'s `chunk_momentum`). See `NeuralMemory`.
MOMENTA = ("paper", "ema", "chunk")

__all__ = [
    "GATES",
    "IMPLS",
    "MOMENTA",
    "NeuralMemory",
    "Weights",
    "memory_read",
    "memory_scan",
    "memory_scan_from",
    "memory_scan_reference",
    "memory_widths",
]


class NeuralMemory(nnx.Module):
    """The LMM sequence mixer (paper §4.4): projections, a short causal convolution, the memory, norm and gate.

    For x `[batch, length, d_model]`, per memory head:
      q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v)), q and k ℓ2-normalized
        (conv: causal depthwise over time, `conv_size` taps);
      θ_t = max_lr · σ(x_t w_θ + b_θ), η_t = σ(x_t w_η + b_η), α_t = σ(x_t w_α + b_α)   (per token and head;
        `gates="chunk"`: constant in each chunk, those of its first token, which keeps them causal — the paper's
        per-chunk option of §3.2);
      y = memory_scan(M_0, q, k, v, θ, η, α) with a learned initial memory M_0 per head;
      out = (RMSNorm(y) ⊙ silu(x W_g)) W_o.
    The memory recurrence runs in float32 whatever the compute dtype; `impl` picks its chunk scan (`IMPLS`). Packed
    documents (`segment_ids`): the convolution restarts at a new document and, with `document_resets` (default), so
    do the memory (M_0), the momentum (0) and the gradient reference of the chunk (`memory_scan`'s `resets`, in the
    XLA scan and the kernel alike). With `document_resets=False` the memory runs across documents. `max_grad_norm`
    > 0 clips each token's memory gradient to that norm (`memory_scan`; not in the paper, for deep memories).

    `momentum="ema"` passes θ_t (1 − η_t) as the step (the momentum averages the scaled gradients instead of summing
    them); `momentum="chunk"` keeps the paper's θ and η but steps the momentum once per chunk (`memory_scan`'s
    `chunk_momentum`: each token adds its own −θ ∇ℓ, the carried momentum enters once per chunk); the default
    `"paper"` is Eq. 10. Neither option is in the paper; why they exist (the paper's momentum diverges in chunk form
    along a repeated key): docs/titans_memory_stability.md.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        head_dim: int,
        depth: int,
        expansion: int,
        chunk_size: int,
        conv_size: int,
        max_lr: float,
        init_std: float,
        out_std: float,
        rngs: nnx.Rngs,
        impl: str = "xla",
        gates: str = "token",
        document_resets: bool = True,
        max_grad_norm: float = 0.0,
        momentum: str = "paper",
    ):
        if impl not in IMPLS:
            raise ValueError(f"NeuralMemory: impl={impl!r}; expected one of {IMPLS}")
        if gates not in GATES:
            raise ValueError(f"NeuralMemory: gates={gates!r}; expected one of {GATES}")
        if momentum not in MOMENTA:
            raise ValueError(f"NeuralMemory: momentum={momentum!r}; expected one of {MOMENTA}")
        self.gates, self.document_resets, self.momentum = gates, document_resets, momentum
        self.num_heads, self.head_dim, self.chunk_size, self.conv_size = num_heads, head_dim, chunk_size, conv_size
        self.max_lr, self.impl, self.max_grad_norm = max_lr, impl, max_grad_norm
        self.w_qkv = param(
            rngs, (d_model, 3, num_heads, head_dim), ("embed", None, "heads", "head_dim"), normal(init_std)
        )
        self.conv = param(rngs, (conv_size, 3, num_heads, head_dim), (None, None, "heads", "head_dim"), _identity_tap)
        self.w_gates = param(rngs, (d_model, 3, num_heads), ("embed", None, "heads"), normal(init_std))
        # Initial θ = max_lr σ(−2) ≈ 0.12 max_lr, η = σ(2) ≈ 0.88, α = σ(−5) ≈ 0.007 (slow forgetting). A steady
        # surprise then moves the memory by θ/(1 − η) ≈ max_lr per token. "ema" moves it by θ, so it starts at
        # θ = σ(2) max_lr ≈ 0.88 max_lr, about the same steady step.
        theta_bias = 2.0 if momentum == "ema" else -2.0
        self.b_gates = param(rngs, (3, num_heads), (None, "heads"), _gate_bias((theta_bias, 2.0, -5.0)))
        widths = memory_widths(head_dim, depth, expansion)
        # Hidden layers start small (std (d_in d_out)^-1/2) so the hidden activations that the last layer's
        # gradient is an outer product of have norm O(1), not O(width): a chunk's step stays stable.
        self.memory = nnx.List(
            param(
                rngs, (num_heads, d_in, d_out), ("heads", None, None), normal((d_in * (d_out if hidden else 1)) ** -0.5)
            )
            for hidden, d_in, d_out in zip(range(depth - 1, -1, -1), widths[:-1], widths[1:], strict=True)
        )
        self.out_scale = param(rngs, (head_dim,), ("head_dim",), ones)
        self.w_gate = param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), normal(init_std))
        self.w_out = param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"), normal(out_std))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Parallel (chunked) form: x `[batch, length, d_model]` -> `[batch, length, d_model]`."""
        state = self._initial_state(x.shape[0])
        history = jnp.zeros((x.shape[0], self.conv_size - 1, 3, self.num_heads, self.head_dim), x.dtype)
        y, _ = self._run(x, history, state, 0, segment_ids)
        return y

    def init_cache(self, batch_size: int) -> dict[str, Any]:
        """Streaming state: the last conv inputs, (W_ref, M, S) per memory layer, and the position in the chunk.

        Leading axes of the parameters (a `layers` axis when the layer sits in a `LayerStack`) lead here too."""
        lead = self.memory[0].shape[:-3]
        ref, weights, momentum = self._initial_state(batch_size)
        history = jnp.zeros((*lead, batch_size, self.conv_size - 1, 3, self.num_heads, self.head_dim), jnp.float32)
        offset = jnp.zeros(lead, jnp.int32)
        gates = jnp.zeros((*lead, batch_size, 3, self.num_heads), jnp.float32)  # the open chunk's (gates="chunk")
        return {
            "conv": history,
            "ref": ref,
            "weights": weights,
            "momentum": momentum,
            "offset": offset,
            "gates": gates,
        }

    def step(self, x: jax.Array, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """Recurrent form: consumes x `[batch, n, d_model]` (n >= 1) after the cached tokens."""
        state = (cache["ref"], cache["weights"], cache["momentum"])
        history = cache["conv"].astype(x.dtype)
        y, (history, (ref, weights, momentum), gates) = self._run(
            x, history, state, cache["offset"], chunk_gates=cache["gates"]
        )
        offset = (cache["offset"] + x.shape[1]) % self.chunk_size
        new = {"conv": history.astype(cache["conv"].dtype), "ref": ref, "weights": weights, "momentum": momentum}
        return y, {**new, "offset": offset, "gates": gates}

    def _initial_state(self, batch_size):
        """M_0 for every batch element: `[..., batch, heads, d_in, d_out]` per memory layer, float32 (the memory's
        dtype even when the trainer casts parameters to bfloat16 for compute)."""
        weights = [
            jnp.broadcast_to(
                jnp.expand_dims(w[...].astype(jnp.float32), -4), (*w.shape[:-3], batch_size, *w.shape[-3:])
            )
            for w in self.memory
        ]
        return weights, weights, [jnp.zeros_like(w) for w in weights]

    def _convolve(self, x, history, parts, segment_ids, history_segments):
        """silu(causal depthwise conv(x W)) for the projections `parts` (a slice of q, k, v) in float32, and the
        new conv history (`lcjax.layers.conv.causal_conv`; a tap reaching into another document reads zero)."""
        projected = jnp.einsum("btd,dshe->btshe", x, self.w_qkv[...][:, parts].astype(x.dtype))
        kernel = self.conv[...][:, parts]
        mixed, history = causal_conv(
            projected, kernel, history=history, segment_ids=segment_ids, history_segments=history_segments
        )
        return jax.nn.silu(mixed.astype(jnp.float32)), history

    @staticmethod
    def _heads_first(z, normalize):
        if normalize:
            z = z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-6)
        return jnp.swapaxes(z, 1, 2)  # [batch, heads, length, head_dim]

    def _output(self, y, x):
        """(RMSNorm(y) ⊙ silu(x W_g)) W_o for y `[batch, heads, length, head_dim]` read from the memory."""
        y = jnp.swapaxes(y, 1, 2)  # [batch, length, heads, head_dim]
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6) * self.out_scale[...]
        y = constrain(y.astype(x.dtype), ("batch", "length", "heads", "head_dim"))
        gate = jax.nn.silu(jnp.einsum("btd,dhe->bthe", x, self.w_gate[...].astype(x.dtype)))
        return jnp.einsum("bthe,hed->btd", y * gate, self.w_out[...].astype(x.dtype))

    def read_queries(self, x, history, segment_ids=None, history_segments=None):
        """The memory queries of x `[batch, n, d_model]` without storing anything: (q `[batch, heads, n,
        head_dim]` float32, new history `[batch, conv_size − 1, 1, heads, head_dim]` of the query projection)."""
        mixed, history = self._convolve(x, history, slice(0, 1), segment_ids, history_segments)
        return self._heads_first(mixed[:, :, 0], normalize=True), history

    def read(self, q, weights, x):
        """The layer output for a read-only retrieval M_W(q) (`read_queries`) with the memory `weights` (`[batch,
        heads, d_in, d_out]` per layer); x is the input the queries came from (it drives the output gate)."""
        return self._output(memory_read(weights, q), x)

    def _gate_logits(self, x, offset, chunk_gates):
        """Pre-sigmoid θ, η, α `[batch, 3, heads, n]` for x `[batch, n, d_model]` after `offset` tokens of a chunk,
        and those of the chunk still open after x. gates="chunk": every token takes its chunk's first token's
        logits; `chunk_gates` `[batch, 3, heads]` are those of a chunk opened before x (zeros: none)."""
        gates = jnp.einsum("btd,dsh->bsht", x.astype(jnp.float32), self.w_gates[...]) + self.b_gates[...][..., None]
        if chunk_gates is None:
            chunk_gates = jnp.zeros(gates.shape[:-1], gates.dtype)
        if self.gates == "chunk":
            # index in x of each token's chunk start (negative: the chunk opened before x)
            start = (offset + jnp.arange(x.shape[1])) // self.chunk_size * self.chunk_size - offset
            taken = jnp.take(gates, jnp.maximum(start, 0), axis=-1)
            gates = jnp.where(start >= 0, taken, chunk_gates[..., None])
            chunk_gates = gates[..., -1]
        return gates, chunk_gates

    def _run(self, x, history, state, offset, segment_ids=None, history_segments=None, chunk_gates=None):
        mixed, history = self._convolve(x, history, slice(0, 3), segment_ids, history_segments)
        q, k, v = (self._heads_first(mixed[:, :, i], normalize=i < 2) for i in range(3))
        gates, chunk_gates = self._gate_logits(x, offset, chunk_gates)
        lr, momentum, decay = (
            self.max_lr * jax.nn.sigmoid(gates[:, 0]),
            jax.nn.sigmoid(gates[:, 1]),
            jax.nn.sigmoid(gates[:, 2]),
        )
        if self.momentum == "ema":
            lr = lr * jax.nn.sigmoid(-gates[:, 1])  # θ (1 − η), with 1 − σ(z) = σ(−z) exact for η near 1
        resets = restart = None
        if segment_ids is not None and self.document_resets:
            resets = document_starts(segment_ids, history_segments)
            resets = jnp.broadcast_to(resets[:, None], q.shape[:3]).astype(q.dtype)
            restart = self._initial_state(x.shape[0])[1]
        y, new_state = memory_scan_from(
            state,
            q,
            k,
            v,
            lr,
            momentum,
            decay,
            chunk_size=self.chunk_size,
            offset=offset,
            impl=self.impl,
            resets=resets,
            init=restart,
            max_grad_norm=self.max_grad_norm,
            chunk_momentum=self.momentum == "chunk",
        )
        return self._output(y, x), (history, new_state, chunk_gates)


def _identity_tap(key, shape, dtype):
    """Conv kernel that starts as the identity (all weight on the current token)."""
    del key
    return jnp.zeros(shape, dtype).at[-1].set(1.0)


def _gate_bias(values):
    def init(key, shape, dtype):
        del key
        return jnp.broadcast_to(jnp.asarray(values, dtype)[:, None], shape)

    return init

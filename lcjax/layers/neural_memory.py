"""Titans neural long-term memory (LMM, arXiv 2501.00663 §3): the functional core.

Notation of `reference/titans_hmt.md` §1. For every batch element and head the memory is an MLP with
`depth = len(weights)` layers, weights `W^1 … W^L`, in the row-vector convention

    h^0 = x,   z^l = h^(l-1) W^l,   h^l = silu(z^l) for l < L,   M_W(x) = z^L

(depth 1 is a linear matrix memory M_W(x) = x W; there are no biases and no residual). The inner loss is
ℓ(W; k, v) = ‖M_W(k) − v‖² summed over features (Eq. 12), and the update with step size θ_t (`lr`), momentum
η_t (`momentum`) and decay α_t (`decay`) is (Eq. 13–14)

    S_t = η_t S_(t−1) − θ_t ∇_W ℓ(W_ref(t); k_t, v_t)          S_0 = 0 unless given
    M_t = (1 − α_t) M_(t−1) + S_t
    y_t = M_(M_t)(q_t)                                           retrieval after storing token t

where W_ref(t) is the memory at the start of the chunk holding t (paper §3.2, mini-batch gradient descent):
chunk size 1 is the fully sequential recurrence; chunk size T takes every gradient at M_0. Results legitimately
depend on the chunk size.

Chunk-parallel form (`memory_scan`). Inside a chunk every per-token gradient is a sum of outer products
u_i^l = h_i^(l−1)ᵀ δ_i^l taken at W_ref (TTT's dual form), and the two recurrences are linear, so

    M_t = a_t M_0 + b_t S_0 + Σ_(i≤t) Γ_(t,i) u_i,       S_t = e_t S_0 + Σ_(i≤t) σ_(t,i) u_i,

with scalar coefficients from two associative scans over the chunk (no division, so η = 0 or α = 1 are fine).
Retrieval is then a causally masked, coefficient-weighted "attention" per layer,
z_t^l = a_t g_t W_0^l + b_t g_t S_0^l + Σ_i Γ_(t,i) (g_t · h_i^(l−1)) δ_i^l with g the layer input of the query,
so the weights of every position are never materialized: a `lax.scan` over chunks carries only (W_ref, M, S).
The per-chunk step itself is `kernels_pallas.titans_memory.chunk_step`, which the fused Pallas kernel of that module
runs too (`impl`).
`memory_scan_reference` is the per-token `lax.scan` of the same recurrence with `jax.grad` (the oracle).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import common, titans_memory
from lcjax.layers.params import normal, ones, param
from lcjax.parallel.sharding import constrain, per_shard

Weights = list[jax.Array]
# The chunk scan: XLA, or the fused kernel (kernels_pallas.titans_memory).
IMPLS = ("xla", "pallas", "interpret", "auto")
# θ, η, α per token, or per chunk (those of the chunk's first token).
GATES = ("token", "chunk")


def memory_widths(head_dim: int, depth: int, expansion: int) -> list[int]:
    """Layer widths of a memory MLP: head_dim in and out, `expansion * head_dim` between (depth 1: a matrix)."""
    return [head_dim] + [expansion * head_dim] * (depth - 1) + [head_dim]


def memory_read(weights: Sequence[jax.Array], x: jax.Array) -> jax.Array:
    """M_W(x) for weights `[..., d_in, d_out]` per layer and x `[..., n, d_in]` (leading axes broadcast)."""
    return _layers(weights, x)[1][-1]


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl"))
def memory_scan(
    init_weights: Sequence[jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lr: jax.Array,
    momentum: jax.Array,
    decay: jax.Array,
    *,
    chunk_size: int,
    initial_momentum: Sequence[jax.Array] | None = None,
    impl: str = "xla",
    resets: jax.Array | None = None,
) -> tuple[jax.Array, tuple[Weights, Weights]]:
    """Stores (k_t, v_t) and retrieves y_t = M_t(q_t) for every token, chunk-parallel (see the module docstring).

    Args:
      init_weights: the memory's layers M_0, each `[heads, d_in, d_out]` (shared by the batch, e.g. a learned
        initial state) or `[batch, heads, d_in, d_out]`; the first d_in is the key width, the last d_out the value
        width.
      q, k: `[batch, heads, length, key_dim]`; v: `[batch, heads, length, value_dim]`.
      lr, momentum, decay: θ, η, α as `[batch, heads, length]`.
      chunk_size: tokens per chunk (gradients at the chunk-start memory); need not divide the length.
      initial_momentum: S_0 with the layout of `init_weights` (zeros when None).
      impl: "xla" (a `lax.scan` over chunks) or the fused Pallas kernel, "pallas" | "interpret" | "auto" (see
        `kernels_pallas.titans_memory`; the kernel runs float32 inputs, anything else takes the scan).
      resets: packed documents, `[batch, length]` or `[batch, heads, length]`, 1 (True) where a document starts:
        there M_(t−1) is replaced by M_0 and S_(t−1) by 0, and the tokens of that chunk from the reset on take their
        gradients at M_0, as if the chunk started there (exactly the per-token recurrence with that rule; a
        document starting on a chunk boundary runs as it would alone). A reset at position 0 changes nothing. A
        batch with any reset runs the XLA scan whatever `impl` says.

    Returns:
      y `[batch, heads, length, value_dim]` and the final `(weights, momentum)`, each `[batch, heads, d_in, d_out]`
      per layer. Passing them to a second call continues the recurrence exactly when the first call's length is a
      multiple of `chunk_size` (otherwise the second call starts a new chunk; the Titans layer keeps the chunk-start
      memory for streaming).
    """
    weights0, momentum0 = _initial_state(init_weights, initial_momentum, q)
    restart = None
    if resets is not None:
        resets, restart = _resets(resets, q), _initial_state(init_weights, None, q)[0]
    y, (_, weights, momentum_state) = memory_scan_from(
        (weights0, weights0, momentum0),
        q,
        k,
        v,
        lr,
        momentum,
        decay,
        chunk_size=chunk_size,
        offset=0,
        impl=impl,
        resets=resets,
        init=restart,
    )
    return y, (weights, momentum_state)


def _resets(resets, q):
    """resets `[batch, length]` or `[batch, heads, length]` -> `[batch, heads, length]` in q's dtype."""
    batch, heads, length = q.shape[:3]
    if resets.shape == (batch, length):
        resets = resets[:, None, :]
    if resets.ndim != 3 or resets.shape[0] != batch or resets.shape[2] != length or resets.shape[1] not in (1, heads):
        raise ValueError(f"resets {resets.shape}: expected [batch, length] or [batch, heads, length] = {q.shape[:3]}")
    return jnp.broadcast_to(resets, (batch, heads, length)).astype(q.dtype)


def memory_scan_from(
    state: tuple[Weights, Weights, Weights],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lr: jax.Array,
    momentum: jax.Array,
    decay: jax.Array,
    *,
    chunk_size: int,
    offset: int | jax.Array,
    impl: str = "xla",
    resets: jax.Array | None = None,
    init: Weights | None = None,
) -> tuple[jax.Array, tuple[Weights, Weights, Weights]]:
    """`memory_scan` continuing a chunk: `state = (W_ref, M, S)` with `offset` tokens of the current chunk done.

    The first `chunk_size − offset` tokens take their gradients at W_ref, later chunks at their own start memory.
    At a static `offset` of 0 a fresh chunk starts at M (W_ref is not read) and `impl` picks the chunk scan: "xla"
    (a `lax.scan`), "pallas" | "interpret" | "auto" (`kernels_pallas.titans_memory`, which falls back to the scan
    where it cannot run, e.g. float64); a traced or nonzero offset always takes the scan.
    Returns y and the state after the last token, whose W_ref is the start memory of the chunk that is still
    open (M itself when the tokens end on a chunk boundary). All state arrays are `[batch, heads, d_in, d_out]`.
    `offset` may be traced (streaming decode): the tokens are then placed in a buffer long enough for any offset.
    `resets` `[batch, heads, length]` (1 where a document starts) restart the memory from `init` (M_0 per layer,
    `[batch, heads, d_in, d_out]`) and the momentum from 0 there, and the rest of that chunk takes its gradients at
    `init` (see `memory_scan`); a batch with any reset takes the scan, not the kernel.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    static_offset = isinstance(offset, int)
    if static_offset and not 0 <= offset < chunk_size:
        raise ValueError(f"offset={offset} must be in [0, chunk_size={chunk_size})")
    batch, heads, length, _ = q.shape
    if k.shape[:3] != (batch, heads, length) or v.shape[:3] != (batch, heads, length):
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} must agree on [batch, heads, length]")
    for name, gate in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if gate.shape != (batch, heads, length):
            expected = (batch, heads, length)
            raise ValueError(f"{name} has shape {gate.shape}; expected [batch, heads, length] = {expected}")

    num_chunks = -(-((offset if static_offset else chunk_size - 1) + length) // chunk_size)
    end = offset + length

    def chunked(x, fill=0.0):
        """[batch, heads, length, ...] -> [chunks, batch, heads, chunk, ...], the tokens starting at `offset`."""
        buffer = jnp.full((batch, heads, num_chunks * chunk_size, *x.shape[3:]), fill, x.dtype)
        x = jax.lax.dynamic_update_slice_in_dim(buffer, x, offset, axis=2)
        x = x.reshape(batch, heads, num_chunks, chunk_size, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    valid = chunked(jnp.ones((batch, heads, length), q.dtype))
    # Padding leaves the state alone: θ = 0, η = 1, α = 0 (and the decay scan ignores it through `valid`).
    if resets is None:
        coeffs = _chunk_coefficients(chunked(lr), chunked(momentum, 1.0), chunked(decay), valid)
        reset_cols = None
    else:
        if resets.shape != (batch, heads, length) or init is None:
            expected = (batch, heads, length)
            raise ValueError(f"resets {resets.shape} must be [batch, heads, length] = {expected}, with init")
        *coeffs, reset_cols = _chunk_coefficients(
            chunked(lr), chunked(momentum, 1.0), chunked(decay), valid, chunked(resets.astype(q.dtype))
        )
        if impl != "xla":
            common.say_once("titans_memory: a batch with a document start runs the XLA chunk scan, not the kernel")
    xs = (chunked(q), chunked(k), chunked(v), tuple(coeffs), jnp.arange(num_chunks), reset_cols)
    ref0, weights0, momentum0 = state
    fresh = static_offset and offset == 0  # a fresh chunk (W_ref = M): the fused kernel's case
    if fresh and impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")

    def fused():  # the kernel (or its XLA reference), which knows no resets
        kernel_impl = "reference" if impl == "xla" else impl
        per_head, per_chunk = ("batch", "heads", None, None), (None, "batch", "heads", None, None)
        y, (weights, momentum_state), (starts, _) = per_shard(  # a kernel runs on each device's shard
            functools.partial(titans_memory.memory_chunks, impl=kernel_impl),
            (weights0, momentum0, *xs[:3], *coeffs),
            ([per_head] * len(weights0), [per_head] * len(momentum0)) + (per_chunk,) * 5,
            (per_chunk, ([per_head] * len(weights0),) * 2, ([per_chunk] * len(weights0),) * 2),
        )
        # A chunk boundary after the last token opens a fresh chunk, whose reference is the final memory.
        ref = weights if end % chunk_size == 0 else [s[-1] for s in starts]
        return y, (ref, weights, momentum_state)

    def scanned():
        open_chunk = end // chunk_size  # the chunk the next token falls in

        def body(carry, inputs):
            ref, weights, momentum_state, open_ref = carry
            q_c, k_c, v_c, (gamma, cols), index, reset_c = inputs
            ref = _select(index == 0, ref, weights)
            chunk_ref = ref  # the reference of this chunk's later tokens: the restart memory after a reset
            args = (weights, momentum_state, q_c, k_c, v_c, gamma, cols)
            if reset_c is None:
                y_c, weights, momentum_state = titans_memory.chunk_step(*args, ref=ref)
            else:
                chunk_ref = _select(reset_c[..., -1, 1:2, None] > 0, init, ref)
                y_c, weights, momentum_state = jax.lax.cond(  # the reset terms only for chunks that have a reset
                    jnp.any(reset_c[..., 1] > 0),
                    lambda: titans_memory.chunk_step(*args, ref=ref, init=init, reset_cols=reset_c),
                    lambda: titans_memory.chunk_step(*args, ref=ref),
                )
            open_ref = _select(index == open_chunk, chunk_ref, open_ref)
            return (ref, weights, momentum_state, open_ref), y_c

        carry = (ref0, weights0, momentum0, ref0)
        (_, weights, momentum_state, open_ref), y = jax.lax.scan(body, carry, xs)
        return y, (_select(end % chunk_size == 0, weights, open_ref), weights, momentum_state)

    if not fresh:
        y, (ref, weights, momentum_state) = scanned()
    elif resets is None:
        y, (ref, weights, momentum_state) = fused()
    else:  # rows without a document start (e.g. one document per row) keep the kernel
        y, (ref, weights, momentum_state) = jax.lax.cond(jnp.any(resets > 0), scanned, fused)
    y = jnp.moveaxis(y, 0, 2).reshape(batch, heads, num_chunks * chunk_size, -1)
    y = jax.lax.dynamic_slice_in_dim(y, offset, length, axis=2)
    return y, (ref, weights, momentum_state)


def _select(predicate, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), on_true, on_false)


@functools.partial(jax.jit, static_argnames="chunk_size")
def memory_scan_reference(
    init_weights: Sequence[jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lr: jax.Array,
    momentum: jax.Array,
    decay: jax.Array,
    *,
    chunk_size: int,
    initial_momentum: Sequence[jax.Array] | None = None,
    resets: jax.Array | None = None,
) -> tuple[jax.Array, tuple[Weights, Weights]]:
    """The oracle: one `lax.scan` step per token, gradients by `jax.grad` at the chunk-start memory.

    Same arguments and results as `memory_scan`; memory O(|W|), time O(length) sequential steps. A reset at t
    replaces the memory, the momentum and the chunk's gradient reference by M_0, 0 and M_0 before token t.
    """
    weights0, momentum0 = _initial_state(init_weights, initial_momentum, q)
    restart = _initial_state(init_weights, None, q)[0]
    resets = jnp.zeros(q.shape[:3], q.dtype) if resets is None else _resets(resets, q)

    def inner_loss(weights, key, value):
        return jnp.sum((memory_read(weights, key[None])[0] - value) ** 2)

    per_token_grad = jax.vmap(jax.vmap(jax.grad(inner_loss)))  # over batch and heads

    def body(carry, inputs):
        ref, weights, momentum_state = carry
        q_t, k_t, v_t, lr_t, momentum_t, decay_t, reset_t, t = inputs
        ref = _select(t % chunk_size == 0, weights, ref)
        restart_here = reset_t[..., None, None] > 0
        ref, weights = (_select(restart_here, restart, w) for w in (ref, weights))
        momentum_state = _select(restart_here, [jnp.zeros_like(s) for s in momentum_state], momentum_state)
        grads = per_token_grad(ref, k_t, v_t)
        momentum_state = [
            momentum_t[..., None, None] * s - lr_t[..., None, None] * g
            for s, g in zip(momentum_state, grads, strict=True)
        ]
        weights = [(1 - decay_t[..., None, None]) * w + s for w, s in zip(weights, momentum_state, strict=True)]
        y_t = jax.vmap(jax.vmap(lambda w, x: memory_read(w, x[None])[0]))(weights, q_t)
        return (ref, weights, momentum_state), y_t

    time_major = [jnp.moveaxis(x, 2, 0) for x in (q, k, v, lr, momentum, decay, resets)]
    carry = (weights0, weights0, momentum0)
    (_, weights, momentum_state), y = jax.lax.scan(body, carry, (*time_major, jnp.arange(q.shape[2])))
    return jnp.moveaxis(y, 0, 2), (weights, momentum_state)


def _initial_state(init_weights, initial_momentum, q):
    batch, heads = q.shape[:2]
    if not init_weights:
        raise ValueError("init_weights must hold at least one memory layer")
    previous = None
    for layer, w in enumerate(init_weights):
        if w.ndim not in (3, 4) or w.shape[-3] != heads:
            raise ValueError(
                f"init_weights[{layer}] has shape {w.shape}; expected [heads={heads}, d_in, d_out] or "
                f"[batch={batch}, heads={heads}, d_in, d_out]"
            )
        if previous is not None and w.shape[-2] != previous:
            raise ValueError(f"init_weights[{layer}] takes width {w.shape[-2]} but layer {layer - 1} gives {previous}")
        previous = w.shape[-1]

    def full(w):
        return jnp.broadcast_to(w, (batch, heads, *w.shape[-2:])).astype(q.dtype)

    weights = [full(w) for w in init_weights]
    if initial_momentum is None:
        return weights, [jnp.zeros_like(w) for w in weights]
    return weights, [full(s) for s in initial_momentum]


def _layers(weights, x):
    """Forward pass keeping every layer's input h^(l−1) and pre-activation z^l."""
    inputs, pre = [], []
    h = x
    for layer, w in enumerate(weights):
        inputs.append(h)
        z = h @ w
        pre.append(z)
        if layer < len(weights) - 1:
            h = jax.nn.silu(z)
    return inputs, pre


def _chunk_coefficients(lr, momentum, decay, valid, reset=None):
    """Scalar coefficients of one chunk's state in terms of (u_i, S_0, M_0), from two associative scans.

    Inputs `[..., chunk]`. Returns gamma `[..., chunk, chunk]` (M_t in u_i) and the columns of
    `kernels_pallas.titans_memory.pack_columns`: a (M_t in M_0), b (M_t in S_0), sigma (the chunk-end S in u_i) and
    e (it in S_0). With `reset` (1 where a document starts) also the `reset_cols` of `titans_memory.chunk_step`:
    c_t (M_t in the restart memory) and 1 from the chunk's first reset on. A reset at r sets S_(r−1) = 0 and
    M_(r−1) = the restart memory, so every coefficient of the state before it (a, b, e, Γ and σ of earlier tokens)
    is 0 from r on.
    """
    size = lr.shape[-1]
    eye = jnp.eye(size, dtype=lr.dtype)
    first = jnp.zeros(size, lr.dtype).at[0].set(1)
    keep = 1.0 if reset is None else 1 - reset

    def linear(earlier, later):  # h_t = a_t h_(t−1) + x_t
        return later[0] * earlier[0], later[0] * earlier[1] + later[1]

    # S_t = η_t S_(t−1) − θ_t u_t; columns: u_1..u_c, then S_0.
    x_s = jnp.concatenate([-lr[..., None] * eye, (momentum * first * keep)[..., None]], axis=-1)
    _, s = jax.lax.associative_scan(linear, ((momentum * keep)[..., None], x_s), axis=-2)
    # M_t = (1 − α_t) M_(t−1) + S_t on valid tokens; columns: u_1..u_c, S_0, M_0, then the restart memory.
    restart = [] if reset is None else [((1 - decay) * reset)[..., None]]
    x_m = jnp.concatenate([valid[..., None] * s, ((1 - decay) * first * keep)[..., None], *restart], axis=-1)
    _, m = jax.lax.associative_scan(linear, (((1 - decay) * keep)[..., None], x_m), axis=-2)
    gamma = m[..., :size]
    cols = titans_memory.pack_columns(gamma, m[..., size + 1], m[..., size], s[..., -1, :size], s[..., -1, size])
    if reset is None:
        return gamma, cols
    after = jax.lax.cummax(reset, axis=reset.ndim - 1)
    return gamma, cols, jnp.stack([m[..., size + 2], after], axis=-1)


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
    do the memory (M_0), the momentum (0) and the gradient reference of the chunk (`memory_scan`'s `resets`; those
    rows take the XLA scan, not the kernel). With `document_resets=False` the memory runs across documents.
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
    ):
        if impl not in IMPLS:
            raise ValueError(f"NeuralMemory: impl={impl!r}; expected one of {IMPLS}")
        if gates not in GATES:
            raise ValueError(f"NeuralMemory: gates={gates!r}; expected one of {GATES}")
        self.gates, self.document_resets = gates, document_resets
        self.num_heads, self.head_dim, self.chunk_size, self.conv_size = num_heads, head_dim, chunk_size, conv_size
        self.max_lr, self.impl = max_lr, impl
        self.w_qkv = param(
            rngs, (d_model, 3, num_heads, head_dim), ("embed", None, "heads", "head_dim"), normal(init_std)
        )
        self.conv = param(rngs, (conv_size, 3, num_heads, head_dim), (None, None, "heads", "head_dim"), _identity_tap)
        self.w_gates = param(rngs, (d_model, 3, num_heads), ("embed", None, "heads"), normal(init_std))
        # Initial θ = max_lr σ(−2) ≈ 0.12 max_lr, η = σ(2) ≈ 0.88, α = σ(−5) ≈ 0.007 (slow forgetting).
        self.b_gates = param(rngs, (3, num_heads), (None, "heads"), _gate_bias((-2.0, 2.0, -5.0)))
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
        new conv history. A tap reaching into another document (`segment_ids`; the history's documents are
        `history_segments`, a new document when None) reads zero."""
        projected = jnp.einsum("btd,dshe->btshe", x, self.w_qkv[...][:, parts].astype(x.dtype))
        padded = jnp.concatenate([history, projected], axis=1)
        kernel = self.conv[...][:, parts].astype(x.dtype)
        length, taps = x.shape[1], self.conv_size
        if segment_ids is not None:
            if history_segments is None:
                history_segments = jnp.full((x.shape[0], taps - 1), -1, segment_ids.dtype)
            seg = jnp.concatenate([history_segments, segment_ids], axis=1)
        mixed = 0
        for tap in range(taps):
            window = padded[:, tap : tap + length]
            if segment_ids is not None:
                window = jnp.where((seg[:, tap : tap + length] == segment_ids)[..., None, None, None], window, 0)
            mixed = mixed + kernel[tap] * window
        return jax.nn.silu(mixed.astype(jnp.float32)), padded[:, padded.shape[1] - (taps - 1) :]

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
        resets = restart = None
        if segment_ids is not None and self.document_resets:
            resets = self.document_starts(segment_ids, history_segments)
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
        )
        return self._output(y, x), (history, new_state, chunk_gates)

    @staticmethod
    def document_starts(segment_ids, history_segments=None):
        """[batch, n] bool: True where a token's document differs from the previous token's (the last of
        `history_segments` `[batch, taps]` before the first token; without history the first token starts none)."""
        previous = segment_ids[:, :1] if history_segments is None else history_segments[:, -1:]
        return segment_ids != jnp.concatenate([previous, segment_ids[:, :-1]], axis=1)


def _identity_tap(key, shape, dtype):
    """Conv kernel that starts as the identity (all weight on the current token)."""
    del key
    return jnp.zeros(shape, dtype).at[-1].set(1.0)


def _gate_bias(values):
    def init(key, shape, dtype):
        del key
        return jnp.broadcast_to(jnp.asarray(values, dtype)[:, None], shape)

    return init

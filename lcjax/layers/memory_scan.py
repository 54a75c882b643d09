"""Titans neural long-term memory (LMM, arXiv 2501.00663 §3): the functional core (`memory_scan`), usable without
the layer for test-time memorization; `lcjax.layers.neural_memory` holds the LMM mixer and re-exports it.

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

`chunk_momentum=True` (not in the paper) steps the momentum once per chunk instead, heavy ball over chunks: with
f the chunk's first token and g_i = ∇_W ℓ(W_ref(i); k_i, v_i),

    S_t = η_f S_(f−1) − Σ_(f≤i≤t) θ_i g_i        M_t = (1 − α_t) M_(t−1) + (S_t − S_(t−1) for t > f; S_f at f)

so each token adds its own −θ_i g_i to the memory, the carried momentum enters once, at f, and the chunk hands
S = η_f S_0 − Σ θ_i g_i to the next. Chunk size 1 is again the paper's recurrence. Why (the paper's momentum
diverges in chunk form along a repeated key): docs/titans_memory_stability.md.

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

import jax
import jax.numpy as jnp

from kernels_pallas import titans_memory
from lcjax.parallel.sharding import per_shard

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


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl", "max_grad_norm", "chunk_momentum"))
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
    max_grad_norm: float = 0.0,
    chunk_momentum: bool = False,
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
      max_grad_norm: > 0 clips every token's gradient ∇_W ℓ (all layers together, Frobenius norm) to this norm
        before it enters the momentum: S_t = η_t S_(t−1) − θ_t clip(∇_W ℓ). Not in the paper (0, the default, is
        the paper's rule); it bounds each token's step, which a deep memory needs to train stably (docs).
      chunk_momentum: the momentum steps once per chunk (module docstring; False, the default, is the paper's).

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
        max_grad_norm=max_grad_norm,
        chunk_momentum=chunk_momentum,
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
    max_grad_norm: float = 0.0,
    chunk_momentum: bool = False,
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
    `init` (see `memory_scan`); the kernel handles them too. `max_grad_norm` and `chunk_momentum` as in
    `memory_scan`.
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
        coeffs = _chunk_coefficients(chunked(lr), chunked(momentum, 1.0), chunked(decay), valid, None, chunk_momentum)
        reset_cols = None
    else:
        if resets.shape != (batch, heads, length) or init is None:
            expected = (batch, heads, length)
            raise ValueError(f"resets {resets.shape} must be [batch, heads, length] = {expected}, with init")
        *coeffs, reset_cols = _chunk_coefficients(
            chunked(lr), chunked(momentum, 1.0), chunked(decay), valid, chunked(resets.astype(q.dtype)), chunk_momentum
        )
    xs = (chunked(q), chunked(k), chunked(v), tuple(coeffs), jnp.arange(num_chunks), reset_cols)
    ref0, weights0, momentum0 = state
    fresh = static_offset and offset == 0  # a fresh chunk (W_ref = M): the fused kernel's case
    if fresh and impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")

    def fused(with_resets=False):  # the kernel (or its XLA reference); with_resets: the restart terms too
        kernel_impl = "reference" if impl == "xla" else impl
        per_head, per_chunk = ("batch", "heads", None, None), (None, "batch", "heads", None, None)
        args = (weights0, momentum0, *xs[:3], *coeffs)
        in_axes = ([per_head] * len(weights0), [per_head] * len(momentum0)) + (per_chunk,) * 5
        if with_resets:
            args, in_axes = args + (init, reset_cols), in_axes + ([per_head] * len(init), per_chunk)

        def run(weights, momentum, q, k, v, gamma, cols, *restart):
            init, reset_cols = restart or (None, None)
            return titans_memory.memory_chunks(
                weights,
                momentum,
                q,
                k,
                v,
                gamma,
                cols,
                impl=kernel_impl,
                init=init,
                reset_cols=reset_cols,
                max_grad_norm=max_grad_norm,
            )

        y, (weights, momentum_state), (starts, _) = per_shard(  # a kernel runs on each device's shard
            run, args, in_axes, (per_chunk, ([per_head] * len(weights0),) * 2, ([per_chunk] * len(weights0),) * 2)
        )
        # A chunk boundary after the last token opens a fresh chunk, whose reference is the final memory; an open
        # chunk with a document start takes its later gradients at the restart memory.
        ref = weights if end % chunk_size == 0 else [s[-1] for s in starts]
        if with_resets and end % chunk_size:
            ref = _select(reset_cols[-1][..., -1, 1:2, None] > 0, init, ref)
        return y, (ref, weights, momentum_state)

    def scanned():
        open_chunk = end // chunk_size  # the chunk the next token falls in

        def body(carry, inputs):
            ref, weights, momentum_state, open_ref = carry
            q_c, k_c, v_c, (gamma, cols), index, reset_c = inputs
            ref = _select(index == 0, ref, weights)
            chunk_ref = ref  # the reference of this chunk's later tokens: the restart memory after a reset
            args = (weights, momentum_state, q_c, k_c, v_c, gamma, cols)
            step = functools.partial(titans_memory.chunk_step, max_grad_norm=max_grad_norm)
            if reset_c is None:
                y_c, weights, momentum_state = step(*args, ref=ref)
            else:
                chunk_ref = _select(reset_c[..., -1, 1:2, None] > 0, init, ref)
                y_c, weights, momentum_state = jax.lax.cond(  # the reset terms only for chunks that have a reset
                    jnp.any(reset_c[..., 1] > 0),
                    lambda: step(*args, ref=ref, init=init, reset_cols=reset_c),
                    lambda: step(*args, ref=ref),
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
    else:  # a batch without a document start (e.g. one document per row) skips the restart terms
        with_resets = scanned if impl == "xla" else functools.partial(fused, True)  # the scan skips them per chunk
        y, (ref, weights, momentum_state) = jax.lax.cond(jnp.any(resets > 0), with_resets, fused)
    y = jnp.moveaxis(y, 0, 2).reshape(batch, heads, num_chunks * chunk_size, -1)
    y = jax.lax.dynamic_slice_in_dim(y, offset, length, axis=2)
    return y, (ref, weights, momentum_state)


def _select(predicate, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), on_true, on_false)


@functools.partial(jax.jit, static_argnames=("chunk_size", "max_grad_norm", "chunk_momentum"))
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
    max_grad_norm: float = 0.0,
    chunk_momentum: bool = False,
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
        first = t % chunk_size == 0
        ref = _select(first, weights, ref)
        restart_here = reset_t[..., None, None] > 0
        ref, weights = (_select(restart_here, restart, w) for w in (ref, weights))
        momentum_state = _select(restart_here, [jnp.zeros_like(s) for s in momentum_state], momentum_state)
        grads = per_token_grad(ref, k_t, v_t)
        if max_grad_norm:  # the whole token gradient to at most that norm, per batch element and head
            norm = jnp.sqrt(sum(jnp.sum(g * g, axis=(-2, -1)) for g in grads) + 1e-12)[..., None, None]
            grads = [g * (max_grad_norm / jnp.maximum(norm, max_grad_norm)) for g in grads]  # finite at g = 0
        carried = jnp.where(first, momentum_t, 1.0) if chunk_momentum else momentum_t
        steps = [-lr_t[..., None, None] * g for g in grads]
        momentum_state = [carried[..., None, None] * s + d for s, d in zip(momentum_state, steps, strict=True)]
        # The paper's: M takes S_t. Per-chunk momentum: S_t at the chunk's first token, then each token's own step.
        added = _select(first, momentum_state, steps) if chunk_momentum else momentum_state
        weights = [(1 - decay_t[..., None, None]) * w + d for w, d in zip(weights, added, strict=True)]
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


def _chunk_coefficients(lr, momentum, decay, valid, reset=None, chunk_momentum=False):
    """Scalar coefficients of one chunk's state in terms of (u_i, S_0, M_0), from two associative scans.

    Inputs `[..., chunk]`. Returns gamma `[..., chunk, chunk]` (M_t in u_i) and the columns of
    `kernels_pallas.titans_memory.pack_columns`: a (M_t in M_0), b (M_t in S_0), sigma (the chunk-end S in u_i) and
    e (it in S_0). With `reset` (1 where a document starts) also the `reset_cols` of `titans_memory.chunk_step`:
    c_t (M_t in the restart memory) and 1 from the chunk's first reset on. A reset at r sets S_(r−1) = 0 and
    M_(r−1) = the restart memory, so every coefficient of the state before it (a, b, e, Γ and σ of earlier tokens)
    is 0 from r on. `chunk_momentum`: η acts at the chunk's first token only and M_t adds S_t − S_(t−1) (S_t at the
    first token), `memory_scan`'s per-chunk momentum.
    """
    size = lr.shape[-1]
    eye = jnp.eye(size, dtype=lr.dtype)
    first = jnp.zeros(size, lr.dtype).at[0].set(1)
    keep = 1.0 if reset is None else 1 - reset

    def linear(earlier, later):  # h_t = a_t h_(t−1) + x_t
        return later[0] * earlier[0], later[0] * earlier[1] + later[1]

    # S_t = η_t S_(t−1) − θ_t u_t; columns: u_1..u_c, then S_0.
    x_s = jnp.concatenate([-lr[..., None] * eye, (momentum * first * keep)[..., None]], axis=-1)
    carried = momentum * first + (1 - first) if chunk_momentum else momentum
    _, s = jax.lax.associative_scan(linear, ((carried * keep)[..., None], x_s), axis=-2)
    step = s
    if chunk_momentum:  # M_t takes S_t − S_(t−1); after a reset S_(t−1) is 0
        earlier = jnp.concatenate([jnp.zeros_like(s[..., :1, :]), s[..., :-1, :]], axis=-2)
        step = s - (keep[..., None] if reset is not None else 1.0) * earlier
    # M_t = (1 − α_t) M_(t−1) + S_t on valid tokens; columns: u_1..u_c, S_0, M_0, then the restart memory.
    restart = [] if reset is None else [((1 - decay) * reset)[..., None]]
    x_m = jnp.concatenate([valid[..., None] * step, ((1 - decay) * first * keep)[..., None], *restart], axis=-1)
    _, m = jax.lax.associative_scan(linear, (((1 - decay) * keep)[..., None], x_m), axis=-2)
    gamma = m[..., :size]
    cols = titans_memory.pack_columns(gamma, m[..., size + 1], m[..., size], s[..., -1, :size], s[..., -1, size])
    if reset is None:
        return gamma, cols
    after = jax.lax.cummax(reset, axis=reset.ndim - 1)
    return gamma, cols, jnp.stack([m[..., size + 2], after], axis=-1)

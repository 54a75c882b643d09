"""Oracles for the Titans memory core (reference/titans_hmt.md §3.1), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.layers.neural_memory import memory_read, memory_scan, memory_scan_from, memory_scan_reference

BATCH, HEADS, DIM = 2, 3, 4


def make_inputs(seed, length, depth, *, hidden=6, batch=BATCH, heads=HEADS, dim=DIM):
    keys = jax.random.split(jax.random.key(seed), 10)
    widths = [dim] + [hidden] * (depth - 1) + [dim]
    init = [0.5 * jax.random.normal(keys[i], (heads, widths[i], widths[i + 1])) for i in range(depth)]
    shape = (batch, heads, length)
    q, k, v = (jax.random.normal(keys[7 + i], (*shape, dim)) for i in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    gates = jax.random.uniform(keys[5], (3, *shape), minval=0.05, maxval=0.95)
    lr, momentum, decay = 0.4 * gates[0], gates[1], 0.2 * gates[2]
    return init, q, k, v, lr, momentum, decay


def sequential_paper_recurrence(init, q, k, v, lr, momentum, decay, *, reference_fixed=False):
    """Eq. 13–15 token by token in plain Python: S_t = η S − θ ∇ℓ(M_(t−1)), M_t = (1−α) M + S_t, y_t = M_t(q_t).

    With `reference_fixed`, every gradient is taken at M_0 instead (the chunk = T case).
    """
    batch, heads, length, _ = q.shape
    ys = np.zeros(v.shape)
    for b in range(batch):
        for h in range(heads):
            weights = [w[h] for w in init]
            first = list(weights)
            surprise = [jnp.zeros_like(w) for w in weights]
            for t in range(length):
                at = first if reference_fixed else weights
                key, value = k[b, h, t][None], v[b, h, t]
                grads = jax.grad(lambda ws, key=key, value=value: jnp.sum((memory_read(ws, key)[0] - value) ** 2))(at)
                surprise = [momentum[b, h, t] * s - lr[b, h, t] * g for s, g in zip(surprise, grads, strict=True)]
                weights = [(1 - decay[b, h, t]) * w + s for w, s in zip(weights, surprise, strict=True)]
                ys[b, h, t] = memory_read(weights, q[b, h, t][None])[0]
    return ys


def assert_gradients_match_the_oracle(args, **kw):
    """jax.grad through `memory_scan` == through the per-token oracle (`jax.grad` of `jax.grad`), for a loss on the
    outputs and the final memory and momentum, with respect to M_0, q, k, v and the gates."""

    def grads(scan):
        def loss(inputs):
            y, (weights, surprise) = scan(*inputs, **kw)
            return jnp.sum(jnp.sin(y)) + sum(jnp.sum(x**2) for x in weights + surprise)

        return jax.grad(loss)(args)

    got, want = grads(memory_scan), grads(memory_scan_reference)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("depth", [1, 2])
def test_chunked_equals_per_token_loop_for_every_chunk_size(x64, depth):
    length = 13
    args = make_inputs(0, length, depth)
    momentum0 = [0.1 * jnp.ones_like(w) for w in args[0]]
    outputs = {}
    for chunk_size in (1, 2, 7, length):
        y, (weights, surprise) = memory_scan(*args, chunk_size=chunk_size, initial_momentum=momentum0)
        outputs[chunk_size] = y
        y_ref, (weights_ref, surprise_ref) = memory_scan_reference(
            *args, chunk_size=chunk_size, initial_momentum=momentum0
        )
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-11, err_msg=f"chunk {chunk_size}")
        for got, want in zip(weights + surprise, weights_ref + surprise_ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11, err_msg=f"chunk {chunk_size}")
    # The chunk size is a real approximation, not a no-op: chunk 7 differs from chunk 1.
    assert float(jnp.max(jnp.abs(outputs[1] - outputs[7]))) > 1e-3


@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_one_is_the_sequential_recurrence_and_chunk_length_takes_all_gradients_at_m0(x64, depth):
    length = 6
    args = make_inputs(1, length, depth, batch=1, heads=2)
    np.testing.assert_allclose(memory_scan(*args, chunk_size=1)[0], sequential_paper_recurrence(*args), atol=1e-11)
    np.testing.assert_allclose(
        memory_scan(*args, chunk_size=length)[0],
        sequential_paper_recurrence(*args, reference_fixed=True),
        atol=1e-11,
    )


# chunk_momentum: pieces that start inside a chunk carry its running momentum, which the memory takes once per chunk
@pytest.mark.parametrize(
    "depth,traced_offset,chunk_momentum", [(1, False, False), (2, False, False), (2, True, False), (1, True, True)]
)
def test_streaming_in_ragged_pieces_equals_one_shot(x64, depth, traced_offset, chunk_momentum):
    length, chunk_size = 13, 4
    init, q, k, v, lr, momentum, decay = make_inputs(2, length, depth)
    kw = dict(chunk_size=chunk_size, chunk_momentum=chunk_momentum)
    y_full, (weights_full, surprise_full) = memory_scan(init, q, k, v, lr, momentum, decay, **kw)
    weights = [jnp.broadcast_to(w, (BATCH, *w.shape)) for w in init]
    state = (weights, weights, [jnp.zeros_like(w) for w in weights])
    # A traced offset is what decode does (the position in the chunk is part of the jitted cache).
    static = ("chunk_size", "chunk_momentum") + (() if traced_offset else ("offset",))
    scan = jax.jit(memory_scan_from, static_argnames=static)
    pieces, start = [], 0
    for size in (3, 1, 5, 1, 3):  # one token at a time, across and inside chunk boundaries
        piece = slice(start, start + size)
        offset = jnp.asarray(start % chunk_size) if traced_offset else start % chunk_size
        sequence = (x[:, :, piece] for x in (q, k, v, lr, momentum, decay))
        y, state = scan(state, *sequence, offset=offset, **kw)
        pieces.append(y)
        start += size
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=2), y_full, atol=1e-12)
    for got, want in zip(state[1] + state[2], weights_full + surprise_full, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)
    # 13 = 3 chunks + 1 token: the open chunk's reference is the memory after token 12, not the final one.
    _, (weights12, _) = memory_scan(init, *(x[:, :, :12] for x in (q, k, v, lr, momentum, decay)), **kw)
    for got, want in zip(state[0], weights12, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_causality_later_tokens_never_change_earlier_outputs(x64):
    args = list(make_inputs(3, 11, depth=2))
    y = memory_scan(*args, chunk_size=4)[0]
    for index in range(1, 7):  # q, k, v, lr, momentum, decay after position 5 (inside the second chunk)
        args[index] = args[index].at[:, :, 6:].add(0.7)
    y_changed = memory_scan(*args, chunk_size=4)[0]
    np.testing.assert_array_equal(y_changed[:, :, :6], y[:, :, :6])
    assert float(jnp.max(jnp.abs(y_changed[:, :, 6:] - y[:, :, 6:]))) > 1e-3


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5])
def test_linear_memory_recalls_every_orthonormal_pair_exactly(x64, chunk_size):
    pairs, dim = 5, 8
    keys = jax.random.split(jax.random.key(4), 3)
    basis = jnp.linalg.qr(jax.random.normal(keys[0], (dim, dim)))[0][:pairs]  # orthonormal rows
    k = jnp.broadcast_to(basis, (1, 1, pairs, dim))
    v = jax.random.normal(keys[1], (1, 1, pairs, dim))
    init = [jax.random.normal(keys[2], (1, dim, dim))]
    half, zero = jnp.full((1, 1, pairs), 0.5), jnp.zeros((1, 1, pairs))
    _, (weights, _) = memory_scan(init, k, k, v, half, zero, zero, chunk_size=chunk_size)
    np.testing.assert_allclose(memory_read(weights, k), v, atol=1e-12)


def test_linear_memory_without_momentum_is_the_gated_delta_rule(x64):
    init, q, k, v, lr, _, decay = make_inputs(5, 9, depth=1)
    y, (weights, _) = memory_scan(init, q, k, v, lr, jnp.zeros_like(lr), decay, chunk_size=1)
    w = np.broadcast_to(np.asarray(init[0]), (BATCH, HEADS, DIM, DIM)).copy()
    for t in range(q.shape[2]):  # rank-1 updates: W_t = (1 − α) W − 2θ k_tᵀ (k_t W − v_t)
        k_t, v_t = np.asarray(k[:, :, t]), np.asarray(v[:, :, t])
        error = np.einsum("bhd,bhde->bhe", k_t, w) - v_t
        w = (1 - np.asarray(decay[:, :, t]))[..., None, None] * w - 2 * np.asarray(lr[:, :, t])[
            ..., None, None
        ] * np.einsum("bhd,bhe->bhde", k_t, error)
        np.testing.assert_allclose(y[:, :, t], np.einsum("bhd,bhde->bhe", np.asarray(q[:, :, t]), w), atol=1e-12)
    np.testing.assert_allclose(weights[0], w, atol=1e-12)


def test_batch_elements_and_heads_never_mix(x64):
    init, q, k, v, lr, momentum, decay = make_inputs(6, 7, depth=2)
    y = memory_scan(init, q, k, v, lr, momentum, decay, chunk_size=3)[0]
    batch_perm, head_perm = jnp.array([1, 0]), jnp.array([2, 0, 1])

    def permute(x):
        return x[batch_perm][:, head_perm]

    y_perm = memory_scan(
        [w[head_perm] for w in init], *(permute(x) for x in (q, k, v, lr, momentum, decay)), chunk_size=3
    )[0]
    np.testing.assert_allclose(y_perm, permute(y), atol=1e-13)


def test_gradients_of_the_chunked_form_equal_those_of_the_reference(x64):
    assert_gradients_match_the_oracle(make_inputs(7, 8, depth=2), chunk_size=3)


@pytest.mark.parametrize("depth", [pytest.param(1, marks=pytest.mark.slow), 2])  # depth 1: `slow` (CI's budget)
def test_clipped_token_gradients_chunked_equal_the_per_token_rule(x64, depth):
    """max_grad_norm: each token's gradient (every layer together) clipped to that norm before the momentum, in the
    chunked dual form as in the per-token `jax.grad` oracle; with and without a document reset; and the gradients."""
    length, clip = 11, 0.5
    args = make_inputs(3, length, depth)
    resets = jnp.zeros((BATCH, length)).at[0, 6].set(1)
    for chunk_size, reset in ((1, None), (length, None), (4, resets)):
        kw = dict(chunk_size=chunk_size, resets=reset, max_grad_norm=clip)
        y, state = memory_scan(*args, **kw)
        y_ref, state_ref = memory_scan_reference(*args, **kw)
        for got, want in zip(jax.tree.leaves((y, state)), jax.tree.leaves((y_ref, state_ref)), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11, err_msg=f"chunk {chunk_size}")
    # the bound is active: most token gradients here exceed it, so clipping changes the outputs
    unclipped, _ = memory_scan_reference(*args, chunk_size=4)
    clipped, _ = memory_scan_reference(*args, chunk_size=4, max_grad_norm=clip)
    assert float(jnp.max(jnp.abs(unclipped - clipped))) > 1e-2
    # a bound above every gradient changes nothing
    loose, _ = memory_scan(*args, chunk_size=4, max_grad_norm=1e6)
    np.testing.assert_allclose(loose, memory_scan(*args, chunk_size=4)[0], rtol=1e-12, atol=1e-13)
    assert_gradients_match_the_oracle(args, chunk_size=4, max_grad_norm=clip)


def test_bad_shapes_name_what_was_expected():
    init, q, k, v, lr, momentum, decay = make_inputs(9, 5, depth=1)
    with pytest.raises(ValueError, match=r"lr has shape .* expected \[batch, heads, length\]"):
        memory_scan(init, q, k, v, lr[..., :4], momentum, decay, chunk_size=2)
    with pytest.raises(ValueError, match=r"init_weights\[0\] has shape"):
        memory_scan([init[0][:2]], q, k, v, lr, momentum, decay, chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        memory_scan(init, q, k, v, lr, momentum, decay, chunk_size=0)


def test_per_chunk_gates_are_those_of_the_chunks_first_token():
    """gates="chunk": constant inside each chunk and equal to its first token's (so causal); a chunk opened before
    the input keeps the cached gates, and the open chunk's gates are handed on."""
    from flax import nnx

    from lcjax.layers.neural_memory import NeuralMemory

    kwargs = dict(num_heads=2, head_dim=4, depth=1, expansion=2, chunk_size=3, conv_size=2, max_lr=0.5)
    per_token = NeuralMemory(8, **kwargs, init_std=0.5, out_std=0.1, rngs=nnx.Rngs(0))
    per_chunk = NeuralMemory(8, **kwargs, init_std=0.5, out_std=0.1, rngs=nnx.Rngs(0), gates="chunk")
    x = jax.random.normal(jax.random.key(1), (2, 7, 8))
    token, _ = per_token._gate_logits(x, 0, None)
    chunk, open_gates = per_chunk._gate_logits(x, 0, None)
    for t in range(7):
        np.testing.assert_array_equal(chunk[..., t], token[..., t // 3 * 3])
    np.testing.assert_array_equal(open_gates, token[..., 6])
    cached = jax.random.normal(jax.random.key(2), open_gates.shape)
    resumed, open_gates = per_chunk._gate_logits(x[:, :4], 2, cached)  # 2 tokens of a chunk already seen
    np.testing.assert_array_equal(resumed[..., 0], cached)  # the rest of that chunk
    np.testing.assert_allclose(resumed[..., 1:4], jnp.repeat(token[..., 1:2], 3, axis=-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(open_gates, token[..., 1], rtol=1e-6, atol=1e-6)


def _doc_resets(length, starts, batch=BATCH):
    resets = np.zeros((batch, length))
    resets[0, starts] = 1  # row 1 is one document
    return jnp.asarray(resets)


@pytest.mark.parametrize("depth", [pytest.param(1, marks=pytest.mark.slow), 2])  # depth 1: `slow` (CI's budget)
def test_document_resets_chunked_equal_the_per_token_rule_for_every_chunk_size(x64, depth):
    """Packed documents starting at 4 (mid-chunk for chunk 7 and 13), 5 and 11: the chunked form equals the per-token
    oracle (restart memory M_0, momentum 0, gradient reference M_0 until the next chunk) in outputs, final memory
    and momentum, also with an initial momentum and with two starts inside one chunk; gradients too."""
    length = 13
    args = make_inputs(3, length, depth)
    momentum0 = [0.1 * jnp.ones_like(w) for w in args[0]]
    resets = _doc_resets(length, [4, 5, 11])
    for chunk_size in (1, 2, 7, length):
        got = memory_scan(*args, chunk_size=chunk_size, initial_momentum=momentum0, resets=resets)
        want = memory_scan_reference(*args, chunk_size=chunk_size, initial_momentum=momentum0, resets=resets)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11, err_msg=f"chunk {chunk_size}")
    y_free, _ = memory_scan(*args, chunk_size=length, initial_momentum=momentum0)  # as `got`, the last
    assert np.abs(np.asarray(got[0] - y_free)[0, :, 4:]).max() > 1e-3  # the resets changed document 2 onwards
    np.testing.assert_allclose(got[0][1], y_free[1], rtol=1e-10, atol=1e-11)  # the unpacked row is unchanged
    assert_gradients_match_the_oracle(args, chunk_size=7, resets=resets)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_a_document_starting_on_a_chunk_boundary_runs_as_it_would_alone(x64, chunk_size):
    """Two documents packed at a chunk boundary (8 = 2 chunks of 4): the second document's outputs equal those of a
    run of it alone, and the first's those of the first alone; with chunk 1 any boundary (here 8) is one."""
    init, q, k, v, lr, momentum, decay = make_inputs(4, 14, 2)
    resets = jnp.zeros((BATCH, 14)).at[:, 8].set(1)
    y, (weights, surprise) = memory_scan(init, q, k, v, lr, momentum, decay, chunk_size=chunk_size, resets=resets)
    parts = [slice(0, 8), slice(8, 14)]
    for part in parts:
        alone = [x[:, :, part] for x in (q, k, v, lr, momentum, decay)]
        y_alone, (w_alone, s_alone) = memory_scan(init, *alone, chunk_size=chunk_size)
        np.testing.assert_allclose(y[:, :, part], y_alone, rtol=1e-10, atol=1e-11)
    for a, b in zip(weights + surprise, w_alone + s_alone, strict=True):  # the final state is the second document's
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)


def test_document_resets_stream_across_a_call_boundary(x64):
    """A reset inside a chunk that a call leaves open: the continuation's tokens in that chunk still take their
    gradients at M_0 (the returned reference), so two calls equal one."""
    length, chunk = 12, 5
    init, q, k, v, lr, momentum, decay = make_inputs(5, length, 2)
    resets = jnp.broadcast_to(_doc_resets(length, [6])[:, None], q.shape[:3])
    restart = [jnp.broadcast_to(w, (BATCH, *w.shape)) for w in init]
    state = (restart, restart, [jnp.zeros_like(w) for w in restart])
    whole, _ = memory_scan_from(
        state, q, k, v, lr, momentum, decay, chunk_size=chunk, offset=0, resets=resets, init=restart
    )
    cut = 7  # after the reset at 6, inside the chunk [5, 10)
    first, state = memory_scan_from(
        state, *(x[:, :, :cut] for x in (q, k, v, lr, momentum, decay)), chunk_size=chunk, offset=0,
        resets=resets[:, :, :cut], init=restart,
    )  # fmt: skip
    second, _ = memory_scan_from(
        state, *(x[:, :, cut:] for x in (q, k, v, lr, momentum, decay)), chunk_size=chunk, offset=cut % chunk,
        resets=resets[:, :, cut:], init=restart,
    )  # fmt: skip
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=2), whole, rtol=1e-10, atol=1e-11)


def _repeated_key_error(chunk_size, lr, momentum, *, chunks=40, dim=4, chunk_momentum=False):
    """‖M k − v‖ after storing one (k, v) pair `chunks` × 16 times into a zero linear memory (α = 0)."""
    keys = jax.random.split(jax.random.key(12), 2)
    key = jax.random.normal(keys[0], (dim,))
    key = key / jnp.linalg.norm(key)
    length = 16 * chunks
    k = jnp.broadcast_to(key, (1, 1, length, dim))
    v = jnp.broadcast_to(jax.random.normal(keys[1], (dim,)), (1, 1, length, dim))
    full = lambda value: jnp.full((1, 1, length), value)  # noqa: E731
    _, (weights, _) = memory_scan(
        [jnp.zeros((1, dim, dim))], k, k, v, full(lr), full(momentum), full(0.0), chunk_size=chunk_size,
        chunk_momentum=chunk_momentum,
    )  # fmt: skip
    return float(jnp.linalg.norm(memory_read(weights, k[:, :, -1:]) - v[:, :, -1:]))


def test_paper_momentum_diverges_in_chunk_form_along_a_repeated_key_and_the_ema_step_does_not(x64):
    """θ = 1/C, η = 0.5, one key over 40 chunks of C = 16: the per-token recurrence converges, the chunk form with
    the paper's momentum (every stale gradient of a chunk summed into its later tokens) grows the error by the chunk
    map's spectral radius, 2.66, per chunk, and θ (1 − η) (NeuralMemory's `momentum="ema"`) converges in chunk form
    too (radius 0.70), as does the momentum stepped once per chunk (`chunk_momentum`: heavy ball with step
    Σθ = 1, radius √η = 0.71; at η = 0.9 it is 0.95, where the paper's chunk form has 9.0)."""
    theta, eta = 1 / 16, 0.5
    start = _repeated_key_error(16, 0.0, eta)  # nothing stored: ‖v‖
    assert _repeated_key_error(1, theta, eta) < 1e-9 * start
    assert _repeated_key_error(16, theta, eta) > 1e12 * start
    assert _repeated_key_error(16, theta * (1 - eta), eta) < 1e-4 * start
    assert _repeated_key_error(16, theta, eta, chunk_momentum=True) < 1e-4 * start
    assert _repeated_key_error(16, theta, 0.9, chunk_momentum=True) < 0.3 * start  # 0.949^40 = 0.12


def test_ema_momentum_keeps_a_layers_memory_bounded_on_a_repeated_input():
    """The layer on one token repeated for 50 chunks, θ saturated at max_lr = 1/C, η = 0.9, α ≈ 0: with the
    paper's momentum the memory's weights blow up (chunk map radius > 1); with momentum="ema" they stay O(1)."""
    from flax import nnx

    from lcjax.layers.neural_memory import NeuralMemory

    kwargs = dict(num_heads=2, head_dim=4, depth=1, expansion=2, chunk_size=4, conv_size=2, max_lr=0.25)
    kwargs |= dict(init_std=0.5, out_std=0.1)

    def final_weights(momentum):
        layer = NeuralMemory(8, **kwargs, rngs=nnx.Rngs(0), momentum=momentum)  # the same parameters for both
        layer.w_gates[...] = jnp.zeros_like(layer.w_gates[...])
        layer.b_gates[...] = jnp.broadcast_to(jnp.array([[20.0], [2.2], [-30.0]]), layer.b_gates[...].shape)
        x = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (1, 1, 8)), (1, 200, 8))
        _, cache = layer.step(x, layer.init_cache(1))
        return float(jnp.max(jnp.abs(cache["weights"][0])))

    paper, ema = final_weights("paper"), final_weights("ema")
    assert not np.isfinite(paper) or paper > 1e8, paper
    assert np.isfinite(ema) and ema < 100, ema
    with pytest.raises(ValueError, match="momentum='adam'"):
        NeuralMemory(8, **kwargs, rngs=nnx.Rngs(0), momentum="adam")


def test_chunk_momentum_chunked_equals_its_per_token_rule_and_chunk_one_is_the_paper(x64):
    """memory_scan(chunk_momentum=True): the chunked form equals the per-token oracle (η at a chunk's first token,
    each token's own −θ ∇ℓ into the memory) for chunk sizes 1, 2, 7 and T, with an initial momentum and packed
    documents (starts at 4, 5 and 11); gradients too. Chunk 1 is the paper's recurrence; at chunk 7 it differs."""
    length = 13
    args = make_inputs(6, length, 2)
    kw = dict(initial_momentum=[0.1 * jnp.ones_like(w) for w in args[0]], chunk_momentum=True)
    for resets in (None, _doc_resets(length, [4, 5, 11])):
        for chunk_size in (1, 2, 7, length):
            got = memory_scan(*args, chunk_size=chunk_size, resets=resets, **kw)
            want = memory_scan_reference(*args, chunk_size=chunk_size, resets=resets, **kw)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11, err_msg=f"chunk {chunk_size}, {resets}")
    paper = {c: memory_scan(*args, chunk_size=c, initial_momentum=kw["initial_momentum"])[0] for c in (1, 7)}
    per_chunk = {c: memory_scan(*args, chunk_size=c, **kw)[0] for c in (1, 7)}
    np.testing.assert_allclose(per_chunk[1], paper[1], rtol=1e-10, atol=1e-11)
    assert float(jnp.max(jnp.abs(per_chunk[7] - paper[7]))) > 1e-3
    assert_gradients_match_the_oracle(args, chunk_size=7, chunk_momentum=True)

"""Oracles for the mLSTM cell (reference/xlstm_ssm_birdie_jrt.md §5.1 items 1–4), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.layers.mlstm import mlstm_cell, mlstm_step

B, H, T, DQK, DV = 2, 2, 12, 4, 3


def _inputs(seed=0, length=T):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k = (jax.random.normal(keys[i], (B, H, length, DQK), jnp.float64) for i in range(2))
    v = jax.random.normal(keys[2], (B, H, length, DV), jnp.float64)
    igate = jax.random.normal(keys[3], (B, H, length), jnp.float64)
    fgate = 2.0 + jax.random.normal(keys[4], (B, H, length), jnp.float64)
    return q, k, v, igate, fgate


def _unstabilized(q, k, v, igate, fgate):
    """H = (Q'Kᵀ ∘ e^(log D)) V / max(|row sum|, 1), the formula without any stabilizer."""
    b = jnp.cumsum(jax.nn.log_sigmoid(fgate), axis=-1)
    log_d = b[..., :, None] - b[..., None, :] + igate[..., None, :]
    weights = jnp.where(jnp.tril(jnp.ones((q.shape[2],) * 2, bool)), jnp.exp(log_d), 0.0)
    scores = jnp.einsum("bhtd,bhsd->bhts", q / np.sqrt(q.shape[-1]), k) * weights
    return (scores @ v) / jnp.maximum(jnp.abs(scores.sum(-1)), 1.0)[..., None]


def _state_value(state):
    """The true (unstabilized) state e^m (C̄, n̄)."""
    c, n, m = state
    return np.exp(m)[..., None, None] * c, np.exp(m)[..., None] * n


@pytest.mark.parametrize("chunk_size", [1, 4, 12, 5])  # 5 does not divide T: the last chunk is padded
def test_three_forms_and_the_unstabilized_formula_agree_without_eps(x64, chunk_size):
    args = _inputs()
    want = _unstabilized(*args)
    results = {
        "parallel": mlstm_cell(*args, form="parallel", eps=0.0),
        "recurrent": mlstm_cell(*args, form="recurrent", eps=0.0),
        "chunkwise": mlstm_cell(*args, form="chunkwise", chunk_size=chunk_size, eps=0.0),
    }
    for form, (h, state) in results.items():
        np.testing.assert_allclose(h, want, atol=1e-12, rtol=0, err_msg=form)
        for got, ref in zip(_state_value(state), _state_value(results["recurrent"][1]), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12, err_msg=form)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_two_halves_continue_one_run(x64, form):
    args = _inputs(1)
    h, state = mlstm_cell(*args, form=form, chunk_size=4)
    first = [x[:, :, :7] for x in args]
    second = [x[:, :, 7:] for x in args]
    h1, mid = mlstm_cell(*first, form=form, chunk_size=4)
    h2, end = mlstm_cell(*second, form=form, chunk_size=4, initial_state=mid)
    np.testing.assert_allclose(jnp.concatenate([h1, h2], axis=2), h, atol=1e-12, rtol=0)
    for got, ref in zip(_state_value(end), _state_value(state), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_decode_steps_equal_the_chunkwise_prefill(x64):
    q, k, v, igate, fgate = _inputs(2)
    h, _ = mlstm_cell(q, k, v, igate, fgate, form="chunkwise", chunk_size=4)
    _, state = mlstm_cell(*(x[:, :, :5] for x in (q, k, v, igate, fgate)), form="chunkwise", chunk_size=4)
    for t in range(5, T):
        h_t, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], igate[:, :, t], fgate[:, :, t], state)
        np.testing.assert_allclose(h_t, h[:, :, t], atol=1e-6, rtol=0)  # eps = 1e-6 on both sides


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_shifting_the_stabilizer_of_the_initial_state_leaves_h(x64, form):
    args = _inputs(3)
    keys = jax.random.split(jax.random.key(9), 2)
    c0 = jax.random.normal(keys[0], (B, H, DQK, DV), jnp.float64)
    n0 = jax.random.normal(keys[1], (B, H, DQK), jnp.float64)
    m0 = jnp.full((B, H), 0.5, jnp.float64)
    h, _ = mlstm_cell(*args, form=form, chunk_size=4, initial_state=(c0, n0, m0), eps=0.0)
    delta = 3.0
    shifted = (c0 * np.exp(-delta), n0 * np.exp(-delta), m0 + delta)
    h_shifted, _ = mlstm_cell(*args, form=form, chunk_size=4, initial_state=shifted, eps=0.0)
    np.testing.assert_allclose(h_shifted, h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_gate_limits_freeze_and_reset_the_state(x64, form):
    q, k, v, igate, fgate = _inputs(4)
    _, state = mlstm_cell(q, k, v, igate, fgate, form=form, chunk_size=4)
    # forget gate 1 (f̃ → +∞) and input gate 0 (ĩ → −∞): the state is frozen
    frozen = (jnp.full_like(igate, -jnp.inf), jnp.full_like(fgate, jnp.inf))
    _, after = mlstm_cell(q, k, v, *frozen, form=form, chunk_size=4, initial_state=state)
    for got, ref in zip(_state_value(after), _state_value(state), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # forget gate 0 at token 5 (f̃ = −1e4): from there on, a fresh-state run of the tail
    reset = fgate.at[:, :, 5].set(-1e4)
    h, _ = mlstm_cell(q, k, v, igate, reset, form=form, chunk_size=4, initial_state=state, eps=0.0)
    tail = [x[:, :, 5:] for x in (q, k, v, igate, reset)]
    h_fresh, _ = mlstm_cell(*tail, form=form, chunk_size=4, eps=0.0)
    np.testing.assert_allclose(h[:, :, 5:], h_fresh, atol=1e-10, rtol=0)


@pytest.mark.parametrize("form,chunk_size", [("parallel", 0), ("recurrent", 0), ("chunkwise", 4), ("chunkwise", 5)])
def test_packed_documents_equal_separate_runs(x64, form, chunk_size):
    """Documents [0, 5), [5, 6), [6, 12) (row 0) and [0, 8), [8, 12) (row 1), boundaries inside chunks: each
    document's outputs are those of a fresh run on it (eps = 0), and the final state is the last document's."""
    args = _inputs(7)
    segment_ids = jnp.array([[0] * 5 + [1] + [2] * 6, [3] * 8 + [4] * 4])
    h, state = mlstm_cell(*args, form=form, chunk_size=chunk_size or 4, eps=0.0, segment_ids=segment_ids)
    for row, bounds in enumerate([(0, 5, 6, 12), (0, 8, 12)]):
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            part = [x[row : row + 1, :, start:end] for x in args]
            h_doc, state_doc = mlstm_cell(*part, form="recurrent", eps=0.0)
            np.testing.assert_allclose(h[row : row + 1, :, start:end], h_doc, atol=1e-12, rtol=0)
        for got, want in zip(_state_value(state), _state_value(state_doc), strict=True):
            np.testing.assert_allclose(got[row : row + 1], want, rtol=1e-12, atol=1e-12)


def test_chunkwise_gradients_equal_the_recurrent_ones(x64):
    args = _inputs(5)
    probe = jax.random.normal(jax.random.key(6), (B, H, T, DV), jnp.float64)

    segment_ids = jnp.array([[0] * 7 + [1] * 5, [0] * 12])  # a document boundary inside a chunk: no NaN

    def loss(form):
        return lambda *a: jnp.sum(mlstm_cell(*a, form=form, chunk_size=5, segment_ids=segment_ids, eps=0.0)[0] * probe)

    grads = jax.grad(loss("chunkwise"), argnums=tuple(range(5)))(*args)
    grads_ref = jax.grad(loss("recurrent"), argnums=tuple(range(5)))(*args)
    for got, want in zip(grads, grads_ref, strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=1e-9, rtol=1e-9)


def test_bad_inputs_name_what_was_expected():
    q = jnp.zeros((B, H, T, DQK))
    v = jnp.zeros((B, H, T, DV))
    gate = jnp.zeros((B, H, T))
    with pytest.raises(ValueError, match="form='scan'"):
        mlstm_cell(q, q, v, gate, gate, form="scan")
    with pytest.raises(ValueError, match=r"fgate has shape \(2, 2, 11\)"):
        mlstm_cell(q, q, v, gate, gate[..., :11])
    with pytest.raises(ValueError, match="initial_state shapes"):
        mlstm_cell(
            q, q, v, gate, gate, initial_state=(jnp.zeros((B, H, DQK, DQK)), jnp.zeros((B, H, DQK)), gate[..., 0])
        )

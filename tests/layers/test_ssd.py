"""Oracles for the SSD scan (reference/xlstm_ssm_birdie_jrt.md §5.1 item 6), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.layers.ssd import ssd_scan, ssd_sequential

B, T, H, P, G, N = 2, 20, 4, 3, 2, 5


def _inputs(seed=0, length=T):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (B, length, H, P), jnp.float64)
    dt = jax.nn.softplus(jax.random.normal(keys[1], (B, length, H), jnp.float64) - 1.0)
    a = -jnp.exp(jax.random.uniform(keys[2], (H,), jnp.float64, 0.0, 2.0))
    b, c = (jax.random.normal(keys[3 + i], (B, length, G, N), jnp.float64) for i in range(2))
    return x, dt, a, b, c


@pytest.mark.parametrize("chunk_size", [1, 8, 64, T])  # 8 leaves a padded chunk; 64 > T: one padded chunk
def test_chunked_equals_sequential(x64, chunk_size):
    args = _inputs()
    h0 = jax.random.normal(jax.random.key(7), (B, H, P, N), jnp.float64)
    for initial in (None, h0):
        y, final = ssd_scan(*args, chunk_size=chunk_size, initial_state=initial)
        y_ref, final_ref = ssd_sequential(*args, initial_state=initial)
        np.testing.assert_allclose(y, y_ref, atol=1e-12, rtol=0)
        np.testing.assert_allclose(final, final_ref, atol=1e-12, rtol=0)


def test_state_hand_off_continues_one_run(x64):
    args = _inputs(1)
    y, final = ssd_scan(*args, chunk_size=8)
    y1, mid = ssd_scan(*(z if z.ndim == 1 else z[:, :11] for z in args), chunk_size=8)
    y2, end = ssd_scan(*(z if z.ndim == 1 else z[:, 11:] for z in args), chunk_size=8, initial_state=mid)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, atol=1e-12, rtol=0)
    np.testing.assert_allclose(end, final, atol=1e-12, rtol=0)


def test_heads_read_their_groups_b_and_c(x64):
    """Heads 0–1 use group 0 and heads 2–3 group 1: changing group 1's B leaves heads 0–1 unchanged."""
    x, dt, a, b, c = _inputs(2)
    y, _ = ssd_scan(x, dt, a, b, c, chunk_size=8)
    y2, _ = ssd_scan(x, dt, a, b.at[:, :, 1].add(1.0), c, chunk_size=8)
    np.testing.assert_array_equal(y2[:, :, :2], y[:, :, :2])
    assert float(jnp.max(jnp.abs(y2[:, :, 2:] - y[:, :, 2:]))) > 1e-3


def test_chunked_gradients_equal_the_sequential_ones(x64):
    args = _inputs(3)
    probe = jax.random.normal(jax.random.key(8), (B, T, H, P), jnp.float64)
    grads = jax.grad(lambda *z: jnp.sum(ssd_scan(*z, chunk_size=8)[0] * probe), argnums=tuple(range(5)))(*args)
    grads_ref = jax.grad(lambda *z: jnp.sum(ssd_sequential(*z)[0] * probe), argnums=tuple(range(5)))(*args)
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-10, rtol=1e-10)


def test_bad_inputs_name_what_was_expected(x64):
    x, dt, a, b, c = _inputs()
    with pytest.raises(ValueError, match=r"groups dividing heads=4"):
        ssd_scan(x, dt, a, b[:, :, :1].repeat(3, axis=2), c[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match=r"a \(3,\)"):
        ssd_scan(x, dt, a[:3], b, c)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_scan(x, dt, a, b, c, initial_state=jnp.zeros((B, H, P, N + 1)))


@pytest.mark.parametrize("chunk_size", [1, 8, T])
def test_packed_documents_equal_separate_runs(x64, chunk_size):
    """segment_ids: a document starts from the zero state (decay 0 at its first token), with finite gradients."""
    args = _inputs(2)
    segments = jnp.array([[1] * 7 + [2] * 13, [5] * 12 + [6] * 3 + [9] * 5])
    y, final = ssd_scan(*args, chunk_size=chunk_size, segment_ids=segments)
    for row, bounds in enumerate([(0, 7, 20), (0, 12, 15, 20)]):
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            part = [z if z.ndim == 1 else z[row : row + 1, start:stop] for z in args]
            y_ref, final_ref = ssd_sequential(*part)
            np.testing.assert_allclose(y[row : row + 1, start:stop], y_ref, atol=1e-12, rtol=0)
        np.testing.assert_allclose(final[row : row + 1], final_ref, atol=1e-12, rtol=0)
    grads = jax.grad(
        lambda dt: jnp.sum(ssd_scan(*args[:1], dt, *args[2:], chunk_size=chunk_size, segment_ids=segments)[0])
    )(args[1])
    assert bool(jnp.all(jnp.isfinite(grads)))

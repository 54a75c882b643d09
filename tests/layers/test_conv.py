"""The causal depthwise convolution: against a direct loop, streaming == one call, packed documents isolated."""

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.layers.conv import causal_conv


def _inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 9, 3, 2))
    kernel = jax.random.normal(keys[1], (4, 3, 2))
    bias = jax.random.normal(keys[2], (3, 2))
    return x, kernel, bias


def test_matches_a_direct_loop_with_tap_three_on_the_current_token():
    x, kernel, bias = _inputs()
    y, history = causal_conv(x, kernel, bias)
    xn, kn = np.asarray(x), np.asarray(kernel)
    for t in range(9):
        want = np.asarray(bias) + sum(kn[j] * xn[:, t - 3 + j] for j in range(4) if t - 3 + j >= 0)
        np.testing.assert_allclose(y[:, t], want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(history, x[:, -3:])


def test_streaming_in_pieces_equals_one_call():
    x, kernel, bias = _inputs()
    whole, _ = causal_conv(x, kernel, bias)
    history, pieces = None, []
    for start, stop in ((0, 1), (1, 3), (3, 9)):  # a piece shorter than the history, then longer ones
        y, history = causal_conv(x[:, start:stop], kernel, bias, history=history)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), whole, atol=1e-6, rtol=0)


def test_packed_documents_read_zero_across_a_boundary():
    x, kernel, bias = _inputs()
    segments = jnp.array([[4] * 5 + [7] * 4, [1] * 9])
    y, _ = causal_conv(x, kernel, bias, segment_ids=segments)
    np.testing.assert_allclose(y[:1, 5:], causal_conv(x[:1, 5:], kernel, bias)[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(y[:1, :5], causal_conv(x[:1, :5], kernel, bias)[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(y[1:], causal_conv(x[1:], kernel, bias)[0], atol=1e-6, rtol=0)

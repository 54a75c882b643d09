import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.layers.attention import dot_product_attention
from lcjax.layers.window_attention import flash_window_attention, window_attention, window_mask

CASES = [(23, 4, 0, False), (23, 4, 2, True), (24, 3, 7, True), (9, 2, 1, False), (17, 16, 3, True)]


def _inputs(length, packed):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, length, 4, 8))
    k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in keys[1:])
    segments = None
    if packed:
        segments = jnp.cumsum(jax.random.bernoulli(jax.random.key(4), 0.15, (2, length)), axis=1)
    return q, k, v, segments


def _dense(q, k, v, segments, window, prefix):
    slots = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    mask = window_mask(slots, slots, segments, segments, window=window, prefix=prefix)
    return dot_product_attention(q, k, v, mask, scale=0.3)


def test_window_mask_is_the_window_plus_the_persistent_prefix():
    slots = jnp.arange(10)[None]
    segments = jnp.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
    mask = np.asarray(window_mask(slots, slots, segments, segments, window=3, prefix=2))[0]
    for i in range(10):
        for j in range(10):
            want = j <= i and (j < 2 or (i - j < 3 and segments[0, i] == segments[0, j]))
            assert mask[i, j] == want, (i, j)


@pytest.mark.parametrize("length,window,prefix,packed", CASES)
def test_blocked_window_attention_equals_the_dense_mask(length, window, prefix, packed):
    """The long-sequence path (blocks of `window` queries over the two blocks of keys they can reach, plus the
    persistent slots before them) == dense attention under `window_mask`: T not a multiple of the window, a prefix
    longer than the window, documents starting inside blocks, grouped-query heads. (The core's logits are float32
    whatever the inputs, so the two sums agree to rounding: a key missed or counted twice moves outputs by ~0.1.)"""
    q, k, v, segments = _inputs(length, packed)
    dense = _dense(q, k, v, segments, window, prefix)
    blocked = window_attention(q, k, v, segments, window=window, prefix=prefix, scale=0.3)
    np.testing.assert_allclose(blocked, dense, atol=2e-6, rtol=0)


@pytest.mark.parametrize("length,window,prefix,packed", CASES)
def test_flash_window_attention_in_interpret_mode_equals_the_dense_mask(length, window, prefix, packed):
    """attention.impl=pallas: the flash kernel (interpret mode on CPU) over the document tokens with a sliding window,
    merged by LSE with the persistent prefix == dense attention under `window_mask`, outputs and gradients (the
    cotangent of the output weighted by a fixed random tensor, so every output element matters)."""
    q, k, v, segments = _inputs(length, packed)
    weights = jax.random.normal(jax.random.key(5), q.shape)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * weights)

    dense = lambda q, k, v: _dense(q, k, v, segments, window, prefix)
    flash = lambda q, k, v: flash_window_attention(
        q, k, v, segments, window=window, prefix=prefix, scale=0.3, impl="interpret"
    )
    np.testing.assert_allclose(jax.jit(flash)(q, k, v), jax.jit(dense)(q, k, v), atol=2e-6, rtol=0)
    grads_flash = jax.jit(jax.grad(lambda *a: loss(flash, *a), argnums=(0, 1, 2)))(q, k, v)
    grads_dense = jax.jit(jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grads_flash, grads_dense, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0.1
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)

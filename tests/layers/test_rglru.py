"""Oracles for the RG-LRU, its scans, Birdie's bidirectional scan and the Gated SSM (reference/xlstm_ssm_birdie_jrt.md
§5.1 items 7 and 8), in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.layers import rglru

B, T, W = 2, 13, 6


def _inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x, gate_a, gate_x = (jax.random.normal(keys[i], (B, T, W), jnp.float64) for i in range(3))
    a_param = rglru.a_param_init()(keys[3], (W,), jnp.float64)
    h0 = jax.random.normal(keys[4], (B, W), jnp.float64)
    return x, gate_a, gate_x, a_param, h0


@pytest.mark.parametrize("reverse", [False, True])
def test_associative_scan_equals_linear_scan_with_an_initial_state(x64, reverse):
    keys = jax.random.split(jax.random.key(1), 3)
    a = jax.random.uniform(keys[0], (B, T, W), jnp.float64)
    b, h0 = jax.random.normal(keys[1], (B, T, W), jnp.float64), jax.random.normal(keys[2], (B, W), jnp.float64)
    h_lin, last_lin = rglru.linear_scan(a, b, h0, reverse=reverse)
    h_assoc, last_assoc = rglru.associative_scan(a, b, h0, reverse=reverse)
    np.testing.assert_allclose(h_assoc, h_lin, atol=1e-12, rtol=0)
    np.testing.assert_allclose(last_assoc, last_lin, atol=1e-12, rtol=0)
    t = 0 if reverse else T - 1  # the last state is the scan's final step, and h at t reads h0 at the far end
    np.testing.assert_allclose(last_lin, h_lin[:, t], atol=0, rtol=0)
    edge = -1 if reverse else 0
    np.testing.assert_allclose(h_lin[:, edge], a[:, edge] * h0 + b[:, edge], atol=1e-14, rtol=0)


@pytest.mark.parametrize("impl", ["linear", "associative"])  # float64 (the kernel: tests/kernels_pallas)
def test_rglru_equals_the_float64_loop_and_a_reset_splits_two_sequences(x64, impl):
    x, gate_a, gate_x, a_param, h0 = _inputs()
    resets = jnp.zeros((B, T), bool).at[:, 5].set(True)
    a, b = rglru.rglru_coefficients(x, gate_a, gate_x, a_param, resets)
    h, last = rglru.scan(a, b, h0, impl=impl)
    want, want_last = rglru.rglru_reference_float64(x, gate_a, gate_x, a_param, resets, h0)
    np.testing.assert_allclose(h, want, atol=1e-12, rtol=0)
    np.testing.assert_allclose(last, want_last, atol=1e-12, rtol=0)
    # from the reset on it is a fresh sequence: the same as the tail run alone (which starts a document too)
    tail_resets = np.zeros((B, T - 5), bool)
    tail_resets[:, 0] = True
    tail, _ = rglru.rglru_reference_float64(x[:, 5:], gate_a[:, 5:], gate_x[:, 5:], a_param, tail_resets, h0 * 7)
    np.testing.assert_allclose(h[:, 5:], tail, atol=1e-12, rtol=0)
    # and the head does not see it: without the reset only positions >= 5 change
    h_no, _ = rglru.scan(*rglru.rglru_coefficients(x, gate_a, gate_x, a_param), h0, impl=impl)
    np.testing.assert_allclose(h_no[:, :5], h[:, :5], atol=0, rtol=0)
    assert float(jnp.abs(h_no[:, 5:] - h[:, 5:]).max()) > 1e-3


def test_the_sqrt_derivative_is_clipped_so_gradients_stay_finite_at_a_near_one(x64):
    """With λ very negative the decay a = σ(−λ)^(8r) rounds to 1: √(1 − a²) has an infinite derivative there, the
    clipped one is 1 / (2 · √(1/(4·1000²))) = 1000; elsewhere it is the exact 1 / (2√x)."""
    grad = jax.grad(lambda v: rglru.sqrt_bounded_derivative(v).sum())
    np.testing.assert_allclose(grad(jnp.array([0.0, 1e-12])), [1000.0, 1000.0], rtol=1e-12)
    np.testing.assert_allclose(grad(jnp.array([0.25, 4.0])), [1.0, 0.25], rtol=1e-12)
    x, gate_a, gate_x, _, h0 = _inputs()
    a_param = jnp.full((W,), -40.0, jnp.float64)  # softplus(λ) ~ e^-40: a = 1 - 8e-18 ~ 1 in float64

    def loss(a_param, x):
        return rglru.scan(*rglru.rglru_coefficients(x, gate_a, gate_x, a_param), h0)[0].sum()

    for g in jax.grad(loss, argnums=(0, 1))(a_param, x):
        assert bool(jnp.isfinite(g).all())
    unclipped = jax.grad(lambda v: jnp.sqrt(v).sum())(jnp.array([0.0]))
    assert not bool(jnp.isfinite(unclipped).all())  # what the clip prevents


def test_bidirectional_scan_suffix_is_causal_prefix_is_two_way_and_samples_are_isolated(x64):
    """Two packed samples: tokens 0-6 (prefix 0-3, causal 4-6) and 7-12 (prefix 7-8, causal 9-12)."""
    keys = jax.random.split(jax.random.key(2), 2)
    a = jax.random.uniform(keys[0], (1, T, W), jnp.float64, 0.2, 0.9)
    b = jax.random.normal(keys[1], (1, T, W), jnp.float64)
    resets = (
        jnp.zeros((1, T), bool).at[:, 0].set(True).at[:, 7].set(True)
    )  # sample starts: the reverse half still reads on
    causal = jnp.zeros((1, T), bool).at[:, 4:7].set(True).at[:, 9:].set(True)
    half = W // 2
    h, last = rglru.bidirectional_scan(a, b, resets, causal)
    # the forward half is the causal scan with the reset (f = 0 at a sample start)
    a_fwd = jnp.where(resets[..., None], 0.0, a[..., :half])
    np.testing.assert_allclose(h[..., :half], rglru.linear_scan(a_fwd, b[..., :half])[0], atol=1e-12)
    np.testing.assert_allclose(last, h[:, -1, :half], atol=0)
    # in the causal suffix the reverse half is b_t alone
    np.testing.assert_allclose(h[0, 4:7, half:], b[0, 4:7, half:], atol=0)
    np.testing.assert_allclose(h[0, 9:, half:], b[0, 9:, half:], atol=0)
    # at the prefix's last token the reverse half reads the first suffix token (the start-generating token)
    np.testing.assert_allclose(h[0, 3, half:], a[0, 3, half:] * b[0, 4, half:] + b[0, 3, half:], atol=1e-14)

    def perturbed(t):
        return rglru.bidirectional_scan(a, b.at[:, t].add(1.0), resets, causal)[0]

    # (a) a suffix token changes no earlier position and no earlier suffix token
    d = jnp.abs(perturbed(5) - h)[0].max(-1)
    assert float(d[:5].max()) == 0.0 and float(d[5]) > 0
    # (b) a prefix token reaches earlier prefix positions, only through the reverse half
    d = jnp.abs(perturbed(2) - h)[0]
    assert float(d[:2, :half].max()) == 0.0 and float(d[:2, half:].min()) > 0
    # (c) packed samples are isolated, both ways
    assert float(jnp.abs(perturbed(8) - h)[0, :7].max()) == 0.0
    assert float(jnp.abs(perturbed(1) - h)[0, 7:].max()) == 0.0
    # ... also when a sample ends inside its prefix (no causal suffix to stop the reverse scan)
    h_all, _ = rglru.bidirectional_scan(a, b, resets, None)
    h_all2, _ = rglru.bidirectional_scan(a, b.at[:, 7].add(1.0), resets, None)
    assert float(jnp.abs(h_all2 - h_all)[0, :7].max()) == 0.0 and float(jnp.abs(h_all2 - h_all)[0, 7].max()) > 0


def test_with_an_all_causal_mask_the_forward_half_is_the_causal_scan(x64):
    keys = jax.random.split(jax.random.key(3), 2)
    a = jax.random.uniform(keys[0], (B, T, W), jnp.float64)
    b = jax.random.normal(keys[1], (B, T, W), jnp.float64)
    h, _ = rglru.bidirectional_scan(a, b, None, jnp.ones((B, T), bool))
    np.testing.assert_allclose(h[..., : W // 2], rglru.linear_scan(a[..., : W // 2], b[..., : W // 2])[0], atol=1e-12)
    np.testing.assert_allclose(h[..., W // 2 :], b[..., W // 2 :], atol=0)


def _assert_streams(layer, x, split):
    """Two calls, the second from the first's last state, == one call: outputs and last state."""
    full, last = layer(x)
    first, h = layer(x[:, :split])
    rest, last2 = layer(x[:, split:], h)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-6)
    np.testing.assert_allclose(last2, last, atol=1e-6)


def test_the_rglru_module_streams_and_its_init_spans_the_decay_ring():
    layer = rglru.RGLRU(8, 2, nnx.Rngs(0))
    a_base = jax.nn.sigmoid(-layer.a_param[...])  # the base decay, squared uniform in [0.9², 0.999²]
    assert float(a_base.min()) >= 0.9 - 1e-6 and float(a_base.max()) <= 0.999 + 1e-6
    _assert_streams(layer, jax.random.normal(jax.random.key(4), (2, 10, 8)), 4)


def test_gated_ssm_streams_and_its_bidirectional_form_keeps_the_suffix_causal():
    model = rglru.GatedSSM(8, 6, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 10, 8))
    _assert_streams(model, x, 3)
    bidir = rglru.GatedSSM(8, 6, nnx.Rngs(0), bidirectional=True)
    causal = jnp.zeros((2, 10), bool).at[:, 4:].set(True)
    y = bidir(x, causal=causal)[0]
    y2 = bidir(x.at[:, 6].add(1.0), causal=causal)[0]
    assert float(jnp.abs(y2 - y)[:, :6].max()) == 0.0 and float(jnp.abs(y2 - y)[:, 6].max()) > 0
    y3 = bidir(x.at[:, 2].add(1.0), causal=causal)[0]
    assert float(jnp.abs(y3 - y)[:, :2].max()) > 0  # the prefix is read both ways

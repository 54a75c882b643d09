"""Oracles for the sLSTM cell (reference/xlstm_ssm_birdie_jrt.md §5.1 item 5), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.layers.slstm import slstm_scan

B, T, NH, DH = 2, 9, 2, 3


def _inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    wx = jax.random.normal(keys[0], (B, T, 4, NH, DH), jnp.float64)
    recurrent = 0.5 * jax.random.normal(keys[1], (NH, DH, 4, DH), jnp.float64)
    return wx, recurrent


def _loop(wx, recurrent, vanilla_first_step):
    """Element by element in numpy; `vanilla_first_step` sets m = ĩ while n is all zero (the vanilla backend)."""
    wx, recurrent = np.asarray(wx), np.asarray(recurrent)
    y, c, n, m = (np.zeros((B, NH, DH)) for _ in range(4))
    ys, ratios = [], []
    for t in range(T):
        raw = wx[:, t].copy()
        for b in range(B):
            for h in range(NH):
                for g in range(4):
                    raw[b, g, h] += y[b, h] @ recurrent[h, :, g, :]
        i, f, z, o = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        log_f = -np.logaddexp(0.0, -f)
        m_new = i.copy() if (vanilla_first_step and not n.any()) else np.maximum(i, log_f + m)
        i_ = np.minimum(np.exp(i - m_new), 1.0)
        f_ = np.minimum(np.exp(log_f + m - m_new), 1.0)
        c = f_ * c + i_ * np.tanh(z)
        n = f_ * n + i_
        m = m_new
        y = 1 / (1 + np.exp(-o)) * c / n
        ys.append(y)
        ratios.append(c / n)
    return np.stack(ys, axis=1), np.stack(ratios, axis=1), m


def test_scan_equals_the_step_loop(x64):
    wx, recurrent = _inputs()
    y, (y_last, c, n, m) = slstm_scan(wx, recurrent)
    y_ref, ratio_ref, m_ref = _loop(wx, recurrent, vanilla_first_step=False)
    np.testing.assert_allclose(y, y_ref, atol=1e-12, rtol=0)
    np.testing.assert_allclose(y_last, y_ref[:, -1], atol=1e-12, rtol=0)
    np.testing.assert_allclose(c / n, ratio_ref[:, -1], atol=1e-12, rtol=0)
    np.testing.assert_allclose(m, m_ref, atol=1e-12, rtol=0)


def test_outputs_do_not_depend_on_the_first_step_stabilizer(x64):
    wx, recurrent = _inputs(1)
    y, (_, c, n, _) = slstm_scan(wx, recurrent)
    y_vanilla, ratio_vanilla, _ = _loop(wx, recurrent, vanilla_first_step=True)
    np.testing.assert_allclose(y, y_vanilla, atol=1e-12, rtol=0)
    np.testing.assert_allclose(c / n, ratio_vanilla[:, -1], atol=1e-12, rtol=0)
    _, (_, _, _, m_first) = slstm_scan(wx[:, :1], recurrent)  # after the first step only m shows the convention
    assert not np.allclose(m_first, wx[:, 0, 0])  # vanilla: m = ĩ


def test_state_continuation(x64):
    wx, recurrent = _inputs(2)
    y, final = slstm_scan(wx, recurrent)
    y1, mid = slstm_scan(wx[:, :4], recurrent)
    y2, end = slstm_scan(wx[:, 4:], recurrent, mid)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, atol=1e-12, rtol=0)
    for got, want in zip(end, final, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)


def test_bad_shapes_name_the_layout():
    with pytest.raises(ValueError, match=r"recurrent \[heads, head_dim, 4, head_dim\]"):
        slstm_scan(jnp.zeros((B, T, 4, NH, DH)), jnp.zeros((NH, DH, 3, DH)))


def test_packed_documents_equal_separate_runs(x64):
    wx, recurrent = _inputs(3)
    segments = jnp.array([[1] * 4 + [2] * 5, [3] * 9])
    y, final = slstm_scan(wx, recurrent, None, segments)
    y_a, _ = slstm_scan(wx[:1, :4], recurrent)
    y_b, final_b = slstm_scan(wx[:1, 4:], recurrent)
    np.testing.assert_allclose(y[:1], jnp.concatenate([y_a, y_b], axis=1), atol=1e-12, rtol=0)
    np.testing.assert_allclose(y[1:], slstm_scan(wx[1:], recurrent)[0], atol=1e-12, rtol=0)
    for got, want in zip(final, final_b, strict=True):
        np.testing.assert_allclose(got[:1], want, atol=1e-12, rtol=0)

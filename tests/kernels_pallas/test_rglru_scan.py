"""The RG-LRU's sequential scan kernel (`kernels_pallas.rglru_scan`): interpret mode == the `lax.scan` reference ==
a float64 loop, forward and gradients, both directions, with padding in time and width; a Mosaic compile for v5e;
the layer's `scan(impl="pallas")` per device shard under a mesh; the GPU fallback; bad shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import common
from kernels_pallas import rglru_scan as kernel
from lcjax.layers import rglru


def _inputs(batch=2, time=21, width=130, seed=0):
    ka, kb, kh = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.uniform(ka, (batch, time, width), minval=0.3, maxval=1.0)
    return a, jax.random.normal(kb, (batch, time, width)), jax.random.normal(kh, (batch, width))


def _loop64(a, b, h0, reverse):
    a, b, h = (np.asarray(x, np.float64) for x in (a, b, h0))
    out = np.zeros_like(b)
    for t in reversed(range(a.shape[1])) if reverse else range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out, h


@pytest.mark.parametrize("reverse,time", [(False, 21), (True, 21), (True, 24)])
def test_interpret_kernel_equals_reference_and_float64_loop_forward_and_gradients(reverse, time):
    """Time 21 in tiles of 8 (3 tiles, the last padded) and width 130 in tiles of 128 (2, the last padded); a reverse
    scan over time 24 too, where no padding step stands between h0 and the last real step (dh0 = a_(T−1) δ_(T−1))."""
    a, b, h0 = _inputs(time=time)
    run = lambda impl: lambda a, b, h0: kernel.rglru_scan(a, b, h0, reverse=reverse, impl=impl, block_t=8, block_w=128)
    got, want = run("interpret")(a, b, h0), run("reference")(a, b, h0)
    loop = _loop64(a, b, h0, reverse)
    for g, w, o in zip(got, want, loop, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-5)
    wh, wl = jax.random.normal(jax.random.key(5), b.shape), jax.random.normal(jax.random.key(6), h0.shape)

    def loss(impl):
        def f(a, b, h0):
            h, last = run(impl)(a, b, h0)
            return jnp.sum(h * wh) + jnp.sum(last * wl)

        return jax.grad(f, argnums=(0, 1, 2))

    for g, w in zip(loss("interpret")(a, b, h0), loss("reference")(a, b, h0), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_layer_pallas_scan_runs_per_shard_and_matches_the_associative_scan():
    """`rglru.bidirectional_scan(impl="pallas")` (kernel, interpret on CPU) == the associative scan, alone and under
    a data=2, tensor=2 mesh (batch and width per device), with resets and a causal suffix."""
    from lcjax.parallel.mesh import make_mesh

    a, b, h0 = _inputs(batch=4, time=12, width=16)
    resets = jnp.zeros((4, 12), bool).at[1, 5].set(True)
    causal = jnp.arange(12)[None, :] >= jnp.array([[4], [6], [0], [12]])
    run = lambda impl: lambda a, b, h0: rglru.bidirectional_scan(a, b, resets, causal, h0[:, :8], impl=impl)
    want = run("associative")(a, b, h0)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1}, devices=jax.devices()[:4])
    for g, w in zip(run("pallas")(a, b, h0), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with jax.set_mesh(mesh):
        text = jax.jit(run("pallas")).lower(a, b, h0).as_text()
        got = jax.jit(run("pallas"))(a, b, h0)
    assert "shard_map" in text or "sdy.manual_computation" in text
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_tpu_kernel_compiles_with_mosaic_for_v5e_forward_and_backward():
    """bf16 inputs of ragged shape [2, 200, 300], both directions, with gradients: 2 forward + 2 backward calls."""
    pytest.importorskip("libtpu")

    def fn(a, b, h0):
        def loss(a, b, h0):
            h, last = kernel.rglru_scan(a, b, h0, impl="pallas", block_t=64, block_w=256)
            back, _ = kernel.rglru_scan(a, b, h0, reverse=True, impl="pallas", block_t=64, block_w=256)
            return jnp.sum(h * back) + jnp.sum(last)

        return jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)

    s = jax.ShapeDtypeStruct
    args = [s((2, 200, 300), jnp.bfloat16), s((2, 200, 300), jnp.bfloat16), s((2, 300), jnp.float32)]
    compiled = common.compile_for_tpu(fn, args, "v5e:2x2")
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 4


def test_gpu_uses_the_reference_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(common, "_said", set())
    a, b, h0 = _inputs(time=5, width=4)
    with caplog.at_level("INFO"), common.tracing_for("gpu"):
        got = [kernel.rglru_scan(a, b, h0, impl="pallas") for _ in range(2)][-1]
    for g, w in zip(got, kernel.reference(a, b, h0), strict=True):
        np.testing.assert_array_equal(g, w)
    lines = [r.getMessage() for r in caplog.records if "rglru_scan" in r.getMessage()]
    assert len(lines) == 1 and "TPU-only" in lines[0], lines


def test_bad_shapes_say_what_was_expected():
    a, b, h0 = _inputs(time=4, width=4)
    with pytest.raises(ValueError, match=r"expected both \[batch, time, width\]"):
        kernel.rglru_scan(a, b[:, :3])
    with pytest.raises(ValueError, match=r"h0 \(2, 3\); expected \(2, 4\)"):
        kernel.rglru_scan(a, b, h0[:, :3])
    with pytest.raises(ValueError, match="impl='fast'"):
        kernel.rglru_scan(a, b, impl="fast")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import common, titans_memory
from lcjax.layers.neural_memory import memory_scan


def _inputs(depth, chunks=4, batch=2, heads=2, size=4, dim=8, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 10)
    q, k, v = (0.5 * jax.random.normal(keys[i], (chunks, batch, heads, size, dim)) for i in range(3))
    gamma = 0.1 * jnp.tril(jax.random.uniform(keys[3], (chunks, batch, heads, size, size)))
    a, b, sigma = (jax.random.uniform(keys[4 + i], (chunks, batch, heads, size)) for i in range(3))
    cols = titans_memory.pack_columns(gamma, a, b, sigma, jax.random.uniform(keys[7], (chunks, batch, heads)))
    widths = [dim] + [2 * dim] * (depth - 1) + [dim]
    weights = [
        jax.random.normal(jax.random.fold_in(keys[8], i), (batch, heads, d_in, d_out)) * d_in**-0.5
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    ]
    momentum = [0.1 * jax.random.normal(jax.random.fold_in(keys[9], i), w.shape) for i, w in enumerate(weights)]
    cast = lambda x: jax.tree.map(lambda a: a.astype(dtype), x)
    return cast(weights), cast(momentum), *cast((q, k, v, gamma, cols))


def _loss(impl, chunks_per_block=0, **resets):
    """Touches every output (y, the final state and the chunk-start states), so every cotangent path is checked."""

    def loss(weights, momentum, q, k, v, gamma, cols):
        y, final, starts = titans_memory.memory_chunks(
            weights, momentum, q, k, v, gamma, cols, impl=impl, chunks_per_block=chunks_per_block, **resets
        )
        total = jnp.sum(jnp.sin(y))
        total += sum(jnp.sum(jnp.cos(x)) for x in jax.tree.leaves(final))
        return total + 0.1 * sum(jnp.sum(x**2) for x in jax.tree.leaves(starts))

    return loss


@pytest.mark.parametrize("depth,chunks_per_block,clip", [(1, 0, 0.0), (1, 1, 0.0), (2, 2, 0.0), (2, 0, 0.3)])
def test_interpret_matches_reference_forward_and_gradients(depth, chunks_per_block, clip):
    """chunks_per_block < chunks: the state crosses grid steps (resident output blocks) forward and backward.
    clip: every token's gradient clipped to that norm (`max_grad_norm`) inside the kernel too."""
    args = _inputs(depth)
    want = titans_memory.reference(*args, max_grad_norm=clip)
    if clip:  # the bound is active here
        assert float(jnp.abs(titans_memory.reference(*args)[0] - want[0]).max()) > 1e-3
    got = titans_memory.memory_chunks(*args, impl="interpret", chunks_per_block=chunks_per_block, max_grad_norm=clip)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    grads = jax.grad(_loss("interpret", chunks_per_block, max_grad_norm=clip), argnums=tuple(range(7)))(*args)
    grads_ref = jax.grad(_loss("reference", max_grad_norm=clip), argnums=tuple(range(7)))(*args)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0
        np.testing.assert_allclose(g, w, atol=2e-6 * scale, rtol=0)


def _reset_inputs(depth, chunks=4):
    """Kernel inputs with document starts: coefficients from the layer's `_chunk_coefficients` (chunk 1 starts a
    document at its second token, the last chunk at its first and third; the others have none)."""
    from lcjax.layers.memory_scan import _chunk_coefficients

    weights, momentum, q, k, v, _, _ = _inputs(depth, chunks=chunks)
    batch, heads, size = q.shape[1:4]
    keys = jax.random.split(jax.random.key(5), 4)
    lr, eta, alpha = (0.5 * jax.random.uniform(keys[i], (chunks, batch, heads, size)) for i in range(3))
    resets = jnp.zeros((chunks, batch, heads, size)).at[1, :, :, 1].set(1).at[-1, :, :, 0].set(1).at[-1, :, :, 2].set(1)
    gamma, cols, reset_cols = _chunk_coefficients(lr, eta, alpha, jnp.ones_like(lr), resets)
    init = [0.5 * jax.random.normal(jax.random.fold_in(keys[3], i), w.shape) for i, w in enumerate(weights)]
    return weights, momentum, q, k, v, gamma, cols, init, reset_cols


@pytest.mark.parametrize("depth,chunks_per_block", [(1, 2), (2, 0)])
def test_interpret_with_document_resets_matches_reference(depth, chunks_per_block):
    """The restart terms inside the kernel: outputs, final and chunk-start states, and gradients of everything
    (the restart memory `init` and `reset_cols` included; d init sums over the chunks, across grid steps)."""
    *args, init, reset_cols = _reset_inputs(depth)
    kw = {"init": init, "reset_cols": reset_cols}
    want = titans_memory.reference(*args, **kw)
    assert float(jnp.abs(reset_cols[..., 0]).max()) > 0  # the restart coefficient is live
    got = titans_memory.memory_chunks(*args, impl="interpret", chunks_per_block=chunks_per_block, **kw)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    no_reset = titans_memory.reference(*args)  # the resets change the result (so the test can fail)
    assert float(jnp.abs(no_reset[0] - want[0]).max()) > 1e-2

    def loss(impl):
        def f(weights, momentum, q, k, v, gamma, cols, init, reset_cols):
            y, final, starts = titans_memory.memory_chunks(
                weights,
                momentum,
                q,
                k,
                v,
                gamma,
                cols,
                impl=impl,
                chunks_per_block=chunks_per_block,
                init=init,
                reset_cols=reset_cols,
            )
            total = jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(x)) for x in jax.tree.leaves(final))
            return total + 0.1 * sum(jnp.sum(x**2) for x in jax.tree.leaves(starts))

        return f

    grads = jax.grad(loss("interpret"), argnums=tuple(range(9)))(*args, init, reset_cols)
    grads_ref = jax.grad(loss("reference"), argnums=tuple(range(9)))(*args, init, reset_cols)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0
        np.testing.assert_allclose(g, w, atol=2e-6 * scale, rtol=0)


@pytest.mark.parametrize("with_resets,chunk_momentum", [(False, False), (True, False), (True, True)])
def test_memory_scan_through_the_kernel_equals_the_xla_scan(with_resets, chunk_momentum):
    """The layer's entry point, a length that is not a multiple of the chunk (padded chunk), gradients to the gates;
    with document starts: the kernel's restart terms, one start in the open last chunk; the per-chunk momentum only
    changes the coefficients the kernel is given."""
    batch, heads, length, dim, chunk = 2, 2, 11, 8, 4
    keys = jax.random.split(jax.random.key(3), 7)
    q, k, v = (jax.random.normal(keys[i], (batch, heads, length, dim)) for i in range(3))
    q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    lr, momentum, decay = (
        0.3 * jax.nn.sigmoid(jax.random.normal(keys[3 + i], (batch, heads, length))) for i in range(3)
    )
    init = [jax.random.normal(keys[6], (heads, dim, 2 * dim)) / 3, jnp.eye(2 * dim, dim)[None].repeat(heads, 0) / 2]
    resets = jnp.zeros((batch, length)).at[0, 5].set(1).at[1, 9].set(1) if with_resets else None  # 9: chunk 8..10

    def loss(impl):
        def f(init, q, k, v, lr, momentum, decay):
            y, (weights, surprise) = memory_scan(
                init, q, k, v, lr, momentum, decay, chunk_size=chunk, impl=impl, resets=resets,
                chunk_momentum=chunk_momentum,
            )  # fmt: skip
            return jnp.sum(jnp.sin(y)) + sum(jnp.sum(w**2) for w in weights + surprise)

        return f

    args = (init, q, k, v, lr, momentum, decay)
    np.testing.assert_allclose(loss("interpret")(*args), loss("xla")(*args), rtol=1e-6)
    grads = jax.grad(loss("interpret"), argnums=tuple(range(7)))(*args)
    grads_ref = jax.grad(loss("xla"), argnums=tuple(range(7)))(*args)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-6 * float(jnp.max(jnp.abs(w))), rtol=0)


def _abstract(depth, chunks=8, size=64, dim=64, resets=False):
    widths = [dim] + [2 * dim] * (depth - 1) + [dim]
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    weights = [f32(1, 2, d_in, d_out) for d_in, d_out in zip(widths[:-1], widths[1:], strict=True)]
    x = f32(chunks, 1, 2, size, dim)
    resets = [*weights, f32(chunks, 1, 2, size, 2)] if resets else []  # init per layer, reset_cols
    return [*weights, *weights, x, x, x, f32(chunks, 1, 2, size, size), f32(chunks, 1, 2, size, 8), *resets]


def _fwd_bwd(depth, resets=False, clip=0.0):
    def fn(*args):
        weights, momentum = list(args[:depth]), list(args[depth : 2 * depth])
        q, k, v, gamma, cols = args[2 * depth : 2 * depth + 5]
        init, reset_cols = (list(args[2 * depth + 5 : -1]), args[-1]) if resets else (None, None)

        def loss(weights, momentum, q, k, v, gamma, cols, init):
            y, (final, _), _ = titans_memory.memory_chunks(
                weights,
                momentum,
                q,
                k,
                v,
                gamma,
                cols,
                impl="pallas",
                init=init,
                reset_cols=reset_cols,
                max_grad_norm=clip,
            )
            return jnp.sum(y) + sum(jnp.sum(w) for w in final)

        return jax.grad(loss, argnums=tuple(range(8)))(weights, momentum, q, k, v, gamma, cols, init)

    return fn


@pytest.mark.parametrize("depth,resets", [(1, False), (2, False), (2, True)])
def test_tpu_kernels_compile_with_mosaic_for_v5e(depth, resets):
    """The depth-2 case with resets also clips the token gradients (`max_grad_norm`)."""
    pytest.importorskip("libtpu")
    clip = 1.0 if resets else 0.0
    compiled = common.compile_for_tpu(_fwd_bwd(depth, resets, clip), _abstract(depth, resets=resets), "v5e:2x2")
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 2  # forward and backward kernels


@pytest.mark.parametrize("resets", [False, True])
def test_gpu_kernels_lower_to_triton_for_cuda(resets):
    """6 chunks: the count is padded to 8 for the Triton block."""
    args = _abstract(2, chunks=6, size=32, dim=32, resets=resets)
    text = common.lower_for(_fwd_bwd(2, resets, clip=1.0 if resets else 0.0), args, ("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 2


def test_bfloat16_falls_back_to_the_reference_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(common, "_said", set())
    args = _inputs(1, chunks=2, dtype=jnp.bfloat16)

    def both(*args):  # two calls (the line is said once), the reference beside them: one compile
        calls = [titans_memory.memory_chunks(*args, impl="interpret")[0] for _ in range(2)]
        return calls[0], titans_memory.reference(*args)[0]

    with caplog.at_level("INFO"):
        got, want = jax.jit(both)(*args)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.astype(jnp.float32), want.astype(jnp.float32))
    lines = [r.getMessage() for r in caplog.records if "titans_memory" in r.getMessage()]
    assert len(lines) == 1 and "float32" in lines[0], lines


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: (a[0], a[1][:0], *a[2:]), "momentum layers"),
        (lambda a: (*a[:3], a[3][..., :4], *a[4:]), "q (4, 2, 2, 4, 8)"),
        (lambda a: (*a[:4], a[4][..., :4], *a[5:]), "width 8 but v has 4"),
        (lambda a: (*a[:5], a[5][..., :2], a[6]), "gamma"),
        (lambda a: ([a[0][0][..., :4, :]], *a[1:]), "layer 0 weights"),
    ],
)
def test_bad_inputs_say_what_was_expected(change, message):
    with pytest.raises(ValueError, match="titans_memory") as error:
        titans_memory.memory_chunks(*change(_inputs(1)), impl="interpret")
    assert message in str(error.value)


@pytest.mark.parametrize("resets", [False, True])
def test_gpu_pads_the_chunk_count_to_a_power_of_two(resets):
    """Traced as for a GPU (interpret mode): 3 chunks run as 4, the extra one a no-op (no reset either); outputs,
    final state, chunk-start states and gradients equal the reference's."""
    if resets:
        *args, init, reset_cols = _reset_inputs(2, chunks=3)
        kw = {"init": init, "reset_cols": reset_cols}
    else:
        args, kw = _inputs(2, chunks=3), {}
    want = titans_memory.reference(*args, **kw)
    with common.tracing_for("gpu"):
        got = titans_memory.memory_chunks(*args, impl="interpret", **kw)
        grads = jax.grad(_loss("interpret", **kw), argnums=tuple(range(7)))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    grads_ref = jax.grad(_loss("reference", **kw), argnums=tuple(range(7)))(*args)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-6 * float(jnp.max(jnp.abs(w))), rtol=0)

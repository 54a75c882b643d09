import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import chunked_linear_attention as cla
from kernels_pallas import common
from lcjax.layers.mlstm import mlstm_cell
from lcjax.layers.ssd import ssd_scan


def _inputs(chunks=3, size=4, dim=8, seed=0, docs=True, pad=1, dtype=jnp.float32):
    """[batch 2, heads 2, chunks, size, dim] inputs with packed documents, a random initial state and `pad` padding
    tokens at the end (i = −∞, no decay)."""
    keys = jax.random.split(jax.random.key(seed), 9)
    shape = (2, 2, chunks, size)
    q = 0.5 * jax.random.normal(keys[0], (*shape, dim))
    k, v = (jax.random.normal(keys[i], (*shape, dim)) for i in (1, 2))
    log_f = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape) + 2)
    log_i = jax.random.normal(keys[4], shape)
    if pad:
        log_f = log_f.at[..., -1, size - pad :].set(0.0)
        log_i = log_i.at[..., -1, size - pad :].set(-jnp.inf)
    doc_ids = None
    if docs:  # a document starts inside the first chunk, and one exactly on the second chunk's boundary
        flat = jnp.zeros((2, 2, chunks * size), jnp.int32).at[..., 2:].add(1).at[..., size:].add(1)
        doc_ids = flat.reshape(shape)
    cols = cla.pack_columns(log_f, log_i, doc_ids)
    state = (
        jax.random.normal(keys[5], (2, 2, dim, dim)),
        jax.random.normal(keys[6], (2, 2, 1, dim)),
        jnp.full((2, 2, 1, 1), 0.5),
    )
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), cols, state


def _loss(mode, impl, chunks_per_block=0):
    def loss(q, k, v, cols, state):
        h, final = cla.chunked_linear_attention(
            q, k, v, cols, state, mode=mode, eps=1e-6, impl=impl, chunks_per_block=chunks_per_block
        )
        return jnp.sum(jnp.sin(h)) + sum(jnp.sum(jnp.cos(x)) for x in final)

    return loss


@pytest.mark.parametrize(
    "mode,chunks_per_block",
    [
        ("mlstm", 0),
        ("ssd", 1),
        pytest.param("mlstm", 1, marks=pytest.mark.slow),
        pytest.param("ssd", 0, marks=pytest.mark.slow),
    ],
)
def test_interpret_matches_reference_forward_and_gradients(mode, chunks_per_block):
    """Packed documents (one starting on a chunk boundary), an initial state, padding tokens; chunks_per_block 1:
    the state crosses phase-1 grid steps forward and backward."""
    args = _inputs()
    want = cla.chunked_linear_attention(*args, mode=mode, eps=1e-6, impl="reference")
    got = cla.chunked_linear_attention(*args, mode=mode, eps=1e-6, impl="interpret", chunks_per_block=chunks_per_block)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(got[0]))
    grads = jax.grad(_loss(mode, "interpret", chunks_per_block), argnums=tuple(range(5)))(*args)
    grads_ref = jax.grad(_loss(mode, "reference"), argnums=tuple(range(5)))(*args)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, atol=1e-5 * max(scale, 1e-6), rtol=0)


def test_gpu_chunk_padding_is_a_no_op():
    """On GPU the chunk count is padded to a power of two with chunks that neither write nor decay: same outputs and
    final state (traced as for a GPU, run in interpret mode)."""
    args = _inputs(chunks=3)
    want = cla.chunked_linear_attention(*args, mode="mlstm", eps=1e-6, impl="reference")
    with common.tracing_for("gpu"):
        got = cla.chunked_linear_attention(*args, mode="mlstm", eps=1e-6, impl="interpret")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_against_the_float32_reference():
    args = _inputs(pad=0)
    low = tuple(x.astype(jnp.bfloat16) for x in args[:3])
    h, _ = cla.chunked_linear_attention(*low, *args[3:], mode="mlstm", eps=1e-6, impl="interpret")
    want, _ = cla.chunked_linear_attention(*args, mode="mlstm", eps=1e-6, impl="reference")
    assert h.dtype == jnp.bfloat16
    error = float(jnp.max(jnp.abs(h.astype(jnp.float32) - want))) / float(jnp.max(jnp.abs(want)))
    assert error < 2e-2, error


def _mlstm_inputs(length=11, dim=8):
    keys = jax.random.split(jax.random.key(1), 8)
    q, k, v = (jax.random.normal(keys[i], (2, 2, length, dim)) for i in range(3))
    igate, fgate = jax.random.normal(keys[3], (2, 2, length)), jax.random.normal(keys[4], (2, 2, length)) + 1
    segments = jnp.array([[0] * 5 + [1] * (length - 5), [0] * length])
    state = (
        jax.random.normal(keys[5], (2, 2, dim, dim)),
        jax.random.normal(keys[6], (2, 2, dim)),
        jnp.full((2, 2), 0.3),
    )
    return (q, k, v, igate, fgate), segments, state


@pytest.mark.parametrize("given_state", [False, True])
def test_mlstm_cell_through_the_kernel_equals_xla_chunkwise(given_state):
    """The layer's glue: T = 11 with chunk 4 (padded), packed documents, an initial state; outputs, final state and
    gradients of everything."""
    inputs, segments, state = _mlstm_inputs()
    extra = {"segment_ids": segments, "initial_state": state if given_state else None}

    def loss(impl):
        def fn(*inputs):
            h, final = mlstm_cell(*inputs, chunk_size=4, impl=impl, **extra)
            return jnp.sum(jnp.sin(h)) + sum(jnp.sum(jnp.cos(x)) for x in final), (h, final)

        return jax.value_and_grad(fn, argnums=tuple(range(5)), has_aux=True)

    (_, got), grads = loss("interpret")(*inputs)
    (_, want), grads_ref = loss("xla")(*inputs)
    for g, w in zip(jax.tree.leaves((got, grads)), jax.tree.leaves((want, grads_ref)), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5 * max(1.0, float(jnp.max(jnp.abs(w)))), rtol=0)


def _ssd_inputs(length=11):
    keys = jax.random.split(jax.random.key(2), 6)
    x = jax.random.normal(keys[0], (2, length, 4, 8))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (2, length, 4)))
    a = -jnp.arange(1.0, 5.0)
    b, c = (jax.random.normal(keys[i], (2, length, 2, 8)) for i in (2, 3))  # 2 groups of 2 heads
    h0 = jax.random.normal(keys[4], (2, 4, 8, 8))
    segments = jnp.array([[0] * 5 + [1] * (length - 5), [0] * length])
    return (x, dt, a, b, c), segments, h0


def test_ssd_scan_through_the_kernel_equals_xla_chunked():
    inputs, segments, h0 = _ssd_inputs()

    def loss(impl):
        def fn(*inputs):
            y, final = ssd_scan(*inputs, chunk_size=4, initial_state=h0, segment_ids=segments, impl=impl)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(final)), (y, final)

        return jax.value_and_grad(fn, argnums=tuple(range(5)), has_aux=True)

    (_, got), grads = loss("interpret")(*inputs)
    (_, want), grads_ref = loss("xla")(*inputs)
    for g, w in zip(jax.tree.leaves((got, grads)), jax.tree.leaves((want, grads_ref)), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5 * max(1.0, float(jnp.max(jnp.abs(w)))), rtol=0)


def test_the_kernel_runs_per_device_shard_under_a_mesh():
    """Under a data=2,tensor=2 mesh the kernel runs on each device's batch and head shard (`per_shard`): the same
    outputs and final state as on one device, and the output keeps its sharding."""
    from lcjax.parallel.mesh import make_mesh

    inputs, segments, state = _mlstm_inputs()
    want = mlstm_cell(*inputs, chunk_size=4, segment_ids=segments, initial_state=state)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1}, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        got = jax.jit(
            lambda *a: mlstm_cell(*a, chunk_size=4, segment_ids=segments, initial_state=state, impl="interpret")
        )(*inputs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
    assert got[0].sharding.spec[:2] == ("data", "tensor")


def _abstract(chunks=3, size=64, dim=128, dtype=jnp.bfloat16):
    s = jax.ShapeDtypeStruct
    lead = (1, 2, chunks, size)
    return [
        s((*lead, dim), dtype),
        s((*lead, dim), dtype),
        s((*lead, dim), dtype),
        s((*lead, len(cla.COLUMNS)), jnp.float32),
        s((1, 2, dim, dim), jnp.float32),
        s((1, 2, 1, dim), jnp.float32),
        s((1, 2, 1, 1), jnp.float32),
    ]


def _fwd_bwd(mode):
    def fn(q, k, v, cols, *state):  # flat arguments (compile_for_tpu)
        return jax.grad(_loss(mode, "pallas", chunks_per_block=1), argnums=tuple(range(5)))(q, k, v, cols, state)

    return fn


@pytest.mark.parametrize("mode", cla.MODES)
def test_tpu_kernels_compile_with_mosaic_for_v5e(mode):
    """bf16 inputs, chunk 64, width 128: the two forward and two backward kernels compile for a v5e chip."""
    pytest.importorskip("libtpu")
    compiled = common.compile_for_tpu(_fwd_bwd(mode), _abstract(), "v5e:2x2")
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 4


def test_gpu_kernels_lower_to_triton_for_cuda():
    text = common.lower_for(_fwd_bwd("mlstm"), _abstract(size=32, dim=32), ("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 4


def test_gpu_falls_back_for_small_widths_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(common, "_said", set())
    args = _inputs(dim=8)
    with caplog.at_level("INFO"), common.tracing_for("gpu"):
        for _ in range(2):
            got = cla.chunked_linear_attention(*args, mode="ssd", impl="interpret")
    want = cla.chunked_linear_attention(*args, mode="ssd", impl="reference")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)
    lines = [r.getMessage() for r in caplog.records if "chunked_linear_attention" in r.getMessage()]
    assert len(lines) == 1 and ">= 16" in lines[0], lines


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: (a[0], a[1][..., :4], *a[2:]), "expected q, k [..., chunks, L, dk]"),
        (lambda a: (*a[:3], a[3][..., :3], a[4]), "cols (2, 2, 3, 4, 3)"),
        (lambda a: (*a[:4], (a[4][0], a[4][1][..., 0, :], a[4][2])), "state shapes"),
    ],
)
def test_bad_inputs_say_what_was_expected(change, message):
    with pytest.raises(ValueError, match="chunked_linear_attention") as error:
        cla.chunked_linear_attention(*change(_inputs()), mode="mlstm", impl="interpret")
    assert message in str(error.value)


def test_bad_impl_and_mode_are_refused():
    inputs, _, _ = _mlstm_inputs()
    with pytest.raises(ValueError, match="impl='pallas' with form='recurrent'"):
        mlstm_cell(*inputs, form="recurrent", impl="pallas")
    with pytest.raises(ValueError, match="mode='gla'"):
        cla.chunked_linear_attention(*_inputs(), mode="gla")


def test_tpu_kernel_runs_on_per_device_shards_in_a_sharded_program():
    """mlstm_cell(impl="pallas") in a program for 4 v5e chips, batch over data=2 and heads over tensor=2: each chip's
    kernel sees its own 2 × 2 (batch, head) programs, not the global 4 × 4 (XLA would not partition the kernel)."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 1, 2, 1), ("data", "fsdp", "tensor", "sequence"))
    sharded = NamedSharding(mesh, PartitionSpec("data", "tensor"))
    arg = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharded)
    args = [arg(4, 4, 256, 64)] * 3 + [arg(4, 4, 256)] * 2
    with jax.set_mesh(mesh), common.tracing_for("tpu"):
        text = jax.jit(lambda *a: mlstm_cell(*a, chunk_size=64, impl="pallas")[0]).lower(*args).compile().as_text()
    calls = [line for line in text.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    assert len(calls) == 2
    outputs = next(line for line in calls if "chunked_linear_attention_outputs" in line)
    assert outputs.split("=")[1].strip().startswith("f32[4,4,64,64]"), outputs[:200]  # 2·2 programs, 4 chunks

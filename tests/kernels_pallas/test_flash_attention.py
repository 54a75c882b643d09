"""Flash attention: both kernel families in interpret mode == the jnp reference (forward, lse and gradients), the
block ranges == brute force, the TPU kernels through the real Mosaic compiler, the GPU kernels lowered for CUDA."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import common
from kernels_pallas.attention_mask import MaskSpec
from kernels_pallas.flash_attention import BlockSizes, flash_attention, reference

# Small blocks so short sequences span several blocks and end in a partial one.
SMALL_BLOCKS = {"tpu": BlockSizes(128, 128, 128, 128), "gpu": BlockSizes(64, 32, 32, 64)}

# id: (batch, length, heads, kv_heads, head_dim, causal, segments, sliding_window, softcap)
CASES = {
    "causal-mha-partial-block": (1, 200, 2, 2, 32, True, False, None, None),
    "noncausal-gqa2": (2, 136, 4, 2, 32, False, False, None, None),
    "causal-gqa4-segments": (1, 264, 4, 1, 16, True, True, None, None),
    "causal-window": (1, 300, 2, 1, 32, True, False, 70, None),
    "noncausal-window-segments": (1, 200, 2, 2, 32, False, True, 45, None),
    "causal-softcap-gqa2": (1, 150, 4, 2, 32, True, False, None, 5.0),
    "single-block": (2, 40, 2, 1, 24, True, True, None, None),
}


def _inputs(batch, length, heads, kv_heads, head_dim, segments, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
    seg = jnp.sort(jax.random.randint(keys[3], (batch, length), 0, 3), axis=1) if segments else None
    probe = jax.random.normal(keys[4], (batch, length, heads, head_dim), jnp.float32)
    return q, k, v, seg, probe


def _outputs_and_grads(attend, q, k, v, probe):
    """(out, lse, dq, dk, dv) of L = Σ out·probe + Σ sin(lse): both outputs carry a cotangent."""

    def loss(q, k, v):
        out, lse = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * probe) + jnp.sum(jnp.sin(lse))

    out, lse = attend(q, k, v)
    return (out, lse, *jax.grad(loss, argnums=(0, 1, 2))(q, k, v))


def _both(case, target, dtype):
    batch, length, heads, kv_heads, head_dim, causal, segments, window, softcap = CASES[case]
    q, k, v, seg, probe = _inputs(batch, length, heads, kv_heads, head_dim, segments, dtype)
    options = dict(causal=causal, segment_ids=seg, sliding_window=window, softcap=softcap)
    kernel = lambda q, k, v: flash_attention(
        q, k, v, return_lse=True, impl="interpret", target=target, block_sizes=SMALL_BLOCKS[target], **options
    )
    # the reference sees the same (possibly bf16-rounded) inputs, in f32
    f32 = lambda x: x.astype(jnp.float32)
    ref = lambda q, k, v: reference(f32(q), f32(k), f32(v), **options)
    return _outputs_and_grads(kernel, q, k, v, probe), _outputs_and_grads(ref, f32(q), f32(k), f32(v), probe)


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_interpret_matches_reference_f32(case, target):
    got, want = _both(case, target, jnp.float32)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def test_gpu_default_blocks_by_head_dim_match_reference():
    """The GPU defaults (128-row backward blocks for 64 < head_dim <= 128, tuned on H100) in interpret mode."""
    assert BlockSizes.default("gpu", 128) == BlockSizes(128, 128, 128, 128)
    assert BlockSizes.default("gpu", 64) == BlockSizes(128, 64, 64, 64)
    assert BlockSizes.default("gpu", 256) == BlockSizes(128, 64, 64, 64)
    q, k, v, seg, probe = _inputs(1, 160, 1, 1, 128, segments=True)
    kernel = lambda q, k, v: flash_attention(
        q, k, v, causal=True, segment_ids=seg, return_lse=True, impl="interpret", target="gpu"
    )
    ref = lambda q, k, v: reference(q, k, v, causal=True, segment_ids=seg)
    got, want = _outputs_and_grads(kernel, q, k, v, probe), _outputs_and_grads(ref, q, k, v, probe)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("case", ["causal-gqa4-segments", "causal-softcap-gqa2"])
def test_interpret_bfloat16_within_2e_2_of_f32_reference(case, target):
    got, want = _both(case, target, jnp.bfloat16)
    assert got[0].dtype == jnp.bfloat16 and got[2].dtype == jnp.bfloat16
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        error = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
        assert error < 2e-2, (name, error)


@pytest.mark.parametrize(
    "causal, window", [(True, None), (False, None), (True, 1), (True, 37), (False, 37), (False, 200)]
)
def test_block_ranges_are_exactly_the_blocks_with_a_visible_pair(causal, window):
    q_len = kv_len = 300
    block_q, block_k = 32, 64
    num_q, num_k = -(-q_len // block_q), -(-kv_len // block_k)
    spec = MaskSpec(causal, window, kv_len, num_k * block_k)
    i = np.arange(num_q * block_q)[:, None]
    j = np.arange(num_k * block_k)[None, :]
    visible = np.asarray(spec.visible(jnp.asarray(i), jnp.asarray(j)))
    visible = visible & (i < q_len)  # padded queries need nothing
    needed = visible.reshape(num_q, block_q, num_k, block_k).any(axis=(1, 3))
    for qb in range(num_q):
        first, last = (int(x) for x in spec.kv_blocks(jnp.int32(qb), block_q, block_k, num_k))
        assert np.flatnonzero(needed[qb]).tolist() == list(range(first, last + 1)), qb
    for kb in range(num_k):
        first, last = (int(x) for x in spec.q_blocks(jnp.int32(kb), block_q, block_k, num_q))
        rows = np.flatnonzero(needed[:, kb]).tolist()
        # every needed query block is in range; at most the padded tail block is extra
        assert set(rows) <= set(range(first, last + 1)) and last - first + 1 - len(rows) <= 1, kb


def _fwd_bwd(target, causal, segments, window, softcap):
    def fn(q, k, v, seg):
        attend = lambda q, k, v: flash_attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=seg if segments else None,
            sliding_window=window,
            softcap=softcap,
            impl="pallas",
            target=target,
        )
        out, vjp = jax.vjp(attend, q, k, v)
        return out, *vjp(out)

    return fn


def _abstract(batch, length, heads, kv_heads, head_dim, dtype):
    return [
        jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
    ]


# Default TPU blocks (512/512 forward, 256/512 backward) over the features that change the kernels' code.
TPU_CONFIGS = {
    "bf16-d128-causal-segments-gqa2": (jnp.bfloat16, 2048, 8, 4, 128, True, True, None, None),
    "bf16-d64-noncausal-window-softcap-mqa": (jnp.bfloat16, 1000, 4, 1, 64, False, False, 256, 30.0),
    "f32-d128-causal-window": (jnp.float32, 1536, 2, 2, 128, True, False, 512, None),
    "bf16-d256-short": (jnp.bfloat16, 200, 2, 1, 256, True, True, None, None),
}


@pytest.mark.parametrize("config", list(TPU_CONFIGS))
def test_tpu_kernels_compile_with_mosaic_for_v5e(config):
    pytest.importorskip("libtpu")
    dtype, length, heads, kv_heads, head_dim, causal, segments, window, softcap = TPU_CONFIGS[config]
    fn = _fwd_bwd("tpu", causal, segments, window, softcap)
    compiled = common.compile_for_tpu(fn, _abstract(2, length, heads, kv_heads, head_dim, dtype), "v5e:2x2")
    # forward, dk/dv and dq: three Mosaic kernels, compiled (not interpreted)
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
    assert compiled.memory_analysis() is not None


def test_gpu_kernels_lower_to_triton_for_cuda():
    fn = _fwd_bwd("gpu", True, True, None, 20.0)
    text = common.lower_for(fn, _abstract(1, 1000, 4, 2, 96, jnp.bfloat16), ("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 3


def test_auto_and_pallas_pick_by_backend():
    q, k, v, _, _ = _inputs(1, 64, 2, 1, 16, False)
    want = reference(q, k, v, causal=True)[0]
    for impl in ("auto", "pallas", "interpret", "reference"):
        np.testing.assert_allclose(flash_attention(q, k, v, causal=True, impl=impl), want, atol=1e-5, err_msg=impl)
    assert common.resolve_impl("auto", "x") == "reference" and common.resolve_impl("pallas", "x") == "interpret"


def test_unsupported_dtype_falls_back_to_reference_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(common, "_said", set())  # said once per process: forget earlier tests' lines
    q, k, v, _, _ = _inputs(1, 32, 2, 2, 16, False, dtype=jnp.float16)
    with caplog.at_level(logging.INFO):
        a = flash_attention(q, k, v, impl="interpret")
        b = flash_attention(q, k, v, impl="interpret")
    np.testing.assert_array_equal(a, reference(q, k, v)[0])
    np.testing.assert_array_equal(a, b)
    assert sum("float16" in r.message and "reference" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q_shape=(1, 8, 3, 16)), "multiple of kv_heads"),
        (dict(k_len=12, causal=True), "equal query and key lengths"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(softcap=-1.0), "softcap=-1.0"),
        (dict(impl="fast"), "impl='fast'"),
        (dict(target="tpu7"), "target='tpu7'"),
        (dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), "segment_ids must be int"),
    ],
)
def test_bad_inputs_say_what_was_expected(kwargs, message):
    q = jnp.zeros(kwargs.pop("q_shape", (1, 8, 4, 16)))
    k = jnp.zeros((1, kwargs.pop("k_len", 8), 2, 16))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        flash_attention(q, k, k, **{"impl": "interpret", **kwargs})

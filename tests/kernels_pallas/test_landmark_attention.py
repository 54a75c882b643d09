"""The blockwise landmark-attention kernels in interpret mode == the dense grouped softmax (forward and gradients,
f32 and bf16), their refusals, and the real Mosaic compile for a TPU topology (forward + backward)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import common
from kernels_pallas.landmark_attention import landmark_attention, tile_multiple
from lcjax.layers import landmark_attention as la

# id: (length, mem_freq, heads, kv_heads, segments): several groups per tile (mem_freq 15, 31), one group per tile
# (127, the TPU default), a partial last tile and a document boundary inside a block
CASES = {
    "freq15-mqa-partial-tile": (200, 15, 2, 1, False),
    "freq31-gqa2-segments": (300, 31, 4, 2, True),
    "freq127-one-group-per-tile": (130, 127, 2, 2, False),
}


def _inputs(length, heads, kv_heads, segments, dtype=jnp.float32, seed=0, head_dim=16):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (1, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (1, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (1, length, kv_heads, head_dim), dtype)
    seg = jnp.sort(jax.random.randint(keys[3], (1, length), 0, 3), axis=1) if segments else None
    return q, k, v, seg, jax.random.normal(keys[4], q.shape, jnp.float32)


def _outputs_and_grads(attend, q, k, v, probe):
    out, vjp = jax.vjp(attend, q, k, v)
    return [out, *vjp(probe.astype(out.dtype))]


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if "freq127" in c else c for c in CASES]
)  # mem_freq 127's code path is the Mosaic compile's below; its interpret run is slow
def test_interpret_equals_the_dense_grouped_softmax_forward_and_gradients(case):
    length, mem_freq, heads, kv_heads, segments = CASES[case]
    q, k, v, seg, probe = _inputs(length, heads, kv_heads, segments)
    kernel = lambda q, k, v: landmark_attention(q, k, v, mem_freq=mem_freq, segment_ids=seg, interpret=True)
    dense = lambda q, k, v: la.reference(q, k, v, seg, mem_freq=mem_freq, scale=16**-0.5)
    got, want = _outputs_and_grads(kernel, q, k, v, probe), _outputs_and_grads(dense, q, k, v, probe)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
    assert float(jnp.abs(want[2]).max()) > 0.1  # the keys (landmark keys included) get gradients


@pytest.mark.slow
def test_bf16_inputs_within_2e_2_of_an_f32_reference_fed_the_same_inputs():
    q, k, v, seg, probe = _inputs(160, 4, 2, True, dtype=jnp.bfloat16, seed=3)
    kernel = lambda q, k, v: landmark_attention(q, k, v, mem_freq=31, segment_ids=seg, interpret=True)
    dense = lambda q, k, v: la.reference(q, k, v, seg, mem_freq=31, scale=16**-0.5)
    got = _outputs_and_grads(kernel, q, k, v, probe)
    want = _outputs_and_grads(dense, *(x.astype(jnp.float32) for x in (q, k, v)), probe)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.abs(b).max())
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 2e-2 * scale, name


def test_blocks_that_split_a_landmark_block_and_bad_inputs_are_refused():
    q, k, v, _, _ = _inputs(64, 2, 1, False)
    assert tile_multiple(127) == 128 and tile_multiple(15) == 128 and tile_multiple(95) == 384
    with pytest.raises(ValueError, match="lcm"):
        landmark_attention(q, k, v, mem_freq=50, interpret=True)  # lcm(51, 128) = 6528 slots per tile
    with pytest.raises(ValueError, match="block_k=128 must be a multiple of lcm"):
        landmark_attention(q, k, v, mem_freq=95, block_k=128, interpret=True)
    with pytest.raises(ValueError, match="mem_freq=0"):
        landmark_attention(q, k, v, mem_freq=0, interpret=True)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        landmark_attention(q.astype(jnp.float16), k, v, mem_freq=15, interpret=True)


@pytest.mark.parametrize("mem_freq, segments", [(127, True), (31, False)], ids=["freq127-segments", "freq31"])
def test_tpu_kernels_compile_with_mosaic_for_v5e(mem_freq, segments):
    pytest.importorskip("libtpu")

    def fn(q, k, v, seg):
        attend = lambda q, k, v: landmark_attention(q, k, v, mem_freq=mem_freq, segment_ids=seg if segments else None)
        out, vjp = jax.vjp(attend, q, k, v)
        return out, *vjp(out)

    shapes = [(2, 1024, 4, 128), (2, 1024, 2, 128), (2, 1024, 2, 128)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes] + [jax.ShapeDtypeStruct((2, 1024), jnp.int32)]
    compiled = common.compile_for_tpu(fn, args, "v5e:2x2")
    # forward, dk/dv and dq: three Mosaic kernels, compiled (not interpreted)
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
    assert compiled.memory_analysis() is not None


# GPU (Triton) kernels: (length, mem_freq, heads, kv_heads, segments, block): several groups per 16-slot tile
# (mem_freq 3, a power-of-two block), and the paper's mem_freq 50 (blocks of 51 padded to 64) with documents, GQA and
# a partial last block
GPU_CASES = {
    "freq3-mqa-four-groups-per-tile": (40, 3, 2, 1, False, 16),
    "freq50-gqa2-segments-regrouped": (110, 50, 4, 2, True, None),
}


@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_interpret_equals_the_dense_grouped_softmax_forward_and_gradients(case):
    length, mem_freq, heads, kv_heads, segments, block = GPU_CASES[case]
    q, k, v, seg, probe = _inputs(length, heads, kv_heads, segments, seed=1)

    def kernel(q, k, v):
        return landmark_attention(
            q, k, v, mem_freq=mem_freq, segment_ids=seg, interpret=True, target="gpu", block_q=block, block_k=block
        )

    dense = lambda q, k, v: la.reference(q, k, v, seg, mem_freq=mem_freq, scale=16**-0.5)
    got, want = _outputs_and_grads(kernel, q, k, v, probe), _outputs_and_grads(dense, q, k, v, probe)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
    assert float(jnp.abs(want[2]).max()) > 0.1


def test_gpu_regrouping_is_invertible_and_pads_blocks_to_a_power_of_two():
    from kernels_pallas import landmark_attention_gpu as gpu

    call = gpu.Call(mem_freq=4, length=12, scale=1.0, interpret=True, block_q=16, block_k=16)
    x = jnp.arange(12)[None, :, None] + 1
    grouped = gpu.regroup(x, call)
    # blocks of 5 slots at 8-slot strides; the partial third block (2 slots) padded too
    assert grouped.shape == (1, 24, 1) and grouped[0, :, 0].tolist()[:10] == [1, 2, 3, 4, 5, 0, 0, 0, 6, 7]
    np.testing.assert_array_equal(gpu.ungroup(grouped, call), x)
    with pytest.raises(ValueError, match="multiple of next_pow2"):
        gpu.check(50, 32, None)
    with pytest.raises(ValueError, match="mem_freq < 256"):
        gpu.check(300, None, None)
    assert gpu.check(50, None, None) == (64, 64) and gpu.check(3, None, 16) == (64, 16)


def test_gpu_kernels_lower_to_triton_for_cuda_and_the_layer_picks_them():
    def fn(q, k, v, seg):
        attend = lambda q, k, v: landmark_attention(q, k, v, mem_freq=50, segment_ids=seg)
        out, vjp = jax.vjp(attend, q, k, v)
        return out, *vjp(out)

    shapes = [(2, 1020, 4, 128), (2, 1020, 2, 128), (2, 1020, 2, 128)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes] + [jax.ShapeDtypeStruct((2, 1020), jnp.int32)]
    text = common.lower_for(fn, args, ("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 3  # forward, dk/dv, dq
    for kernel in ("landmark_attention_fwd", "landmark_attention_dkv", "landmark_attention_dq"):
        assert kernel in text

    def layer(q, k, v):
        return la.causal_landmark_attention(q, k, v, None, mem_freq=50, scale=0.1, impl="pallas")

    text = common.lower_for(layer, args[:3], ("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 1
    with common.tracing_for("gpu"):
        assert la.resolve_impl("auto", 50) == "xla"  # auto waits for a GPU run (module docstring)

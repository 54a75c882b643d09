"""JRT-RNN's prefix linear attention (reference/xlstm_ssm_birdie_jrt.md §4.2 and §5.1 item 9): the Taylor kernel
identity, the parallel form == an explicit float64 double sum (packed documents, a chunk size that does not divide
the row), the encoder term invariant to permuting the prefix, the suffix causal, a short prompt encoded as if
repeated, prefill then recurrent decode == parallel, and the chunkwise kernel (interpret) == the XLA reference,
forward and gradients. The model's protocol checks are in tests/models/test_protocol.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.layers import prefix_linear_attention as pla

D, H, F, DV, M = 8, 2, 4, 3, 4


def test_the_feature_map_is_the_second_order_taylor_kernel(x64):
    q, k = jax.random.normal(jax.random.key(0), (2, 5, 7, F), jnp.float64)
    s = jnp.sum(q * k, -1) / math.sqrt(F)
    np.testing.assert_allclose(jnp.sum(pla.feature_map(q) * pla.feature_map(k), -1), 1 + s + s**2 / 2, rtol=1e-12)
    assert pla.feature_map(q).shape[-1] == pla.num_features(F) == 24  # 1 + 4 + 16 = 21, padded to 24
    assert pla.num_features(16) == 280  # the paper's 273 features, padded


def _layer(impl="xla", chunk_size=3, prefix_len=M):
    return pla.PrefixLinearAttention(D, H, F, DV, prefix_len=prefix_len, chunk_size=chunk_size, impl=impl,
                                     init_std=0.5, out_std=0.5, rngs=nnx.Rngs(0))  # fmt: skip


def _double_sum(layer, x, docs, weights):
    """y_i (before W_o) by the formula: Σ over j ≤ i of i's document, plus the encoder term for document 0."""
    proj = lambda name: jnp.einsum("btd,dhf->bthf", x, getattr(layer, name)[...])
    phi = lambda name: pla.feature_map(proj(name))
    q, k, ke, v, ve = phi("w_q"), phi("w_k"), phi("w_ke"), proj("w_v"), proj("w_ve")
    batch, length = x.shape[:2]
    out = np.zeros((batch, length, H, DV))
    for b in range(batch):
        for i in range(length):
            for h in range(H):
                num, den = np.zeros(DV), 0.0
                for j in range(length):
                    if j <= i and docs[b, j] == docs[b, i]:
                        a = float(q[b, i, h] @ k[b, j, h])
                        num, den = num + a * np.asarray(v[b, j, h]), den + a
                    if docs[b, i] == 0 and weights[b, j]:
                        a = float(weights[b, j] * (q[b, i, h] @ ke[b, j, h]))
                        num, den = num + a * np.asarray(ve[b, j, h]), den + a
                out[b, i, h] = num / (den + pla.EPS)
    return jnp.einsum("bthv,hvd->btd", out, layer.w_o[...])


def test_the_parallel_form_is_the_explicit_double_sum_with_packed_documents(x64):
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (2, 10, D), jnp.float64)
    # row 0: documents of 6 and 4 tokens; row 1: one of 3 (shorter than M: encoded repeated) then one of 7
    segments = jnp.array([[1] * 6 + [2] * 4, [1] * 3 + [2] * 7], jnp.int32)
    positions = jnp.array([list(range(6)) + list(range(4)), list(range(3)) + list(range(7))], jnp.int32)
    docs = pla.documents(positions, segments)
    weights = pla.encoder_weights(docs, M, None, segments)
    np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [2, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    y, _ = layer(x, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(y, _double_sum(layer, x, np.asarray(docs), np.asarray(weights)), rtol=1e-9, atol=1e-12)
    # a prefix_mask names the encoder's tokens instead (the first document's only)
    prefix = jnp.array([[1, 1, 0, 0, 0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    weights = pla.encoder_weights(docs, M, prefix, segments)
    np.testing.assert_array_equal(weights[0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    y, _ = layer(x, positions=positions, segment_ids=segments, prefix_mask=prefix)
    np.testing.assert_allclose(y, _double_sum(layer, x, np.asarray(docs), np.asarray(weights)), rtol=1e-9, atol=1e-12)


def test_the_encoder_term_ignores_the_prefix_order_and_the_suffix_is_causal(x64):
    layer = _layer()
    x = jax.random.normal(jax.random.key(2), (1, 9, D), jnp.float64)
    proj = lambda x, name: jnp.einsum("btd,dhf->bthf", x, getattr(layer, name)[...])
    enc = lambda x, w: pla.encoder_state(pla.feature_map(proj(x, "w_ke")), proj(x, "w_ve"), w)
    weights = pla.encoder_weights(jnp.zeros((1, 9), jnp.int32), M)
    permuted = x.at[:, :M].set(x[:, jnp.array([2, 0, 3, 1])])
    np.testing.assert_allclose(enc(permuted, weights), enc(x, weights), rtol=1e-12)
    assert float(jnp.abs(enc(x.at[:, M].add(1.0), weights) - enc(x, weights)).max()) == 0.0  # M is not encoded
    # a short prompt (n = 3 < M = 4) is encoded as if repeated to fill the M positions: x0 x1 x2 x0
    short = x[:, :3]
    tiled = jnp.concatenate([short, short[:, :1]], axis=1)
    w_short = pla.encoder_weights(jnp.zeros((1, 3), jnp.int32), M)
    np.testing.assert_allclose(enc(short, w_short), enc(tiled, jnp.ones((1, 4))), rtol=1e-12)
    positions = jnp.arange(9)[None]
    base, _ = layer(x, positions=positions)
    later, _ = layer(x.at[:, 6].add(1.0), positions=positions)  # a suffix token: nothing before it moves
    assert float(jnp.abs(later - base)[0, :6].max()) == 0.0 and float(jnp.abs(later - base)[0, 6].max()) > 1e-6
    early, _ = layer(x.at[:, 2].add(1.0), positions=positions)  # a prefix token reaches every position
    assert float(jnp.abs(early - base)[0, :2].min()) > 1e-8


def test_prefill_then_recurrent_decode_equals_the_parallel_form(x64):
    layer = _layer()
    x = jax.random.normal(jax.random.key(3), (2, 11, D), jnp.float64)
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    want, _ = layer(x, positions=positions)
    cache, outs, start = layer.init_cache(2).astype(jnp.float64), [], 0
    for n in (5, 1, 1, 4):  # the prompt holds the M encoder tokens
        out, cache = layer(x[:, start : start + n], cache, positions=positions[:, start : start + n], index=start)
        outs.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-9, atol=1e-12)
    # the state is the encoder state plus every token's φ(k)[v; 1]ᵀ: one more token by the formula
    proj = lambda name: jnp.einsum("btd,dhf->bthf", x, getattr(layer, name)[...])
    phi_k, v = pla.feature_map(proj("w_k")), proj("w_v")
    s = pla.encoder_state(pla.feature_map(proj("w_ke")), proj("w_ve"), pla.encoder_weights(positions * 0, M))
    s = s + jnp.einsum("bthf,bthv->bhfv", phi_k, jnp.concatenate([v, jnp.ones_like(v[..., :1])], -1))
    np.testing.assert_allclose(cache, s, rtol=1e-9)


def test_the_chunkwise_kernel_in_interpret_mode_equals_the_reference_with_gradients():
    x = jax.random.normal(jax.random.key(4), (1, 16, D))
    positions = jnp.arange(16)[None]
    segments = jnp.array([[1] * 10 + [2] * 6], jnp.int32)

    def loss(layer):
        y, _ = layer(x, positions=positions, segment_ids=segments)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

    results = {}
    for impl in ("xla", "interpret"):
        layer = _layer(impl=impl, chunk_size=8)
        results[impl] = (loss(layer), nnx.grad(loss)(layer))
    np.testing.assert_allclose(results["interpret"][0], results["xla"][0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(results["interpret"][1]), jax.tree.leaves(results["xla"][1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    assert float(jnp.abs(nnx.state(results["xla"][1])["w_ke"][...]).max()) > 0  # the encoder gets gradients


def test_baseconv_streams_and_isolates_documents():
    conv = pla.BaseConv(D, taps=3, init_std=0.5, out_std=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 9, D))
    full, _ = conv(x)
    first, cache = conv(x[:, :4], conv.init_cache(2))
    rest, _ = conv(x[:, 4:], cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-5)
    segments = jnp.array([[1] * 4 + [2] * 5] * 2)
    packed, _ = conv(x, segment_ids=segments)
    alone, _ = conv(x[:, 4:])
    np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-5)


def test_a_left_padded_prompt_equals_the_prompt_alone(x64):
    """JRT-Prompt pads on the left: the padding writes nothing and the first real document is the encoder's."""
    layer = _layer()
    x = jax.random.normal(jax.random.key(6), (1, 9, D), jnp.float64)
    segments = jnp.array([[0, 0, 0] + [1] * 6], jnp.int32)
    positions = jnp.array([[0, 0, 0] + list(range(6))], jnp.int32)
    padded, _ = layer(x, positions=positions, segment_ids=segments)
    alone, _ = layer(x[:, 3:], positions=positions[:, 3:])
    np.testing.assert_allclose(padded[:, 3:], alone, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(pla.encoder_weights(pla.documents(positions, segments), M, None, segments),
                                  [[0, 0, 0, 1, 1, 1, 1, 0, 0]])  # fmt: skip


def test_on_gpu_features_and_values_are_padded_to_powers_of_two_and_lower_to_triton():
    """Triton needs powers of two >= 16: the zero padding changes nothing (interpret mode as the GPU path), and the
    layer at the paper's feature dim 16 (280 features -> 512) lowers to the Triton kernels, forward and backward."""
    from kernels_pallas import common

    x = jax.random.normal(jax.random.key(7), (1, 12, D))
    positions = jnp.arange(12)[None]
    want, _ = _layer(impl="xla")(x, positions=positions)
    with common.tracing_for("gpu"):
        got, _ = _layer(impl="interpret")(x, positions=positions)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    layer = pla.PrefixLinearAttention(64, 2, 16, 32, prefix_len=32, chunk_size=32, impl="pallas", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x, positions=jnp.arange(64)[None])
        return jnp.sum(y.astype(jnp.float32) ** 2)

    text = common.lower_for(jax.grad(loss), [params, jax.ShapeDtypeStruct((1, 64, 64), jnp.bfloat16)], ("cuda",))
    assert text.as_text().count("custom_call @__gpu$xla.gpu.triton") == 4

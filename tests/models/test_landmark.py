"""Landmark attention in the transformer (`attention.impl=landmark`): landmark_impl=pallas == xla (dense) through
the whole model, decode token by token across block boundaries == the parallel form, and the config refusals. The
protocol checks (decode in pieces, causality, packed documents, sharding, golden names, presets, learning, TPU
compile) run for it as the `landmark` variant in test_protocol.py; the grouped softmax's oracles are in
tests/layers and tests/kernels_pallas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.errors import ConfigError
from lcjax.layers import landmark_attention as la

MODEL = {"name": "transformer", "vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
MODEL |= {"mlp_dim": 64}


def _model(num_layers=2, **attention):
    config = from_dict(
        {"model": MODEL | {"num_layers": num_layers, "attention": {"impl": "landmark", "mem_freq": 3} | attention}}
    )
    config.validate(device_count=8)
    return models.build(config, nnx.Rngs(0))


def test_the_kernel_equals_the_dense_form_in_the_model_logits_and_gradients():
    tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, 64)
    segments = jnp.array([[1] * 40, [1] * 17 + [2] * 23])
    batch = {"inputs": tokens, "segment_ids": segments}
    loss = lambda model: jnp.mean(model(batch)[0] ** 2)
    logits, grads = {}, {}
    for impl in ("pallas", "xla"):
        model = _model(1, mem_freq=15, landmark_impl=impl)
        logits[impl], grads[impl] = model(batch)[0], nnx.grad(loss)(model)
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=1e-5, rtol=0)
    flat = {impl: jax.tree.leaves(nnx.state(g, nnx.Param)) for impl, g in grads.items()}
    for a, b in zip(flat["pallas"], flat["xla"], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
    assert float(jnp.abs(grads["xla"].landmark[...]).max()) > 0  # the landmark embedding trains


def test_decode_one_token_at_a_time_equals_the_parallel_form_across_blocks():
    model = _model()
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 64)
    want = model({"inputs": tokens})[0]
    decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    cache, got = model.init_cache(2, 13), []
    for t in range(13):
        out, cache = decode(model, tokens[:, t : t + 1], cache)
        got.append(out)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, atol=1e-5, rtol=0)
    assert int(cache["index"]) == 13
    # the cache holds the landmarks' keys too: 13 tokens are 16 slots (4 landmarks), all written
    k = cache["layers"]["k"]
    assert k.shape[2] >= 17 and float(jnp.abs(k[:, :, :17]).min(axis=(0, 1, 3, 4)).min()) > 0


@pytest.mark.parametrize(
    "attention, model, mesh, field",
    [
        ({"mem_freq": 0}, {}, {}, "model.attention.mem_freq"),
        ({"mem_freq": 50, "landmark_impl": "pallas"}, {}, {}, "model.attention.mem_freq"),
        ({"landmark_impl": "triton"}, {}, {}, "model.attention.landmark_impl"),
        ({}, {}, {"sequence": 2, "data": 4}, "mesh.sequence"),
        ({}, {"position_embedding": "learned", "max_seq_len": 4096}, {}, "model.position_embedding"),
    ],
)
def test_bad_configs_name_their_field(attention, model, mesh, field):
    values = {"model": MODEL | model | {"attention": {"impl": "landmark", "mem_freq": 3} | attention}}
    with pytest.raises(ConfigError) as error:
        from_dict(values | ({"mesh": mesh} if mesh else {})).validate(device_count=8)
    assert error.value.field == field, str(error.value)


def test_the_mem_freq_the_kernel_takes_depends_on_the_platform():
    """mem_freq 50 (blocks of 51): no TPU tile of <= 1024 slots holds whole blocks, the GPU kernel pads them to 64;
    300 is past the GPU kernel's 256-slot blocks."""
    from kernels_pallas import common

    values = lambda f: {"model": MODEL | {"attention": {"impl": "landmark", "mem_freq": f, "landmark_impl": "pallas"}}}
    with common.tracing_for("gpu"):
        from_dict(values(50)).validate(device_count=8)
        with pytest.raises(ConfigError, match="at most 256"):
            from_dict(values(300)).validate(device_count=8)
    with pytest.raises(ConfigError, match="lcm"):
        from_dict(values(50)).validate(device_count=8)


def test_mem_freq_50_runs_on_the_dense_form():  # the paper's lm_benchmark setting: blocks of 51 slots
    model = _model(mem_freq=50)
    tokens = jax.random.randint(jax.random.key(3), (1, 120), 0, 64)
    assert np.isfinite(np.asarray(model({"inputs": tokens})[0])).all()


@pytest.mark.parametrize("mode", ["per_token_and_head", "max_over_tokens"])
def test_decode_with_top_k_over_every_block_equals_the_parallel_form_and_fewer_blocks_differ(mode):
    """22 tokens are 29 slots, 7 blocks: k = 7 (and k = 100, clamped) retrieves every block at its own position,
    which is the training form; k = 2 reads less and differs."""
    tokens = jax.random.randint(jax.random.key(1), (2, 22), 0, 64)
    want = _model()({"inputs": tokens})[0]

    def decoded(top_k, pieces):
        model = _model(retrieval_top_k=top_k, retrieval_mode=mode)
        decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
        cache, outs, start = model.init_cache(2, 22), [], 0
        for n in pieces:
            out, cache = decode(model, tokens[:, start : start + n], cache)
            outs.append(out)
            start += n
        return jnp.concatenate(outs, axis=1)

    for top_k in (7, 100) if mode == "per_token_and_head" else (100,):
        np.testing.assert_allclose(decoded(top_k, (5, 1, 16)), want, atol=1e-5, rtol=0)
    fewer = decoded(2, (5, 1, 16))
    if mode == "per_token_and_head":  # tokens 0-8 (slots <= 11) have at most 2 earlier blocks: k = 2 is all of them
        np.testing.assert_allclose(fewer[:, :9], want[:, :9], atol=1e-5, rtol=0)
    # (max_over_tokens picks one set for a whole piece: tokens 6-8 share the 16-token piece's set)
    assert float(jnp.abs(fewer[:, 9:] - want[:, 9:]).max()) > 1e-3


@pytest.mark.parametrize("mode", ["per_token_and_head", "max_over_tokens"])
def test_the_host_offloaded_cache_decodes_as_the_device_cache_and_keeps_only_landmark_keys_on_device(mode):
    """56 tokens (23 blocks of L = 4 slots) in ragged pieces (5, 1, 16), then token by token, with k = 2: the
    offloaded cache (keys and values in pinned_host memory, each layer fetching the blocks its queries chose) gives
    the device cache's logits, and the device holds only the landmark keys (1/L of the keys). Token by token each
    call fetches fewer blocks than the cache holds, so the compacted block rows are what is read."""
    length, pieces = 56, (5, 1, 16) + (1,) * 34
    tokens = jax.random.randint(jax.random.key(1), (2, length), 0, 64)

    def decoded(offload):
        model = _model(retrieval_top_k=2, retrieval_mode=mode, offload_cache=offload)
        decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
        cache, outs, start = model.init_cache(2, length), [], 0
        for n in pieces:
            out, cache = decode(model, tokens[:, start : start + n], cache)
            outs.append(out)
            start += n
        return jnp.concatenate(outs, axis=1), cache

    want, device_cache = decoded(False)
    got, host_cache = decoded(True)
    layers = host_cache["layers"]
    num_blocks = layers["k"].shape[2] // 4
    # one token is a chunk of 2 slots: 2 * 4 heads * k (or 4 * k once per chunk) + own blocks < every block
    assert la.fetch_budget(2, MODEL["num_heads"], 2, 4, num_blocks, mode) < num_blocks
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert layers["k"].sharding.memory_kind == layers["v"].sharding.memory_kind == "pinned_host"
    assert layers["lm"].sharding.memory_kind == "device"
    np.testing.assert_array_equal(layers["k"], device_cache["layers"]["k"])  # the same keys, in host memory
    assert layers["lm"].shape[2] == num_blocks  # one landmark key per block
    np.testing.assert_array_equal(layers["lm"], device_cache["layers"]["k"][:, :, 3::4])


def test_offload_cache_needs_landmark_retrieval():
    with pytest.raises(ConfigError, match="model.attention.offload_cache"):
        attention = {"impl": "landmark", "mem_freq": 3, "offload_cache": True}
        from_dict({"model": MODEL | {"attention": attention}}).validate(device_count=8)
    with pytest.raises(ConfigError, match="model.attention.offload_cache"):
        from_dict({"model": MODEL | {"attention": {"impl": "xla", "offload_cache": True}}}).validate(device_count=8)

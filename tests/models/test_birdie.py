"""Birdie's Hawk and Gated-SSM stacks with a bidirectional prefix (reference/xlstm_ssm_birdie_jrt.md §5.1 item 8,
through the whole model): the suffix stays causal, the prefix is read both ways, a packed sample never sees another,
and a row without a prefix is the causal model. The family's protocol checks (decode in pieces == parallel, packed
documents, sharding, names, presets, learning, TPU compile) run in test_protocol.py; the scans' oracles are in
tests/layers/test_rglru.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.errors import ConfigError
from lcjax.eval import generate as generation

MODEL = {"name": "birdie", "vocab_size": 64, "d_model": 32, "num_layers": 2, "num_gate_blocks": 2}


def _model(mixer):
    config = from_dict({"model": MODEL | {"mixer": mixer, "lru_width": 32}})
    config.validate(device_count=8)
    return models.build(config, nnx.Rngs(0))


def _forward(mixer):
    model = _model(mixer)
    return lambda batch: nnx.jit(lambda m, b: m(b)[0])(model, batch)


@pytest.mark.parametrize("mixer", ["hawk", "gated_ssm"])
def test_the_prefix_is_bidirectional_the_suffix_causal_and_packed_samples_isolated(mixer):
    """Row: sample 1 = tokens 0-7 (prefix 0-3), sample 2 = tokens 8-13 (prefix 8-9)."""
    forward = _forward(mixer)
    tokens = jax.random.randint(jax.random.key(0), (1, 14), 0, 64)
    segments = jnp.array([[1] * 8 + [2] * 6], jnp.int32)
    positions = jnp.array([list(range(8)) + list(range(6))], jnp.int32)
    prefix = jnp.array([[1] * 4 + [0] * 4 + [1] * 2 + [0] * 4], jnp.int32)
    batch = {"inputs": tokens, "segment_ids": segments, "positions": positions, "prefix_mask": prefix}
    base = forward(batch)

    def diff(t, **change):
        out = forward(batch | {"inputs": tokens.at[:, t].set((tokens[:, t] + 1) % 64)} | change)
        return jnp.abs(out - base)[0].max(-1)

    d = diff(6)  # a suffix token: nothing before it moves
    assert float(d[:6].max()) == 0.0 and float(d[6]) > 1e-4
    d = diff(2)  # a prefix token: earlier prefix positions move (the reverse half), the other sample does not
    assert float(d[:2].min()) > 1e-5 and float(d[8:].max()) == 0.0
    d = diff(9)  # sample 2's prefix reaches its own earlier prefix token, never sample 1
    assert float(d[8]) > 1e-5 and float(d[:8].max()) == 0.0
    # no prefix_mask == an all-zero one (every position causal): the causal model
    causal = {k: v for k, v in batch.items() if k != "prefix_mask"}
    want = forward(batch | {"prefix_mask": jnp.zeros_like(prefix)})
    np.testing.assert_allclose(forward(causal), want, atol=1e-6, rtol=0)
    later = forward(causal | {"inputs": tokens.at[:, 2].set((tokens[:, 2] + 1) % 64)})
    assert float(jnp.abs(later - want)[0, :2].max()) == 0.0  # causal: token 2 reaches nothing before it


def test_bad_birdie_configs_name_their_field():
    for model, field in (
        ({"mixer": "lstm"}, "model.mixer"),
        ({"num_layers": 3}, "model.num_layers"),
        ({"num_gate_blocks": 5}, "model.num_gate_blocks"),
        ({"scan_impl": "fast"}, "model.scan_impl"),
    ):
        with pytest.raises(ConfigError, match=field):
            from_dict({"model": MODEL | model}).validate(device_count=8)


@pytest.mark.parametrize("mixer", ["hawk", "gated_ssm"])
def test_prefill_reads_the_prefix_both_ways_then_decode_goes_on_causally(mixer):
    """prefill(prompt, prefix_len) then decode in pieces == the parallel form with that prefix_mask."""
    model = _model(mixer)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    prefix = jnp.broadcast_to(jnp.arange(12) < 5, (2, 12)).astype(jnp.int32)
    want = nnx.jit(lambda m, b: m(b)[0])(model, {"inputs": tokens, "prefix_mask": prefix})
    logits, cache = nnx.jit(lambda m, t: m.prefill(t, 5))(model, tokens[:, :7])
    step = nnx.jit(lambda m, t, c: m.decode(t, c))
    one, cache = step(model, tokens[:, 7:8], cache)
    rest, cache = step(model, tokens[:, 8:], cache)
    np.testing.assert_allclose(jnp.concatenate([logits, one, rest], 1), want, atol=2e-5, rtol=0)
    assert int(cache["index"]) == 12
    # the prefix is read both ways: the all-causal model differs at the prefix, and prefix_len 0 is that model
    causal, _ = step(model, tokens[:, :7], model.init_cache(2))
    assert float(jnp.abs(causal - logits)[:, :5].max()) > 1e-4
    np.testing.assert_allclose(nnx.jit(lambda m, t: m.prefill(t, 0))(model, tokens[:, :7])[0], causal, atol=2e-5)
    # generation from a bidirectional prompt: greedy tokens are the parallel form's argmax, step by step
    graphdef, params = nnx.split(model)
    new = generation.generate(
        graphdef, params, tokens[:, :7], jax.random.key(0), max_new_tokens=2, temperature=0.0, top_p=1.0, prefix_len=5
    )
    np.testing.assert_array_equal(new[:, 0], jnp.argmax(logits[:, -1], -1))
    row = jnp.concatenate([tokens[:, :7], new[:, :1]], 1)
    full = nnx.jit(lambda m, b: m(b)[0])(model, {"inputs": row, "prefix_mask": prefix[:, :8]})
    np.testing.assert_array_equal(new[:, 1], jnp.argmax(full[:, -1], -1))
    with pytest.raises(ValueError, match="prefix_len must be in"):
        model.prefill(tokens[:, :5], 5)  # no start-generating token after the prefix

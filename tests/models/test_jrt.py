"""JRT-RNN through the whole model (reference/xlstm_ssm_birdie_jrt.md §4.2–4.3): the encoder's tokens are read both
ways and the rest causally, a `prefix_mask` names the encoder's tokens instead of the first M, the paper's
objective (next token past the encoder plus the masked-token loss on it) as a pure function of the batch, eval
scores past the encoder only, and bad configs exit 2 with one line. The protocol checks (decode in pieces ==
parallel, packed documents, sharding, names, presets, learning, TPU compile) run in test_protocol.py; the layer's
float64 oracles are in tests/layers/test_prefix_linear_attention.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.errors import ConfigError
from tests.conftest import run_main

MODEL = {"name": "jrt", "vocab_size": 64, "d_model": 32, "num_layers": 3, "layer_pattern": "cpw", "num_heads": 2}
MODEL |= {"num_kv_heads": 2, "feature_dim": 4, "prefix_len": 4, "window": 4, "chunk_size": 4}


def test_the_encoder_reads_its_tokens_both_ways_and_the_rest_is_causal():
    config = from_dict({"model": MODEL | {"init_std": 0.2}})
    config.validate(device_count=8)
    model = models.build(config, nnx.Rngs(0))
    forward = nnx.jit(lambda m, b: m(b)[0])
    tokens = jax.random.randint(jax.random.key(0), (1, 10), 0, 63)
    base = forward(model, {"inputs": tokens})

    def diff(t, **fields):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % 63)
        return jnp.abs(forward(model, {"inputs": changed, **fields}) - forward(model, {"inputs": tokens, **fields}))[
            0
        ].max(-1)

    d = diff(2)  # an encoder token (M = 4) reaches the positions before it
    assert float(d[:2].min()) > 1e-6
    d = diff(6)  # past the encoder: causal
    assert float(d[:6].max()) == 0.0 and float(d[6]) > 1e-6
    prefix = jnp.array([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)  # a prefix_mask of 7 replaces the first M = 4
    d = diff(6, prefix_mask=prefix)
    assert float(d[:6].min()) > 1e-6
    assert float(jnp.abs(forward(model, {"inputs": tokens, "prefix_mask": prefix}) - base).max()) > 1e-5


def test_the_objective_is_next_token_past_the_encoder_plus_the_masked_token_loss():
    config = from_dict({"model": MODEL | {"prefix_len": 32}}).model
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 60, (8, 48)).astype(np.int32)
    batch = {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "loss_mask": np.ones((8, 48), np.float32),
        "segment_ids": np.ones((8, 48), np.int32),
        "positions": np.broadcast_to(np.arange(48), (8, 48)).copy(),
    }
    out = config.train_batch(batch)
    again = config.train_batch(batch)
    for key in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(out[key], again[key])  # a pure function of the batch
    chosen = out["inputs"] != inputs
    assert not chosen[:, 32:].any()  # only encoder tokens are masked ...
    assert 0.08 < chosen[:, :32].mean() < 0.22  # ... about 15% of them
    np.testing.assert_array_equal(out["inputs"][chosen], 63)  # with the mask token (vocab_size − 1)
    np.testing.assert_array_equal(out["targets"][chosen], inputs[chosen])  # predicted at their own position
    np.testing.assert_array_equal(out["loss_mask"][chosen], 0.25)
    # no next token where the encoder reads the target: positions 0..30 (31's target, token 32, is not encoded)
    np.testing.assert_array_equal(out["loss_mask"][:, :31][~chosen[:, :31]], 0.0)
    np.testing.assert_array_equal(out["loss_mask"][:, 31][~chosen[:, 31]], 1.0)
    np.testing.assert_array_equal(out["loss_mask"][:, 32:], 1.0)
    np.testing.assert_array_equal(out["targets"][:, 32:], batch["targets"][:, 32:])
    # a second packed document has no encoder: its next-token loss stays; eval drops what the encoder reads
    packed = batch | {"segment_ids": np.array([[1] * 16 + [2] * 32] * 8, np.int32)}
    packed["positions"] = np.array([list(range(16)) + list(range(32))] * 8, np.int32)
    mask = config.eval_loss_mask(packed)
    np.testing.assert_array_equal(mask[:, :15], 0.0)
    np.testing.assert_array_equal(mask[:, 15:], 1.0)  # 15's target starts the second document
    off = from_dict({"model": MODEL | {"prefix_len": 32, "mlm_weight": 0.0}}).model.train_batch(batch)
    np.testing.assert_array_equal(off["inputs"], inputs)


def test_bad_jrt_configs_name_their_field():
    for model, field in (
        ({"feature_dim": 0}, "model.feature_dim"),
        ({"layer_pattern": "cpx"}, "model.layer_pattern"),
        ({"num_layers": 4}, "model.num_layers"),
        ({"mlm_rate": 1.5}, "model.mlm_rate"),
        ({"mask_token": 64}, "model.mask_token"),
        ({"pla_impl": "fast"}, "model.pla_impl"),
    ):
        with pytest.raises(ConfigError, match=field):
            from_dict({"model": MODEL | model}).validate(device_count=8)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.model.prefix_len=32", "model.prefix_len=32 must be in [1, train.seq_len=32)"),
        ("--config.model.feature_dim=0", "model.feature_dim: must be a positive integer, got 0"),
    ],
)
def test_bad_jrt_flags_exit_2_with_one_line(override, expected, tmp_path):
    result = run_main(
        "--config=configs/jrt.py:tiny",
        "--config.train.seq_len=32",
        "--config.train.steps=1",
        override,
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "run").exists()

"""Task scoring through `decode` (`lcjax.eval.decode_tasks`) == the parallel form's `eval_sums`, for a KV-cache
transformer and for landmark attention with top-k >= every block (where retrieval is the training form; its cache
on the device or offloaded to host memory), with
answers that straddle two decode pieces; and top-k below the block count scores something else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.eval.decode_tasks import decode_sums
from lcjax.eval.perplexity import summarize
from lcjax.train.step import eval_sums

MODEL = {"name": "transformer", "vocab_size": 32, "d_model": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
MODEL |= {"mlp_dim": 32}
LENGTH = 24


def _model(**attention):
    config = from_dict({"model": MODEL | ({"attention": attention} if attention else {})})
    graphdef, state = nnx.split(models.build(config, nnx.Rngs(0)))
    keys = iter(jax.random.split(jax.random.key(4), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(next(keys), a.shape), state)
    return graphdef, nnx.to_pure_dict(state)


def _batch(graphdef, params):
    """Three rows; answers of 3 tokens at 5..7 (inside a piece), 9..11 (across the piece boundary at 10) and
    20..22. Targets are the model's own argmax except where flipped, so some answers are right and some wrong."""
    inputs = jax.random.randint(jax.random.key(1), (3, LENGTH), 0, 32)
    logits = nnx.merge(graphdef, params)({"inputs": inputs})[0]
    targets = np.array(jnp.argmax(logits, axis=-1), np.int32)
    mask = np.zeros((3, LENGTH), np.float32)
    for lo in (5, 9, 20):
        mask[:, lo : lo + 3] = 1
    targets[0, 10] = (targets[0, 10] + 1) % 32  # row 0: the straddling answer wrong
    targets[1, 21] = (targets[1, 21] + 1) % 32  # row 1: the last answer wrong
    return {"inputs": np.asarray(inputs), "targets": targets, "loss_mask": mask}, logits


@pytest.mark.parametrize(
    "attention",
    [
        {},
        {"impl": "landmark", "mem_freq": 3, "retrieval_top_k": 8},
        {"impl": "landmark", "mem_freq": 3, "retrieval_top_k": 8, "offload_cache": True},
    ],
    ids=["kv-cache", "landmark-top-k-all-blocks", "landmark-host-offloaded"],
)
def test_decode_scoring_equals_the_parallel_form(attention):
    graphdef, params = _model(**attention)
    batch, logits = _batch(graphdef, params)
    parallel = summarize(
        [jax.device_get(eval_sums(logits, {k: jnp.asarray(v) for k, v in batch.items()}))],
        tokens_are_bytes=False,
        task=True,
    )
    sums, info = decode_sums(graphdef, params, [batch], piece=10)
    decoded = summarize(sums, tokens_are_bytes=False, task=True)
    assert parallel["answer_accuracy"] == pytest.approx(7 / 9) and parallel["example_accuracy"] == pytest.approx(1 / 3)
    for key in ("answer_accuracy", "token_accuracy", "example_accuracy", "nonfinite_fraction"):
        assert decoded[key] == parallel[key], key
    np.testing.assert_allclose(decoded["loss"], parallel["loss"], rtol=1e-5)
    assert info["state_bytes"] > 0 and info["state_bytes_per_token"] == info["state_bytes"] / (3 * LENGTH)
    if attention.get("offload_cache"):  # on the device: the landmark keys, 1/(2L) of keys and values, and the index
        assert info["device_state_bytes"] < info["state_bytes"] / 8
    else:
        assert info["device_state_bytes"] == info["state_bytes"]


def test_top_k_below_the_block_count_is_another_inference():
    graphdef, params = _model(impl="landmark", mem_freq=3, retrieval_top_k=1)
    batch, _ = _batch(graphdef, params)
    all_blocks = _model(impl="landmark", mem_freq=3, retrieval_top_k=8)[0]
    one = summarize(decode_sums(graphdef, params, [batch], piece=10)[0], tokens_are_bytes=False, task=True)
    every = summarize(decode_sums(all_blocks, params, [batch], piece=10)[0], tokens_are_bytes=False, task=True)
    assert abs(one["loss"] - every["loss"]) > 1e-4
    with pytest.raises(ValueError, match="piece=0"):
        decode_sums(graphdef, params, [batch], piece=0)

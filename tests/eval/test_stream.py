"""Streaming perplexity (`lcjax.eval.stream`): a stream read piece by piece through `decode` scores exactly what
the parallel form scores on the same tokens, for a fixed-state model (HMT, past FIFO eviction) and a KV-cache one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.eval.stream import default_piece, stream_perplexity
from tests.conftest import make_config

HMT = {
    "name": "hmt",
    "backbone": {
        "name": "transformer",
        "vocab_size": 64,
        "d_model": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "mlp_dim": 32,
    },
    "segment_len": 4,
    "sensory_tokens": 2,
    "cache_size": 2,
}


def _parallel_nll(model, tokens):
    logits = model({"inputs": jnp.asarray(tokens[:-1])[None]})[0][0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens[1:])[:, None], axis=1)[:, 0], np.float64)


@pytest.mark.parametrize(
    ("model_config", "piece"),
    [(HMT, 8), (None, 5)],
    ids=["hmt-two-segment-pieces", "transformer-kv-cache"],
)
def test_the_stream_scores_what_the_parallel_form_scores(model_config, piece):
    config = from_dict({"model": model_config}) if model_config else make_config()
    model = models.build(config, nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (41,), 0, 64))  # 40 inputs: 10 HMT segments
    seen = []
    result = stream_perplexity(
        *nnx.split(model), tokens, piece=piece, tokens_are_bytes=True, on_piece=lambda n, loss: seen.append(n)
    )
    nll = _parallel_nll(model, tokens)[: result["tokens"]]
    assert result["tokens"] == 40 // piece * piece and seen == list(range(piece, result["tokens"] + 1, piece))
    np.testing.assert_allclose(result["loss"], nll.mean(), rtol=1e-5)
    assert math.isclose(result["bits_per_byte"], result["loss"] / math.log(2))
    np.testing.assert_allclose(result["loss_pos/0-0"], nll[0], rtol=1e-5)
    np.testing.assert_allclose(result["loss_pos/16-31"], nll[16:32].mean(), rtol=1e-5)
    sizes = [sum(a.nbytes for a in jax.tree.leaves(model.init_cache(1, n))) for n in (40, 4000)]
    assert result["state_bytes"] == sizes[0]
    if model_config:  # HMT's state is fixed (cache, one segment, sensory slots) however long the stream
        assert sizes[1] == sizes[0]
    else:  # a KV cache is sized for the stream
        assert sizes[1] > 50 * sizes[0]


def test_default_piece_is_the_segment():
    assert default_piece(from_dict({"model": HMT}).model) == 4
    assert default_piece(make_config().model) == 256

"""Streaming perplexity: one long token stream fed through a model's recurrent form (`init_cache` / `decode`) a
piece at a time, the way a deployed model reads an unbounded document.

Every model of the protocol streams. What the state costs depends on the family: a recurrent one (HMT, xLSTM,
Mamba-2, Titans) carries a fixed-size state, so memory stays flat however many tokens were read; a KV-cache
model's cache is sized for the whole stream. `eval.stream_tokens` in `--mode=eval` runs it on the validation split
(`lcjax/experiments/inference.py`); `scripts/bench_hmt_stream.py` measures memory and time per token with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def default_piece(model_config: Any) -> int:
    """The piece length `eval.stream_piece=0` stands for: the model's segment length if it has one, else 256."""
    return int(getattr(model_config, "segment_len", 0) or 256)


def _bucket(positions: np.ndarray) -> np.ndarray:
    """Position bucket of `lcjax.eval.perplexity.evaluate`: 0 -> 0, [2^(b-1), 2^b - 1] -> b."""
    return np.where(positions == 0, 0, np.floor(np.log2(np.maximum(positions, 1))).astype(np.int64) + 1)


def stream_perplexity(
    graphdef: Any,
    params: Any,
    tokens: np.ndarray,
    *,
    piece: int,
    tokens_are_bytes: bool,
    on_piece: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Streams `tokens` [n + 1] (int) through `decode` in pieces of `piece` tokens, scoring each next token.

    Reads the largest multiple of `piece` that leaves a target for every input (`tokens` is the number scored).
    Returns the mean NLL (nats) `loss`, `perplexity`, `bits_per_byte` (byte tokens), the loss by absolute stream
    position (`loss_pos/<lo>-<hi>`, the buckets of `evaluate`), `ms_per_token` after the first (compiling) piece,
    and `state_bytes`, the size of the streaming state. `on_piece(tokens_read, mean_loss_so_far)` is called after
    every piece (progress for long streams)."""
    tokens = np.asarray(tokens, np.int32)
    count = (tokens.shape[0] - 1) // piece * piece
    if count <= 0:
        raise ValueError(f"need more than {piece} tokens to stream pieces of {piece}, got {tokens.shape[0]}")

    def step(params, cache, inputs, targets):
        model = nnx.merge(graphdef, params)
        logits, cache = model.decode(inputs[None], cache)
        logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, targets[:, None], axis=1)[:, 0], cache

    step = jax.jit(step, donate_argnums=1)
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(1, count, jnp.float32)
    state_bytes = int(sum(np.dtype(a.dtype).itemsize * a.size for a in jax.tree.leaves(cache)))
    buckets = int(_bucket(np.asarray([count - 1]))[0]) + 1
    bucket_nll, bucket_tokens = np.zeros(buckets), np.zeros(buckets)
    total, began, first_s = 0.0, time.perf_counter(), 0.0
    for start in range(0, count, piece):
        nll, cache = step(params, cache, tokens[start : start + piece], tokens[start + 1 : start + piece + 1])
        nll = np.asarray(jax.device_get(nll), np.float64)
        where = _bucket(np.arange(start, start + piece))
        np.add.at(bucket_nll, where, nll)
        np.add.at(bucket_tokens, where, 1.0)
        total += float(nll.sum())
        if start == 0:
            first_s, began = time.perf_counter() - began, time.perf_counter()
        if on_piece is not None:
            on_piece(start + piece, total / (start + piece))
    steady_s = time.perf_counter() - began
    loss = total / count
    result: dict[str, Any] = {
        "tokens": count,
        "piece": piece,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "ms_per_token": 1000 * steady_s / max(1, count - piece),
        "first_piece_s": first_s,
        "state_bytes": state_bytes,
    }
    if tokens_are_bytes:
        result["bits_per_byte"] = loss / math.log(2)
    for b in range(buckets):
        if bucket_tokens[b]:
            lo, hi = (0, 0) if b == 0 else (2 ** (b - 1), 2**b - 1)
            result[f"loss_pos/{lo}-{hi}"] = float(bucket_nll[b] / bucket_tokens[b])
    return result

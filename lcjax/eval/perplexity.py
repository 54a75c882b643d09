"""Validation loss, perplexity and bits per byte over a fixed set of batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def evaluate(
    eval_step: Callable,
    params: Any,
    batches: Sequence[dict[str, Any]],
    device_batch: Callable,
    *,
    tokens_are_bytes: bool,
) -> dict[str, float]:
    """Mean next-token NLL (nats) over every unmasked target of `batches`, plus perplexity and bits/byte."""
    totals = [eval_step(params, device_batch(b)) for b in batches]
    totals = jax.device_get(totals)
    nll = sum(float(t["nll_sum"]) for t in totals)
    tokens = sum(float(t["tokens"]) for t in totals)
    loss = nll / max(tokens, 1.0)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    if tokens_are_bytes:
        result["bits_per_byte"] = loss / math.log(2)
    return result


def unigram_entropy_bits(tokens: np.ndarray) -> float:
    """Entropy (bits per token) of the empirical unigram distribution of `tokens`."""
    counts = np.bincount(np.asarray(tokens).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())

"""Validation loss, perplexity, bits per byte, loss by position and task accuracy over a fixed set of batches."""

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
    task: bool = False,
) -> dict[str, float]:
    """Mean next-token NLL (nats) over every unmasked target of `batches`, perplexity, bits/byte (byte tokens),
    and the loss by position bucket (`loss_pos/<lo>-<hi>`: positions lo..hi). With `task`, also the accuracies
    of `lcjax.train.step.eval_sums`: answer_accuracy (the task score: exact match of each answer), token_accuracy
    and example_accuracy (every answer of an example right), and nonfinite_fraction (examples with an inf/NaN
    logit at an answer: a diverging model, not a wrong guess)."""
    sums = jax.device_get([eval_step(params, device_batch(b)) for b in batches])
    return summarize(sums, tokens_are_bytes=tokens_are_bytes, task=task)


def summarize(sums: Sequence[dict[str, Any]], *, tokens_are_bytes: bool, task: bool = False) -> dict[str, float]:
    """`evaluate`'s metrics from per-batch `eval_sums` (from the parallel form, or `lcjax.eval.decode_tasks`)."""
    total = {k: sum(np.asarray(s[k], np.float64) for s in sums) for k in sums[0]}
    tokens = float(total["tokens"])
    loss = float(total["nll_sum"]) / max(tokens, 1.0)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    if tokens_are_bytes and not task:
        result["bits_per_byte"] = loss / math.log(2)
    if task:
        result["answer_accuracy"] = float(total["answers_correct"]) / max(float(total["answers"]), 1.0)
        result["token_accuracy"] = float(total["correct_tokens"]) / max(tokens, 1.0)
        result["example_accuracy"] = float(total["examples_correct"]) / max(float(total["examples"]), 1.0)
        result["nonfinite_fraction"] = float(total["examples_nonfinite"]) / max(float(total["examples"]), 1.0)
    for b, (nll, count) in enumerate(zip(total["bucket_nll"], total["bucket_tokens"], strict=True)):
        if count > 0:
            lo, hi = (0, 0) if b == 0 else (2 ** (b - 1), 2**b - 1)
            result[f"loss_pos/{lo}-{hi}"] = float(nll) / float(count)
    return result


def unigram_entropy_bits(tokens: np.ndarray) -> float:
    """Entropy (bits per token) of the empirical unigram distribution of `tokens`."""
    counts = np.bincount(np.asarray(tokens).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())

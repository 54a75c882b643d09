"""Task scoring through a model's recurrent form: every row of an evaluation batch is fed through `init_cache` /
`decode` a piece at a time (teacher-forced, as `--mode=eval` scores the parallel form), and the predictions at the
answer positions are scored with the same sums as `lcjax.train.step.eval_sums`.

This is how a model is scored where its parallel form is not the inference it is judged by, or does not fit:
landmark attention with top-k block retrieval (`attention.retrieval_top_k`, the paper's inference), or any
KV-cache model at a context whose [S, S] scores would not fit in memory. Exact match under teacher forcing is
"greedy decoding reproduces the answer" (`eval_sums`' docstring), so a passkey scored here is a retrieval the
deployed model makes. Memory is reported as the decode state's bytes, total and per token of context.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _step(graphdef):
    def step(params, cache, inputs, targets):
        model = nnx.merge(graphdef, params)
        logits, cache = model.decode(inputs, cache)
        logits = logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        finite = jnp.isfinite(logits).all(axis=-1)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), nll, finite, cache

    return jax.jit(step, donate_argnums=1)


def batch_sums(predictions, nll, finite, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`lcjax.train.step.eval_sums` in numpy, from argmax predictions, NLLs and finiteness [B, T] (so answers that
    span two decode pieces count once)."""
    on = np.asarray(batch["loss_mask"]) > 0
    mask = on.astype(np.float64)
    correct = predictions == np.asarray(batch["targets"])
    wrong = on & ~correct
    starts = on & ~np.pad(on[:, :-1], ((0, 0), (1, 0)))
    answer_id = np.where(on, np.cumsum(starts, axis=1), 0)
    answers_wrong = sum(len(np.unique(answer_id[r][wrong[r]])) for r in range(on.shape[0]))
    rows = on.any(axis=1)
    length = on.shape[1]
    positions = np.broadcast_to(np.arange(length), on.shape)
    num_buckets = length.bit_length() + 1
    bucket = sum((positions >= 2**k).astype(np.int64) for k in range(num_buckets - 1))
    return {
        "nll_sum": float((nll * mask).sum()),
        "tokens": float(mask.sum()),
        "correct_tokens": float((correct & on).sum()),
        "answers": float(starts.sum()),
        "answers_correct": float(starts.sum() - answers_wrong),
        "examples": float(rows.sum()),
        "examples_correct": float((rows & ~wrong.any(axis=1)).sum()),
        "examples_nonfinite": float((on & ~finite).any(axis=1).sum()),
        "bucket_nll": np.bincount(bucket.ravel(), (nll * mask).ravel(), minlength=num_buckets),
        "bucket_tokens": np.bincount(bucket.ravel(), mask.ravel(), minlength=num_buckets),
    }


def cache_bytes(cache: Any, *, device_only: bool = False) -> int:
    """Bytes of a decode state; `device_only`: without the leaves in host memory (`pinned_host`)."""
    return int(
        sum(
            np.dtype(a.dtype).itemsize * a.size
            for a in jax.tree.leaves(cache)
            if not device_only or getattr(getattr(a, "sharding", None), "memory_kind", None) != "pinned_host"
        )
    )


def decode_sums(graphdef: Any, params: Any, batches: Sequence[dict[str, np.ndarray]], *, piece: int) -> tuple:
    """([sums per batch], info): every batch's rows decoded in pieces of `piece` tokens from an empty cache.
    info: `state_bytes` (the decode state for one batch at this length), `state_bytes_per_token` (per row and
    token of context), `device_state_bytes(_per_token)` (the part not in host memory), `ms_per_token`
    (per row, after the first compiling piece)."""
    if piece < 1:
        raise ValueError(f"decode piece={piece} must be >= 1")
    step = _step(graphdef)
    model = nnx.merge(graphdef, params)
    sums, state_bytes, device_bytes, steady_s, steady_tokens = [], 0, 0, 0.0, 0
    for batch in batches:
        inputs, targets = np.asarray(batch["inputs"], np.int32), np.asarray(batch["targets"], np.int32)
        if "segment_ids" in batch and np.any(
            np.asarray(batch["segment_ids"]) != np.asarray(batch["segment_ids"])[:, :1]
        ):
            raise ValueError("decode scoring reads one document per row; this batch packs several")
        rows, length = inputs.shape
        cache = model.init_cache(rows, length, jnp.float32)
        state_bytes, device_bytes = cache_bytes(cache), cache_bytes(cache, device_only=True)
        out = [], [], []
        for start in range(0, length, piece):
            began = time.perf_counter()
            pred, nll, finite, cache = step(
                params, cache, inputs[:, start : start + piece], targets[:, start : start + piece]
            )
            for acc, x in zip(out, jax.device_get((pred, nll, finite)), strict=True):
                acc.append(np.asarray(x))
            if start:  # the first piece compiles (and a ragged last piece compiles again: counted, it is rare)
                steady_s += time.perf_counter() - began
                steady_tokens += rows * min(piece, length - start)
        pred, nll, finite = (np.concatenate(x, axis=1) for x in out)
        sums.append(batch_sums(pred, nll.astype(np.float64), finite, batch))
    rows, length = np.asarray(batches[0]["inputs"]).shape
    info = {
        "state_bytes": state_bytes,
        "state_bytes_per_token": state_bytes / (rows * length),
        # what stays on the device (the host-offloaded landmark cache keeps only the landmark keys there)
        "device_state_bytes": device_bytes,
        "device_state_bytes_per_token": device_bytes / (rows * length),
        "ms_per_token": 1000 * steady_s / max(steady_tokens, 1),
        "piece": piece,
    }
    return sums, info

"""Training and evaluation batches as grain `MapDataset`s: the batch at step k is a pure function of (seed, k).

A stream of N tokens is cut into rows of `seq_len + 1` tokens starting every `seq_len` tokens (row r covers
[r*seq_len, (r+1)*seq_len]); the extra token supplies the last target. Documents are packed, not padded:
`segment_ids` number the documents inside a row from 1, `positions` restart at 0 at each document start, and
`loss_mask` is 0 where the target belongs to another document than the input.

Training shuffles rows with `seed` (a fresh permutation each epoch) and repeats; global batch k is rows
[k*B, (k+1)*B) of that order. Process p of P takes every P-th row, so its local batch is a fixed slice of the
global one whatever the host count, and resuming at step k is just indexing: nothing to checkpoint.
"""

from __future__ import annotations

import grain
import numpy as np

from lcjax.data.batch import device_fields
from lcjax.errors import ConfigError


def make_row(stream, row: int, seq_len: int) -> dict[str, np.ndarray]:
    tokens, starts = stream.read(row * seq_len, seq_len + 1)
    starts = starts.copy()
    starts[0] = True  # a row that begins mid-document starts a segment of its own
    segments = np.cumsum(starts, dtype=np.int32)
    index = np.arange(seq_len + 1, dtype=np.int32)
    last_start = np.maximum.accumulate(np.where(starts, index, 0))
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "segment_ids": segments[:-1],
        "positions": (index - last_start)[:-1],
        "loss_mask": (segments[1:] == segments[:-1]).astype(np.float32),
    }


def num_rows(stream, seq_len: int) -> int:
    return max(0, (stream.num_tokens - 1) // seq_len)


def _rows(stream, seq_len: int, split: str) -> grain.MapDataset:
    n = num_rows(stream, seq_len)
    if n == 0:
        raise ConfigError(
            "data", f"the {split} split has {stream.num_tokens} tokens, fewer than one row of seq_len+1={seq_len + 1}"
        )
    return grain.MapDataset.range(n)


def train_batches(
    stream, *, seq_len: int, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """Local batch for every step: `ds[k]` is this process's slice of global batch k (infinite length)."""
    local = global_batch // process_count
    rows = _rows(stream, seq_len, "train").shuffle(seed=seed).repeat()
    return rows[process_index::process_count].map(lambda r: make_row(stream, int(r), seq_len)).batch(local)


def eval_batches(
    stream, *, seq_len: int, global_batch: int, num_batches: int, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """A fixed validation set: `num_batches` batches of rows spread evenly over the eval stream."""
    n = _rows(stream, seq_len, "eval").__len__()
    wanted = num_batches * global_batch
    rows = (np.arange(wanted, dtype=np.int64) * n) // wanted if n >= wanted else np.arange(wanted) % n
    local = global_batch // process_count
    batches = []
    for b in range(num_batches):
        mine = rows[b * global_batch : (b + 1) * global_batch][process_index::process_count][:local]
        batches.append(_stack([make_row(stream, int(r), seq_len) for r in mine]))
    return batches


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def iterate_from(batches: grain.MapDataset, start_step: int, num_threads: int):
    """Iterator over `batches[start_step:]` with background prefetch."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, 2 * num_threads))
    return iter(batches[start_step:].to_iter_dataset(options))


def example_train_batches(
    examples, *, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """Like `train_batches` for a random-access source of whole examples (a synthetic task): `ds[k]` is this
    process's slice of global batch k, a pure function of (seed, k)."""
    if len(examples) < global_batch:
        raise ConfigError(
            "task.num_train_examples", f"={len(examples)} is smaller than one batch (train.batch_size={global_batch})"
        )
    local = global_batch // process_count
    order = grain.MapDataset.range(len(examples)).shuffle(seed=seed).repeat()
    return order[process_index::process_count].map(lambda i: device_fields(examples[int(i)])).batch(local)


def example_eval_batches(
    examples, *, global_batch: int, num_batches: int, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """A fixed evaluation set: examples 0 .. num_batches * global_batch - 1 of `examples`, in order."""
    local = global_batch // process_count
    batches = []
    for b in range(num_batches):
        mine = range(b * global_batch, (b + 1) * global_batch)[process_index::process_count][:local]
        batches.append(_stack([device_fields(examples[i]) for i in mine]))
    return batches

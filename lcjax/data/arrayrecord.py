"""ArrayRecord shards of a token stream, written by `scripts/prepare_data.py` and read with random access.

Layout of a prepared directory: `meta.json` ({"chunk_len", "vocab_size", "tokenizer", "max_token",
"num_tokens": {split: n}}) and `<split>-NNNNN.array_record` shards. Record i holds stream tokens
[i*chunk_len, (i+1)*chunk_len) as int32 `[2, chunk_len]`: row 0 the token ids, row 1 the document-start flags.
The last record of a split may be shorter.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from lcjax.errors import ConfigError


def encode_record(tokens: np.ndarray, doc_start: np.ndarray) -> bytes:
    return np.stack([tokens.astype(np.int32), doc_start.astype(np.int32)]).tobytes()


def decode_record(record: bytes) -> tuple[np.ndarray, np.ndarray]:
    rows = np.frombuffer(record, np.int32).reshape(2, -1)
    return rows[0], rows[1].astype(bool)


class ArrayRecordStream:
    def __init__(self, files: list[str], chunk_len: int, num_tokens: int, max_token: int):
        import grain

        self._source = grain.sources.ArrayRecordDataSource(files)
        self.chunk_len = chunk_len
        self.num_tokens = num_tokens
        self._max_token = max_token

    @classmethod
    def open(cls, directory: str, split: str) -> ArrayRecordStream:
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise ConfigError("data.path", f"{directory!r} has no meta.json; write it with scripts/prepare_data.py")
        with open(meta_path) as f:
            meta = json.load(f)
        files = sorted(glob.glob(os.path.join(directory, f"{split}-*.array_record")))
        if not files:
            raise ConfigError("data.path", f"no {split}-*.array_record shards in {directory!r}")
        return cls(files, meta["chunk_len"], meta["num_tokens"][split], meta["max_token"])

    def read(self, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        first, last = offset // self.chunk_len, (offset + length - 1) // self.chunk_len
        parts = [decode_record(self._source[i]) for i in range(first, min(last + 1, len(self._source)))]
        tokens = np.concatenate([p[0] for p in parts])
        starts = np.concatenate([p[1] for p in parts])
        begin = offset - first * self.chunk_len
        return tokens[begin : begin + length], starts[begin : begin + length]

    def max_token(self) -> int:
        return self._max_token


def write_stream(stream, directory: str, split: str, *, chunk_len: int, records_per_shard: int) -> int:
    """Writes `stream` as `<split>-NNNNN.array_record` shards of `chunk_len`-token records; returns #records."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(directory, exist_ok=True)
    num_records = -(-stream.num_tokens // chunk_len)
    writer = None
    for i in range(num_records):
        if i % records_per_shard == 0:
            if writer is not None:
                writer.close()
            path = os.path.join(directory, f"{split}-{i // records_per_shard:05d}.array_record")
            writer = ArrayRecordWriter(path, "group_size:1")
        tokens, starts = stream.read(i * chunk_len, chunk_len)
        writer.write(encode_record(tokens, starts))
    if writer is not None:
        writer.close()
    return num_records


def write_meta(
    directory: str, *, chunk_len: int, tokenizer: str, vocab_size: int, max_token: int, num_tokens: dict[str, int]
) -> None:
    meta = {
        "chunk_len": chunk_len,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "max_token": max_token,
        "num_tokens": num_tokens,
    }
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)

"""Token streams: documents tokenized and concatenated, with a flag at each document's first token.

Every source (the embedded default corpus, text and jsonl files, ArrayRecord shards from
`scripts/prepare_data.py`) becomes a `TokenStream` with random access `read(offset, length)`, so the pipeline
that cuts it into training rows is the same for all of them.

The default corpus is the Python standard library's own source files on the running interpreter: real text,
about 30 MB, always present and offline. Documents go to train or validation by a hash of their path.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lcjax.data.tokenizers import Tokenizer
from lcjax.errors import ConfigError

SPLITS = ("train", "eval")


class TokenStream:
    """In-memory stream: `tokens` [N] int32 and `doc_start` [N] bool (True at each document's first token)."""

    def __init__(self, tokens: np.ndarray, doc_start: np.ndarray):
        self.tokens = np.asarray(tokens, np.int32)
        self.doc_start = np.asarray(doc_start, bool)
        self.num_tokens = len(self.tokens)

    def read(self, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[offset : offset + length], self.doc_start[offset : offset + length]

    def max_token(self) -> int:
        return int(self.tokens.max()) if self.num_tokens else -1


def concat_documents(docs: Iterable[np.ndarray]) -> TokenStream:
    docs = [np.asarray(d, np.int32) for d in docs if len(d)]
    if not docs:
        return TokenStream(np.zeros(0, np.int32), np.zeros(0, bool))
    starts = [np.zeros(len(d), bool) for d in docs]
    for s in starts:
        s[0] = True
    return TokenStream(np.concatenate(docs), np.concatenate(starts))


def split_of(key: str, eval_fraction: float) -> str:
    """Deterministic train/eval assignment by a hash of `key` (a file path, or path:line)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
    )
    return root, files


def _encode(tokenizer: Tokenizer, raw: bytes) -> np.ndarray:
    if tokenizer.is_bytes:
        return np.frombuffer(raw, np.uint8).astype(np.int32)
    return np.asarray(tokenizer.encode(raw.decode("utf-8", errors="replace")), np.int32)


def _expand(pattern: str, field: str) -> list[str]:
    if os.path.isdir(pattern):
        files = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file())
    else:
        files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise ConfigError(field, f"no files match {pattern!r}")
    return files


def _documents(source: str, files: list[str], text_key: str) -> Iterable[tuple[str, bytes]]:
    """(key, raw utf-8 bytes) per document. The key, which the train/eval hash split uses, is the path relative
    to the files' common directory (plus the line for jsonl), so moving a data set does not change its split."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    for path in files:
        key = os.path.relpath(os.path.abspath(path), root)
        if source == "text":
            yield key, Path(path).read_bytes()
            continue
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(
                        "data.path",
                        f"{path}:{line_no + 1}: not a JSON object with key {text_key!r} ({type(e).__name__})",
                    ) from None
                yield f"{key}:{line_no}", str(text).encode("utf-8")


def load_stream(data_config, tokenizer: Tokenizer, split: str):
    """The token stream of `split` ("train" or "eval") for `data_config` (a DataConfig)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_config.source == "arrayrecord":
        from lcjax.data.arrayrecord import ArrayRecordStream

        return ArrayRecordStream.open(data_config.path, split)
    if data_config.source == "stdlib":
        root, paths = stdlib_files()
        docs = ((str(p.relative_to(root)), p.read_bytes()) for p in paths)
        fraction = data_config.eval_fraction
    else:
        use_eval_files = split == "eval" and data_config.eval_path
        files = _expand(
            data_config.eval_path if use_eval_files else data_config.path,
            "data.eval_path" if use_eval_files else "data.path",
        )
        docs = _documents(data_config.source, files, data_config.text_key)
        # With separate eval files every document of the chosen files belongs to the split.
        fraction = None if data_config.eval_path else data_config.eval_fraction
    selected = (_encode(tokenizer, raw) for key, raw in docs if fraction is None or split_of(key, fraction) == split)
    return concat_documents(selected)

"""Tokenizers: byte-level (default, offline) and ones loaded from a local file by their own libraries."""

from __future__ import annotations

import os
from typing import Protocol

from lcjax.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    is_bytes: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; one token per byte, so bits/token == bits/byte."""

    vocab_size = 256
    is_bytes = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    is_bytes = False

    def __init__(self, path: str):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` library (no network)."""

    is_bytes = False

    def __init__(self, path: str):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    """`spec` is "bytes", a sentencepiece `.model` path, or a HF `tokenizer.json` path (a directory holding one)."""
    if spec == "bytes":
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError("data.tokenizer", f"no readable tokenizer file at {spec!r} (expected 'bytes' or a path)")
    try:
        return HFTokenizer(path) if path.endswith(".json") else SentencePieceTokenizer(path)
    except ImportError as e:
        raise ConfigError(
            "data.tokenizer", f"{e}; install the 'tokenizers' extra: pip install 'lcjax[tokenizers]'"
        ) from None
    except Exception as e:  # the libraries raise assorted types for malformed files
        raise ConfigError("data.tokenizer", f"cannot load {path!r}: {type(e).__name__}: {e}".splitlines()[0]) from None

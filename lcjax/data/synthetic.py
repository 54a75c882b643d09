"""Synthetic long-context tasks as random-access sources: example i is a pure function of (seed, i).

Every example is a dict of [seq_len] arrays in the trainer's format: `inputs`, `targets`, `loss_mask` (1 only at
answer positions), so the shared loop trains and evaluates on them like on text.

MQAR (multi-query associative recall, zoology semantics): keys from [1, V/2), values from [V/2, V), drawn without
replacement; the context is k_1 v_1 ... k_D v_D repeated `num_passes` times; each key is queried once later, at an
even offset 2(g-1) after the context with gap g ~ g^(a-1) (a power law favouring short gaps); the target at a
query position is that key's value. Other query-region slots hold random tokens.

S-NIAH passkey (RULER-style): a filler haystack with one needle sentence "The pass key is N. Remember it. N is
the pass key." inserted at a given depth, then the question; the targets are the answer's tokens.

Phonebook lookup (Birdie-style) and selective copying (Mamba) are described at their classes.
"""

from __future__ import annotations

import numpy as np

from lcjax.data.tokenizers import Tokenizer
from lcjax.errors import ConfigError


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


class MQAR:
    """Multi-query associative recall; `MQAR(...)[i]` is example i."""

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        num_kv_pairs: int,
        num_examples: int,
        seed: int = 0,
        num_passes: int = 1,
        power_a: float = 0.01,
    ):
        if seq_len % 2:
            raise ConfigError("mqar.seq_len", f"={seq_len} must be even")
        if vocab_size <= seq_len:
            raise ConfigError("mqar.vocab_size", f"={vocab_size} must exceed seq_len={seq_len}")
        context = 2 * num_kv_pairs * num_passes
        if context + 2 * num_kv_pairs > seq_len:
            raise ConfigError(
                "mqar.num_kv_pairs",
                f"={num_kv_pairs} with num_passes={num_passes} needs 2*D*p + 2*D = {context + 2 * num_kv_pairs} "
                f"<= seq_len={seq_len}",
            )
        if num_kv_pairs >= vocab_size // 2 - 1:
            raise ConfigError("mqar.num_kv_pairs", f"={num_kv_pairs} needs more keys than vocab_size/2 provides")
        self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
        self.num_passes, self.seed, self.num_examples = num_passes, seed, num_examples
        slots = (seq_len - context) // 2
        weights = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
        self._gap_probs = weights / weights.sum()

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        half, d = self.vocab_size // 2, self.num_kv_pairs
        keys = rng.choice(np.arange(1, half), d, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), d, replace=False)
        pairs = np.stack([keys, values], axis=1).reshape(-1)
        context = np.tile(pairs, self.num_passes)
        gaps = rng.choice(len(self._gap_probs), d, replace=False, p=self._gap_probs)  # 0-based: gap g-1
        queries = rng.integers(0, self.vocab_size, self.seq_len - len(context))
        queries[2 * gaps] = keys
        inputs = np.concatenate([context, queries]).astype(np.int32)
        targets = np.zeros(self.seq_len, np.int32)
        loss_mask = np.zeros(self.seq_len, np.float32)
        positions = len(context) + 2 * gaps
        targets[positions] = values
        loss_mask[positions] = 1.0
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class Passkey:
    """S-NIAH passkey retrieval; `Passkey(...)[i]` is example i, its needle at `depth` (0 = start, 1 = end)."""

    def __init__(
        self, tokenizer: Tokenizer, *, seq_len: int, depth: float, num_examples: int, seed: int = 0, digits: int = 5
    ):
        if not 0.0 <= depth <= 1.0:
            raise ConfigError("passkey.depth", f"={depth} must be in [0, 1]")
        self.tokenizer, self.seq_len, self.depth = tokenizer, seq_len, depth
        self.num_examples, self.seed, self.digits = num_examples, seed, digits
        self._filler = np.asarray(tokenizer.encode(FILLER * 4), np.int32)
        needle, question, answer = self._parts("0" * digits)
        if len(needle) + len(question) + len(answer) >= seq_len:
            raise ConfigError("passkey.seq_len", f"={seq_len} leaves no room for the haystack")

    def _parts(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        encode = lambda text: np.asarray(self.tokenizer.encode(text), np.int32)
        needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        return needle, encode(" What is the pass key? The pass key is "), encode(key)

    def __len__(self) -> int:
        return self.num_examples

    def passkey(self, index: int) -> str:
        rng = _rng(self.seed, index)
        return "".join(str(d) for d in rng.integers(0, 10, self.digits))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        needle, question, answer = self._parts(self.passkey(index))
        haystack_len = self.seq_len + 1 - len(needle) - len(question) - len(answer)
        haystack = np.resize(self._filler, haystack_len)
        cut = int(round(self.depth * haystack_len))
        tokens = np.concatenate([haystack[:cut], needle, haystack[cut:], question, answer])
        loss_mask = np.zeros(self.seq_len, np.float32)
        loss_mask[self.seq_len - len(answer) :] = 1.0
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask, "needle_start": np.int32(cut)}


def _text_example(tokenizer: Tokenizer, prompt: str, answer: str, seq_len: int, pad: str, field: str):
    """inputs/targets/loss_mask of length seq_len for `prompt` + `answer` (targets only on the answer),
    left-padded with repetitions of `pad` text."""
    prompt_ids = np.asarray(tokenizer.encode(prompt), np.int32)
    answer_ids = np.asarray(tokenizer.encode(answer), np.int32)
    room = seq_len + 1 - len(prompt_ids) - len(answer_ids)
    if room < 0:
        raise ConfigError(field, f"={seq_len} is too short for the task ({len(prompt_ids) + len(answer_ids)} tokens)")
    filler = np.resize(np.asarray(tokenizer.encode(pad), np.int32), room)
    tokens = np.concatenate([filler, prompt_ids, answer_ids])
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[seq_len - len(answer_ids) :] = 1.0
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask}


FIRST_NAMES = (
    "Ada",
    "Alan",
    "Barbara",
    "Claude",
    "Donald",
    "Edsger",
    "Frances",
    "Grace",
    "John",
    "Ken",
    "Leslie",
    "Margaret",
    "Niklaus",
    "Radia",
    "Shafi",
    "Tim",
    "Yoshua",
    "Geoffrey",
    "Fei-Fei",
    "Judea",
)
LAST_NAMES = (
    "Lovelace",
    "Turing",
    "Liskov",
    "Shannon",
    "Knuth",
    "Dijkstra",
    "Allen",
    "Hopper",
    "McCarthy",
    "Thompson",
    "Lamport",
    "Hamilton",
    "Wirth",
    "Perlman",
    "Goldwasser",
    "Berners-Lee",
    "Bengio",
    "Hinton",
    "Li",
    "Pearl",
)


class Phonebook:
    """Multi-number phonebook lookup (Birdie-style): the question stands before and after a book of `num_entries`
    "Name: number" lines; the answer lists the `num_queries` asked numbers in the order asked."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        num_entries: int,
        num_queries: int,
        num_examples: int,
        seed: int = 0,
    ):
        if not 1 <= num_queries <= num_entries <= len(FIRST_NAMES) * len(LAST_NAMES):
            raise ConfigError("phonebook.num_queries", f"={num_queries} must be in [1, num_entries={num_entries}]")
        self.tokenizer, self.seq_len, self.num_entries = tokenizer, seq_len, num_entries
        self.num_queries, self.num_examples, self.seed = num_queries, num_examples, seed

    def __len__(self) -> int:
        return self.num_examples

    def book(self, index: int) -> tuple[list[tuple[str, str]], list[int]]:
        """The (name, number) entries and the indices of the queried entries."""
        rng = _rng(self.seed, index)
        people = rng.choice(len(FIRST_NAMES) * len(LAST_NAMES), self.num_entries, replace=False)
        names = [f"{FIRST_NAMES[p // len(LAST_NAMES)]} {LAST_NAMES[p % len(LAST_NAMES)]}" for p in people]
        numbers = [f"{rng.integers(200, 1000)}-{rng.integers(0, 10000):04d}" for _ in names]
        return list(zip(names, numbers, strict=True)), rng.choice(
            self.num_entries, self.num_queries, replace=False
        ).tolist()

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        entries, asked = self.book(index)
        question = "What are the numbers of " + ", ".join(entries[i][0] for i in asked) + "?\n"
        book = "".join(f"{name}: {number}\n" for name, number in entries)
        answer = "".join(f"{entries[i][0]}: {entries[i][1]}\n" for i in asked)
        return _text_example(
            self.tokenizer, question + book + question, answer, self.seq_len, "\n", "phonebook.seq_len"
        )


class SelectiveCopy:
    """Selective copying (Mamba paper): `num_tokens` data tokens from [2, V) scattered in order among noise
    tokens (id 0) over a context, then a marker (id 1); the targets are the data tokens, in order."""

    NOISE, MARKER = 0, 1

    def __init__(self, *, vocab_size: int, seq_len: int, num_tokens: int, num_examples: int, seed: int = 0):
        context = seq_len - num_tokens
        if vocab_size < 3 or num_tokens < 1 or context < num_tokens:
            raise ConfigError(
                "selective_copy.num_tokens", f"={num_tokens} needs seq_len >= 2*num_tokens + 1 and vocab_size >= 3"
            )
        self.vocab_size, self.seq_len, self.num_tokens = vocab_size, seq_len, num_tokens
        self.num_examples, self.seed = num_examples, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        context_len = self.seq_len - self.num_tokens  # context, then the marker, then the copies
        data = rng.integers(2, self.vocab_size, self.num_tokens)
        context = np.full(context_len, self.NOISE)
        context[np.sort(rng.choice(context_len, self.num_tokens, replace=False))] = data
        tokens = np.concatenate([context, [self.MARKER], data]).astype(np.int32)
        loss_mask = np.zeros(self.seq_len, np.float32)
        loss_mask[context_len:] = 1.0
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask}

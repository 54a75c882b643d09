"""Synthetic long-context tasks as random-access sources: example i is a pure function of (seed, i).

Every example is a dict in the trainer's format: `inputs`, `targets`, `loss_mask` (1 only at answer positions),
`segment_ids` (1 on content, 0 on left padding), `positions` (0 at the first content token), all [length]; plus
host-only metadata `context_start`/`context_end` (the in-context document, in input positions), which the
pipeline drops before batches reach the device. The shared loop trains and evaluates on them like on text.

Task names (`data.source` to train on one, `eval.tasks` to score several) are in `TASKS`; `make_task` builds one
from the typed config.

MQAR (multi-query associative recall, zoology semantics): keys from [1, V/2), values from [V/2, V), drawn without
replacement; the context is k_1 v_1 ... k_D v_D repeated `num_passes` times; each key is queried once later, at an
even offset 2(g-1) after the context with gap g ~ g^(a-1) (a power law favouring short gaps); the target at a
query position is that key's value. Other query-region slots hold random tokens.

S-NIAH (RULER-style single needle in a haystack): a noise haystack ("The grass is green. ...", RULER's S-NIAH-1
haystack, used here for all three needle kinds because essays are not shipped offline) with one needle inserted
at a given depth, then the question; the targets are the answer's tokens. Needles: `passkey` (a 5-digit key),
`number` (a 7-digit "special magic number" for a word key), `word` (a "special magic word" for a word key).

Phonebook lookup (Birdie-style) and selective copying (Mamba) are described at their classes.

JRT-Prompt (`JRTPrompt`, any task): the in-context document is repeated once more before the question, and the
result left-padded to a fixed length, so a causal model sees the document again after knowing what it holds.
"""

from __future__ import annotations

import numpy as np

from lcjax.data.tokenizers import Tokenizer
from lcjax.errors import ConfigError


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _example(inputs, targets, loss_mask, context: tuple[int, int], start: int = 0) -> dict[str, np.ndarray]:
    """The trainer's example: `start` tokens of left padding get segment 0 and positions restart after them;
    `context` is the in-context document [start, end) in input positions (host-only metadata)."""
    index = np.arange(len(inputs), dtype=np.int32)
    return {
        "inputs": np.asarray(inputs, np.int32),
        "targets": np.asarray(targets, np.int32),
        "loss_mask": np.asarray(loss_mask, np.float32),
        "segment_ids": (index >= start).astype(np.int32),
        "positions": np.maximum(index - start, 0).astype(np.int32),
        "context_start": np.int32(context[0]),
        "context_end": np.int32(context[1]),
    }


def _finish(tokens: np.ndarray, loss_mask: np.ndarray, context: tuple[int, int], start: int = 0) -> dict:
    """The example of a token sequence of length + 1 (targets are the tokens shifted by one)."""
    return _example(tokens[:-1], tokens[1:], loss_mask, context, start)


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
            raise ConfigError("train.seq_len", f"={seq_len} must be even for MQAR")
        if vocab_size <= seq_len:
            raise ConfigError("model.vocab_size", f"={vocab_size} must exceed train.seq_len={seq_len} for MQAR")
        if num_kv_pairs < 1 or num_passes < 1:
            raise ConfigError("task.num_kv_pairs", f"={num_kv_pairs} and task.num_passes={num_passes} must be >= 1")
        context = 2 * num_kv_pairs * num_passes
        if context + 2 * num_kv_pairs > seq_len:
            raise ConfigError(
                "task.num_kv_pairs",
                f"={num_kv_pairs} with task.num_passes={num_passes} needs 2*D*p + 2*D = "
                f"{context + 2 * num_kv_pairs} <= train.seq_len={seq_len}",
            )
        if num_kv_pairs >= vocab_size // 2 - 1:
            raise ConfigError("task.num_kv_pairs", f"={num_kv_pairs} needs more keys than model.vocab_size/2 gives")
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
        inputs = np.concatenate([context, queries])
        targets = np.zeros(self.seq_len, np.int32)  # as in zoology, the slot after a query holds a random
        loss_mask = np.zeros(self.seq_len, np.float32)  # token: only the label says the value
        positions = len(context) + 2 * gaps
        targets[positions] = values
        loss_mask[positions] = 1.0
        return _example(inputs, targets, loss_mask, (0, len(context)))


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "keen", "lucky", "misty", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy",
)  # fmt: skip
KEY_NOUNS = (
    "anchor", "badger", "canyon", "dragon", "engine", "falcon", "garden", "harbor", "island", "jungle",
    "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "rocket", "saddle", "tunnel",
)  # fmt: skip
NEEDLES = ("passkey", "number", "word")


class NIAH:
    """S-NIAH: `NIAH(tok, needle=..., ...)[i]` is example i, its needle at `depth` (0 = start, 1 = end of the
    haystack). `needle_value(i)` is the answer text and `needle_key(i)` what the question names."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        depth: float,
        num_examples: int,
        seed: int = 0,
        needle: str = "passkey",
        random_depth: bool = False,
    ):
        if needle not in NEEDLES:
            raise ConfigError("task.needle", f"unknown needle {needle!r}; expected one of {NEEDLES}")
        if not 0.0 <= depth <= 1.0:
            raise ConfigError("task.depth", f"={depth} must be in [0, 1]")
        self.tokenizer, self.seq_len, self.depth, self.needle = tokenizer, seq_len, depth, needle
        self.num_examples, self.seed, self.random_depth = num_examples, seed, random_depth
        self._filler = self._encode(FILLER * 4)
        longest_key = max((f"{a}-{n}" for a in KEY_ADJECTIVES for n in KEY_NOUNS), key=len)
        longest_value = {"passkey": "0" * 5, "number": "0" * 7, "word": max(KEY_NOUNS, key=len)}[needle]
        if sum(len(p) for p in self._parts(longest_key, longest_value)) + 8 > seq_len:  # >= 8 haystack tokens
            raise ConfigError("train.seq_len", f"={seq_len} leaves no room for a haystack around the {needle} needle")

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), np.int32)

    def _parts(self, key: str, value: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.needle == "passkey":
            needle = f" The pass key is {value}. Remember it. {value} is the pass key. "
            question = " What is the pass key? The pass key is "
        else:
            kind = "number" if self.needle == "number" else "word"
            needle = f" One of the special magic {kind}s for {key} is: {value}. "
            question = f" What is the special magic {kind} for {key} mentioned in the text? It is: "
        return self._encode(needle), self._encode(question), self._encode(value)

    def __len__(self) -> int:
        return self.num_examples

    def needle_key(self, index: int) -> str:
        rng = _rng(self.seed, index)
        return f"{KEY_ADJECTIVES[rng.integers(len(KEY_ADJECTIVES))]}-{KEY_NOUNS[rng.integers(len(KEY_NOUNS))]}"

    def needle_value(self, index: int) -> str:
        rng = _rng(self.seed + 1, index)  # independent of the key
        if self.needle == "passkey":
            return "".join(str(d) for d in rng.integers(0, 10, 5))
        if self.needle == "number":
            return str(rng.integers(1_000_000, 10_000_000))
        return KEY_NOUNS[rng.integers(len(KEY_NOUNS))]

    def passkey(self, index: int) -> str:
        return self.needle_value(index)

    def needle_depth(self, index: int) -> float:
        """Example `index`'s needle depth: `depth`, or with `random_depth` one drawn uniformly from [0, 1]."""
        return float(_rng(self.seed + 2, index).uniform()) if self.random_depth else self.depth

    def needle_start(self, index: int) -> int:
        """Input position where the needle text begins."""
        needle, question, answer = self._parts(self.needle_key(index), self.needle_value(index))
        return int(round(self.needle_depth(index) * (self.seq_len + 1 - len(needle) - len(question) - len(answer))))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        needle, question, answer = self._parts(self.needle_key(index), self.needle_value(index))
        haystack_len = self.seq_len + 1 - len(needle) - len(question) - len(answer)
        haystack = np.resize(self._filler, haystack_len)
        cut = self.needle_start(index)
        tokens = np.concatenate([haystack[:cut], needle, haystack[cut:], question, answer])
        loss_mask = np.zeros(self.seq_len, np.float32)
        loss_mask[self.seq_len - len(answer) :] = 1.0
        return _finish(tokens, loss_mask, (0, haystack_len + len(needle)))


def Passkey(tokenizer: Tokenizer, **kwargs) -> NIAH:  # noqa: N802 - the S-NIAH-1 task under its usual name
    return NIAH(tokenizer, needle="passkey", **kwargs)


def _text_example(tokenizer: Tokenizer, context: str, question: str, answer: str, seq_len: int, name: str):
    """The example for `context` + `question` + `answer` (targets only on the answer), left-padded to seq_len."""
    encode = lambda text: np.asarray(tokenizer.encode(text), np.int32)
    context_ids, question_ids, answer_ids = encode(context), encode(question), encode(answer)
    used = len(context_ids) + len(question_ids) + len(answer_ids)
    start = seq_len + 1 - used
    if start < 0:
        raise ConfigError("train.seq_len", f"={seq_len} is too short for the {name} task ({used} tokens)")
    tokens = np.concatenate([np.zeros(start, np.int32), context_ids, question_ids, answer_ids])
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[seq_len - len(answer_ids) :] = 1.0
    return _finish(tokens, loss_mask, (start, start + len(context_ids)), start=start)


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
    "Name: number" lines; the answer lists the `num_queries` asked numbers in the order asked. Left padding is
    token 0 in segment 0."""

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
            raise ConfigError("task.num_queries", f"={num_queries} must be in [1, task.num_entries={num_entries}]")
        self.tokenizer, self.seq_len, self.num_entries = tokenizer, seq_len, num_entries
        self.num_queries, self.num_examples, self.seed = num_queries, num_examples, seed
        self[0]  # the longest names and numbers are close to the typical ones: fail early on a short seq_len

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
        return _text_example(self.tokenizer, question + book, question, answer, self.seq_len, "phonebook")


class SelectiveCopy:
    """Selective copying (Mamba paper): `num_tokens` data tokens from [2, V) scattered in order among noise
    tokens (id 0) over a context, then a marker (id 1); the targets are the data tokens, in order."""

    NOISE, MARKER = 0, 1

    def __init__(self, *, vocab_size: int, seq_len: int, num_tokens: int, num_examples: int, seed: int = 0):
        context = seq_len - num_tokens
        if vocab_size < 3 or num_tokens < 1 or context < num_tokens:
            raise ConfigError(
                "task.num_tokens", f"={num_tokens} needs train.seq_len >= 2*num_tokens + 1 and vocab_size >= 3"
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
        return _finish(tokens, loss_mask, (0, context_len))


class SetDisjointness:
    """JRT's set disjointness (Arora et al. 2024, §4.4 of the reference): a short set of `short_set` distinct tokens,
    a separator (id 1), a long set of `long_set` distinct tokens sharing exactly one element with the short one, a
    separator, then that shared element as the answer. Tokens are drawn from [2, V); left padding (segment 0) fills
    the row. A recurrent model reading the short set first must hold all of it while the long set streams past;
    with the sets repeated (JRT-Prompt) it can read the long set knowing what to look for."""

    SEPARATOR = 1

    def __init__(self, *, vocab_size: int, seq_len: int, short_set: int, long_set: int, num_examples: int, seed=0):
        if short_set < 1 or long_set < 1:
            raise ConfigError("task.short_set", f"={short_set} and task.long_set={long_set} must be >= 1")
        if short_set + long_set + 2 > seq_len:
            raise ConfigError(
                "task.long_set",
                f"task.short_set={short_set} + task.long_set={long_set} + 2 separators exceed train.seq_len={seq_len}",
            )
        if short_set + long_set - 1 > vocab_size - 2:
            raise ConfigError("model.vocab_size", f"={vocab_size} has too few tokens for the two sets")
        self.vocab_size, self.seq_len, self.short_set, self.long_set = vocab_size, seq_len, short_set, long_set
        self.num_examples, self.seed = num_examples, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        drawn = rng.choice(np.arange(2, self.vocab_size), self.short_set + self.long_set - 1, replace=False)
        short, rest = drawn[: self.short_set], drawn[self.short_set :]
        shared = short[rng.integers(self.short_set)]
        long = rng.permutation(np.concatenate([rest, [shared]]))
        body = np.concatenate([short, [self.SEPARATOR], long, [self.SEPARATOR], [shared]]).astype(np.int32)
        pad = self.seq_len + 1 - len(body)
        tokens = np.concatenate([np.zeros(pad, np.int32), body])
        loss_mask = np.zeros(self.seq_len, np.float32)
        loss_mask[-1] = 1.0  # the last separator predicts the shared element
        return _finish(tokens, loss_mask, (pad, pad + len(body) - 2), start=pad)


class JRTPrompt:
    """JRT-Prompt over any task: the in-context document (`context_start:context_end`) appears twice before the
    question; examples are left-padded (segment 0) to `length` = 2 * the task's length, the most it can need."""

    def __init__(self, task):
        self.task = task
        self.seq_len = 2 * task.seq_len

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ex = self.task[index]
        inputs, targets, loss_mask = ex["inputs"], ex["targets"], ex["loss_mask"]
        s, c = int(ex["context_start"]), int(ex["context_end"])
        first_copy_targets = np.concatenate([inputs[s + 1 : c], inputs[s : s + 1]])  # then the copy starts again
        pad = self.seq_len - (len(inputs) - s) - (c - s)
        zeros = lambda n, dtype=np.int32: np.zeros(n, dtype)
        return _example(
            np.concatenate([zeros(pad), inputs[s:c], inputs[s:]]),
            np.concatenate([zeros(pad), first_copy_targets, targets[s:]]),
            np.concatenate([zeros(pad, np.float32), zeros(c - s, np.float32), loss_mask[s:]]),
            (pad, pad + 2 * (c - s)),
            start=pad,
        )


TASKS = ("mqar", "passkey", "niah_number", "niah_word", "phonebook", "selective_copy", "set_disjointness")
NIAH_TASKS = ("passkey", "niah_number", "niah_word")
TEXT_TASKS = (*NIAH_TASKS, "phonebook")  # built with the tokenizer; the others use raw ids


def make_task(name: str, task_config, *, tokenizer: Tokenizer, vocab_size: int, seq_len: int, num_examples: int,
              seed: int, jrt_prompt: bool = False, random_depth: bool = False):  # fmt: skip
    """Task `name` (one of TASKS) with the parameters of `task_config` (a TaskConfig); `seq_len` is the length
    before JRT-Prompt doubles it. `random_depth`: S-NIAH needles at uniformly drawn depths (training sets)."""
    t = task_config
    if random_depth and name not in NIAH_TASKS:
        raise ConfigError("task.random_depth", f"applies to the needle tasks {NIAH_TASKS}, not {name!r}")
    if name == "mqar":
        task = MQAR(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=t.num_kv_pairs, num_examples=num_examples,
                    seed=seed, num_passes=t.num_passes, power_a=t.power_a)  # fmt: skip
    elif name in NIAH_TASKS:
        needle = {"passkey": "passkey", "niah_number": "number", "niah_word": "word"}[name]
        task = NIAH(tokenizer, seq_len=seq_len, depth=t.depth, num_examples=num_examples, seed=seed, needle=needle,
                    random_depth=random_depth)  # fmt: skip
    elif name == "phonebook":
        task = Phonebook(tokenizer, seq_len=seq_len, num_entries=t.num_entries, num_queries=t.num_queries,
                         num_examples=num_examples, seed=seed)  # fmt: skip
    elif name == "selective_copy":
        task = SelectiveCopy(vocab_size=vocab_size, seq_len=seq_len, num_tokens=t.num_tokens,
                             num_examples=num_examples, seed=seed)  # fmt: skip
    elif name == "set_disjointness":
        task = SetDisjointness(vocab_size=vocab_size, seq_len=seq_len, short_set=t.short_set, long_set=t.long_set,
                               num_examples=num_examples, seed=seed)  # fmt: skip
    else:
        raise ConfigError("eval.tasks", f"unknown task {name!r}; expected one of {TASKS}")
    task = JRTPrompt(task) if jrt_prompt else task
    return PromptPrefix(task) if t.prefix_mask else task


class PromptPrefix:
    """Any task with `prefix_mask` 1 over the prompt: every content input before the one that predicts the first
    answer token (that last prompt token stays causal, as Birdie's start-generating token does). Birdie's and JRT's
    layers read the prompt bidirectionally; other models ignore the field (`task.prefix_mask`)."""

    def __init__(self, task):
        self.task, self.seq_len = task, task.seq_len

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ex = dict(self.task[index])
        answer = int(np.argmax(ex["loss_mask"] > 0)) if np.any(ex["loss_mask"] > 0) else len(ex["loss_mask"])
        ex["prefix_mask"] = ((np.arange(len(ex["loss_mask"])) < answer) & (ex["segment_ids"] > 0)).astype(np.int32)
        return ex


class ContextLoss:
    """Any task with weight `weight` on the targets of its unlabelled content positions (segment_ids > 0), its
    labels keeping theirs: trains the next-token loss on the context beside the answer (`task.context_loss`)."""

    def __init__(self, task, weight: float):
        self.task, self.weight, self.seq_len = task, float(weight), task.seq_len

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ex = dict(self.task[index])
        mask, content = ex["loss_mask"], ex["segment_ids"] > 0
        ex["loss_mask"] = np.where(mask > 0, mask, np.where(content, self.weight, 0.0)).astype(np.float32)
        return ex

"""Birdie's pretraining objectives (Blouir et al. 2024, Table 1 and A.2; `reference/xlstm_ssm_birdie_jrt.md` §3.1–3.2)
as arms of a mixture, and the packed rows they make.

An **arm** is one objective family with one parameter setting; the paper's grid (`paper_arms`, 96 arms) crosses each
family's lengths, mask ratios, span lengths, shuffle fractions and query placements. Every arm turns a slice of the
source text into (prefix P, target T), and a sample is laid out as Birdie's packer does:

    [paradigm] P [start] T      (the paradigm string after P instead, half of the time: paper A.6)

with `inputs` = the sample without its last token, `targets` = the sample shifted by one, `loss_mask` 1 on T's tokens
only, and `prefix_mask` 1 over the paradigm and P (read bidirectionally by Birdie's layers and JRT), 0 from the
start-generating token on. Next-token prediction has no prefix and no start token: [paradigm] T, all causal.

Families (P → T; the paper's text in brackets):
- `next_token`: nothing → the text.                         - `prefix_lm`: the first 75% → the rest.
- `infilling` (T5 span corruption): the text with each masked span replaced by sentinel k → sentinel 1, span 1,
  sentinel 2, span 2, ...  [mask ratio, mean span length]
- `copying`: the text → the same text.
- `deshuffling`: the text with `shuffle_fraction` of its tokens permuted among their positions → the text.
- `autoencoding` (BART-like): the text with each masked span replaced by one mask string, the unmasked pieces
  shuffled too when `deshuffle` → the whole original text.
- `selective_copying`: "[COPY] [START] pre [END] post ... [CONTEXT] text" (or the context first) → for each of
  `num_spans` non-overlapping spans of 4–32 tokens, the tokens between its delimiters `pre` (the 1–8 tokens before
  it) and `post` (the 1–8 after it), then "[DONE]". The paper's "[COPY] [START] BC [END] F [CONTEXT] ABCDEF → DE
  [DONE]".

Markers (paradigm strings, sentinels, the start-generating string "\n<|assistant|>\n", the selective-copying tags)
are text, encoded by the run's tokenizer, as in the Birdie code.

**Rows.** `ObjectiveRows` packs samples into rows of `seq_len` input tokens: sample after sample, each arm drawn from
the mixture, each in its own segment (segment_ids 1, 2, ...; positions restart), until the next one does not fit;
the rest is padding (segment 0, no loss). A length range is scaled by `length_scale` and clamped to the space left;
next-token and prefix-LM samples fill what is left. Row j of global batch k draws from `np.random.default_rng((seed,
k, j))` with the mixture in force at step k (`MixtureSchedule`), so the batch at step k is a pure function of (seed,
k, mixture state), and a run that restores the schedule resumes on the same batches.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from lcjax.data.batch import device_fields
from lcjax.errors import ConfigError

FAMILIES = (
    "next_token",
    "prefix_lm",
    "infilling",
    "copying",
    "deshuffling",
    "autoencoding",
    "selective_copying",
)
# `objectives.mixture` names a family at its default setting as one of these (autoencoding with deshuffling too)
ARM_NAMES = (*FAMILIES, "autoencoding_deshuffle")
PARADIGMS = {
    "next_token": "<|NTP|>",
    "prefix_lm": "<|PREFIX LM|>",
    "infilling": "<|INFILL|>",
    "copying": "<|COPY|>",
    "deshuffling": "<|DESHUFFLE|>",
    "autoencoding": "<|AUTOENCODE|>",
    "selective_copying": "<|SELECTIVE COPY|>",
}
START = "\n<|assistant|>\n"
SENTINEL = " [[mask_{k}]]"  # infilling: one per span, numbered from 1
MASK = " [[mask]]"  # autoencoding: one per span
TAGS = {"copy": "[COPY]", "start": " [START] ", "end": " [END] ", "context": " [CONTEXT] ", "done": " [DONE]"}
MIN_SOURCE = 4  # a sample needs at least this many source tokens (a shorter remainder of a row is padding)
SPAN = (4, 32)  # selective copying: tokens per copied span
DELIMITER = (1, 8)  # selective copying: tokens per delimiter


@dataclasses.dataclass(frozen=True)
class Arm:
    """One objective setting. `length` (min, max) source tokens, () for "fill the space left"."""

    family: str
    length: tuple[int, ...] = ()
    mask_ratio: float = 0.0  # infilling, autoencoding
    mean_span: float = 0.0  # infilling, autoencoding
    shuffle_fraction: float = 0.0  # deshuffling
    deshuffle: bool = False  # autoencoding: shuffle the unmasked pieces too
    num_spans: int = 1  # selective copying
    query_first: bool = True  # selective copying: the query before the context
    prefix_fraction: float = 0.75  # prefix LM

    @property
    def name(self) -> str:
        fields = []
        if self.length:
            fields.append(f"len={self.length[0]}-{self.length[1]}")
        if self.family in ("infilling", "autoencoding"):
            fields += [f"mask={self.mask_ratio:g}", f"span={self.mean_span:g}"]
        if self.family == "autoencoding" and self.deshuffle:
            fields.append("deshuffle")
        if self.family == "deshuffling":
            fields.append(f"shuffle={self.shuffle_fraction:g}")
        if self.family == "selective_copying":
            fields += [f"spans={self.num_spans}", "query_first" if self.query_first else "context_first"]
        if self.family == "prefix_lm":
            fields.append(f"prefix={self.prefix_fraction:g}")
        return f"{self.family}({','.join(fields)})" if fields else self.family

    @property
    def key(self) -> str:
        """The name as a metric tag (TensorBoard takes [A-Za-z0-9_.-/]): infilling/len=128-256/... -> underscores."""
        return re.sub(r"[^A-Za-z0-9_.\-]+", "_", self.name).strip("_")


def paper_arms() -> list[Arm]:
    """The paper's grid (A.2): 96 arms."""
    arms = [Arm("next_token"), Arm("prefix_lm")]
    for length in ((128, 256), (256, 512), (512, 1024), (1024, 2048)):
        for ratio in (0.05, 0.15, 0.5):
            arms += [Arm("infilling", length, ratio, span) for span in (3, 8, 32)]
    arms += [Arm("copying", length) for length in ((64, 256), (256, 2048))]
    for length in ((128, 256), (512, 1024)):
        arms += [Arm("deshuffling", length, shuffle_fraction=f) for f in (0.5, 1.0)]
    for length in ((192, 384), (384, 768), (768, 1536)):
        for ratio in (0.15, 0.85):
            for span in (3, 8, 32):
                arms += [Arm("autoencoding", length, ratio, span, deshuffle=d) for d in (False, True)]
    for spans in (1, 2, 3, 4):
        for first in (True, False):
            arms += [Arm("selective_copying", c, num_spans=spans, query_first=first) for c in ((384, 768), (768, 1536))]
    return arms


DEFAULT_ARMS = {  # one setting per family (`objectives.mixture=birdie-small` and the names in ARM_NAMES)
    "next_token": Arm("next_token"),
    "prefix_lm": Arm("prefix_lm"),
    "infilling": Arm("infilling", (128, 256), 0.15, 3),
    "copying": Arm("copying", (64, 256)),
    "deshuffling": Arm("deshuffling", (128, 256), shuffle_fraction=0.5),
    "autoencoding": Arm("autoencoding", (192, 384), 0.5, 3),
    "autoencoding_deshuffle": Arm("autoencoding", (192, 384), 0.75, 3, deshuffle=True),
    "selective_copying": Arm("selective_copying", (384, 768)),
}
# Decoder-only UL2 (the Birdie code's config): C (causal) 0.6, S (prefix LM 0.75) 0.2, R(15%, 3) 0.1, R(50%, 32) 0.1
UL2 = (
    (Arm("next_token"), 0.6),
    (Arm("prefix_lm"), 0.2),
    (Arm("infilling", (), 0.15, 3), 0.1),
    (Arm("infilling", (), 0.5, 32), 0.1),
)
PRESETS = ("birdie", "birdie-small", "ul2")


def parse_mixture(spec: str) -> tuple[list[Arm], np.ndarray]:
    """(arms, initial weights summing to 1) of `objectives.mixture`: a preset ("birdie": the paper's 96 arms,
    "birdie-small": DEFAULT_ARMS, both uniform; "ul2": decoder-only UL2's fixed ratios) or "name[:weight],..." of
    ARM_NAMES at their default settings (weight 1 when left out)."""
    spec = spec.strip()
    if spec == "birdie":
        arms = paper_arms()
        return arms, np.full(len(arms), 1.0 / len(arms))
    if spec == "birdie-small":
        arms = list(DEFAULT_ARMS.values())
        return arms, np.full(len(arms), 1.0 / len(arms))
    if spec == "ul2":
        return [a for a, _ in UL2], np.array([w for _, w in UL2])
    arms, weights = [], []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition(":")
        if name not in ARM_NAMES:
            raise ConfigError(
                "objectives.mixture",
                f"unknown objective {name!r}; expected a preset {list(PRESETS)} or names from {list(ARM_NAMES)}",
            )
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError("objectives.mixture", f"{item!r}: the weight {weight!r} is not a number") from None
        if not np.isfinite(value) or value < 0:
            raise ConfigError("objectives.mixture", f"{item!r}: a weight must be finite and >= 0")
        arms.append(DEFAULT_ARMS[name])
        weights.append(value)
    if not arms:
        raise ConfigError("objectives.mixture", "is empty; expected a preset or 'name[:weight],...'")
    total = sum(weights)
    if total <= 0:
        raise ConfigError("objectives.mixture", f"the weights {weights} sum to {total:g}; they must sum to > 0")
    return arms, np.asarray(weights) / total


# one sample


@dataclasses.dataclass(frozen=True)
class Markers:
    """The marker strings as token ids (`Markers.encode(tokenizer)`)."""

    paradigm: dict[str, tuple[int, ...]]
    start: tuple[int, ...]
    mask: tuple[int, ...]
    tags: dict[str, tuple[int, ...]]
    encode_sentinel: Any  # k -> tuple of ids

    @classmethod
    def encode(cls, tokenizer) -> Markers:
        enc = lambda s: tuple(tokenizer.encode(s))
        cache: dict[int, tuple[int, ...]] = {}

        def sentinel(k: int) -> tuple[int, ...]:
            if k not in cache:
                cache[k] = enc(SENTINEL.format(k=k))
            return cache[k]

        return cls(
            {f: enc(s) for f, s in PARADIGMS.items()},
            enc(START),
            enc(MASK),
            {k: enc(s) for k, s in TAGS.items()},
            sentinel,
        )


def _spans(rng, n: int, ratio: float, mean: float, max_spans: int = 0) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) spans covering about `ratio` of n tokens, lengths ~ 1 + Poisson(mean − 1)."""
    target = max(1, int(round(n * ratio)))
    count = max(1, int(round(target / max(mean, 1.0))))
    if max_spans:
        count = min(count, max_spans)
    count = min(count, max(1, n // 2))
    count = min(count, target)
    drawn = 1 + rng.poisson(max(mean - 1.0, 0.0), count)
    lengths = _apportion(drawn * target / drawn.sum(), target)
    free = n - int(lengths.sum())
    while free < count - 1 and lengths.max() > 1:  # too long to separate: shorten the longest
        lengths[int(np.argmax(lengths))] -= 1
        free += 1
    if free < count - 1:
        return []
    # gaps: count + 1 non-negative parts of `free`, the inner ones >= 1 so spans never touch
    inner = count - 1
    cuts = np.sort(rng.integers(0, free - inner + 1, count))
    gaps = np.diff(np.concatenate([[0], cuts, [free - inner]]))
    gaps[1:-1] += 1
    spans, at = [], int(gaps[0])
    for length, gap in zip(lengths, gaps[1:], strict=True):
        spans.append((at, at + int(length)))
        at += int(length) + int(gap)
    return spans


def _apportion(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers >= 1 summing to `total` (>= len(shares)), near `shares` (largest remainders)."""
    lengths = np.maximum(1, np.floor(shares).astype(int))
    while lengths.sum() > total:
        lengths[int(np.argmax(lengths))] -= 1
    order = np.argsort(-(shares - np.floor(shares)), kind="stable")
    for i in range(total - int(lengths.sum())):
        lengths[order[i % len(order)]] += 1
    return lengths


def _shuffle_positions(rng, n: int, fraction: float) -> np.ndarray:
    """A permutation of range(n) that moves `fraction` of the positions among themselves."""
    order = np.arange(n)
    chosen = np.sort(rng.choice(n, size=int(round(n * fraction)), replace=False))
    order[chosen] = chosen[rng.permutation(len(chosen))]
    return order


def make_sample(arm: Arm, text: np.ndarray, rng, markers: Markers) -> tuple[list[int], list[int]] | None:
    """(P, T) of `arm` on source tokens `text` (module docstring); None when the text is too short for it."""
    text = [int(t) for t in text]
    n = len(text)
    f = arm.family
    if f == "next_token":
        return [], text
    if f == "prefix_lm":
        cut = min(n - 1, max(1, int(round(n * arm.prefix_fraction))))
        return text[:cut], text[cut:]
    if f == "copying":
        return text, text
    if f == "deshuffling":
        order = _shuffle_positions(rng, n, arm.shuffle_fraction)
        return [text[i] for i in order], text
    if f in ("infilling", "autoencoding"):
        spans = _spans(rng, n, arm.mask_ratio, arm.mean_span, max_spans=20 if f == "infilling" else 0)
        if not spans:
            return None
        if f == "infilling":
            prefix, target, at = [], [], 0
            for k, (s, e) in enumerate(spans, 1):
                prefix += text[at:s] + list(markers.encode_sentinel(k))
                target += list(markers.encode_sentinel(k)) + text[s:e]
                at = e
            return prefix + text[at:], target
        pieces, at = [], 0
        for s, e in spans:
            pieces.append(text[at:s])
            at = e
        pieces.append(text[at:])
        if arm.deshuffle:
            pieces = [pieces[i] for i in rng.permutation(len(pieces))]
        prefix = list(pieces[0])
        for piece in pieces[1:]:
            prefix += list(markers.mask) + piece
        return prefix, text
    if f == "selective_copying":
        return _selective_copy(arm, text, rng, markers)
    raise ValueError(f"unknown objective family {f!r}")


def _selective_copy(arm: Arm, text: list[int], rng, markers: Markers):
    n = len(text)
    d_lo, d_hi = DELIMITER
    width = lambda: int(rng.integers(SPAN[0], SPAN[1] + 1))
    need = arm.num_spans * (SPAN[0] + 2 * d_lo)
    if n < need:
        return None
    # the spans with their delimiters, as non-overlapping windows [pre | span | post] in order
    slots, at = [], 0
    for left in range(arm.num_spans, 0, -1):
        pre, post = (int(rng.integers(d_lo, d_hi + 1)) for _ in range(2))
        size = width()
        room = n - at - (left - 1) * (SPAN[0] + 2 * d_lo)  # leave the minimum for the spans still to place
        while pre + size + post > room and (size > SPAN[0] or pre > d_lo or post > d_lo):
            size, pre, post = max(SPAN[0], size - 1), max(d_lo, pre - 1), max(d_lo, post - 1)
        if pre + size + post > room:
            return None
        start = at + int(rng.integers(0, room - (pre + size + post) + 1))
        slots.append((start, pre, size, post))
        at = start + pre + size + post
    tags = markers.tags
    query, answer = list(tags["copy"]), []
    for start, pre, size, post in slots:
        query += list(tags["start"]) + text[start : start + pre] + list(tags["end"])
        query += text[start + pre + size : start + pre + size + post]
        answer += text[start + pre : start + pre + size]
    context = list(tags["context"]) + text
    prefix = query + context if arm.query_first else context + query
    return prefix, answer + list(tags["done"])


def layout(family: str, prefix: list[int], target: list[int], markers: Markers, paradigm_last: bool):
    """The sample's tokens [paradigm] P [start] T and (prefix tokens, first target token index) in it."""
    paradigm = list(markers.paradigm[family])
    if family == "next_token":
        tokens = paradigm + target
        return tokens, 0, len(paradigm)
    head = prefix + paradigm if paradigm_last else paradigm + prefix
    tokens = head + list(markers.start) + target
    return tokens, len(head), len(head) + len(markers.start)


# rows and the mixture


class MixtureSchedule:
    """The mixture in force at each step: [(from_step, weights)], the latest entry at or before the step."""

    def __init__(self, initial: np.ndarray):
        self.steps: list[int] = [0]
        self.weights: list[np.ndarray] = [np.asarray(initial, np.float64)]

    def at(self, step: int) -> np.ndarray:
        return self.weights[bisect.bisect_right(self.steps, step) - 1]

    def set_from(self, step: int, weights: np.ndarray) -> None:
        """From `step` on (later entries are dropped: a resumed run replays them)."""
        keep = bisect.bisect_left(self.steps, step)
        self.steps, self.weights = self.steps[:keep] + [step], self.weights[:keep] + [np.asarray(weights, np.float64)]

    def state(self) -> dict[str, np.ndarray]:
        return {"steps": np.asarray(self.steps, np.int64), "weights": np.stack(self.weights)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.steps = [int(s) for s in np.asarray(state["steps"])]
        self.weights = [np.asarray(w, np.float64) for w in np.asarray(state["weights"])]


class ObjectiveRows:
    """Packed rows of mixture samples from a token stream (module docstring)."""

    def __init__(self, stream, arms: Sequence[Arm], markers: Markers, *, seq_len: int, length_scale: float = 1.0):
        self.stream, self.arms, self.markers = stream, list(arms), markers
        self.seq_len, self.length_scale = seq_len, length_scale
        check_arms_fit(self.arms, markers, seq_len, length_scale, stream.num_tokens)

    def _source(self, rng, n: int) -> np.ndarray:
        start = int(rng.integers(0, self.stream.num_tokens - n + 1))
        return self.stream.read(start, n)[0]

    def sample(self, arm: Arm, rng, space: int):
        """(tokens, prefix_len, target_start) of one sample of `arm` in at most `space` tokens, or None."""
        paradigm_last = bool(rng.integers(2))
        fixed = len(self.markers.paradigm[arm.family]) + (0 if arm.family == "next_token" else len(self.markers.start))
        if arm.length:
            lo, hi = scaled(arm.length, self.length_scale)
            n = int(rng.integers(lo, hi + 1))
        else:
            n = space - fixed
        n = min(n, space - fixed, self.stream.num_tokens)
        while n >= MIN_SOURCE:
            made = make_sample(arm, self._source(rng, n), rng, self.markers)
            if made is not None:
                tokens, prefix_len, target_start = layout(arm.family, *made, self.markers, paradigm_last)
                if len(tokens) <= space:
                    return tokens, prefix_len, target_start
                n = min(n - 1, int(n * space / len(tokens)))
            else:
                n //= 2
        return None

    def row(self, rng, weights: np.ndarray) -> dict[str, np.ndarray]:
        """One packed row of `seq_len` inputs; also the host-only `arm_counts` [num_arms]."""
        length = self.seq_len
        fields = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        fields["loss_mask"] = np.zeros(length, np.float32)
        fields["prefix_mask"] = np.zeros(length, np.int32)
        counts = np.zeros(len(self.arms), np.int32)
        at, segment = 0, 1
        while length - at >= MIN_SOURCE:
            choice = int(rng.choice(len(self.arms), p=weights))
            made = self.sample(self.arms[choice], rng, length - at + 1)  # + 1: the last token is a target only
            if made is None:
                break
            tokens, prefix_len, target_start = made
            n = len(tokens) - 1
            window = slice(at, at + n)
            fields["inputs"][window] = tokens[:-1]
            fields["targets"][window] = tokens[1:]
            fields["segment_ids"][window] = segment
            fields["positions"][window] = np.arange(n)
            fields["prefix_mask"][at : at + prefix_len] = 1
            fields["loss_mask"][at + max(target_start - 1, 0) : at + n] = 1  # targets that are T's tokens
            counts[choice] += 1
            at, segment = at + n, segment + 1
        fields["arm_counts"] = counts
        return fields

    def arm_rows(self, arm_index: int, num_rows: int, seed: int) -> list[dict[str, np.ndarray]]:
        """`num_rows` fixed rows of one arm alone (the controller's held-out batches)."""
        onehot = np.eye(len(self.arms))[arm_index]
        return [self.row(np.random.default_rng((seed, arm_index, r)), onehot) for r in range(num_rows)]


def scaled(length: tuple[int, ...], scale: float) -> tuple[int, int]:
    lo, hi = (max(MIN_SOURCE, int(round(x * scale))) for x in length)
    return lo, max(lo, hi)


def min_tokens(arm: Arm, markers: Markers, length_scale: float) -> int:
    """The fewest sample tokens an arm can take: its shortest source length (MIN_SOURCE for the filling arms)
    laid out with its markers, at the arm's own size formula."""
    n = scaled(arm.length, length_scale)[0] if arm.length else MIN_SOURCE
    fixed = len(markers.paradigm[arm.family]) + (0 if arm.family == "next_token" else len(markers.start))
    double = arm.family in ("copying", "deshuffling", "autoencoding")
    extra = 0
    if arm.family == "selective_copying":
        n = max(n, arm.num_spans * (SPAN[0] + 2 * DELIMITER[0]))
        tags = markers.tags
        extra = len(tags["copy"]) + len(tags["context"]) + len(tags["done"])
        extra += arm.num_spans * (len(tags["start"]) + len(tags["end"]) + SPAN[0] + 2 * DELIMITER[0])
    return fixed + n * (2 if double else 1) + extra


def check_arms_fit(arms: Sequence[Arm], markers: Markers, seq_len: int, length_scale: float, source_tokens):
    """Refuses an arm whose shortest sample (its prefix included) is longer than a row."""
    for arm in arms:
        need = min_tokens(arm, markers, length_scale)
        if need > seq_len + 1:
            raise ConfigError(
                "objectives.length_scale",
                f"={length_scale:g}: objective {arm.name} needs at least {need} tokens (its prefix and markers "
                f"included), longer than a row of train.seq_len={seq_len}; lower the scale or raise seq_len",
            )
        if source_tokens is not None and arm.length and scaled(arm.length, length_scale)[0] > source_tokens:
            raise ConfigError("data", f"objective {arm.name} reads more tokens than the source has ({source_tokens})")


def train_batches(
    rows: ObjectiveRows,
    schedule: MixtureSchedule,
    *,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """`ds[k]`: this process's rows of global batch k (rows p, p + P, ... of it), each a pure function of (seed, k,
    row, the schedule's weights at k)."""
    local = global_batch // process_count

    def batch(step: int, _) -> dict[str, np.ndarray]:
        weights = schedule.at(step)
        rng = lambda j: np.random.default_rng((seed, step, j))
        mine = [rows.row(rng(j), weights) for j in range(process_index, global_batch, process_count)][:local]
        return stack_rows(mine)

    return grain.MapDataset.range(1).repeat().map_with_index(batch)


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A batch of rows: their device fields stacked (the host-only `arm_counts` dropped)."""
    return device_fields({k: np.stack([r[k] for r in rows]) for k in rows[0]})

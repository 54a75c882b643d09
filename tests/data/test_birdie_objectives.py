"""Birdie's objectives (`lcjax.data.birdie_objectives`): each family's transform on a fixed input gives the documented
format; the packed row lays a sample out as Birdie's packer does; the batch at step k is a pure function of (seed, k,
mixture); bad mixtures are refused naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from lcjax.data import birdie_objectives as bo
from lcjax.data import sources
from lcjax.data.tokenizers import ByteTokenizer
from lcjax.errors import ConfigError

TOKENIZER = ByteTokenizer()
MARKERS = bo.Markers.encode(TOKENIZER)
# distinct source tokens above every marker byte (markers are ASCII): a token's place is unambiguous
TEXT = np.arange(128, 128 + 120, dtype=np.int32)


def _make(arm, seed=0, text=TEXT):
    made = bo.make_sample(arm, text, np.random.default_rng(seed), MARKERS)
    assert made is not None
    return [int(t) for t in text], *made


def _split(tokens, marker):
    """`tokens` cut at every occurrence of `marker` (a token tuple)."""
    pieces, at, m = [[]], 0, list(marker)
    while at < len(tokens):
        if tokens[at : at + len(m)] == m:
            pieces.append([])
            at += len(m)
        else:
            pieces[-1].append(tokens[at])
            at += 1
    return pieces


def test_next_token_and_prefix_lm_and_copying():
    text, p, t = _make(bo.Arm("next_token"))
    assert p == [] and t == text
    text, p, t = _make(bo.Arm("prefix_lm"))
    assert p + t == text and len(p) == 90  # 0.75 of 120
    text, p, t = _make(bo.Arm("copying", (64, 256)))
    assert p == text and t == text


@pytest.mark.parametrize("ratio,span", [(0.15, 3), (0.5, 8)])
def test_infilling_is_t5_span_corruption(ratio, span):
    """P: the text with span k replaced by sentinel k; T: sentinel 1, span 1, sentinel 2, ...; putting the spans back
    gives the text; the masked share is the ratio; sentinels are numbered 1..K in order."""
    text, p, t = _make(bo.Arm("infilling", (64, 128), ratio, span))
    spans, rest, count = {}, t, 0
    while rest:
        count += 1
        marker = list(MARKERS.encode_sentinel(count))
        assert rest[: len(marker)] == marker, f"sentinel {count} expected"
        rest = rest[len(marker) :]
        nxt = list(MARKERS.encode_sentinel(count + 1))
        end = next((i for i in range(len(rest)) if rest[i : i + len(nxt)] == nxt), len(rest))
        spans[count], rest = rest[:end], rest[end:]
    rebuilt = p
    for j, span_tokens in spans.items():
        marker = list(MARKERS.encode_sentinel(j))
        at = next(i for i in range(len(rebuilt)) if rebuilt[i : i + len(marker)] == marker)
        rebuilt = rebuilt[:at] + span_tokens + rebuilt[at + len(marker) :]
    assert rebuilt == text
    assert sum(len(s) for s in spans.values()) == round(len(text) * ratio)
    assert 1 <= count <= 20 and all(len(s) >= 1 for s in spans.values())


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_deshuffling_moves_at_most_the_fraction_and_targets_the_original(fraction):
    text, p, t = _make(bo.Arm("deshuffling", (64, 128), shuffle_fraction=fraction))
    moved = sum(a != b for a, b in zip(p, text, strict=True))
    assert t == text and sorted(p) == text
    assert 0.8 * fraction * len(text) <= moved <= fraction * len(text)


@pytest.mark.parametrize("deshuffle", [False, True])
def test_autoencoding_masks_spans_with_one_marker_and_reconstructs_everything(deshuffle):
    """T is the whole text; P is the unmasked pieces joined by the mask string (in order, or shuffled when
    `deshuffle`), and the masked share is the ratio."""
    arm = bo.Arm("autoencoding", (64, 128), 0.5, 3, deshuffle=deshuffle)
    text, p, t = _make(arm)
    assert t == text
    pieces = _split(p, MARKERS.mask)
    kept = [tok for piece in pieces for tok in piece]
    assert len(text) - len(kept) == round(0.5 * len(text))
    if deshuffle:
        # the same pieces, reordered: in text order they are increasing runs that tile the unmasked tokens
        ordered = sorted((piece for piece in pieces if piece), key=lambda piece: piece[0])
        assert [tok for piece in ordered for tok in piece] == sorted(kept)
        assert pieces != sorted(pieces, key=lambda piece: piece[0] if piece else -1)
    else:
        assert kept == [tok for tok in text if tok in set(kept)]  # the text in order, spans removed


@pytest.mark.parametrize("spans,query_first", [(1, True), (3, False)])
def test_selective_copying_answers_the_span_between_each_pair_of_delimiters(spans, query_first):
    """The paper's "[COPY] [START] BC [END] F [CONTEXT] ABCDEF → DE [DONE]": for each span, `pre` is the text just
    before it and `post` the text just after, and the answer is the spans in order, then [DONE]."""
    arm = bo.Arm("selective_copying", (100, 120), num_spans=spans, query_first=query_first)
    text, p, t = _make(arm, seed=3)
    tags = {k: list(v) for k, v in MARKERS.tags.items()}
    context_at = next(i for i in range(len(p)) if p[i : i + len(tags["context"])] == tags["context"])
    if query_first:
        query, context = p[:context_at], p[context_at + len(tags["context"]) :]
    else:
        assert context_at == 0
        copy_at = next(i for i in range(len(p)) if p[i : i + len(tags["copy"])] == tags["copy"])
        query, context = p[copy_at:], p[len(tags["context"]) : copy_at]
    assert context == text and query[: len(tags["copy"])] == tags["copy"]
    assert t[-len(tags["done"]) :] == tags["done"]
    answer = t[: -len(tags["done"])]
    pairs = _split(query[len(tags["copy"]) :], tags["start"])[1:]
    assert len(pairs) == spans
    at, expected = 0, []
    for pair in pairs:
        pre, post = _split(pair, tags["end"])
        assert 1 <= len(pre) <= 8 and 1 <= len(post) <= 8
        begin = text.index(pre[0]) + len(pre)
        assert begin >= at and text[begin - len(pre) : begin] == pre
        end = text.index(post[0])
        assert 4 <= end - begin <= 32 and text[end : end + len(post)] == post
        expected += text[begin:end]
        at = end + len(post)
    assert answer == expected


def _stream(n=4000):
    rng = np.random.default_rng(0)
    return sources.TokenStream(rng.integers(97, 123, n).astype(np.int32), np.zeros(n, bool))


def test_a_packed_row_lays_samples_out_as_birdie_does():
    """Per segment: [paradigm] P [start] T with the prefix mask over paradigm + P (the start token is causal), the
    loss on T's tokens only, positions from 0; next-token samples are all causal; padding has segment 0 and no loss."""
    rows = bo.ObjectiveRows(_stream(), list(bo.DEFAULT_ARMS.values()), MARKERS, seq_len=512, length_scale=0.25)
    weights = np.full(len(rows.arms), 1 / len(rows.arms))
    families = set()
    for r in range(12):
        row = rows.row(np.random.default_rng((0, r)), weights)
        assert row["arm_counts"].sum() == row["segment_ids"].max()
        for seg in range(1, row["segment_ids"].max() + 1):
            where = np.flatnonzero(row["segment_ids"] == seg)
            assert np.array_equal(row["positions"][where], np.arange(len(where)))
            tokens = [*row["inputs"][where], row["targets"][where[-1]]]
            assert np.array_equal(row["targets"][where][:-1], row["inputs"][where][1:])
            prefix = int(row["prefix_mask"][where].sum())
            assert np.all(row["prefix_mask"][where[:prefix]] == 1)
            family = next(f for f, p in MARKERS.paradigm.items() if _has(tokens[: prefix or len(p)], p))
            families.add(family)
            loss = row["loss_mask"][where] > 0
            first_target = int(np.argmax(loss)) + 1  # the token the first scored target is
            if family == "next_token":
                assert prefix == 0 and tokens[: len(MARKERS.paradigm[family])] == list(MARKERS.paradigm[family])
                assert first_target == len(MARKERS.paradigm[family])
            else:
                assert tokens[prefix : prefix + len(MARKERS.start)] == list(MARKERS.start)
                assert first_target == prefix + len(MARKERS.start)
            assert loss[first_target - 1 :].all() and not loss[: first_target - 1].any()
        pad = row["segment_ids"] == 0
        assert not row["loss_mask"][pad].any() and not row["prefix_mask"][pad].any()
    assert families == set(bo.FAMILIES)


def _has(tokens, marker):
    """The paradigm at the start or at the end of the prefix."""
    m = list(marker)
    return tokens[: len(m)] == m or tokens[-len(m) :] == m


def test_the_batch_at_step_k_is_a_pure_function_of_seed_step_and_mixture():
    stream = _stream()
    make = lambda schedule, **kw: bo.train_batches(
        bo.ObjectiveRows(stream, list(bo.DEFAULT_ARMS.values()), MARKERS, seq_len=256, length_scale=0.25),
        schedule,
        global_batch=4,
        seed=7,
        **kw,
    )
    uniform = np.full(8, 1 / 8)
    a, b = bo.MixtureSchedule(uniform), bo.MixtureSchedule(uniform)
    ds_a, ds_b = make(a), make(b)
    for k in (0, 5):
        for key in ds_a[k]:
            np.testing.assert_array_equal(ds_a[k][key], ds_b[k][key])
    b.set_from(5, np.eye(8)[3])  # copying only from step 5
    assert all(np.array_equal(ds_a[4][k], ds_b[4][k]) for k in ds_a[4])
    assert not np.array_equal(ds_a[5]["inputs"], ds_b[5]["inputs"])
    copy = list(MARKERS.paradigm["copying"])
    rows = ds_b[6]
    for r in range(4):
        first = rows["segment_ids"][r] == 1
        inputs = list(rows["inputs"][r][first])
        assert _has(inputs[: int(rows["prefix_mask"][r][first].sum())], copy)
    # a process's rows are its slice of the global batch
    half = make(a, process_index=1, process_count=2)
    np.testing.assert_array_equal(half[3]["inputs"], ds_a[3]["inputs"][1::2])
    # a restored schedule gives the same batches
    c = bo.MixtureSchedule(uniform)
    c.load(b.state())
    np.testing.assert_array_equal(make(c)[6]["inputs"], rows["inputs"])
    b.set_from(2, uniform)  # a later entry is dropped when an earlier step is set again
    assert b.steps == [0, 2]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("copying,lstm", "unknown objective 'lstm'"),
        ("copying:0,infilling:0", "sum to 0"),
        ("copying:-1", "must be finite and >= 0"),
        ("copying:x", "is not a number"),
        ("", "is empty"),
    ],
)
def test_bad_mixtures_name_the_field(spec, message):
    with pytest.raises(ConfigError, match="objectives.mixture") as error:
        bo.parse_mixture(spec)
    assert message in str(error.value)


def test_presets_and_a_row_too_short_for_an_arm():
    arms, weights = bo.parse_mixture("birdie")
    assert len(arms) == 96 and len({a.name for a in arms}) == 96 and np.isclose(weights.sum(), 1)
    arms, weights = bo.parse_mixture("ul2")
    assert [a.family for a in arms] == ["next_token", "prefix_lm", "infilling", "infilling"]
    np.testing.assert_allclose(weights, [0.6, 0.2, 0.1, 0.1])
    with pytest.raises(ConfigError, match="objectives.length_scale=1: objective copying") as error:
        bo.check_arms_fit([bo.DEFAULT_ARMS["copying"]], MARKERS, 128, 1.0, None)
    assert "longer than a row of train.seq_len=128" in str(error.value)

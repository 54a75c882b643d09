import numpy as np
import pytest

from lcjax.data.synthetic import MQAR, Passkey, Phonebook, SelectiveCopy
from lcjax.data.tokenizers import ByteTokenizer
from lcjax.errors import ConfigError


@pytest.mark.parametrize("seq_len, pairs, passes", [(64, 4, 1), (128, 8, 1), (256, 16, 1), (256, 16, 3)])
def test_mqar_examples(seq_len, pairs, passes):
    task = MQAR(vocab_size=8192, seq_len=seq_len, num_kv_pairs=pairs, num_examples=50, seed=3, num_passes=passes)
    context = 2 * pairs * passes
    for i in range(50):
        ex = task[i]
        assert ex["inputs"].shape == ex["targets"].shape == ex["loss_mask"].shape == (seq_len,)
        keys, values = ex["inputs"][0 : 2 * pairs : 2], ex["inputs"][1 : 2 * pairs : 2]
        assert len(set(keys.tolist())) == pairs  # keys unique
        assert keys.min() >= 1 and keys.max() < 4096 and values.min() >= 4096 and values.max() < 8192
        np.testing.assert_array_equal(ex["inputs"][:context], np.tile(ex["inputs"][: 2 * pairs], passes))
        labelled = np.flatnonzero(ex["loss_mask"])
        assert len(labelled) == pairs and labelled.min() >= context and np.all((labelled - context) % 2 == 0)
        pair_of = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for position in labelled:  # each label is the value paired with the queried key
            assert ex["targets"][position] == pair_of[int(ex["inputs"][position])]
    for k in ex:  # deterministic per (seed, index), different across indices and seeds
        np.testing.assert_array_equal(task[7][k], task[7][k])
    assert not np.array_equal(task[7]["inputs"], task[8]["inputs"])
    other = MQAR(vocab_size=8192, seq_len=seq_len, num_kv_pairs=pairs, num_examples=50, seed=4, num_passes=passes)
    assert not np.array_equal(task[7]["inputs"], other[7]["inputs"])


def test_mqar_gaps_favour_short_distances():
    task = MQAR(vocab_size=8192, seq_len=512, num_kv_pairs=8, num_examples=300, seed=0)
    offsets = np.concatenate([np.flatnonzero(task[i]["loss_mask"]) - 16 for i in range(300)]) // 2
    near, far = np.sum(offsets < 62), np.sum(offsets >= 186)  # first vs last quarter of the 248 query slots
    assert near > 1.5 * far


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vocab_size": 100, "seq_len": 128, "num_kv_pairs": 4}, "mqar.vocab_size"),
        ({"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 17}, "mqar.num_kv_pairs"),  # 34 + 34 > 64
        ({"vocab_size": 8192, "seq_len": 65, "num_kv_pairs": 4}, "mqar.seq_len"),
        ({"vocab_size": 8192, "seq_len": 256, "num_kv_pairs": 16, "num_passes": 8}, "mqar.num_kv_pairs"),
    ],
)
def test_mqar_constraints(kwargs, field):
    with pytest.raises(ConfigError) as e:
        MQAR(num_examples=1, **kwargs)
    assert e.value.field == field


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_appears_once_at_depth_and_is_the_answer(depth):
    tok = ByteTokenizer()
    task = Passkey(tok, seq_len=600, depth=depth, num_examples=10, seed=1)
    for i in range(10):
        ex, key = task[i], task.passkey(i)
        assert ex["inputs"].shape == ex["targets"].shape == ex["loss_mask"].shape == (600,)
        text = tok.decode(ex["inputs"].tolist())
        assert text.count(f"The pass key is {key}.") == 1
        answer = tok.decode(ex["targets"][ex["loss_mask"] > 0].tolist())
        assert answer == key and text.endswith("What is the pass key? The pass key is " + key[:-1])
        needle, question, answer_tokens = task._parts(key)
        haystack_len = 600 + 1 - len(needle) - len(question) - len(answer_tokens)
        assert text.index(" The pass key is") == int(ex["needle_start"]) == round(depth * haystack_len)
    np.testing.assert_array_equal(
        task[3]["inputs"], Passkey(tok, seq_len=600, depth=depth, num_examples=10, seed=1)[3]["inputs"]
    )
    assert task.passkey(3) != task.passkey(4)


def test_phonebook_answer_matches_the_book_and_question_is_on_both_sides():
    tok = ByteTokenizer()
    task = Phonebook(tok, seq_len=1024, num_entries=20, num_queries=3, num_examples=5, seed=2)
    for i in range(5):
        ex = task[i]
        entries, asked = task.book(i)
        assert ex["inputs"].shape == (1024,) and len({name for name, _ in entries}) == 20
        text = tok.decode(ex["inputs"].tolist())
        question = "What are the numbers of " + ", ".join(entries[j][0] for j in asked) + "?\n"
        assert text.count(question) == 2
        first, second = text.index(question), text.rindex(question)
        book = text[first + len(question) : second]
        assert book == "".join(f"{n}: {p}\n" for n, p in entries)
        answer = tok.decode(ex["targets"][ex["loss_mask"] > 0].tolist())
        assert answer == "".join(f"{entries[j][0]}: {entries[j][1]}\n" for j in asked)
    with pytest.raises(ConfigError, match="phonebook.seq_len"):
        Phonebook(tok, seq_len=100, num_entries=20, num_queries=3, num_examples=1)[0]


def test_selective_copy_targets_are_the_scattered_tokens_in_order():
    task = SelectiveCopy(vocab_size=16, seq_len=64, num_tokens=8, num_examples=20, seed=0)
    for i in range(20):
        ex = task[i]
        context = ex["inputs"][:56]
        data = context[context != SelectiveCopy.NOISE]
        assert len(data) == 8 and data.min() >= 2
        assert ex["inputs"][56] == SelectiveCopy.MARKER
        np.testing.assert_array_equal(ex["targets"][ex["loss_mask"] > 0], data)
        assert ex["loss_mask"].sum() == 8
    assert not np.array_equal(task[0]["inputs"], task[1]["inputs"])
    with pytest.raises(ConfigError, match="selective_copy.num_tokens"):
        SelectiveCopy(vocab_size=16, seq_len=10, num_tokens=8, num_examples=1)

import numpy as np
import pytest

from lcjax.data.synthetic import MQAR, NIAH, TASKS, JRTPrompt, Passkey, Phonebook, SelectiveCopy, make_task
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
        ({"vocab_size": 100, "seq_len": 128, "num_kv_pairs": 4}, "model.vocab_size"),
        ({"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 17}, "task.num_kv_pairs"),  # 34 + 34 > 64
        ({"vocab_size": 8192, "seq_len": 65, "num_kv_pairs": 4}, "train.seq_len"),
        ({"vocab_size": 8192, "seq_len": 256, "num_kv_pairs": 16, "num_passes": 8}, "task.num_kv_pairs"),
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
        assert len(key) == 5 and key.isdigit()
        text = tok.decode(ex["inputs"].tolist())
        assert text.count(f"The pass key is {key}.") == 1
        answer = tok.decode(ex["targets"][ex["loss_mask"] > 0].tolist())
        assert answer == key and text.endswith("What is the pass key? The pass key is " + key[:-1])
        needle, question, answer_tokens = task._parts("", key)
        haystack_len = 600 + 1 - len(needle) - len(question) - len(answer_tokens)
        assert text.index(" The pass key is") == task.needle_start(i) == round(depth * haystack_len)
        np.testing.assert_array_equal(ex["segment_ids"], 1)
        np.testing.assert_array_equal(ex["positions"], np.arange(600))
    np.testing.assert_array_equal(
        task[3]["inputs"], Passkey(tok, seq_len=600, depth=depth, num_examples=10, seed=1)[3]["inputs"]
    )
    assert task.passkey(3) != task.passkey(4)


@pytest.mark.parametrize("needle, kind", [("number", "number"), ("word", "word")])
def test_number_and_word_needles(needle, kind):
    tok = ByteTokenizer()
    task = NIAH(tok, seq_len=512, depth=0.3, num_examples=20, seed=5, needle=needle)
    values = set()
    for i in range(20):
        ex, key, value = task[i], task.needle_key(i), task.needle_value(i)
        values.add(value)
        text = tok.decode(ex["inputs"].tolist())
        sentence = f"One of the special magic {kind}s for {key} is: {value}."
        assert text.count(sentence) == 1 and text.index(sentence) == task.needle_start(i) + 1
        assert text.count(f"special magic {kind} for {key} mentioned") == 1  # the question names the key
        assert tok.decode(ex["targets"][ex["loss_mask"] > 0].tolist()) == value
        assert value.isdigit() and len(value) == 7 if needle == "number" else value.isalpha()
    assert len(values) > 5


def test_task_bad_parameters_name_their_flag():
    tok = ByteTokenizer()
    for kwargs, field in [
        ({"needle": "uuid"}, "task.needle"),
        ({"depth": 1.5}, "task.depth"),
        ({"seq_len": 90}, "train.seq_len"),
    ]:
        args = {"seq_len": 512, "depth": 0.5, "num_examples": 1, **kwargs}
        with pytest.raises(ConfigError) as e:
            NIAH(tok, **args)
        assert e.value.field == field


def _content(ex):
    """Token sequence of an example's content (segment 1): its inputs plus the last target."""
    on = ex["segment_ids"] > 0
    return np.concatenate([ex["inputs"][on], ex["targets"][-1:]])


@pytest.mark.parametrize("name", TASKS)
def test_jrt_prompt_repeats_the_context_before_the_question(name):
    from lcjax.config import TaskConfig

    tok = ByteTokenizer()
    seq_len = 512
    cfg = TaskConfig(num_kv_pairs=8, num_entries=6, num_queries=2)
    plain = make_task(name, cfg, tokenizer=tok, vocab_size=1024, seq_len=seq_len, num_examples=4, seed=2)
    jrt = make_task(name, cfg, tokenizer=tok, vocab_size=1024, seq_len=seq_len, num_examples=4, seed=2, jrt_prompt=True)
    assert isinstance(jrt, JRTPrompt)
    for i in range(4):
        a, b = plain[i], jrt[i]
        assert b["inputs"].shape == (2 * seq_len,)
        s, c = int(a["context_start"]), int(a["context_end"])
        tokens = np.concatenate([a["inputs"], a["targets"][-1:]])
        context = tokens[s:c]
        assert len(context) > 0
        pad = int(np.sum(b["segment_ids"] == 0))
        np.testing.assert_array_equal(b["segment_ids"][:pad], 0)
        np.testing.assert_array_equal(b["positions"][pad:], np.arange(2 * seq_len - pad))
        np.testing.assert_array_equal(b["loss_mask"][: pad + 2 * len(context)], 0)
        # the content is context, context, then the rest of the original example
        np.testing.assert_array_equal(b["inputs"][pad:], np.concatenate([context, tokens[s:-1]]))
        np.testing.assert_array_equal(b["targets"][b["loss_mask"] > 0], a["targets"][a["loss_mask"] > 0])
        np.testing.assert_array_equal(  # each answer sits after the same inputs as before
            b["inputs"][b["loss_mask"] > 0], a["inputs"][a["loss_mask"] > 0]
        )


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
        on = ex["segment_ids"] > 0  # left padding is segment 0; positions count from the first real token
        assert tok.decode(ex["inputs"][on][:24].tolist()) == "What are the numbers of "
        np.testing.assert_array_equal(ex["positions"][on], np.arange(on.sum()))
        assert ex["loss_mask"][~on].sum() == 0
    with pytest.raises(ConfigError, match="train.seq_len"):
        Phonebook(tok, seq_len=100, num_entries=20, num_queries=3, num_examples=1)


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
    with pytest.raises(ConfigError, match="task.num_tokens"):
        SelectiveCopy(vocab_size=16, seq_len=10, num_tokens=8, num_examples=1)


def test_set_disjointness_answers_the_one_element_the_two_sets_share():
    from lcjax.data.synthetic import SetDisjointness

    task = SetDisjointness(vocab_size=64, seq_len=24, short_set=4, long_set=8, num_examples=20, seed=0)
    for i in range(20):
        ex = task[i]
        on = ex["segment_ids"] > 0
        body = ex["inputs"][on]
        assert on.sum() == 4 + 1 + 8 + 1 and not on[: 24 - 14].any()  # left padding, then the body
        short, sep1, long, sep2 = body[:4], body[4], body[5:13], body[13]
        assert sep1 == sep2 == SetDisjointness.SEPARATOR and len(set(short)) == 4 and len(set(long)) == 8
        (shared,) = set(short) & set(long)
        assert ex["loss_mask"].sum() == 1 and ex["loss_mask"][-1] == 1 and ex["targets"][-1] == shared
        assert ex["context_end"] - ex["context_start"] == 13  # both sets: what JRT-Prompt repeats
    assert len({int(task[i]["targets"][-1]) for i in range(20)}) > 5
    with pytest.raises(ConfigError, match="task.long_set"):
        SetDisjointness(vocab_size=64, seq_len=12, short_set=4, long_set=8, num_examples=1)


@pytest.mark.parametrize("jrt_prompt", [False, True])
@pytest.mark.parametrize("name", TASKS)
def test_context_loss_weights_the_unlabelled_content_and_keeps_the_labels(name, jrt_prompt):
    from lcjax.config import TaskConfig
    from lcjax.data.synthetic import ContextLoss

    cfg = TaskConfig(num_kv_pairs=8, num_entries=6, num_queries=2)
    kwargs = dict(
        tokenizer=ByteTokenizer(), vocab_size=1024, seq_len=512, num_examples=3, seed=5, jrt_prompt=jrt_prompt
    )
    plain = make_task(name, cfg, **kwargs)
    weighted = ContextLoss(make_task(name, cfg, **kwargs), 0.25)
    assert len(weighted) == len(plain) and weighted.seq_len == plain.seq_len
    for i in range(3):
        a, b = plain[i], weighted[i]
        labels, content = a["loss_mask"] > 0, a["segment_ids"] > 0
        np.testing.assert_array_equal(b["loss_mask"][labels], a["loss_mask"][labels])
        np.testing.assert_array_equal(b["loss_mask"][content & ~labels], 0.25)
        np.testing.assert_array_equal(b["loss_mask"][~content], 0.0)  # left padding (JRT-Prompt) stays out
        assert (~content).any() or not jrt_prompt  # JRT-Prompt pads on the left
        for key in a:
            if key != "loss_mask":
                np.testing.assert_array_equal(b[key], a[key])


def test_context_loss_applies_to_training_only_and_is_checked():
    import types

    from lcjax.config import TaskConfig
    from lcjax.data.synthetic import ContextLoss
    from lcjax.train import run as run_lib

    with pytest.raises(ConfigError) as e:
        TaskConfig(context_loss=1.5).validate()
    assert e.value.field == "task.context_loss"
    config = types.SimpleNamespace(
        task=TaskConfig(context_loss=0.1, num_train_examples=10),
        model=types.SimpleNamespace(vocab_size=256),
        train=types.SimpleNamespace(seq_len=128, seed=0),
        eval=types.SimpleNamespace(num_batches=1, batch_size=2),
    )
    run = types.SimpleNamespace(config=config, tokenizer=ByteTokenizer())
    train, held_out = run_lib.task_examples(run, "passkey", "train"), run_lib.task_examples(run, "passkey", "eval")
    assert isinstance(train, ContextLoss) and not isinstance(held_out, ContextLoss)
    assert np.isclose(train[0]["loss_mask"].sum(), 0.1 * (128 - 5) + 5)  # 5 answer digits at weight 1
    assert held_out[0]["loss_mask"].sum() == 5


def test_random_depth_draws_each_needle_depth_and_trains_only():
    import types

    from lcjax.config import TaskConfig, from_dict
    from lcjax.train import run as run_lib

    fixed = Passkey(ByteTokenizer(), seq_len=256, depth=0.5, num_examples=64, seed=3)
    drawn = Passkey(ByteTokenizer(), seq_len=256, depth=0.5, num_examples=64, seed=3, random_depth=True)
    starts = [drawn.needle_start(i) for i in range(64)]
    assert len({fixed.needle_start(i) for i in range(64)}) == 1 and len(set(starts)) > 30
    depths = np.array([drawn.needle_depth(i) for i in range(64)])
    assert depths.min() < 0.1 and depths.max() > 0.9 and drawn.needle_depth(5) == drawn.needle_depth(5)
    for i in range(8):  # the needle sits where needle_start says, and the answer is still its value
        ex, value = drawn[i], drawn.needle_value(i)
        text = bytes(np.concatenate([ex["inputs"], ex["targets"][-1:]]).astype(np.uint8)).decode()
        assert text.index(f" The pass key is {value}.") == starts[i]
        assert bytes(ex["targets"][ex["loss_mask"] > 0].astype(np.uint8)).decode() == value
    config = types.SimpleNamespace(
        task=TaskConfig(random_depth=True, num_train_examples=64),
        model=types.SimpleNamespace(vocab_size=256),
        train=types.SimpleNamespace(seq_len=256, seed=3),
        eval=types.SimpleNamespace(num_batches=1, batch_size=2),
    )
    run = types.SimpleNamespace(config=config, tokenizer=ByteTokenizer())
    assert run_lib.task_examples(run, "passkey", "train").random_depth
    assert not run_lib.task_examples(run, "passkey", "eval").random_depth
    with pytest.raises(ConfigError) as e:
        make_task("mqar", TaskConfig(), tokenizer=ByteTokenizer(), vocab_size=512, seq_len=64, num_examples=1, seed=0,
                  random_depth=True)  # fmt: skip
    assert e.value.field == "task.random_depth"
    with pytest.raises(ConfigError) as e:
        from_dict(
            {"model": {"name": "transformer"}, "data": {"source": "mqar"}, "task": {"random_depth": True}}
        ).validate(device_count=1)
    assert e.value.field == "task.random_depth"


def test_prompt_prefix_covers_the_prompt_and_stops_before_the_answer():
    """task.prefix_mask: 1 on the question and the book, 0 on padding, on the last prompt token (the input that
    predicts the answer's first token, causal like Birdie's start token) and on the answer."""
    from lcjax.config import TaskConfig

    tok = ByteTokenizer()
    config = TaskConfig(num_entries=4, num_queries=2, prefix_mask=True)
    task = make_task("phonebook", config, tokenizer=tok, vocab_size=256, seq_len=384, num_examples=2, seed=0)
    ex = task[1]
    first_answer = int(np.argmax(ex["loss_mask"] > 0))
    prefix = ex["prefix_mask"].astype(bool)
    assert prefix.sum() > 0 and np.array_equal(prefix, (np.arange(384) < first_answer) & (ex["segment_ids"] > 0))
    assert tok.decode(ex["inputs"][prefix].tolist()).startswith("What are the numbers of ")
    assert tok.decode([int(ex["inputs"][first_answer])]) == "\n"
    plain = make_task(
        "phonebook", TaskConfig(num_entries=4, num_queries=2), tokenizer=tok, vocab_size=256, seq_len=384,
        num_examples=2, seed=0,
    )  # fmt: skip
    assert "prefix_mask" not in plain[1] and np.array_equal(plain[1]["inputs"], ex["inputs"])

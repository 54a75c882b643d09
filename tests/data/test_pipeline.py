import itertools
import json

import numpy as np
import pytest

from lcjax.config import DataConfig
from lcjax.data import pipeline, sources
from lcjax.data.tokenizers import ByteTokenizer, load_tokenizer
from lcjax.errors import ConfigError


def _stream(doc_lengths, seed=0):
    rng = np.random.default_rng(seed)
    return sources.concat_documents(rng.integers(0, 256, n) for n in doc_lengths)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_batch_at_step_k_is_identical_across_instances():
    stream = _stream([50, 300, 17, 900, 120] * 4)
    make = lambda: pipeline.train_batches(stream, seq_len=32, global_batch=4, seed=7)
    first, second = make(), make()
    for step in (0, 3, 57, 200):  # 200 is past the first epoch
        _assert_batches_equal(first[step], second[step])
    # Iterating from step k gives the same batches as random access (this is how a run resumes).
    it = pipeline.iterate_from(make(), 55, num_threads=2)
    for step in (55, 56, 57):
        _assert_batches_equal(next(it), first[step])
    assert not np.array_equal(
        first[0]["inputs"], pipeline.train_batches(stream, seq_len=32, global_batch=4, seed=8)[0]["inputs"]
    )


def test_epochs_cover_every_row_once_then_reshuffle():
    stream = _stream([1000])
    ds = pipeline.train_batches(stream, seq_len=10, global_batch=1, seed=0)
    rows = pipeline.num_rows(stream, 10)
    firsts = lambda steps: [tuple(ds[s]["inputs"][0][:10]) for s in steps]
    epoch1, epoch2 = firsts(range(rows)), firsts(range(rows, 2 * rows))
    assert len(set(epoch1)) == rows and set(epoch1) == set(epoch2) and epoch1 != epoch2


def test_process_shards_partition_the_global_batch():
    stream = _stream([400] * 10)
    global_ds = pipeline.train_batches(stream, seq_len=16, global_batch=8, seed=1)
    shards = [
        pipeline.train_batches(stream, seq_len=16, global_batch=8, seed=1, process_index=p, process_count=4)
        for p in range(4)
    ]
    for step in (0, 9):
        rows = {tuple(r) for r in global_ds[step]["inputs"]}
        local = [tuple(r) for s in shards for r in s[step]["inputs"]]
        assert len(local) == 8 and set(local) == rows


def test_rows_pack_documents_with_segments_positions_and_mask():
    tokens = np.arange(20, dtype=np.int32)
    starts = np.zeros(20, bool)
    starts[[0, 4, 9]] = True  # documents [0..3], [4..8], [9..19]
    stream = sources.TokenStream(tokens, starts)
    row = pipeline.make_row(stream, 0, seq_len=8)  # tokens 0..8
    np.testing.assert_array_equal(row["inputs"], np.arange(8))
    np.testing.assert_array_equal(row["targets"], np.arange(1, 9))
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 1, 0, 1, 1, 1, 1])
    row = pipeline.make_row(stream, 1, seq_len=8)  # tokens 8..16: starts mid-document 2
    np.testing.assert_array_equal(row["segment_ids"], [1, 2, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(row["positions"], [0, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 1, 1, 1, 1])


def test_eval_batches_are_fixed_and_sharded():
    stream = _stream([3000])
    a = pipeline.eval_batches(stream, seq_len=16, global_batch=4, num_batches=3)
    b = pipeline.eval_batches(stream, seq_len=16, global_batch=4, num_batches=3)
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        _assert_batches_equal(x, y)
    halves = [
        pipeline.eval_batches(stream, seq_len=16, global_batch=4, num_batches=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    merged = {tuple(r) for h in halves for r in h[1]["inputs"]}
    assert merged == {tuple(r) for r in a[1]["inputs"]}


def test_too_short_split_is_a_config_error():
    with pytest.raises(ConfigError, match="fewer than one row"):
        pipeline.train_batches(_stream([10]), seq_len=32, global_batch=2, seed=0)


def test_stdlib_split_is_disjoint_and_deterministic():
    root, files = sources.stdlib_files()
    assert len(files) > 100
    keys = [str(p.relative_to(root)) for p in files]
    evals = {k for k in keys if sources.split_of(k, 0.05) == "eval"}
    assert 0.01 * len(keys) < len(evals) < 0.1 * len(keys)
    assert evals == {k for k in keys if sources.split_of(k, 0.05) == "eval"}


def test_text_and_jsonl_sources(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 5)
    data = DataConfig(source="text", path=str(tmp_path / "*.txt"), eval_fraction=0.3)
    train = sources.load_stream(data, ByteTokenizer(), "train")
    evals = sources.load_stream(data, ByteTokenizer(), "eval")
    assert train.doc_start.sum() + evals.doc_start.sum() == 20
    assert train.num_tokens + evals.num_tokens == sum(len(f"document number {i}\n" * 5) for i in range(20))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"héllo {i}"}) for i in range(5)))
    stream = sources.load_stream(
        DataConfig(source="jsonl", path=str(jsonl), eval_path=str(jsonl)), ByteTokenizer(), "eval"
    )
    assert stream.doc_start.sum() == 5
    assert ByteTokenizer().decode(stream.tokens[: stream.num_tokens // 5].tolist()).startswith("héllo 0")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        sources.load_stream(DataConfig(source="jsonl", path=str(bad), eval_path=str(bad)), ByteTokenizer(), "eval")
    with pytest.raises(ConfigError, match="no files match"):
        sources.load_stream(DataConfig(source="text", path=str(tmp_path / "*.md")), ByteTokenizer(), "train")


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    text = "def f(x):\n    return 'ü'  # ✓"
    assert tok.decode(tok.encode(text)) == text and len(tok.encode("ü")) == 2 and tok.vocab_size == 256


def test_sentencepiece_and_hf_tokenizers_from_local_files(tmp_path):
    import sentencepiece
    import tokenizers

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60, model_type="bpe"
    )
    sp = load_tokenizer(str(tmp_path / "sp.model"))
    assert sp.vocab_size == 60 and not sp.is_bytes
    assert sp.decode(sp.encode("the lazy dog")) == "the lazy dog"

    hf = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.train([str(corpus)], tokenizers.trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.encode("quick fox") == hf.encode("quick fox").ids

    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "broken.model"))
    with pytest.raises(ConfigError, match="no readable tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_resume_neither_repeats_nor_skips_examples():
    """Every row is tagged with its id (its first token); killing after step k and resuming at k (as the loop
    does from the checkpointed step) sees each row of the epoch exactly once, in the uninterrupted order."""
    seq_len, rows = 4, 40
    stream = sources.TokenStream(np.arange(rows * seq_len + 1), np.zeros(rows * seq_len + 1, bool))
    ids = lambda batch: (batch["inputs"][:, 0] // seq_len).tolist()
    make = lambda: pipeline.train_batches(stream, seq_len=seq_len, global_batch=4, seed=5)
    steps_per_epoch = rows // 4
    take = lambda start, n: [ids(b) for b in itertools.islice(pipeline.iterate_from(make(), start, 1), n)]
    uninterrupted = take(0, steps_per_epoch)
    for kill_step in (1, 4, 7):
        before, after = take(0, kill_step), take(kill_step, steps_per_epoch - kill_step)
        seen = [i for batch in before + after for i in batch]
        assert sorted(seen) == list(range(rows))  # none repeated, none skipped
        assert before + after == uninterrupted


def test_moving_a_data_set_keeps_its_split(tmp_path):
    for where in ("a", "b/deeper"):
        for i in range(30):
            (tmp_path / where / "docs").mkdir(parents=True, exist_ok=True)
            (tmp_path / where / "docs" / f"{i}.txt").write_text(f"text {i}\n")
    load = lambda where, split: (
        sources.load_stream(
            DataConfig(source="text", path=str(tmp_path / where / "docs"), eval_fraction=0.3), ByteTokenizer(), split
        ).tokens
    )
    for split in sources.SPLITS:
        np.testing.assert_array_equal(load("a", split), load("b/deeper", split))
    assert 0 < len(load("a", "eval")) < len(load("a", "train"))


class _WithPrefix:
    """A data transform in the way Birdie's and JRT's objectives are: it adds `prefix_mask` (the first 3 positions
    of each example) and a host-only field beside the example's own fields."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        prefix = (np.arange(8) < 3).astype(np.int32)
        return {**self.examples[i], "prefix_mask": prefix, "context_span": np.array([0, 3])}


def test_prefix_mask_travels_from_a_data_transform_to_the_model():
    """The batch schema (`lcjax.data.batch`): a `prefix_mask` made by a transform reaches the model through the
    pipeline, the device batch and the train step's loss (the probe model adds a learned vector where it is 1);
    host-only fields stay behind."""
    import jax

    from lcjax.config import from_dict
    from lcjax.parallel.mesh import make_mesh
    from lcjax.train.step import Trainer
    from tests.models.probe import registered

    rng = np.random.default_rng(0)
    plain = [
        {
            "inputs": rng.integers(0, 64, 8).astype(np.int32),
            "targets": rng.integers(0, 64, 8).astype(np.int32),
            "segment_ids": np.ones(8, np.int32),
            "positions": np.arange(8, dtype=np.int32),
            "loss_mask": np.ones(8, np.float32),
        }
        for _ in range(8)
    ]
    batch = pipeline.example_train_batches(_WithPrefix(plain), global_batch=4, seed=0)[0]
    assert "prefix_mask" in batch and "context_span" not in batch
    with registered():
        config = from_dict({"model": {"name": "probe"}, "train": {"batch_size": 4, "seq_len": 8}})
        trainer = Trainer.create(
            config, make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}, jax.devices()[:1])
        )
        params = trainer.init_state(0)["params"]
        loss = lambda b: float(jax.jit(trainer._loss)(params, trainer.device_batch(b))[0])
        without = {k: v for k, v in batch.items() if k != "prefix_mask"}
        assert abs(loss(batch) - loss(without)) > 1e-3

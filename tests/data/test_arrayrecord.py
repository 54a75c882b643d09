import numpy as np

from lcjax.config import DataConfig
from lcjax.data import arrayrecord, pipeline, sources


def test_arrayrecord_stream_reads_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    stream = sources.concat_documents(rng.integers(0, 256, n) for n in (40, 7, 130, 64, 3, 90))
    records = arrayrecord.write_stream(stream, str(tmp_path), "train", chunk_len=32, records_per_shard=3)
    arrayrecord.write_meta(
        str(tmp_path),
        chunk_len=32,
        tokenizer="bytes",
        vocab_size=256,
        max_token=stream.max_token(),
        num_tokens={"train": stream.num_tokens, "eval": 0},
    )
    assert records == -(-stream.num_tokens // 32) and len(list(tmp_path.glob("train-*.array_record"))) == 4
    loaded = sources.load_stream(DataConfig(source="arrayrecord", path=str(tmp_path)), None, "train")
    assert loaded.num_tokens == stream.num_tokens
    for offset, length in [(0, 32), (30, 5), (31, 70), (stream.num_tokens - 9, 9)]:
        for a, b in zip(loaded.read(offset, length), stream.read(offset, length), strict=True):
            np.testing.assert_array_equal(a, b)
    # Whole training batches agree with the in-memory stream's.
    make = lambda s: pipeline.train_batches(s, seq_len=24, global_batch=4, seed=3)
    for step in (0, 5):
        for k, v in make(stream)[step].items():
            np.testing.assert_array_equal(make(loaded)[step][k], v)

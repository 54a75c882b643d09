"""Tokenizes a corpus once and writes ArrayRecord shards for `data.source=arrayrecord`.

    python scripts/prepare_data.py --source=jsonl --path='data/*.jsonl' --tokenizer=bytes --out=data/prepared
    python main.py --config=configs/transformer.py:tiny --config.data.source=arrayrecord \
        --config.data.path=data/prepared --workdir=runs/x
"""

import sys

from absl import app, flags  # noqa: E402

from lcjax.config import DataConfig  # noqa: E402
from lcjax.data import arrayrecord, sources  # noqa: E402
from lcjax.data.tokenizers import load_tokenizer  # noqa: E402
from lcjax.errors import ConfigError  # noqa: E402

flags.DEFINE_enum("source", "stdlib", ["stdlib", "text", "jsonl"], "Where the documents come from.")
flags.DEFINE_string("path", "", "Files (directory or glob) for text/jsonl.")
flags.DEFINE_string("eval_path", "", "Optional separate validation files.")
flags.DEFINE_float("eval_fraction", 0.05, "Hash-split fraction for validation when --eval_path is empty.")
flags.DEFINE_string("text_key", "text", "JSON key of the text in jsonl records.")
flags.DEFINE_string("tokenizer", "bytes", "'bytes', or a sentencepiece .model / HF tokenizer.json path.")
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("chunk_len", 8192, "Tokens per record.")
flags.DEFINE_integer("records_per_shard", 1024, "Records per .array_record file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        data = DataConfig(
            source=FLAGS.source,
            path=FLAGS.path,
            eval_path=FLAGS.eval_path,
            eval_fraction=FLAGS.eval_fraction,
            text_key=FLAGS.text_key,
        )
        data.validate()
        tokenizer = load_tokenizer(FLAGS.tokenizer)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    num_tokens, max_token = {}, -1
    for split in sources.SPLITS:
        stream = sources.load_stream(data, tokenizer, split)
        records = arrayrecord.write_stream(
            stream, FLAGS.out, split, chunk_len=FLAGS.chunk_len, records_per_shard=FLAGS.records_per_shard
        )
        num_tokens[split] = stream.num_tokens
        max_token = max(max_token, stream.max_token())
        print(f"{split}: {stream.num_tokens} tokens in {records} records")
    arrayrecord.write_meta(
        FLAGS.out,
        chunk_len=FLAGS.chunk_len,
        tokenizer=FLAGS.tokenizer,
        vocab_size=tokenizer.vocab_size,
        max_token=max_token,
        num_tokens=num_tokens,
    )


if __name__ == "__main__":
    app.run(main)

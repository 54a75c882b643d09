"""HMT streaming: peak memory and time per token of `decode` over a long token stream, at two lengths side by side.

Each length runs in its own process (peak RSS is per process), feeding the validation split of the embedded
default corpus through `model.decode` one segment at a time (`lcjax.eval.stream`, what `--mode=eval` runs with
`eval.stream_tokens`) and accumulating the stream's bits per byte. The model is `configs/hmt.py:<preset>` with
random weights; flat memory means the ratio of the peak RSS at the two lengths stays near 1.

python scripts/bench_hmt_stream.py --tokens=10000,100000 --out=docs/benchmarks/hmt_stream.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("tokens", "10000,100000", "comma-separated stream lengths, each in its own process")
flags.DEFINE_string("preset", "tiny", "configs/hmt.py preset")
flags.DEFINE_string("out", "", "JSON output path")
flags.DEFINE_integer("one", 0, "internal: run one length in this process and print its JSON")
FLAGS = flags.FLAGS


def _one(length: int, preset: str) -> dict:
    from flax import nnx

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from configs import hmt as presets
    from lcjax import models
    from lcjax.config import from_config_dict
    from lcjax.data import sources
    from lcjax.data.tokenizers import ByteTokenizer
    from lcjax.eval.stream import stream_perplexity

    config = from_config_dict(presets.get_config(preset))
    model = models.build(config, nnx.Rngs(0))
    stream = sources.load_stream(config.data, ByteTokenizer(), "eval")
    tokens, _ = stream.read(0, length + 1)  # the validation split holds 1.5 M tokens of the default corpus
    graphdef, params = nnx.split(model)
    result = stream_perplexity(graphdef, params, tokens, piece=config.model.segment_len, tokens_are_bytes=True)
    return {
        "tokens": result["tokens"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ms_per_token": result["ms_per_token"],
        "first_segment_s": result["first_piece_s"],
        "bits_per_byte": result["bits_per_byte"],
        "state_bytes": result["state_bytes"],
    }


def main(argv):
    del argv
    if FLAGS.one:
        print(json.dumps(_one(FLAGS.one, FLAGS.preset)))
        return
    rows = []
    for length in [int(t) for t in FLAGS.tokens.split(",")]:
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        out = subprocess.run(
            [sys.executable, __file__, f"--one={length}", f"--preset={FLAGS.preset}"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'tokens':>8} {'peak RSS MiB':>13} {'ms/token':>9} {'state bytes':>12} {'bits/byte':>10}")
    for r in rows:
        print(
            f"{r['tokens']:>8} {r['peak_rss_mib']:>13.1f} {r['ms_per_token']:>9.3f} {r['state_bytes']:>12} "
            f"{r['bits_per_byte']:>10.3f}"
        )
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    print(f"peak RSS ratio {rows[-1]['tokens']} / {rows[0]['tokens']} tokens: {ratio:.3f}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"preset": FLAGS.preset, "rows": rows, "rss_ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    app.run(main)

"""Trains every listed preset on the same synthetic task and budget through the shared loop, scores each over a
grid, and writes comparison.md, comparison.json and PNG plots.

    python scripts/compare_models.py --models=transformer:tiny,titans:mac-tiny,xlstm:large-tiny,mamba2:tiny \
        --task=mqar --stages=64:4:2000,256:16:250 --seq_lens=64,128,256 --values=4,8,16 --out_dir=docs/comparison/mqar

`--stages` is the training curriculum (seq_len:value:steps, the value being the task's swept parameter: MQAR's
number of key-value pairs, S-NIAH's depth, the phonebook's entries, selective copying's tokens); each stage starts
from the previous stage's parameters. `--set=section.key=value` applies to every model (e.g. the MQAR vocabulary,
`--set=model.vocab_size=8192`), `--set=family:section.key=value` to one family
(`--set=transformer:model.num_kv_heads=4`). Runs live in `--workdir/<model>/stage<i>`; finished stages are not
retrained, and a model whose `<out_dir>/scores/<model>.json` holds the same recipe is not trained or scored again
(commit that folder to carry a long comparison across machines). The report is rewritten after every model;
`--report_only` writes it from the saved scores alone.

The defaults are the MQAR recipe that takes the tiny transformer (2 layers) to 99.6% at L = 256, D = 16 on a 2-core
CPU in about 20 minutes (docs/benchmarks.md): zoology's vocabulary of 8192 (with 512, random filler tokens repeat
a queried key before its query in 8.7% of queries at L = 256, which caps recall near 95%), an easy first stage
(L = 64, D = 4), batch 64, and logits only at the labelled positions (`train.sparse_logits`).
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags, logging  # noqa: E402

from lcjax.errors import ConfigError  # noqa: E402
from lcjax.experiments import compare  # noqa: E402
from lcjax.train.metrics import quiet_library_logs  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["transformer:tiny"], "family:preset of every model to compare.")
_TASK = flags.DEFINE_enum("task", "mqar", sorted(compare.SWEEP_PARAMETER), "Synthetic task.")
_STAGES = flags.DEFINE_string("stages", "64:4:2000,256:16:250", "Training curriculum: seq_len:value:steps,...")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["64", "128", "256"], "Sequence lengths of the scoring grid.")
_VALUES = flags.DEFINE_list("values", ["4", "8", "16"], "Values of the task's swept parameter in the grid.")
_SET = flags.DEFINE_multi_string(
    "set",
    [
        "model.vocab_size=8192",
        "model.num_layers=2",
        "transformer:model.num_kv_heads=4",
        "train.batch_size=64",
        "train.learning_rate=3e-3",
        "train.warmup_steps=100",
        "train.min_lr_ratio=1.0",
        "train.sparse_logits=16",
        "train.log_every=250",
        "train.eval_every=1000",
        "eval.batch_size=64",
        "eval.num_batches=4",
    ],
    "section.key=value overrides applied to every model, or family:section.key / family:preset:section.key to one "
    "(repeat the flag; replaces the default list).",
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Where the training runs go.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where the table and plots go (default: --workdir).")
_INIT_FROM = flags.DEFINE_multi_string(
    "init_from",
    [],
    "family:preset=run_dir: that model's first stage starts from the run's latest parameters (e.g. a language-model "
    "pretraining run of main.py; optimizer and step start fresh). Repeat the flag for several models.",
)
_DECODE_PIECE = flags.DEFINE_integer(
    "decode_piece",
    0,
    "Score through each model's decode in pieces of this many tokens (0: the parallel form). Landmark attention's "
    "top-k retrieval (--set=landmark:model.attention.retrieval_top_k=5) is decode-only, and a KV-cache model at 32k "
    "tokens fits only this way; each row then reports the decode state's bytes per token.",
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only",
    False,
    "Train nothing: write the report from the saved scores of the listed models (<out_dir>/scores).",
)


def _parse_override(item: str):
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError("set", f"{item!r} is not section.key=value")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string
    return key.strip(), value


def _parse_init_from(item: str) -> tuple[str, str]:
    spec, sep, path = item.partition("=")
    if not sep or not path:
        raise ConfigError("init_from", f"{item!r} is not family:preset=run_dir")
    return spec.strip(), path.strip()


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    quiet_library_logs()
    try:
        compare.compare(
            _MODELS.value,
            _TASK.value,
            compare.parse_stages(_STAGES.value),
            [int(s) for s in _SEQ_LENS.value],
            [float(v) for v in _VALUES.value],
            dict(_parse_override(s) for s in _SET.value),
            _WORKDIR.value,
            _OUT_DIR.value or _WORKDIR.value,
            os.path.join(ROOT, "configs"),
            train=not _REPORT_ONLY.value,
            init_from=dict(_parse_init_from(item) for item in _INIT_FROM.value),
            decode_piece=_DECODE_PIECE.value,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"stopped: {e}; run the same command again to continue", file=sys.stderr)
        sys.exit(0)
    logging.flush()


if __name__ == "__main__":
    app.run(main)

"""Birdie's comparison on one CPU: a tiny Hawk pretrained with Birdie's controlled mixture, with next-token
prediction only, and with a fixed decoder-only UL2 mixture (same text, same steps), each fine-tuned the same way on
phone-book lookup and scored on single- and multi-number lookup, with next-token bits/byte and the controller's
mixture trajectory (`lcjax.experiments.birdie_compare`).

    python scripts/compare_birdie.py --workdir=runs/birdie_compare --out_dir=docs/comparison/birdie

`--pretrain` / `--finetune` (section.key=value, repeatable; each replaces its default list) set the two stages; the
defaults are the recipe of docs/benchmarks.md ("Birdie: objectives and controller"). Finished runs are not retrained.
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402

from lcjax.errors import ConfigError  # noqa: E402
from lcjax.experiments import birdie_compare  # noqa: E402
from lcjax.train.metrics import quiet_library_logs  # noqa: E402

_PRESET = flags.DEFINE_string("preset", "birdie:hawk-tiny", "family:preset of the model.")
_RECIPES = flags.DEFINE_list("recipes", list(birdie_compare.RECIPES), "Pretraining recipes to run.")
_PRETRAIN = flags.DEFINE_multi_string(
    "pretrain",
    [
        "train.steps=400",
        "train.seq_len=256",
        "train.batch_size=16",
        "train.log_every=50",
        "train.eval_every=400",
        "eval.num_batches=4",
        "objectives.length_scale=0.125",
        "objectives.schedule_scale=0.2",
    ],
    "Pretraining overrides (section.key=value).",
)
_FINETUNE = flags.DEFINE_multi_string(
    "finetune",
    [
        "data.source=phonebook",
        "task.prefix_mask=True",
        "task.num_entries=8",
        "task.num_queries=2",
        "train.steps=200",
        "train.seq_len=640",
        "train.batch_size=16",
        "train.learning_rate=1e-3",
        "train.warmup_steps=20",
        "train.log_every=50",
        "train.eval_every=200",
        "eval.num_batches=4",
    ],
    "Phone-book fine-tuning overrides (section.key=value).",
)
_QUERIES = flags.DEFINE_list("queries", ["1", "2", "4"], "Numbers asked per phone book when scoring.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/birdie_compare", "Where the runs go.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where the table and the PNG go (default: --workdir).")


def _parse(item: str):
    key, sep, text = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError("set", f"{item!r} is not section.key=value")
    try:
        return key.strip(), ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key.strip(), text


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    quiet_library_logs()
    try:
        unknown = sorted(set(_RECIPES.value) - set(birdie_compare.RECIPES))
        if unknown:
            raise ConfigError("recipes", f"unknown recipe {unknown[0]!r}; expected {list(birdie_compare.RECIPES)}")
        birdie_compare.run(
            _PRESET.value,
            _WORKDIR.value,
            _OUT_DIR.value or _WORKDIR.value,
            pretrain=dict(_parse(s) for s in _PRETRAIN.value),
            finetune=dict(_parse(s) for s in _FINETUNE.value),
            queries=[int(q) for q in _QUERIES.value],
            recipes=_RECIPES.value,
            configs_dir=os.path.join(ROOT, "configs"),
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.flush()


if __name__ == "__main__":
    app.run(main)

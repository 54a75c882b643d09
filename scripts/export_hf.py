"""Export a run's latest checkpoint as a Hugging Face folder (the same as `main.py --mode=export`).

    python scripts/export_hf.py --workdir=runs/tiny --export_dir=hf/tiny

The run's resolved config is read from `<workdir>/config.json`. The folder holds config.json, model.safetensors (or
shards with an index) and the tokenizer; `transformers.AutoModelForCausalLM.from_pretrained(export_dir)` loads the
transformer (Llama), xlstm (variant large) and mamba2 models, and `lcjax.export.load_hf(export_dir)` reads it back.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from lcjax.config import from_dict  # noqa: E402
from lcjax.errors import ConfigError  # noqa: E402
from lcjax.export import export_checkpoint  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with config.json and checkpoints/.", required=True)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Output folder.", required=True)


def main(argv):
    del argv
    path = os.path.join(_WORKDIR.value, "config.json")
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found (is --workdir a run directory?)")
    with open(path) as f:
        try:
            config = from_dict(json.load(f)).validate(jax.device_count())
            directory, step = export_checkpoint(config, _WORKDIR.value, _EXPORT_DIR.value)
        except ConfigError as e:
            sys.exit(f"error: {e}")
    print(f"exported step {step} to {directory}")


if __name__ == "__main__":
    app.run(main)

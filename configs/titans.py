"""Titans (neural long-term memory). Presets: lmm-tiny (one CPU, minutes), lmm-small.

python main.py --config=configs/titans.py:lmm-tiny --workdir=runs/lmm-tiny

MAC, MAG and MAL presets arrive with those variants.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402

from lcjax.models.titans import TitansConfig  # noqa: E402

_TINY_TRAIN = {
    "steps": 500,
    "batch_size": 16,
    "seq_len": 256,
    "log_every": 25,
    "eval_every": 250,
    "warmup_steps": 50,
    "learning_rate": 4e-3,
}
_SMALL_TRAIN = {
    "steps": 20000,
    "batch_size": 64,
    "seq_len": 1024,
    "learning_rate": 1e-3,
    "warmup_steps": 1000,
    "compute_dtype": "bfloat16",
}

PRESETS = {
    "lmm-tiny": {
        "model": {"variant": "lmm", "num_layers": 2, "memory_heads": 4, "chunk_size": 16},
        "train": _TINY_TRAIN,
        "checkpoint": {"every": 250},
    },
    "lmm-small": {
        "model": {
            "variant": "lmm",
            "d_model": 512,
            "num_layers": 8,
            "mlp_dim": 1408,
            "memory_heads": 8,
            "chunk_size": 64,
            "num_persistent": 16,
        },
        "train": _SMALL_TRAIN,
        "checkpoint": {"every": 1000},
    },
}


def get_config(preset: str = "lmm-tiny"):
    return base.apply_preset(base.with_model(TitansConfig()), PRESETS, preset or "lmm-tiny")

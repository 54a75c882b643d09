"""Titans (neural long-term memory). Presets: lmm-tiny (one CPU, minutes), lmm-small.

python main.py --config=configs/titans.py:lmm-tiny --workdir=runs/lmm-tiny

MAC, MAG and MAL presets arrive with those variants.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402

from lcjax.models.titans import TitansConfig  # noqa: E402

PRESETS = {
    "lmm-tiny": {
        "model": {"variant": "lmm", "num_layers": 2, "memory_heads": 4, "chunk_size": 16},
        "train": base.TINY_TRAIN,
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
        "train": base.SMALL_TRAIN,
        "checkpoint": {"every": 1000},
    },
}


def get_config(preset: str = "lmm-tiny"):
    return base.apply_preset(base.with_model(TitansConfig()), PRESETS, preset or "lmm-tiny")

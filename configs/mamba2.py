"""Mamba-2 (SSD). Presets: tiny (one CPU, minutes), 130m and 370m (the state-spaces/mamba2-130m and -370m shapes:
D 768 and 1024, 24 and 48 layers, state 128, head_dim 64, vocabulary 50288).

python main.py --config=configs/mamba2.py:tiny --workdir=runs/mamba2-tiny
"""

from configs import base
from lcjax.models.mamba2 import Mamba2Config

_LARGE_TRAIN = {
    "steps": 100000,
    "batch_size": 256,
    "seq_len": 2048,
    "learning_rate": 6e-4,
    "warmup_steps": 2000,
    "compute_dtype": "bfloat16",
}
PRESETS = {
    "tiny": {
        "model": {"d_model": 128, "num_layers": 4, "d_state": 32, "head_dim": 32, "chunk_size": 32},
        "train": base.TINY_TRAIN,
        "checkpoint": {"every": 250},
    },
    "130m": {
        "model": {
            "vocab_size": 50288,
            "d_model": 768,
            "num_layers": 24,
            "d_state": 128,
            "head_dim": 64,
            "chunk_size": 256,
        },
        "train": _LARGE_TRAIN,
        "checkpoint": {"every": 2000},
    },
    "370m": {
        "model": {
            "vocab_size": 50288,
            "d_model": 1024,
            "num_layers": 48,
            "d_state": 128,
            "head_dim": 64,
            "chunk_size": 256,
            "remat": "dots",
        },
        "train": _LARGE_TRAIN,
        "checkpoint": {"every": 2000},
    },
}


def get_config(preset: str = "tiny"):
    return base.apply_preset(base.with_model(Mamba2Config()), PRESETS, preset or "tiny")

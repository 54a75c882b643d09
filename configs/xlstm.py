"""xLSTM (mLSTM / sLSTM). Presets: large-tiny (the xLSTM-7B block, one CPU, minutes), 7-1-tiny (the NeurIPS
xLSTM[7:1] stack: seven mLSTM blocks and one sLSTM block), small (xLSTM-Large, about 125M parameters) and 7b (the
xLSTM-7B shape: D 4096, 32 blocks, 8 heads, vocabulary 50304, context 8192).

python main.py --config=configs/xlstm.py:large-tiny --workdir=runs/xlstm-large-tiny
"""

from configs import base
from lcjax.models.xlstm import XLSTMConfig

PRESETS = {
    "large-tiny": {
        "model": {"variant": "large", "d_model": 128, "num_layers": 2, "num_heads": 4, "chunk_size": 32},
        "train": base.TINY_TRAIN,
        "checkpoint": {"every": 250},
    },
    "7-1-tiny": {
        "model": {
            "variant": "neurips",
            "pattern": "mmmmmmms",
            "d_model": 64,
            "num_layers": 8,
            "num_heads": 4,
            "chunk_size": 32,
            "norm_eps": 1e-5,
            "gate_soft_cap": 0.0,
            "logit_soft_cap": 0.0,
            "tie_embeddings": True,
        },
        "train": base.TINY_TRAIN,
        "checkpoint": {"every": 250},
    },
    "small": {
        "model": {"variant": "large", "d_model": 768, "num_layers": 12, "num_heads": 4, "chunk_size": 64},
        "train": base.SMALL_TRAIN,
        "checkpoint": {"every": 1000},
    },
    "7b": {
        "model": {
            "variant": "large",
            "vocab_size": 50304,
            "d_model": 4096,
            "num_layers": 32,
            "num_heads": 8,
            "chunk_size": 64,
            "remat": "dots",
        },
        "train": {
            "steps": 500000,
            "batch_size": 256,
            "seq_len": 8192,
            "learning_rate": 4e-4,
            "warmup_steps": 3000,
            "compute_dtype": "bfloat16",
        },
        "checkpoint": {"every": 2000},
    },
}


def get_config(preset: str = "large-tiny"):
    return base.apply_preset(base.with_model(XLSTMConfig()), PRESETS, preset or "large-tiny")

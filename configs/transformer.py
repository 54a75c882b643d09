"""Llama-style transformer baseline. Presets: tiny (one CPU, minutes), small, 350m, 1b.

python main.py --config=configs/transformer.py:tiny --workdir=runs/tiny
"""

from configs import base
from lcjax.models.transformer import TransformerConfig

PRESETS = {
    "tiny": {
        "model": {},
        "train": base.TINY_TRAIN,
        "checkpoint": {"every": 250},
    },
    "small": {
        "model": {"d_model": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "mlp_dim": 1408},
        "train": base.SMALL_TRAIN,
        "checkpoint": {"every": 1000},
    },
    "350m": {
        "model": {
            "vocab_size": 32768,
            "d_model": 1024,
            "num_layers": 24,
            "num_heads": 16,
            "num_kv_heads": 8,
            "mlp_dim": 2816,
            "tie_embeddings": False,
            "remat": "dots",
        },
        "train": {
            "steps": 100000,
            "batch_size": 256,
            "seq_len": 2048,
            "learning_rate": 6e-4,
            "warmup_steps": 2000,
            "compute_dtype": "bfloat16",
            "z_loss_weight": 1e-4,
        },
        "checkpoint": {"every": 2000},
    },
    "1b": {
        "model": {
            "vocab_size": 32768,
            "d_model": 2048,
            "num_layers": 22,
            "num_heads": 32,
            "num_kv_heads": 8,
            "mlp_dim": 5632,
            "tie_embeddings": False,
            "remat": "dots",
        },
        "train": {
            "steps": 200000,
            "batch_size": 512,
            "seq_len": 2048,
            "learning_rate": 4e-4,
            "warmup_steps": 2000,
            "compute_dtype": "bfloat16",
            "z_loss_weight": 1e-4,
        },
        "checkpoint": {"every": 2000},
    },
}


def get_config(preset: str = "tiny"):
    return base.apply_preset(base.with_model(TransformerConfig()), PRESETS, preset or "tiny")

"""Birdie's models (Blouir et al. 2024): Hawk (RG-LRU) and the Gated SSM, layers alternating (bidirectional over the
prefix, causal). Presets: hawk-tiny and gated-ssm-tiny (one CPU, minutes), small (Hawk, D 512, 8 layers).

python main.py --config=configs/birdie.py:hawk-tiny --workdir=runs/hawk-tiny

Trained here with next-token prediction only (every row causal, so the bidirectional layers' reverse halves read
the token alone); the Birdie objective mixture and its controller are issue 28's next steps.
"""

from configs import base
from lcjax.models.birdie import BirdieConfig

PRESETS = {
    "hawk-tiny": {
        "model": {"mixer": "hawk", "d_model": 128, "num_layers": 4, "num_gate_blocks": 4},
        "train": base.TINY_TRAIN,
        "checkpoint": {"every": 250},
    },
    "gated-ssm-tiny": {
        "model": {"mixer": "gated_ssm", "d_model": 128, "lru_width": 256, "num_layers": 4},
        "train": base.TINY_TRAIN,
        "checkpoint": {"every": 250},
    },
    "small": {
        "model": {"mixer": "hawk", "d_model": 512, "num_layers": 8, "num_gate_blocks": 8},
        "train": base.SMALL_TRAIN,
        "checkpoint": {"every": 1000},
    },
}


def get_config(preset: str = "hawk-tiny"):
    return base.apply_preset(base.with_model(BirdieConfig()), PRESETS, preset or "hawk-tiny")

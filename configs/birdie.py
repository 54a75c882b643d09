"""Birdie (Blouir et al. 2024): Hawk (RG-LRU) and Gated-SSM stacks, layers alternating (bidirectional over the
prefix, causal), trained on Birdie's objective mixture under its reward-driven controller. Presets: hawk-tiny and
gated-ssm-tiny (one CPU, minutes), small (Hawk, D 512, 8 layers, 1024-token rows).

python main.py --config=configs/birdie.py:hawk-tiny --workdir=runs/hawk-tiny

The tiny presets train the 8-arm `birdie-small` mixture with the controller, arm lengths scaled to 256-token rows
(`objectives.length_scale` 0.125) and the paper's evaluation schedule scaled to 500 steps (`schedule_scale` 0.2);
`small` trains the paper's 96 arms at half their lengths. `--config.objectives.mixture=` (empty) trains on
next-token rows only; `--config.objectives.controller=false` keeps the mixture fixed; `ul2` or "name:weight,..."
gives a fixed mixture of your own (`lcjax.data.birdie_objectives`). Generation from a Birdie prompt:
`--mode=generate --prompt=... --config.generate.paradigm=prefix_lm` reads the prompt both ways (`Birdie.prefill`).
"""

from configs import base
from lcjax.models.birdie import BirdieConfig

TINY_OBJECTIVES = {"mixture": "birdie-small", "controller": True, "length_scale": 0.125, "schedule_scale": 0.2}

PRESETS = {
    "hawk-tiny": {
        "model": {"mixer": "hawk", "d_model": 128, "num_layers": 4, "num_gate_blocks": 4},
        "train": base.TINY_TRAIN,
        "objectives": TINY_OBJECTIVES,
        "checkpoint": {"every": 250},
    },
    "gated-ssm-tiny": {
        "model": {"mixer": "gated_ssm", "d_model": 128, "lru_width": 256, "num_layers": 4},
        "train": base.TINY_TRAIN,
        "objectives": TINY_OBJECTIVES,
        "checkpoint": {"every": 250},
    },
    "small": {
        "model": {"mixer": "hawk", "d_model": 512, "num_layers": 8, "num_gate_blocks": 8},
        "train": base.SMALL_TRAIN,
        "objectives": {"mixture": "birdie", "controller": True, "length_scale": 0.5},
        "checkpoint": {"every": 1000},
    },
}


def get_config(preset: str = "hawk-tiny"):
    return base.apply_preset(base.with_model(BirdieConfig()), PRESETS, preset or "hawk-tiny")

"""JRT-RNN (Arora et al. 2024): a Based-style stack (BaseConv, prefix linear attention, sliding-window attention in
the paper's repeating pattern "cpwcc"). Presets: tiny (one CPU, minutes; M = 128 of 256 tokens), small (D 768,
10 layers, M = 512 of 1024, window 256 as in the paper).

python main.py --config=configs/jrt.py:tiny --workdir=runs/jrt-tiny

The encoder reads each row's first `model.prefix_len` tokens both ways (or the batch's `prefix_mask`, as the
synthetic tasks give it with `task.prefix_mask`); see `lcjax.models.jrt`.
"""

from configs import base
from lcjax.models.jrt import JRTConfig

PRESETS = {
    "tiny": {
        "model": {"d_model": 128, "num_layers": 5, "num_heads": 4, "num_kv_heads": 4, "prefix_len": 128}
        | {"window": 64},
        "train": base.TINY_TRAIN,
        "checkpoint": {"every": 250},
    },
    "small": {
        "model": {"d_model": 768, "num_layers": 10, "num_heads": 12, "num_kv_heads": 12, "prefix_len": 512}
        | {"window": 256},
        "train": base.SMALL_TRAIN,
        "checkpoint": {"every": 1000},
    },
}


def get_config(preset: str = "tiny"):
    return base.apply_preset(base.with_model(JRTConfig()), PRESETS, preset or "tiny")

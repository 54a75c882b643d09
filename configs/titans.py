"""Titans (neural long-term memory). Presets: lmm-tiny, mac-tiny, mag-tiny, mal-tiny (one CPU, minutes) and their
-small versions. mac: memory as context (segment-local attention over persistent ‖ memory read ‖ segment, the
attention output stored in the memory); mag: memory as a gate beside sliding-window attention; mal: memory layer,
then sliding-window attention.

python main.py --config=configs/titans.py:mac-tiny --workdir=runs/mac-tiny
"""

from configs import base
from lcjax.models.titans import TitansConfig

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

_TINY_ATTENTION = {"window": 64, "num_heads": 4, "num_kv_heads": 2}
_SMALL_ATTENTION = {"window": 512, "num_heads": 8, "num_kv_heads": 4}
_TINY_ATTENTION["segment"], _SMALL_ATTENTION["segment"] = 32, 256  # mac only (64 or 256 tokens of context)
for _variant in ("mac", "mag", "mal"):
    PRESETS[f"{_variant}-tiny"] = {
        **PRESETS["lmm-tiny"],
        "model": {**PRESETS["lmm-tiny"]["model"], **_TINY_ATTENTION, "variant": _variant},
    }
    PRESETS[f"{_variant}-small"] = {
        **PRESETS["lmm-small"],
        "model": {**PRESETS["lmm-small"]["model"], **_SMALL_ATTENTION, "variant": _variant},
    }


def get_config(preset: str = "lmm-tiny"):
    return base.apply_preset(base.with_model(TitansConfig()), PRESETS, preset or "lmm-tiny")

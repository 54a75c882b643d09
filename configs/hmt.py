"""HMT around a backbone. Presets: tiny (one CPU, minutes; segments of 128 tokens) and small (segments of 256, the
paper's), each around a transformer, or any registered backbone named after a colon:

python main.py --config=configs/hmt.py:tiny --workdir=runs/hmt-tiny
python main.py --config=configs/hmt.py:tiny:mamba2 --workdir=runs/hmt-mamba2-tiny

The backbone section is `model.backbone` (`--config.model.backbone.num_layers=2`); the shared fields of `model`
(`vocab_size`, `d_model`, ...) are references to the backbone's. Stage 2 from a stage-1 run:

python main.py --config=configs/hmt.py:tiny --config.model.stage=1 --workdir=runs/hmt-s1
python main.py --config=configs/hmt.py:tiny --init_from=runs/hmt-s1 --workdir=runs/hmt-s2
"""

import dataclasses
import importlib

from ml_collections import config_dict

from configs import base
from lcjax.models import registry
from lcjax.models.hmt import MIRRORED, HMTConfig

# The backbone's own preset (configs/<backbone>.py) each HMT size starts from; a backbone not listed takes its
# family's defaults.
BACKBONE_PRESETS = {
    "tiny": {"transformer": "tiny", "mamba2": "tiny", "xlstm": "large-tiny"},
    "small": {"transformer": "small", "mamba2": "130m", "xlstm": "small"},
}
PRESETS = {
    "tiny": {
        "model": {"segment_len": 128, "sensory_tokens": 32, "cache_size": 300},
        "train": {**base.TINY_TRAIN, "batch_size": 8, "seq_len": 1024},
        "checkpoint": {"every": 250},
    },
    "small": {
        "model": {"segment_len": 256, "sensory_tokens": 32, "cache_size": 300},
        "train": {**base.SMALL_TRAIN, "batch_size": 32, "seq_len": 2048},
        "checkpoint": {"every": 1000},
    },
}
# Every size around every listed backbone: "tiny", "tiny:mamba2", ... (what `test_every_preset_builds` covers).
VARIANTS = [
    size if backbone == "transformer" else f"{size}:{backbone}"
    for size, backbones in BACKBONE_PRESETS.items()
    for backbone in backbones
]


def _backbone_section(size: str, backbone: str) -> dict:
    if backbone not in registry.names() or backbone == "hmt":
        raise ValueError(f"unknown HMT backbone {backbone!r}; expected one of {registry.names()} but hmt")
    section = dataclasses.asdict(registry.config_class(backbone)())
    preset = BACKBONE_PRESETS[size].get(backbone)
    if preset:
        family = importlib.import_module(f"configs.{backbone}").PRESETS[preset]["model"]
        section.update({k: v for k, v in family.items() if k != "vocab_size"})  # the byte tokenizer's vocabulary
    return section


def get_config(preset: str = "tiny"):
    size, _, backbone = (preset or "tiny").partition(":")
    if size not in PRESETS:
        raise ValueError(f"unknown preset {size!r}; expected one of {sorted(PRESETS)}, optionally :<backbone>")
    c = base.apply_preset(base.with_model(HMTConfig()), PRESETS, size)
    c.model.backbone = config_dict.ConfigDict(_backbone_section(size, backbone or "transformer"))
    for name in MIRRORED:  # one value: setting either side sets both
        c.model[name] = c.model.backbone.get_ref(name)
    return c

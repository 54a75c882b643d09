"""Shared defaults for every run: one ConfigDict section per typed section of `lcjax/config.py`, filled from the
dataclasses' own defaults (one source of truth). Model families add `model` and their presets' overrides.
"""

import dataclasses

from ml_collections import config_dict

from lcjax.config import SECTIONS

# Training settings shared by the families' presets of the same size.
TINY_TRAIN = {
    "steps": 500,
    "batch_size": 16,
    "seq_len": 256,
    "log_every": 25,
    "eval_every": 250,
    "warmup_steps": 50,
    "learning_rate": 4e-3,
}
SMALL_TRAIN = {
    "steps": 20000,
    "batch_size": 64,
    "seq_len": 1024,
    "learning_rate": 1e-3,
    "warmup_steps": 1000,
    "compute_dtype": "bfloat16",
}


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    for name, section in SECTIONS.items():
        c[name] = config_dict.ConfigDict(dataclasses.asdict(section()))
    return c


def with_model(model_config) -> config_dict.ConfigDict:
    """Base defaults plus a `model` section from a model config dataclass instance."""
    c = get_config()
    c.model = config_dict.ConfigDict(dataclasses.asdict(model_config))
    return c


def apply_preset(config: config_dict.ConfigDict, presets: dict, preset: str) -> config_dict.ConfigDict:
    """Updates `config` with `presets[preset]` ({"section": {key: value}}); unknown presets are an error."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(presets)}")
    for section, values in presets[preset].items():
        config[section].update(values)
    return config

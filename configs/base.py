"""Shared defaults for every run: one ConfigDict section per typed section of `lcjax/config.py`, filled from the
dataclasses' own defaults (one source of truth). Model families add `model` and their presets' overrides.
"""

import dataclasses

from ml_collections import config_dict

from lcjax.config import SECTIONS


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

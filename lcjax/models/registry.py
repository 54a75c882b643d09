"""Model names -> (config dataclass, module class). Add a model by adding one line here."""

from __future__ import annotations

from lcjax.models import birdie, hmt, jrt, mamba2, titans, transformer, xlstm

_MODELS = {
    "birdie": (birdie.BirdieConfig, birdie.Birdie),
    "hmt": (hmt.HMTConfig, hmt.HMT),
    "jrt": (jrt.JRTConfig, jrt.JRT),
    "mamba2": (mamba2.Mamba2Config, mamba2.Mamba2),
    "titans": (titans.TitansConfig, titans.Titans),
    "transformer": (transformer.TransformerConfig, transformer.Transformer),
    "xlstm": (xlstm.XLSTMConfig, xlstm.XLSTM),
}


def names() -> list[str]:
    return sorted(_MODELS)


def config_class(name: str) -> type:
    return _MODELS[name][0]


def model_class(name: str) -> type:
    return _MODELS[name][1]


def register(name: str, config_class: type, model_class: type) -> None:
    """Adds a model defined outside the package (a notebook's experiment, a test's throwaway model)."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered already")
    _MODELS[name] = (config_class, model_class)

"""Model names -> (config dataclass, module class). Add a model by adding one line here."""

from __future__ import annotations

from lcjax.models import mamba2, titans, transformer, xlstm

_MODELS = {
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

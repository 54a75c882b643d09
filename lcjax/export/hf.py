"""Which lcjax model exports as which Hugging Face architecture: one module per architecture in this package
(`llama.py`, `mamba2.py`, `xlstm.py`), each a mapping table that carries its own checks (`mapping.Architecture`).
Add an architecture by adding its module and one line here."""

from __future__ import annotations

from lcjax.errors import ConfigError
from lcjax.export import llama, mamba2, mapping, xlstm
from lcjax.export.safetensors_io import read_safetensors, write_safetensors

ARCHITECTURES: dict[str, mapping.Architecture] = {  # lcjax model name -> HF architecture
    "transformer": llama.ARCHITECTURE,
    "mamba2": mamba2.ARCHITECTURE,
    "xlstm": xlstm.ARCHITECTURE,
}
BY_MODEL_TYPE = {arch.model_type: name for name, arch in ARCHITECTURES.items()}

__all__ = ["ARCHITECTURES", "BY_MODEL_TYPE", "check_exportable", "params_from_hf", "params_to_hf"]
__all__ += ["read_safetensors", "write_safetensors"]


def check_exportable(cfg) -> None:
    """Raises ConfigError naming the field when `cfg` (a model config) has no HF counterpart."""
    if cfg.name not in ARCHITECTURES:
        raise ConfigError(
            "model.name", f"={cfg.name!r} has no Hugging Face export; expected one of {list(ARCHITECTURES)}"
        )
    ARCHITECTURES[cfg.name].check(cfg)


def params_to_hf(cfg, params: dict):
    check_exportable(cfg)
    return mapping.params_to_hf(ARCHITECTURES[cfg.name], cfg, params)


def params_from_hf(cfg, tensors, shapes):
    return mapping.params_from_hf(ARCHITECTURES[cfg.name], cfg, tensors, shapes)

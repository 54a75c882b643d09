"""Hugging Face export and import (`hf.py`: which architecture; `llama.py`, `mamba2.py`, `xlstm.py`: the mapping
tables; `mapping.py`: the conversion; `safetensors_io.py`: the files).

    export_hf(config, model, "hf_dir")     # config.json + safetensors (+ index when sharded) + tokenizer files
    config, model = load_hf("hf_dir")      # back into lcjax (an lcjax Config with the HF model's section)

The folder loads in `transformers` with `AutoModelForCausalLM.from_pretrained` for the transformer baseline
(LlamaForCausalLM), xLSTM-Large (xLSTMForCausalLM) and Mamba-2 (Mamba2ForCausalLM).
"""

from __future__ import annotations

import json
import os
from typing import Any

from flax import nnx

from lcjax.export import hf

LCJAX_KEY = "lcjax_config"  # the resolved lcjax config, stored in config.json next to HF's keys


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> dict[str, Any]:
    """A `tokenizers` tokenizer.json that maps UTF-8 bytes to ids 0..255, like lcjax's ByteTokenizer: a ByteLevel
    pre-tokenizer (no regex split, no prefix space) and a BPE model over the 256 byte symbols with no merges."""
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def _write_tokenizer(config, directory: str) -> list[str]:
    import shutil

    path = config.data.tokenizer
    if path == "bytes":
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            json.dump(byte_tokenizer_json(), f)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.train.seq_len}, f)
        return ["tokenizer.json", "tokenizer_config.json"]
    name = "tokenizer.json" if path.endswith(".json") else "tokenizer.model"
    shutil.copy(path, os.path.join(directory, name))
    return [name]


def export_hf(config, model: nnx.Module, directory: str, *, max_shard_bytes: int = 2 * 2**30) -> list[str]:
    """Writes `model` (built from `config`, an lcjax Config) as a Hugging Face folder; returns the file names."""
    cfg = config.model
    hf.check_exportable(cfg)
    os.makedirs(directory, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = hf.params_to_hf(cfg, params)
    hf_config = hf.ARCHITECTURES[cfg.name].to_config(cfg, config.train.seq_len)
    hf_config[LCJAX_KEY] = config.to_dict()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1, sort_keys=True)
    files = ["config.json", *hf.write_safetensors(tensors, directory, max_shard_bytes)]
    return files + _write_tokenizer(config, directory)


def export_checkpoint(config, workdir: str, directory: str) -> tuple[str, int]:
    """Exports the latest checkpoint of the run in `workdir`; returns (directory, step). Process 0 writes."""
    import jax

    from lcjax.train.run import restore_for_inference

    hf.check_exportable(config.model)  # before restoring anything
    run, params, step = restore_for_inference(config, workdir)
    model = run.trainer.model(jax.device_get(params))
    if jax.process_index() == 0:
        export_hf(config, model, directory)
    return directory, step


def load_hf(directory: str):
    """(lcjax Config, model) from a Hugging Face folder written by `export_hf` or by `transformers` (Llama,
    xLSTM, Mamba-2). A folder without lcjax's config gets default training sections."""
    from lcjax import models
    from lcjax.config import from_dict

    with open(os.path.join(directory, "config.json")) as f:
        hf_config = json.load(f)
    if LCJAX_KEY in hf_config:
        values = hf_config[LCJAX_KEY]
    else:
        model_type = hf_config.get("model_type")
        if model_type not in hf.BY_MODEL_TYPE:
            raise ValueError(f"{directory}: model_type {model_type!r}; expected one of {sorted(hf.BY_MODEL_TYPE)}")
        values = {"model": hf.ARCHITECTURES[hf.BY_MODEL_TYPE[model_type]].from_config(hf_config)}
    config = from_dict(values)
    abstract = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = jax_shapes(nnx.to_pure_dict(state))
    params = hf.params_from_hf(config.model, hf.read_safetensors(directory), shapes)
    nnx.replace_by_pure_dict(state, params)
    return config, nnx.merge(graphdef, state)


def jax_shapes(tree):
    import jax

    return jax.tree.map(lambda a: tuple(a.shape), tree)

"""Shared defaults for every run. Model families override `model` and whatever else their presets need.

Every key here mirrors a field of the typed config in `lcjax/config.py`; an unknown key is an error.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.model = config_dict.ConfigDict({"name": "transformer"})
    c.attention = config_dict.ConfigDict({"impl": "xla"})
    c.train = config_dict.ConfigDict(
        {
            "steps": 1000,
            "batch_size": 16,
            "seq_len": 256,
            "log_every": 50,
            "eval_every": 250,
            "seed": 0,
            "learning_rate": 3e-3,
            "min_lr_ratio": 0.1,
            "warmup_steps": 100,
            "weight_decay": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "grad_clip": 1.0,
            "z_loss_weight": 0.0,
            "compute_dtype": "float32",
            "profile_start_step": -1,
            "profile_num_steps": 5,
            "peak_flops_per_device": 0.0,
            "grad_accum_steps": 1,
            "debug_nan_step": -1,
        }
    )
    c.data = config_dict.ConfigDict(
        {
            "source": "stdlib",
            "path": "",
            "eval_path": "",
            "tokenizer": "bytes",
            "eval_fraction": 0.05,
            "text_key": "text",
            "num_threads": 1,
        }
    )
    c.eval = config_dict.ConfigDict({"num_batches": 8, "batch_size": 16})
    c.mesh = config_dict.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
    c.checkpoint = config_dict.ConfigDict({"every": 500, "max_to_keep": 3, "keep_every": 0})
    c.generate = config_dict.ConfigDict({"max_new_tokens": 200, "temperature": 0.8, "top_p": 0.95, "seed": 0})
    return c


def apply_preset(config: config_dict.ConfigDict, presets: dict, preset: str) -> config_dict.ConfigDict:
    """Updates `config` with `presets[preset]` ({"section": {key: value}}); unknown presets are an error."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(presets)}")
    for section, values in presets[preset].items():
        config[section].update(values)
    return config

"""Mamba-2 as `Mamba2ForCausalLM`."""

from __future__ import annotations

from typing import Any

from lcjax.export.mapping import LAYERS, Architecture, Rule, head_rules, rule


def rules(cfg) -> list[Rule]:
    layer = "backbone.layers.{i}."
    mixer = LAYERS + "mixer/"
    rules = [
        rule("embed", "backbone.embeddings.weight", "same"),
        rule("norm_f/scale", "backbone.norm_f.weight", "flat"),
        rule(LAYERS + "norm/scale", layer + "norm.weight", "flat"),
        rule(
            tuple(mixer + n for n in ("w_z", "w_x", "w_b", "w_c", "w_dt")),
            layer + "mixer.in_proj.weight",
            "concat_in_first",
        ),
        rule(tuple(mixer + n for n in ("conv_x", "conv_b", "conv_c")), layer + "mixer.conv1d.weight", "conv"),
        rule(
            tuple(mixer + n for n in ("conv_x_bias", "conv_b_bias", "conv_c_bias")),
            layer + "mixer.conv1d.bias",
            "concat_flat",
        ),
        rule(mixer + "dt_bias", layer + "mixer.dt_bias", "flat"),
        rule(mixer + "a_log", layer + "mixer.A_log", "flat"),
        rule(mixer + "d_skip", layer + "mixer.D", "flat"),
        rule(mixer + "norm", layer + "mixer.norm.weight", "flat"),
        rule(mixer + "w_out", layer + "mixer.out_proj.weight", "out_last"),
    ]
    return rules + head_rules(cfg)


def to_config(cfg, max_len: int) -> dict[str, Any]:
    del max_len
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "state_size": cfg.d_state,
        "expand": cfg.expand,
        "head_dim": cfg.head_dim,
        "num_heads": cfg.num_heads,
        "n_groups": cfg.n_groups,
        "conv_kernel": cfg.d_conv,
        "chunk_size": cfg.chunk_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "norm_before_gate": False,
        "rms_norm": True,
        "residual_in_fp32": True,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_floor,
        "time_step_limit": [0.0, float("inf")],
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }


def from_config(hf: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "mamba2",
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "d_state": hf["state_size"],
        "expand": hf["expand"],
        "head_dim": hf["head_dim"],
        "n_groups": hf.get("n_groups", 1),
        "d_conv": hf.get("conv_kernel", 4),
        "chunk_size": hf.get("chunk_size", 256),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


ARCHITECTURE = Architecture("mamba2", rules, to_config, from_config)

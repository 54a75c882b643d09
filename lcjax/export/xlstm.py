"""xLSTM-Large as `xLSTMForCausalLM` (the NeurIPS stacks have no transformers class)."""

from __future__ import annotations

from typing import Any

from lcjax.errors import ConfigError
from lcjax.export.mapping import LAYERS, Architecture, Rule, head_rules, rule


def check(cfg) -> None:
    if cfg.variant != "large":
        raise ConfigError("model.variant", "only the large variant exists in transformers (xLSTMForCausalLM)")


def rules(cfg) -> list[Rule]:
    layer = "backbone.blocks.{i}."
    m = LAYERS + "mlstm/"
    rules = [
        rule("embed", "backbone.embeddings.weight", "same"),
        rule("out_norm/scale", "backbone.out_norm.weight", "flat"),
        rule(LAYERS + "norm_mlstm/scale", layer + "norm_mlstm.weight", "flat"),
        rule(m + "w_q", layer + "mlstm_layer.q.weight", "in_first"),
        rule(m + "w_k", layer + "mlstm_layer.k.weight", "in_first"),
        rule(m + "w_v", layer + "mlstm_layer.v.weight", "in_first"),
        rule(m + "w_o", layer + "mlstm_layer.ogate_preact.weight", "in_first"),
        rule(m + "w_i", layer + "mlstm_layer.igate_preact.weight", "in_first"),
        rule(m + "b_i", layer + "mlstm_layer.igate_preact.bias", "flat"),
        rule(m + "w_f", layer + "mlstm_layer.fgate_preact.weight", "in_first"),
        rule(m + "b_f", layer + "mlstm_layer.fgate_preact.bias", "flat"),
        rule(m + "norm", layer + "mlstm_layer.multihead_norm.weight", "flat"),
        rule(m + "w_out", layer + "mlstm_layer.out_proj.weight", "out_last"),
        rule(LAYERS + "norm_ffn/scale", layer + "norm_ffn.weight", "flat"),
        rule(LAYERS + "ffn/w_gate", layer + "ffn.proj_up_gate.weight", "in_first"),
        rule(LAYERS + "ffn/w_up", layer + "ffn.proj_up.weight", "in_first"),
        rule(LAYERS + "ffn/w_down", layer + "ffn.proj_down.weight", "out_last"),
    ]
    return rules + head_rules(cfg)


def to_config(cfg, max_len: int) -> dict[str, Any]:
    del max_len
    return {
        "architectures": ["xLSTMForCausalLM"],
        "model_type": "xlstm",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "embedding_dim": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_blocks": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "use_bias": False,
        "norm_eps": cfg.norm_eps,
        "norm_reduction_force_float32": True,
        "add_out_norm": True,
        "qk_dim_factor": cfg.qk_dim_factor,
        "v_dim_factor": cfg.v_dim_factor,
        "ffn_proj_factor": cfg.ffn_proj_factor,
        "ffn_round_up_to_multiple_of": cfg.ffn_multiple,
        "gate_soft_cap": cfg.gate_soft_cap,
        "output_logit_soft_cap": cfg.logit_soft_cap,
        "chunk_size": cfg.chunk_size,
        "eps": cfg.cell_eps,
        "weight_mode": "single",
        "mode": "inference",
        "chunkwise_kernel": "chunkwise--native_autograd",
        "sequence_kernel": "native_sequence__native",
        "step_kernel": "native",
        "return_last_states": True,
        "autocast_kernel_dtype": "float32",
        "inference_state_dtype": "float32",
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }


def from_config(hf: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "xlstm",
        "variant": "large",
        "vocab_size": hf["vocab_size"],
        "d_model": hf.get("hidden_size") or hf["embedding_dim"],
        "num_layers": hf.get("num_hidden_layers") or hf["num_blocks"],
        "num_heads": hf["num_heads"],
        "qk_dim_factor": float(hf.get("qk_dim_factor", 0.5)),
        "v_dim_factor": float(hf.get("v_dim_factor", 1.0)),
        "ffn_proj_factor": float(hf.get("ffn_proj_factor", 2.667)),
        "ffn_multiple": hf.get("ffn_round_up_to_multiple_of", 64),
        "gate_soft_cap": float(hf.get("gate_soft_cap", 15.0)),
        "logit_soft_cap": float(hf.get("output_logit_soft_cap", 30.0)),
        "norm_eps": float(hf.get("norm_eps", 1e-6)),
        "cell_eps": float(hf.get("eps", 1e-6)),
        "chunk_size": hf.get("chunk_size", 64),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


ARCHITECTURE = Architecture("xlstm", rules, to_config, from_config, check=check)

"""The transformer as `LlamaForCausalLM`."""

from __future__ import annotations

from typing import Any

from lcjax.errors import ConfigError
from lcjax.export.mapping import LAYERS, Architecture, Rule, head_rules, rule


def check(cfg) -> None:
    if cfg.position_embedding != "rope":
        raise ConfigError("model.position_embedding", "LlamaForCausalLM needs rope")
    if cfg.qkv_bias:
        raise ConfigError("model.qkv_bias", "LlamaForCausalLM has q/k/v biases only with an o_proj bias too")


def fold(cfg) -> dict[str, float]:
    """lcjax scales tied logits by d_model^-0.5 (HF does not): folded into the final norm."""
    return {"final_norm/scale": cfg.d_model**-0.5} if cfg.tie_embeddings else {}


def rules(cfg) -> list[Rule]:
    layer = "model.layers.{i}."
    rules = [
        rule("embed", "model.embed_tokens.weight", "same"),
        rule("final_norm/scale", "model.norm.weight", "flat"),
        rule(LAYERS + "attn_norm/scale", layer + "input_layernorm.weight", "flat"),
        rule(LAYERS + "attn/wq", layer + "self_attn.q_proj.weight", "in_first"),
        rule(LAYERS + "attn/wk", layer + "self_attn.k_proj.weight", "in_first"),
        rule(LAYERS + "attn/wv", layer + "self_attn.v_proj.weight", "in_first"),
        rule(LAYERS + "attn/wo", layer + "self_attn.o_proj.weight", "out_last"),
        rule(LAYERS + "mlp_norm/scale", layer + "post_attention_layernorm.weight", "flat"),
        rule(LAYERS + "mlp/w_gate", layer + "mlp.gate_proj.weight", "in_first"),
        rule(LAYERS + "mlp/w_up", layer + "mlp.up_proj.weight", "in_first"),
        rule(LAYERS + "mlp/w_down", layer + "mlp.down_proj.weight", "out_last"),
    ]
    return rules + head_rules(cfg)


def to_config(cfg, max_len: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def from_config(hf: dict[str, Any]) -> dict[str, Any]:
    rope = hf.get("rope_parameters") or {}
    return {
        "name": "transformer",
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "mlp_dim": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "norm_eps": hf["rms_norm_eps"],
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


ARCHITECTURE = Architecture("llama", rules, to_config, from_config, check=check, fold=fold)

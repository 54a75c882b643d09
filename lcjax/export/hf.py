"""Hugging Face export and import: one declarative mapping table per architecture.

A table is a list of `Rule(lcjax, hf, kind)`: which lcjax parameters (paths in `nnx.to_pure_dict(state)`, joined with
"/") make which HF tensor, and how. Parameters under `layers/blocks/` are stacked along a leading `layers` axis in
lcjax and stored per layer in HF (`{i}` in the HF name). Kinds, for PyTorch's Linear layout [out, in]:

- "in_first": lcjax [in, *out] -> HF [prod(out), in]   (projections from the model width: q, k, v, up, embeddings)
- "out_last": lcjax [*in, out] -> HF [out, prod(in)]   (projections back to the model width: o, down)
- "flat":     lcjax [...] -> HF [prod(...)]            (norm weights, biases, per-head scalars)
- "same":     unchanged                                (embedding tables)
- "concat_in_first": several "in_first" parameters concatenated along HF's output rows (Mamba-2's in_proj)
- "conv": several depthwise conv kernels lcjax [taps, *channels] -> HF Conv1d weight [sum(channels), 1, taps]
- "concat_flat": several "flat" parameters concatenated (Mamba-2's conv bias)

Import inverts every rule against the parameter shapes of the model the HF config describes, so a round trip is
exact. Folded constants (the lcjax transformer scales tied logits by d_model^-0.5; HF does not) are applied to the
final norm weight on export and removed on import. The tensors are written with `safetensors` (no pickle); files
above `max_shard_bytes` are split with a `model.safetensors.index.json`, as `transformers` expects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from lcjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
    lcjax: tuple[str, ...]
    hf: str
    kind: str


def _rule(lcjax: str | tuple[str, ...], hf: str, kind: str) -> Rule:
    return Rule((lcjax,) if isinstance(lcjax, str) else tuple(lcjax), hf, kind)


LAYERS = "layers/blocks/"


def llama_rules(cfg) -> list[Rule]:
    layer = "model.layers.{i}."
    rules = [
        _rule("embed", "model.embed_tokens.weight", "same"),
        _rule("final_norm/scale", "model.norm.weight", "flat"),
        _rule(LAYERS + "attn_norm/scale", layer + "input_layernorm.weight", "flat"),
        _rule(LAYERS + "attn/wq", layer + "self_attn.q_proj.weight", "in_first"),
        _rule(LAYERS + "attn/wk", layer + "self_attn.k_proj.weight", "in_first"),
        _rule(LAYERS + "attn/wv", layer + "self_attn.v_proj.weight", "in_first"),
        _rule(LAYERS + "attn/wo", layer + "self_attn.o_proj.weight", "out_last"),
        _rule(LAYERS + "mlp_norm/scale", layer + "post_attention_layernorm.weight", "flat"),
        _rule(LAYERS + "mlp/w_gate", layer + "mlp.gate_proj.weight", "in_first"),
        _rule(LAYERS + "mlp/w_up", layer + "mlp.up_proj.weight", "in_first"),
        _rule(LAYERS + "mlp/w_down", layer + "mlp.down_proj.weight", "out_last"),
    ]
    if not cfg.tie_embeddings:
        rules.append(_rule("lm_head", "lm_head.weight", "in_first"))
    return rules


def mamba2_rules(cfg) -> list[Rule]:
    layer = "backbone.layers.{i}."
    mixer = LAYERS + "mixer/"
    rules = [
        _rule("embed", "backbone.embeddings.weight", "same"),
        _rule("norm_f/scale", "backbone.norm_f.weight", "flat"),
        _rule(LAYERS + "norm/scale", layer + "norm.weight", "flat"),
        _rule(
            tuple(mixer + n for n in ("w_z", "w_x", "w_b", "w_c", "w_dt")),
            layer + "mixer.in_proj.weight",
            "concat_in_first",
        ),
        _rule(tuple(mixer + n for n in ("conv_x", "conv_b", "conv_c")), layer + "mixer.conv1d.weight", "conv"),
        _rule(
            tuple(mixer + n for n in ("conv_x_bias", "conv_b_bias", "conv_c_bias")),
            layer + "mixer.conv1d.bias",
            "concat_flat",
        ),
        _rule(mixer + "dt_bias", layer + "mixer.dt_bias", "flat"),
        _rule(mixer + "a_log", layer + "mixer.A_log", "flat"),
        _rule(mixer + "d_skip", layer + "mixer.D", "flat"),
        _rule(mixer + "norm", layer + "mixer.norm.weight", "flat"),
        _rule(mixer + "w_out", layer + "mixer.out_proj.weight", "out_last"),
    ]
    if not cfg.tie_embeddings:
        rules.append(_rule("lm_head", "lm_head.weight", "in_first"))
    return rules


def xlstm_rules(cfg) -> list[Rule]:
    layer = "backbone.blocks.{i}."
    m = LAYERS + "mlstm/"
    rules = [
        _rule("embed", "backbone.embeddings.weight", "same"),
        _rule("out_norm/scale", "backbone.out_norm.weight", "flat"),
        _rule(LAYERS + "norm_mlstm/scale", layer + "norm_mlstm.weight", "flat"),
        _rule(m + "w_q", layer + "mlstm_layer.q.weight", "in_first"),
        _rule(m + "w_k", layer + "mlstm_layer.k.weight", "in_first"),
        _rule(m + "w_v", layer + "mlstm_layer.v.weight", "in_first"),
        _rule(m + "w_o", layer + "mlstm_layer.ogate_preact.weight", "in_first"),
        _rule(m + "w_i", layer + "mlstm_layer.igate_preact.weight", "in_first"),
        _rule(m + "b_i", layer + "mlstm_layer.igate_preact.bias", "flat"),
        _rule(m + "w_f", layer + "mlstm_layer.fgate_preact.weight", "in_first"),
        _rule(m + "b_f", layer + "mlstm_layer.fgate_preact.bias", "flat"),
        _rule(m + "norm", layer + "mlstm_layer.multihead_norm.weight", "flat"),
        _rule(m + "w_out", layer + "mlstm_layer.out_proj.weight", "out_last"),
        _rule(LAYERS + "norm_ffn/scale", layer + "norm_ffn.weight", "flat"),
        _rule(LAYERS + "ffn/w_gate", layer + "ffn.proj_up_gate.weight", "in_first"),
        _rule(LAYERS + "ffn/w_up", layer + "ffn.proj_up.weight", "in_first"),
        _rule(LAYERS + "ffn/w_down", layer + "ffn.proj_down.weight", "out_last"),
    ]
    if not cfg.tie_embeddings:
        rules.append(_rule("lm_head", "lm_head.weight", "in_first"))
    return rules


# -- configs ------------------------------------------------------------------------------------------------


def llama_config(cfg, max_len: int) -> dict[str, Any]:
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


def llama_from_config(hf: dict[str, Any]) -> dict[str, Any]:
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


def mamba2_config(cfg, max_len: int) -> dict[str, Any]:
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


def mamba2_from_config(hf: dict[str, Any]) -> dict[str, Any]:
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


def xlstm_config(cfg, max_len: int) -> dict[str, Any]:
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


def xlstm_from_config(hf: dict[str, Any]) -> dict[str, Any]:
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


ARCHITECTURES = {
    # lcjax model name: (HF model_type, rules, lcjax config -> HF config, HF config -> lcjax model section)
    "transformer": ("llama", llama_rules, llama_config, llama_from_config),
    "mamba2": ("mamba2", mamba2_rules, mamba2_config, mamba2_from_config),
    "xlstm": ("xlstm", xlstm_rules, xlstm_config, xlstm_from_config),
}
BY_MODEL_TYPE = {entry[0]: name for name, entry in ARCHITECTURES.items()}


def check_exportable(cfg) -> None:
    """Raises ConfigError naming the field when `cfg` (a model config) has no HF counterpart."""
    if cfg.name not in ARCHITECTURES:
        raise ConfigError(
            "model.name", f"={cfg.name!r} has no Hugging Face export; expected one of {list(ARCHITECTURES)}"
        )
    if cfg.name == "transformer":
        if cfg.position_embedding != "rope":
            raise ConfigError("model.position_embedding", "LlamaForCausalLM needs rope")
        if cfg.qkv_bias:
            raise ConfigError("model.qkv_bias", "LlamaForCausalLM has q/k/v biases only with an o_proj bias too")
    if cfg.name == "xlstm" and cfg.variant != "large":
        raise ConfigError("model.variant", "only the large variant exists in transformers (xLSTMForCausalLM)")


# -- tensors ------------------------------------------------------------------------------------------------


def _fold(cfg) -> dict[str, float]:
    """Scales applied on export to lcjax parameters HF has no place for (divided out on import)."""
    if cfg.name == "transformer" and cfg.tie_embeddings:
        return {"final_norm/scale": cfg.d_model**-0.5}  # tied logits are scaled by d_model^-0.5 in lcjax
    return {}


def _to_hf(kind: str, arrays: list[np.ndarray]) -> np.ndarray:
    if kind == "same":
        return arrays[0]
    if kind == "flat":
        return arrays[0].reshape(-1)
    if kind == "in_first":
        return arrays[0].reshape(arrays[0].shape[0], -1).T
    if kind == "out_last":
        return arrays[0].reshape(-1, arrays[0].shape[-1]).T
    if kind == "concat_in_first":
        return np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays], axis=0)
    if kind == "conv":
        return np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays], axis=0)[:, None, :]
    if kind == "concat_flat":
        return np.concatenate([a.reshape(-1) for a in arrays])
    raise ValueError(f"unknown rule kind {kind!r}")


def _from_hf(kind: str, tensor: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    if kind in ("same", "flat"):
        return [tensor.reshape(shapes[0])]
    if kind in ("in_first", "out_last"):
        return [tensor.T.reshape(shapes[0])]
    sizes = [math.prod(s[1:]) if kind in ("concat_in_first", "conv") else math.prod(s) for s in shapes]
    if kind == "conv":
        tensor = tensor[:, 0, :]
    parts = np.split(tensor, np.cumsum(sizes)[:-1], axis=0)
    if kind == "concat_flat":
        return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
    return [p.T.reshape(s) for p, s in zip(parts, shapes, strict=True)]


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, path + "/"))
        else:
            out[path] = value
    return out


def _unflat(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def params_to_hf(cfg, params: dict) -> dict[str, np.ndarray]:
    """lcjax parameters (`nnx.to_pure_dict` of the model's Param state) -> {HF name: float32 array}."""
    check_exportable(cfg)
    flat = {k: np.asarray(v, np.float32) for k, v in _flat(params).items()}
    for path, scale in _fold(cfg).items():
        flat[path] = flat[path] * scale
    rules = ARCHITECTURES[cfg.name][1](cfg)
    used = {p for r in rules for p in r.lcjax}
    missing = sorted(set(flat) - used)
    if missing:
        raise ValueError(f"params_to_hf: no rule exports {missing} for model {cfg.name!r}")
    tensors = {}
    for rule in rules:
        arrays = [flat[p] for p in rule.lcjax]
        if rule.lcjax[0].startswith(LAYERS):
            for i in range(arrays[0].shape[0]):
                tensors[rule.hf.format(i=i)] = np.ascontiguousarray(_to_hf(rule.kind, [a[i] for a in arrays]))
        else:
            tensors[rule.hf] = np.ascontiguousarray(_to_hf(rule.kind, arrays))
    return tensors


def params_from_hf(cfg, tensors: dict[str, np.ndarray], shapes: dict) -> dict:
    """{HF name: array} -> lcjax parameters shaped like `shapes` (a pure dict of shapes, e.g. from nnx.eval_shape)."""
    flat_shapes = _flat(shapes)
    rules = ARCHITECTURES[cfg.name][1](cfg)
    flat: dict[str, np.ndarray] = {}
    unused = set(tensors)
    for rule in rules:
        target = [tuple(flat_shapes[p]) for p in rule.lcjax]
        if rule.lcjax[0].startswith(LAYERS):
            layers = target[0][0]
            per_layer = []
            for i in range(layers):
                name = rule.hf.format(i=i)
                if name not in tensors:
                    raise ValueError(f"params_from_hf: the checkpoint has no tensor {name!r}")
                unused.discard(name)
                per_layer.append(_from_hf(rule.kind, np.asarray(tensors[name], np.float32), [s[1:] for s in target]))
            for j, path in enumerate(rule.lcjax):
                flat[path] = np.stack([parts[j] for parts in per_layer])
        else:
            if rule.hf not in tensors:
                raise ValueError(f"params_from_hf: the checkpoint has no tensor {rule.hf!r}")
            unused.discard(rule.hf)
            for path, array in zip(
                rule.lcjax, _from_hf(rule.kind, np.asarray(tensors[rule.hf], np.float32), target), strict=True
            ):
                flat[path] = array
    unused.discard("lm_head.weight")  # a tied checkpoint may still store the (identical) head
    if unused:
        raise ValueError(f"params_from_hf: tensors with no lcjax parameter: {sorted(unused)[:5]}")
    for path, scale in _fold(cfg).items():
        flat[path] = flat[path] / scale
    missing = sorted(set(flat_shapes) - set(flat))
    if missing:
        raise ValueError(f"params_from_hf: no rule fills {missing}")
    return _unflat(flat)


# -- files --------------------------------------------------------------------------------------------------


def write_safetensors(tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: int = 2 * 2**30) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json when larger."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(directory, name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
    return names


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: missing (expected a Hugging Face safetensors checkpoint)")
        tensors.update(load_file(path))
    return tensors

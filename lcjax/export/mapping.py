"""Declarative mapping tables between lcjax parameters and Hugging Face tensors, and the conversion both ways.

An architecture (`Architecture`, one module per HF architecture in this package) holds a list of
`Rule(lcjax, hf, kind)`: which lcjax parameters (paths in `nnx.to_pure_dict(state)`, joined with
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
import math
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    lcjax: tuple[str, ...]
    hf: str
    kind: str


def rule(lcjax: str | tuple[str, ...], hf: str, kind: str) -> Rule:
    return Rule((lcjax,) if isinstance(lcjax, str) else tuple(lcjax), hf, kind)


LAYERS = "layers/blocks/"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One HF architecture: its `model_type`, the mapping table of an lcjax model config (`rules(cfg)`), the HF
    config it writes (`to_config(cfg, max_len)`) and reads (`from_config(hf) -> lcjax model section`), what it
    refuses (`check(cfg)` raises ConfigError naming the field) and the constants folded into parameters on export
    (`fold(cfg) -> {lcjax path: scale}`, divided out on import)."""

    model_type: str
    rules: Callable[[Any], list[Rule]]
    to_config: Callable[[Any, int], dict[str, Any]]
    from_config: Callable[[dict[str, Any]], dict[str, Any]]
    check: Callable[[Any], None] = lambda cfg: None
    fold: Callable[[Any], dict[str, float]] = lambda cfg: {}


def head_rules(cfg) -> list[Rule]:
    """The untied `lm_head` (every causal LM's, in the Linear layout)."""
    return [] if cfg.tie_embeddings else [rule("lm_head", "lm_head.weight", "in_first")]


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


def params_to_hf(arch: Architecture, cfg, params: dict) -> dict[str, np.ndarray]:
    """lcjax parameters (`nnx.to_pure_dict` of the model's Param state) -> {HF name: float32 array}."""
    arch.check(cfg)
    flat = {k: np.asarray(v, np.float32) for k, v in _flat(params).items()}
    for path, scale in arch.fold(cfg).items():
        flat[path] = flat[path] * scale
    rules = arch.rules(cfg)
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


def params_from_hf(arch: Architecture, cfg, tensors: dict[str, np.ndarray], shapes: dict) -> dict:
    """{HF name: array} -> lcjax parameters shaped like `shapes` (a pure dict of shapes, e.g. from nnx.eval_shape)."""
    flat_shapes = _flat(shapes)
    rules = arch.rules(cfg)
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
    for path, scale in arch.fold(cfg).items():
        flat[path] = flat[path] / scale
    missing = sorted(set(flat_shapes) - set(flat))
    if missing:
        raise ValueError(f"params_from_hf: no rule fills {missing}")
    return _unflat(flat)

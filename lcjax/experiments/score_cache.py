"""Each scored model's grid, saved with its recipe in `<out_dir>/scores/<model>.json`: a comparison longer than one
sitting goes on where it stopped (a model whose scores file holds the same recipe is neither trained nor scored
again)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax


def scores_path(out_dir: str, spec: str) -> str:
    return os.path.join(out_dir, "scores", spec.replace(":", "_") + ".json")


def _recipe(task, stages, seq_lens, values, overrides, init_from: str = "", decode_piece: int = 0) -> dict[str, Any]:
    """What a model's scores depend on: scores saved under another recipe are not reused."""
    recipe = {
        "task": task,
        "stages": [dataclasses.astuple(s) for s in stages],
        "seq_lens": list(seq_lens),
        "values": list(values),
        "overrides": dict(sorted(overrides.items())),
    }
    if init_from:  # only when set, so that the scores saved before this key existed still match
        recipe["init_from"] = os.path.abspath(init_from)
    if decode_piece:  # likewise
        recipe["decode_piece"] = int(decode_piece)
    return json.loads(json.dumps(recipe))


def save_scores(out_dir: str, spec: str, recipe: dict, rows: list[dict], seconds: float, parameters: int) -> str:
    """`<out_dir>/scores/<model>.json`: one model's grid, so that a comparison longer than one sitting (or one
    machine) keeps what it finished; `compare` reuses it when the recipe is the same."""
    path = scores_path(out_dir, spec)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {
        "model": spec,
        "recipe": recipe,
        "rows": rows,
        "training_seconds": seconds,
        "parameters": parameters,
        "devices": devices(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def load_scores(out_dir: str, spec: str, recipe: dict) -> dict | None:
    """The saved record of `spec` if one exists for this exact recipe, else None."""
    path = scores_path(out_dir, spec)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("recipe") != recipe:
        print(f"[{spec}] {path} holds another recipe: training again", flush=True)
        return None
    return record


def devices() -> str:
    """This process's devices, as a scores file records them."""
    return f"{jax.device_count()} x {jax.devices()[0].device_kind}"

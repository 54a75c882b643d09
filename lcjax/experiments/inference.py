"""`--mode=eval` and `--mode=generate`: the latest checkpoint of a workdir, evaluated or continued from a prompt."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from lcjax.config import Config
from lcjax.errors import ConfigError
from lcjax.eval import generate as generation
from lcjax.train.run import eval_steps, evaluate_all, load_eval_sets, restore_for_inference


def evaluate_checkpoint(config: Config, workdir: str) -> dict[str, Any]:
    """Evaluates the latest checkpoint on the validation split of `data.source` and on every `eval.tasks` entry;
    writes `<workdir>/eval.json`: {"step", the primary metrics..., "tasks": {task: metrics}} and returns it."""
    run, params, step = restore_for_inference(config, workdir)
    sets = load_eval_sets(run)
    results = evaluate_all(run, eval_steps(run, params, sets), params, sets)
    report = {"step": step, "source": config.data.source, **results.pop("eval")}
    report["tasks"] = results
    report["jrt_prompt"] = config.eval.jrt_prompt
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def generate_text(config: Config, workdir: str, prompt: str) -> str:
    """Continues `prompt` with the latest checkpoint, sampling as `config.generate` says."""
    if not prompt:
        raise ConfigError("prompt", "must be a non-empty string")
    run, params, _ = restore_for_inference(config, workdir, text=True)
    ids = np.asarray([run.tokenizer.encode(prompt)], np.int32)
    gen = config.generate
    tokens = generation.generate(
        run.trainer.graphdef,
        params,
        ids,
        jax.random.key(gen.seed),
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
    )
    return run.tokenizer.decode(np.asarray(tokens[0]).tolist())

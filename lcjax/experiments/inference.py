"""`--mode=eval` and `--mode=generate`: the latest checkpoint of a workdir, evaluated (with `eval.stream_tokens`,
also streamed over a long stretch of the validation split) or continued from a prompt."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from lcjax.config import Config
from lcjax.data import birdie_objectives
from lcjax.errors import ConfigError
from lcjax.eval import generate as generation
from lcjax.eval import stream as streaming
from lcjax.models import registry
from lcjax.train.run import Run, _is_task, eval_steps, evaluate_all, load_eval_sets, load_split, restore_for_inference


def evaluate_checkpoint(config: Config, workdir: str) -> dict[str, Any]:
    """Evaluates the latest checkpoint on the validation split of `data.source` and on every `eval.tasks` entry,
    and with `eval.stream_tokens` streams that many validation tokens through `decode` (`stream_eval`); writes
    `<workdir>/eval.json`: {"step", the primary metrics..., "tasks": {task: metrics}, "stream": {...}} and
    returns it."""
    run, params, step = restore_for_inference(config, workdir)
    sets = load_eval_sets(run)
    results = evaluate_all(run, eval_steps(run, params, sets), params, sets)
    report = {"step": step, "source": config.data.source, **results.pop("eval")}
    report["tasks"] = results
    report["jrt_prompt"] = config.eval.jrt_prompt
    if config.eval.stream_tokens:
        report["stream"] = stream_eval(run, params)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def stream_eval(run: Run, params: Any, *, progress: bool = True) -> dict[str, Any]:
    """The first `eval.stream_tokens` tokens of the validation split, documents concatenated as one long
    document, streamed through `decode` in pieces of `eval.stream_piece` (`lcjax.eval.stream`)."""
    cfg = run.config
    if _is_task(run):
        raise ConfigError("eval.stream_tokens", f"streams a text source; data.source={cfg.data.source!r} is a task")
    piece = cfg.eval.stream_piece or streaming.default_piece(cfg.model)
    want = cfg.eval.stream_tokens
    if want < piece:
        raise ConfigError("eval.stream_tokens", f"={want} is shorter than one piece (eval.stream_piece={piece})")
    stream = load_split(run, "eval")
    if stream.num_tokens < want + 1:
        raise ConfigError(
            "eval.stream_tokens",
            f"={want} needs {want + 1} validation tokens; the eval split of data.source={cfg.data.source!r} "
            f"holds {stream.num_tokens}",
        )
    tokens, _ = stream.read(0, want + 1)
    every = max(1, want // piece // 10)
    seen = [0]

    def report(read: int, loss: float) -> None:
        seen[0] += 1
        if progress and jax.process_index() == 0 and seen[0] % every == 0:
            print(f"stream: {read}/{want} tokens, loss {loss:.4f}", flush=True)

    return streaming.stream_perplexity(
        run.trainer.graphdef,
        params,
        np.asarray(tokens),
        piece=piece,
        tokens_are_bytes=run.tokenizer.is_bytes,
        on_piece=report,
    )


def generate_text(config: Config, workdir: str, prompt: str) -> str:
    """Continues `prompt` with the latest checkpoint, sampling as `config.generate` says."""
    if not prompt:
        raise ConfigError("prompt", "must be a non-empty string")
    gen = config.generate
    if gen.paradigm and not hasattr(registry.model_class(config.model.name), "prefill"):
        raise ConfigError(
            "generate.paradigm",
            f"needs a model that reads a bidirectional prefix (birdie); model.name={config.model.name!r} is causal",
        )
    run, params, _ = restore_for_inference(config, workdir, text=True)
    ids, prefix_len = run.tokenizer.encode(prompt), None
    if gen.paradigm:
        markers = birdie_objectives.Markers.encode(run.tokenizer)
        ids = list(markers.paradigm[gen.paradigm]) + ids
        prefix_len = len(ids)
        ids += list(markers.start)
    ids = np.asarray([ids], np.int32)
    tokens = generation.generate(
        run.trainer.graphdef,
        params,
        ids,
        jax.random.key(gen.seed),
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        prefix_len=prefix_len,
    )
    return run.tokenizer.decode(np.asarray(tokens[0]).tolist())

"""Architecture comparison on a synthetic task: train each preset through the shared loop on the same task and
budget, score it over a grid (sequence length x a task parameter, e.g. MQAR's number of key-value pairs), and
write a markdown table and PNG plots. `scripts/compare_models.py` is the command line; notebooks call these
functions directly.

Training may run as a curriculum of stages (seq_len, value, steps): each stage is a run of its own in
`<workdir>/<model>/stage<i>` that starts from the previous stage's parameters (`init_from`, fresh optimizer).
Every model gets the same stages, so the same number of steps, examples and tokens.

Each scored model's grid is saved to `<out_dir>/scores/<model>.json` with its recipe (task, stages, grid, the
model's overrides), and the report is rewritten after every model. A comparison that outlasts one sitting or one
machine (seven models take hours on a CPU) therefore goes on where it stopped: a model whose scores file holds the
same recipe is neither trained nor scored again, even when its training runs are gone.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import config_dict

from lcjax import config as config_lib
from lcjax import models as models_lib
from lcjax.data import pipeline
from lcjax.errors import ConfigError
from lcjax.eval import decode_tasks
from lcjax.eval.perplexity import evaluate, summarize
from lcjax.experiments import score_cache
from lcjax.experiments.comparison_report import SWEEP_PARAMETER, write_report
from lcjax.experiments.score_cache import _recipe, load_scores, save_scores, scores_path  # noqa: F401
from lcjax.train import loop
from lcjax.train import run as run_lib


@dataclasses.dataclass(frozen=True)
class Stage:
    seq_len: int
    value: float
    steps: int


def parse_stages(text: str) -> list[Stage]:
    """ "64:16:600,256:16:400" -> stages of (seq_len, sweep value, steps)."""
    stages = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3:
            raise ConfigError("stages", f"{item!r} is not seq_len:value:steps")
        stages.append(Stage(int(parts[0]), float(parts[1]), int(parts[2])))
    if not stages:
        raise ConfigError("stages", "needs at least one seq_len:value:steps stage")
    return stages


def load_preset(spec: str, configs_dir: str) -> config_dict.ConfigDict:
    """`family:preset` -> the ConfigDict of `configs/<family>.py:<preset>`."""
    family, _, preset = spec.partition(":")
    path = os.path.join(configs_dir, f"{family}.py")
    if not os.path.isfile(path):
        raise ConfigError("models", f"{spec!r}: no config file {path}")
    module_spec = importlib.util.spec_from_file_location(f"lcjax_configs_{family}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(preset or None)
    except ValueError as e:
        raise ConfigError("models", f"{spec!r}: {e}") from None


def _with_value(task: config_lib.TaskConfig, name: str, value: float) -> config_lib.TaskConfig:
    parameter = SWEEP_PARAMETER[name]
    kind = type(getattr(task, parameter))
    return dataclasses.replace(task, **{parameter: kind(value)})


def overrides_for(spec: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that apply to model `spec` ("family:preset"): every plain `section.key`, and the ones written
    `family:section.key` or `family:preset:section.key` for this model (these win over plain ones)."""
    family = spec.partition(":")[0]
    plain = {k: v for k, v in overrides.items() if ":" not in k}
    for key, value in overrides.items():
        prefix, _, dotted = key.rpartition(":")
        if prefix and prefix in (family, spec):
            plain[dotted] = value
    return plain


def stage_config(base: config_dict.ConfigDict, task: str, stage: Stage, overrides: dict[str, Any]):
    """The typed, validated config of one training stage of one model."""
    values = base.to_dict()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in values or not key:
            raise ConfigError(dotted, "override must be section.key=value")
        values[section][key] = value
    values["data"]["source"] = task
    values["train"]["seq_len"] = stage.seq_len
    values["train"]["steps"] = stage.steps
    values["checkpoint"]["every"] = max(min(stage.steps, 500), 1)  # an interrupted stage resumes from its last 500
    config = config_lib.from_dict(values)
    config = dataclasses.replace(config, task=_with_value(config.task, task, stage.value))
    return config.validate(jax.device_count())


STAGE_SECONDS = "training_seconds.json"  # in each stage's workdir: the wall seconds of every invocation on it, summed


def stage_seconds(stage_dir: str) -> float:
    """The wall seconds spent training in `stage_dir` so far, over every invocation (0 if none recorded)."""
    try:
        with open(os.path.join(stage_dir, STAGE_SECONDS)) as f:
            return float(json.load(f)["seconds"])
    except FileNotFoundError:
        return 0.0


def _add_stage_seconds(stage_dir: str, seconds: float) -> None:
    if not os.path.isdir(stage_dir):  # the run failed before writing anything: leave no directory behind
        return
    total = stage_seconds(stage_dir) + seconds
    tmp = os.path.join(stage_dir, STAGE_SECONDS + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"seconds": total}, f)
    os.replace(tmp, os.path.join(stage_dir, STAGE_SECONDS))


def train_model(
    spec: str, base, task: str, stages: Sequence[Stage], overrides: dict, workdir: str, init_from: str = ""
) -> tuple[str, float]:
    """Trains `spec` through every stage, the first one starting from the parameters of run `init_from` if given
    (e.g. a language-model pretraining run; fresh otherwise); returns the last stage's workdir and the training
    seconds of all stages.
    Finished stages are skipped (their checkpoint is there), so an interrupted comparison resumes where it stopped;
    each stage keeps the seconds of every invocation that trained it (an interrupted or crashed one included, a
    killed one not), so the total counts the earlier sittings too."""
    previous, seconds = init_from, 0.0
    for i, stage in enumerate(stages):
        config = stage_config(base, task, stage, overrides)
        stage_dir = os.path.join(workdir, spec.replace(":", "_"), f"stage{i}")
        what = f"{task} seq_len={stage.seq_len} {SWEEP_PARAMETER[task]}={stage.value:g}"
        print(f"[{spec}] stage {i + 1}/{len(stages)}: {what} for {stage.steps} steps -> {stage_dir}", flush=True)
        started = time.perf_counter()
        try:
            result = loop.train(config, stage_dir, init_from=previous)
        finally:
            _add_stage_seconds(stage_dir, time.perf_counter() - started)
        if "stopped_at_step" in result:  # preempted (SIGTERM/SIGINT): the stage resumes on the next run
            raise KeyboardInterrupt(f"stopped during {stage_dir} at step {int(result['stopped_at_step'])}")
        previous = stage_dir
        seconds += stage_seconds(stage_dir)
    return previous, seconds


def score_grid(
    config, workdir: str, task: str, seq_lens: Sequence[int], values: Sequence[float], decode_piece: int = 0
) -> list[dict]:
    """Scores the latest checkpoint of `workdir` on `task` at every (seq_len, value) of the grid; points the task
    cannot build (e.g. MQAR with 2D*p + 2D > L) are reported as skipped with the reason. `decode_piece` > 0: through
    the model's `decode` in pieces of that many tokens (`lcjax.eval.decode_tasks`: landmark retrieval, or contexts
    whose parallel form does not fit), with the decode state's bytes per token in each row."""
    run, params, step = run_lib.restore_for_inference(config, workdir)
    eval_step = run.trainer.jit_eval_step()
    rows = []
    for seq_len in seq_lens:
        for value in values:
            point_config = dataclasses.replace(
                config,
                train=dataclasses.replace(config.train, seq_len=seq_len),
                task=_with_value(config.task, task, value),
            )
            row = {"seq_len": seq_len, SWEEP_PARAMETER[task]: value, "step": step}
            began = time.perf_counter()
            try:
                point = run_lib.Run(point_config, run.trainer, run.tokenizer)
                examples = run_lib.task_examples(point, task, "eval", jrt_prompt=config.eval.jrt_prompt)
            except ConfigError as e:
                rows.append({**row, "skipped": str(e)})
                continue
            batches = pipeline.example_eval_batches(
                examples,
                global_batch=config.eval.batch_size,
                num_batches=config.eval.num_batches,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            if decode_piece:
                sums, info = decode_tasks.decode_sums(run.trainer.graphdef, params, batches, piece=decode_piece)
                metrics = summarize(sums, tokens_are_bytes=False, task=True) | info
            else:
                metrics = evaluate(
                    eval_step, params, batches, run.trainer.device_batch, tokens_are_bytes=False, task=True
                )
            rows.append({**row, **metrics})
            # a grid point can take many minutes (a dense decode at 32k is quadratic): show each one as it lands
            print(
                f"  scored L={seq_len} {SWEEP_PARAMETER[task]}={value:g}: "
                f"{100 * metrics.get('answer_accuracy', float('nan')):.1f}% in {time.perf_counter() - began:.0f} s",
                flush=True,
            )
    return rows


def count_parameters(config) -> int:
    """Parameters of the model `config` builds (shapes only; nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: models_lib.build(config, nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))


def _meta(stages, overrides, sizes, timings, models, devices, init_from=None) -> dict[str, Any]:
    meta = {
        "stages (seq_len:value:steps)": ", ".join(f"{s.seq_len}:{s.value:g}:{s.steps}" for s in stages),
        "overrides": ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none",
        "parameters": ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sizes.items()),
        "training wall time (s)": ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        # where each model was trained and scored (its scores file says so), not where this report is written
        "devices": (
            next(iter(devices.values()))
            if len(set(devices.values())) == 1
            else ", ".join(f"{k} {v}" for k, v in devices.items())
        ),
    }
    if init_from:
        meta["first stage starts from"] = ", ".join(f"{k} {v}" for k, v in init_from.items())
    missing = [m for m in models if m not in sizes]
    if missing:
        meta["not scored yet"] = ", ".join(missing)
    return meta


def check_overrides(models: Sequence[str], overrides: dict[str, Any], configs_dir: str) -> None:
    """A `family:` or `family:preset:` prefix must name a config family (a typo is an error). One for a family or
    preset that is not compared applies to nothing, so the default overrides can name families left out."""
    for key in overrides:
        prefix = key.rpartition(":")[0]
        if (
            prefix
            and prefix not in models
            and not os.path.isfile(os.path.join(configs_dir, f"{prefix.partition(':')[0]}.py"))
        ):
            raise ConfigError(
                "set", f"{key!r} names {prefix!r}: no config family of that name (compared: {list(models)})"
            )


def compare(
    models: Sequence[str],
    task: str,
    stages: Sequence[Stage],
    seq_lens: Sequence[int],
    values: Sequence[float],
    overrides: dict[str, Any],
    workdir: str,
    out_dir: str,
    configs_dir: str,
    train: bool = True,
    init_from: dict[str, str] | None = None,
    decode_piece: int = 0,
) -> dict:
    """Trains and scores every model; writes the report; returns {model: grid rows}. With `train=False` only the
    models with saved scores for this recipe are reported (the rest are listed as not scored yet). `init_from`
    {model: run directory}: that model's first stage starts from the run's latest parameters. `decode_piece` > 0
    scores through `decode` (`score_grid`)."""
    if task not in SWEEP_PARAMETER:
        raise ConfigError("task", f"unknown task {task!r}; expected one of {sorted(SWEEP_PARAMETER)}")
    check_overrides(models, overrides, configs_dir)
    init_from = dict(init_from or {})
    for spec, path in init_from.items():
        if spec not in models:
            raise ConfigError("init_from", f"names {spec!r}, which is not one of --models {list(models)}")
        if not os.path.isdir(path):
            raise ConfigError("init_from", f"{spec}={path}: no such run directory")
    results, timings, sizes, devices = {}, {}, {}, {}
    for n, spec in enumerate(models, 1):
        print(f"== model {n}/{len(models)}: {spec}", flush=True)
        base = load_preset(spec, configs_dir)
        mine = overrides_for(spec, overrides)
        recipe = _recipe(task, stages, seq_lens, values, mine, init_from.get(spec, ""), decode_piece)
        saved = load_scores(out_dir, spec, recipe)
        if saved is not None:
            print(f"[{spec}] scored before with this recipe: {scores_path(out_dir, spec)}", flush=True)
            results[spec], timings[spec], sizes[spec] = saved["rows"], saved["training_seconds"], saved["parameters"]
            devices[spec] = saved.get("devices", "unknown")
            continue
        if not train:
            print(f"[{spec}] no saved scores for this recipe: left out of the report", flush=True)
            continue
        devices[spec] = score_cache.devices()
        last_dir, timings[spec] = train_model(spec, base, task, stages, mine, workdir, init_from.get(spec, ""))
        config = stage_config(base, task, stages[-1], mine)
        sizes[spec] = count_parameters(config)
        results[spec] = score_grid(config, last_dir, task, seq_lens, values, decode_piece)
        for r in results[spec]:
            score = f"{100 * r['answer_accuracy']:.1f}%" if "answer_accuracy" in r else "n/a"
            print(
                f"[{spec}] L={r['seq_len']} {SWEEP_PARAMETER[task]}={r[SWEEP_PARAMETER[task]]:g}: {score}", flush=True
            )
        save_scores(out_dir, spec, recipe, results[spec], timings[spec], sizes[spec])
        if n < len(models):  # a partial report after every model: a long comparison shows its progress
            write_report(results, task, out_dir, _meta(stages, overrides, sizes, timings, models, devices, init_from))
    if not results:
        print("no model has scores for this recipe yet: no report written", flush=True)
        return results
    meta = _meta(stages, overrides, sizes, timings, models, devices, init_from)
    paths = write_report(results, task, out_dir, meta)
    print("wrote " + ", ".join(paths), flush=True)
    return results

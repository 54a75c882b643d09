"""A run's parts, assembled from a validated config: mesh, tokenizer and trainer (`setup`), its data (training
batches, evaluation sets, synthetic-task examples), evaluation of parameters on those sets, and the parameters of a
workdir's latest checkpoint restored read-only for inference (`restore_for_inference`). The loop
(`lcjax/train/loop.py`) and everything that works from a checkpoint (`lcjax/experiments`, `lcjax/export`) build on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lcjax.config import Config
from lcjax.data import birdie_objectives, pipeline, sources, synthetic
from lcjax.data.tokenizers import Tokenizer, load_tokenizer
from lcjax.errors import ConfigError
from lcjax.eval.perplexity import evaluate
from lcjax.parallel.mesh import make_mesh
from lcjax.train.checkpoint import Checkpointer, parameter_layout
from lcjax.train.step import Trainer


@dataclasses.dataclass
class Run:
    config: Config
    trainer: Trainer
    tokenizer: Tokenizer
    objectives: Any = None  # `Objectives` of a run with `objectives.mixture` (set by `load_train_batches`)


@dataclasses.dataclass
class Objectives:
    """A mixture run's sample maker and the mixture in force at each step (what the controller updates)."""

    rows: birdie_objectives.ObjectiveRows
    schedule: birdie_objectives.MixtureSchedule
    eval_stream: Any  # the validation token stream, for the per-arm held-out rows


def _uses_text(config: Config) -> bool:
    """Whether the run feeds tokenizer output to the model (MQAR and selective copying use raw token ids)."""
    tasks = {config.data.source, *config.eval.task_list}
    return config.data.source not in synthetic.TASKS or bool(tasks & set(synthetic.TEXT_TASKS))


def setup(config: Config, *, text: bool = False) -> Run:
    """Mesh, tokenizer and trainer for a validated config; checks the tokenizer against the model's vocabulary
    when text goes through it (always with `text`, as for generation)."""
    mesh = make_mesh(config.mesh.shape(jax.device_count()))
    tokenizer = load_tokenizer(config.data.tokenizer)
    if (text or _uses_text(config)) and tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"={config.model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})",
        )
    return Run(config, Trainer.create(config, mesh), tokenizer)


def load_split(run: Run, split: str):
    stream = sources.load_stream(run.config.data, run.tokenizer, split)
    if stream.max_token() >= run.config.model.vocab_size:
        raise ConfigError(
            "data", f"{split} split has token id {stream.max_token()} >= model.vocab_size={run.config.model.vocab_size}"
        )
    return stream


def _eval_set(run: Run, stream) -> list[dict[str, np.ndarray]]:
    cfg = run.config
    batches = pipeline.eval_batches(
        stream,
        seq_len=cfg.train.seq_len,
        global_batch=cfg.eval.batch_size,
        num_batches=cfg.eval.num_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return [{**b, "loss_mask": cfg.model.eval_loss_mask(b)} for b in batches]


EVAL_SEED_OFFSET = 1_000_003  # a task's eval examples come from train.seed + this: a stream apart from training


def task_examples(run: Run, name: str, split: str, *, jrt_prompt: bool = False):
    """The random-access examples of synthetic task `name` for `split` ("train" or "eval")."""
    cfg = run.config
    train = split == "train"
    task = synthetic.make_task(
        name,
        cfg.task,
        tokenizer=run.tokenizer,
        vocab_size=cfg.model.vocab_size,
        seq_len=cfg.train.seq_len,
        num_examples=cfg.task.num_train_examples if train else cfg.eval.num_batches * cfg.eval.batch_size,
        seed=cfg.train.seed if train else cfg.train.seed + EVAL_SEED_OFFSET,
        jrt_prompt=jrt_prompt,
        random_depth=train and cfg.task.random_depth,
    )
    if train and cfg.task.context_loss > 0:
        return synthetic.ContextLoss(task, cfg.task.context_loss)
    return task


def _is_task(run: Run) -> bool:
    return run.config.data.source in synthetic.TASKS


@dataclasses.dataclass
class EvalSets:
    """The validation set of the training source ("eval") and one set per `eval.tasks` entry."""

    primary: list[dict[str, np.ndarray]]
    primary_is_task: bool
    tasks: dict[str, list[dict[str, np.ndarray]]]
    text_stream: Any = None  # the eval token stream of a text source (for the unigram-entropy reference)


def load_eval_sets(run: Run) -> EvalSets:
    cfg = run.config
    shard = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    sizes = {"global_batch": cfg.eval.batch_size, "num_batches": cfg.eval.num_batches, **shard}
    tasks = {
        name: pipeline.example_eval_batches(task_examples(run, name, "eval", jrt_prompt=cfg.eval.jrt_prompt), **sizes)
        for name in cfg.eval.task_list
    }
    if _is_task(run):
        primary = pipeline.example_eval_batches(task_examples(run, cfg.data.source, "eval"), **sizes)
        return EvalSets(primary, True, tasks)
    stream = load_split(run, "eval")
    return EvalSets(_eval_set(run, stream), False, tasks, stream)


def load_train_batches(run: Run):
    """(batches, token count or None): `batches[k]` is this process's part of global batch k."""
    cfg = run.config
    shard = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    if _is_task(run):
        examples = task_examples(run, cfg.data.source, "train")
        batches = pipeline.example_train_batches(
            examples, global_batch=cfg.train.batch_size, seed=cfg.train.seed, **shard
        )
        return _with_model_loss_mask(batches, cfg.model), None
    stream = load_split(run, "train")
    if cfg.objectives.mixture:
        arms, weights = birdie_objectives.parse_mixture(cfg.objectives.mixture)
        markers = birdie_objectives.Markers.encode(run.tokenizer)
        rows = birdie_objectives.ObjectiveRows(
            stream, arms, markers, seq_len=cfg.train.seq_len, length_scale=cfg.objectives.length_scale
        )
        run.objectives = Objectives(rows, birdie_objectives.MixtureSchedule(weights), load_split(run, "eval"))
        batches = birdie_objectives.train_batches(
            rows, run.objectives.schedule, global_batch=cfg.train.batch_size, seed=cfg.train.seed, **shard
        )
        return _with_model_loss_mask(batches, cfg.model), stream.num_tokens
    batches = pipeline.train_batches(
        stream, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size, seed=cfg.train.seed, **shard
    )
    return _with_model_loss_mask(batches, cfg.model), stream.num_tokens


def _with_model_loss_mask(batches, model_config):
    """Training batches as the model trains on them (`ModelConfig.train_batch`: its loss mask, its objective)."""
    return batches.map(model_config.train_batch)


def evaluate_all(run: Run, eval_fns: dict[str, Any], params: Any, sets: EvalSets) -> dict[str, dict[str, float]]:
    """{"eval": metrics of the primary set, "<task>": metrics of each eval task}."""
    results = {
        "eval": evaluate(
            eval_fns["eval"],
            params,
            sets.primary,
            run.trainer.device_batch,
            tokens_are_bytes=run.tokenizer.is_bytes,
            task=sets.primary_is_task,
        )
    }
    for name, batches in sets.tasks.items():
        results[name] = evaluate(
            eval_fns[name], params, batches, run.trainer.device_batch, tokens_are_bytes=False, task=True
        )
    return results


def eval_steps(run: Run, params: Any, sets: EvalSets) -> dict[str, Any]:
    """The eval step for every set; with several processes each is compiled now, before the processes meet."""
    step = run.trainer.jit_eval_step()
    named = {"eval": sets.primary, **sets.tasks}
    if jax.process_count() == 1:
        return dict.fromkeys(named, step)
    return {k: step.lower(params, run.trainer.device_batch(v[0])).compile() for k, v in named.items()}


def headline(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The figures worth a line: the primary metrics without position buckets, and each task's accuracy."""
    line = {k: v for k, v in results["eval"].items() if not k.startswith("loss_pos/")}
    for name, metrics in results.items():
        if name != "eval":
            line[f"{name}/answer_accuracy"] = metrics["answer_accuracy"]
    return line


def expected_meta(run: Run) -> dict[str, Any]:
    return {
        "model": run.config.model.name,
        "scan_layers": getattr(run.config.model, "scan_layers", None),
        "parameter_layout": parameter_layout(run.trainer.abstract_state["params"]),
    }


def restore_for_inference(config: Config, workdir: str, *, text: bool = False) -> tuple[Run, Any, int]:
    """Run objects and the parameters of the latest valid checkpoint in `workdir`."""
    run = setup(config, text=text)
    checkpointer = Checkpointer.for_workdir(workdir, read_only=True)
    if not checkpointer.steps():
        raise ConfigError("workdir", f"no checkpoint in {checkpointer.directory}; train first")
    restored, _, step = checkpointer.restore(
        {"params": run.trainer.abstract_state["params"]}, expected_meta(run), partial=True
    )
    checkpointer.close()
    return run, restored["params"], step

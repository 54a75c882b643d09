"""One run, top to bottom: mesh, data, model and optimizer state, restore, then train with eval, logging and
checkpoints. `main.py` calls `train`, `evaluate_checkpoint` or `generate_text`; notebooks can too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from lcjax.config import Config
from lcjax.data import pipeline, sources, synthetic
from lcjax.data.tokenizers import Tokenizer, load_tokenizer
from lcjax.errors import ConfigError
from lcjax.eval import generate as generation
from lcjax.eval.perplexity import evaluate, unigram_entropy_bits
from lcjax.parallel import distributed
from lcjax.parallel.mesh import make_mesh
from lcjax.train.checkpoint import Checkpointer, parameter_layout
from lcjax.train.metrics import MetricWriter, Progress, summarize
from lcjax.train.preemption import PreemptionWatcher
from lcjax.train.step import Trainer, check_sparse_logits


@dataclasses.dataclass
class Run:
    config: Config
    trainer: Trainer
    tokenizer: Tokenizer


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
    return pipeline.eval_batches(
        stream,
        seq_len=cfg.train.seq_len,
        global_batch=cfg.eval.batch_size,
        num_batches=cfg.eval.num_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


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
        return batches, None
    stream = load_split(run, "train")
    batches = pipeline.train_batches(
        stream, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size, seed=cfg.train.seed, **shard
    )
    return batches, stream.num_tokens


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


def _eval_fns(run: Run, params: Any, sets: EvalSets) -> dict[str, Any]:
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


def _expected_meta(run: Run) -> dict[str, Any]:
    return {
        "model": run.config.model.name,
        "scan_layers": getattr(run.config.model, "scan_layers", None),
        "parameter_layout": parameter_layout(run.trainer.abstract_state["params"]),
    }


def _meta(run: Run, step: int) -> dict[str, Any]:
    """Checkpoint metadata. The data pipeline is a pure function of (seed, step): that pair is its state."""
    return {
        **_expected_meta(run),
        "config": run.config.to_dict(),
        "data": {"seed": run.config.train.seed, "step": step},
    }


def prepare_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe per process: every host of a multi-process run probes the same shared workdir at once.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test."):
            pass
    except OSError as e:
        raise ConfigError("workdir", f"cannot write to {workdir!r}: {e.strerror}") from None


def _initial_state(run: Run, workdir: str, init_from: str) -> tuple[dict[str, Any], Checkpointer]:
    """Resumes from the workdir's latest valid checkpoint; else fresh state, with params from `init_from` if given.

    Everything that can fail happens before the workdir is created or written.
    """
    cfg, trainer = run.config, run.trainer
    options = {"max_to_keep": cfg.checkpoint.max_to_keep, "keep_every": cfg.checkpoint.keep_every}
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        checkpointer = Checkpointer.for_workdir(workdir, **options)
        if checkpointer.steps():
            state, meta, step = checkpointer.restore(trainer.abstract_state, _expected_meta(run))
            data = meta.get("data", {})
            if data.get("seed") != cfg.train.seed or data.get("step") != step:
                raise ConfigError(
                    "train.seed",
                    f"={cfg.train.seed}, but checkpoint {step} was trained on data seed {data.get('seed')} at data "
                    f"step {data.get('step')}; resuming would change the data order (use --init_from for a new run)",
                )
            prepare_workdir(workdir)  # fail now, not at the next save, if it became read-only
            logging.info("resumed from %s at step %d", checkpointer.directory, step)
            return state, checkpointer
        checkpointer.close()
    params = None
    if init_from:
        source = Checkpointer(_checkpoint_dir(init_from), read_only=True)
        restored, _, step = source.restore(
            {"params": trainer.abstract_state["params"]}, _expected_meta(run), partial=True
        )
        source.close()
        params = restored["params"]
        logging.info("initializing parameters from %s step %d", source.directory, step)
    prepare_workdir(workdir)
    state = trainer.init_state(cfg.train.seed)
    if params is not None:
        state["params"] = params
    return state, Checkpointer.for_workdir(workdir, **options)


def _checkpoint_dir(path: str) -> str:
    """Accepts a workdir or its checkpoints/ folder."""
    nested = os.path.join(path, "checkpoints")
    if os.path.isdir(nested):
        return nested
    if not os.path.isdir(path):
        raise ConfigError("init_from", f"{path!r} is not a directory holding checkpoints")
    return path


def train(config: Config, workdir: str, *, init_from: str = "") -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint, else starting from `init_from`'s
    parameters (a workdir or checkpoint directory) or from scratch. Returns the final eval metrics.

    SIGTERM or SIGINT (preemption) stops the run at the next step boundary with a checkpoint of that step.
    """
    run = setup(config)
    cfg, trainer = run.config, run.trainer
    batches, train_tokens = load_train_batches(run)
    eval_sets = load_eval_sets(run)
    if cfg.train.sparse_logits:  # the first batch, before anything is written; every step checks its own
        check_sparse_logits(batches[0], cfg.train.sparse_logits)
    state, checkpointer = _initial_state(run, workdir, init_from)
    if jax.process_index() == 0:  # only once the checkpoint (if any) was accepted
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json())
    start_step = int(jax.device_get(state["step"]))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
    data_desc = f"{train_tokens} train tokens" if train_tokens is not None else f"task {cfg.data.source}"
    logging.info(
        "model %s: %.2fM parameters; mesh %s; %s; eval tasks %s",
        cfg.model.name,
        num_params / 1e6,
        dict(trainer.mesh.shape),
        data_desc,
        list(cfg.eval.task_list) or "none",
    )

    data_iter = pipeline.iterate_from(batches, start_step, cfg.data.num_threads)
    train_step = trainer.jit_train_step()
    eval_fns = _eval_fns(run, state["params"], eval_sets)
    if jax.process_count() > 1:  # compile everywhere first, then meet: no process waits in a collective
        train_step = train_step.lower(state, trainer.device_batch(batches[start_step])).compile()
        distributed.barrier("lcjax_steps_compiled")
    writer = MetricWriter(workdir)
    flops_per_token = cfg.model.flops_per_token(cfg.train.seq_len)
    if cfg.train.sparse_logits:  # the vocabulary projection runs at sparse_logits of seq_len positions
        unused = max(0.0, 1.0 - cfg.train.sparse_logits / cfg.train.seq_len)
        flops_per_token -= 6 * cfg.model.d_model * cfg.model.vocab_size * unused
    progress = Progress(cfg.train.steps, start_step, cfg.train.batch_size * cfg.train.seq_len, flops_per_token)

    def run_eval(step: int) -> dict[str, float]:
        started = time.perf_counter()
        results = evaluate_all(run, eval_fns, state["params"], eval_sets)
        for name, metrics in results.items():
            writer.write(step, name if name == "eval" else f"eval_{name}", metrics)
        result = headline(results)
        logging.info("eval at step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        progress.pause(time.perf_counter() - started)
        return result

    window: list[dict[str, Any]] = []
    result: dict[str, float] = {}
    profile = cfg.train.profile_start_step, cfg.train.profile_start_step + cfg.train.profile_num_steps
    profiling = profile[0] >= 0
    with PreemptionWatcher() as preemption:
        for step in range(start_step, cfg.train.steps):
            if profiling and step == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            local_batch = next(data_iter)
            if cfg.train.sparse_logits:
                check_sparse_logits(local_batch, cfg.train.sparse_logits)
            state, metrics = train_step(state, trainer.device_batch(local_batch))
            window.append(metrics)
            done = step + 1
            if profiling and done == profile[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            last = done == cfg.train.steps
            stopping = preemption.should_stop(done)
            if done % cfg.train.log_every == 0 or last or stopping:
                values = summarize(window)
                window = []
                values |= progress.report(done, values)
                writer.write(done, "train", values)
            if (done % cfg.train.eval_every == 0 or last) and not stopping:
                result = run_eval(done)
            if done % cfg.checkpoint.every == 0 or last or stopping:
                started = time.perf_counter()
                checkpointer.save(done, state, _meta(run, done))
                progress.pause(time.perf_counter() - started)
            if stopping:
                checkpointer.close()
                writer.close()
                logging.warning("stopped at step %d on request; checkpoint saved in %s", done, checkpointer.directory)
                return {"stopped_at_step": float(done)}
    if not result:  # resumed at the end: still report the final model
        result = run_eval(start_step)
    checkpointer.close()
    writer.close()
    if run.tokenizer.is_bytes and isinstance(eval_sets.text_stream, sources.TokenStream):
        entropy = unigram_entropy_bits(eval_sets.text_stream.tokens)
        result["unigram_entropy_bits"] = entropy
        logging.info(
            "final validation: %.4f bits/byte; unigram entropy of validation bytes %.4f bits (ratio %.3f)",
            result["bits_per_byte"],
            entropy,
            result["bits_per_byte"] / entropy,
        )
    return result


def restore_for_inference(config: Config, workdir: str, *, text: bool = False) -> tuple[Run, Any, int]:
    """Run objects and the parameters of the latest valid checkpoint in `workdir`."""
    run = setup(config, text=text)
    checkpointer = Checkpointer.for_workdir(workdir, read_only=True)
    if not checkpointer.steps():
        raise ConfigError("workdir", f"no checkpoint in {checkpointer.directory}; train first")
    restored, _, step = checkpointer.restore(
        {"params": run.trainer.abstract_state["params"]}, _expected_meta(run), partial=True
    )
    checkpointer.close()
    return run, restored["params"], step


def evaluate_checkpoint(config: Config, workdir: str) -> dict[str, Any]:
    """Evaluates the latest checkpoint on the validation split of `data.source` and on every `eval.tasks` entry;
    writes `<workdir>/eval.json`: {"step", the primary metrics..., "tasks": {task: metrics}} and returns it."""
    run, params, step = restore_for_inference(config, workdir)
    sets = load_eval_sets(run)
    results = evaluate_all(run, _eval_fns(run, params, sets), params, sets)
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

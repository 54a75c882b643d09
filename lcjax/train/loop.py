"""One run, top to bottom: mesh, data, model and optimizer state, restore, then train with eval, logging and
checkpoints. `main.py` calls `train`, `evaluate_checkpoint` or `generate_text`; notebooks can too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from lcjax.config import Config
from lcjax.data import pipeline, sources
from lcjax.data.tokenizers import Tokenizer, load_tokenizer
from lcjax.errors import ConfigError
from lcjax.eval import generate as generation
from lcjax.eval.perplexity import evaluate, unigram_entropy_bits
from lcjax.parallel import distributed
from lcjax.parallel.mesh import make_mesh
from lcjax.train.checkpoint import Checkpointer, parameter_layout
from lcjax.train.metrics import MetricWriter, Progress, summarize
from lcjax.train.preemption import PreemptionWatcher
from lcjax.train.step import Trainer


@dataclasses.dataclass
class Run:
    config: Config
    trainer: Trainer
    tokenizer: Tokenizer


def setup(config: Config) -> Run:
    """Mesh, tokenizer and trainer for a validated config; checks the tokenizer against the model's vocab."""
    mesh = make_mesh(config.mesh.shape(jax.device_count()))
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
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
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
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
    train_stream, eval_stream = load_split(run, "train"), load_split(run, "eval")
    eval_set = _eval_set(run, eval_stream)
    state, checkpointer = _initial_state(run, workdir, init_from)
    if jax.process_index() == 0:  # only once the checkpoint (if any) was accepted
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json())
    start_step = int(jax.device_get(state["step"]))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
    logging.info(
        "model %s: %.2fM parameters; mesh %s; %d train tokens, %d eval tokens",
        cfg.model.name,
        num_params / 1e6,
        dict(trainer.mesh.shape),
        train_stream.num_tokens,
        eval_stream.num_tokens,
    )

    batches = pipeline.train_batches(
        train_stream,
        seq_len=cfg.train.seq_len,
        global_batch=cfg.train.batch_size,
        seed=cfg.train.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    data_iter = pipeline.iterate_from(batches, start_step, cfg.data.num_threads)
    train_step, eval_step = trainer.jit_train_step(), trainer.jit_eval_step()
    if jax.process_count() > 1:  # compile everywhere first, then meet: no process waits in a collective
        train_step = train_step.lower(state, trainer.device_batch(batches[start_step])).compile()
        eval_step = eval_step.lower(state["params"], trainer.device_batch(eval_set[0])).compile()
        distributed.barrier("lcjax_steps_compiled")
    writer = MetricWriter(workdir)
    progress = Progress(
        cfg.train.steps,
        start_step,
        cfg.train.batch_size * cfg.train.seq_len,
        cfg.model.flops_per_token(cfg.train.seq_len),
    )

    def run_eval(step: int) -> dict[str, float]:
        started = time.perf_counter()
        result = evaluate(
            eval_step, state["params"], eval_set, trainer.device_batch, tokens_are_bytes=run.tokenizer.is_bytes
        )
        writer.write(step, "eval", result)
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
            state, metrics = train_step(state, trainer.device_batch(next(data_iter)))
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
    if run.tokenizer.is_bytes and isinstance(eval_stream, sources.TokenStream):
        entropy = unigram_entropy_bits(eval_stream.tokens)
        result["unigram_entropy_bits"] = entropy
        logging.info(
            "final validation: %.4f bits/byte; unigram entropy of validation bytes %.4f bits (ratio %.3f)",
            result["bits_per_byte"],
            entropy,
            result["bits_per_byte"] / entropy,
        )
    return result


def restore_for_inference(config: Config, workdir: str) -> tuple[Run, Any, int]:
    """Run objects and the parameters of the latest valid checkpoint in `workdir`."""
    run = setup(config)
    checkpointer = Checkpointer.for_workdir(workdir, read_only=True)
    if not checkpointer.steps():
        raise ConfigError("workdir", f"no checkpoint in {checkpointer.directory}; train first")
    restored, _, step = checkpointer.restore(
        {"params": run.trainer.abstract_state["params"]}, _expected_meta(run), partial=True
    )
    checkpointer.close()
    return run, restored["params"], step


def evaluate_checkpoint(config: Config, workdir: str) -> dict[str, float]:
    """Evaluates the latest checkpoint on the validation split and writes `<workdir>/eval.json`."""
    run, params, step = restore_for_inference(config, workdir)
    result = evaluate(
        run.trainer.jit_eval_step(),
        params,
        _eval_set(run, load_split(run, "eval")),
        run.trainer.device_batch,
        tokens_are_bytes=run.tokenizer.is_bytes,
    )
    result["step"] = step
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def generate_text(config: Config, workdir: str, prompt: str) -> str:
    """Continues `prompt` with the latest checkpoint, sampling as `config.generate` says."""
    if not prompt:
        raise ConfigError("prompt", "must be a non-empty string")
    run, params, _ = restore_for_inference(config, workdir)
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

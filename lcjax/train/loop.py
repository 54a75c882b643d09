"""The training loop, top to bottom: the run's parts (`lcjax/train/run.py`), restore or fresh state, then train
steps with periodic eval, logging, progress and checkpoints. `main.py` calls `train`; notebooks can too.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from lcjax.config import Config
from lcjax.data import birdie_objectives, pipeline, sources
from lcjax.errors import ConfigError
from lcjax.eval.perplexity import evaluate, unigram_entropy_bits
from lcjax.parallel import distributed
from lcjax.train import birdie_controller
from lcjax.train.checkpoint import Checkpointer
from lcjax.train.metrics import MetricWriter, Progress, summarize
from lcjax.train.preemption import PreemptionWatcher
from lcjax.train.run import (
    Run,
    eval_steps,
    evaluate_all,
    expected_meta,
    headline,
    load_eval_sets,
    load_train_batches,
    setup,
)
from lcjax.train.step import check_sparse_logits


def _meta(run: Run, step: int, controller=None) -> dict[str, Any]:
    """Checkpoint metadata. The data pipeline is a pure function of (seed, step) and, for an objective mixture
    under Birdie's controller, of the mixture schedule: the controller's state (which holds it) is saved too."""
    meta = {
        **expected_meta(run),
        "config": run.config.to_dict(),
        "data": {"seed": run.config.train.seed, "step": step},
    }
    if controller is not None:
        meta["birdie_controller"] = controller.state()
    return meta


def _controller(run: Run, restored_meta: dict[str, Any]):
    """Birdie's controller and each arm's held-out batches, for a run with `objectives.controller` (else None)."""
    cfg = run.config
    if run.objectives is None or not cfg.objectives.controller:
        return None, []
    rows = run.objectives.rows
    controller = birdie_controller.Controller(
        cfg.objectives, rows.arms, run.objectives.schedule, seed=cfg.train.seed, total_steps=cfg.train.steps
    )
    if "birdie_controller" in restored_meta:
        controller.load(restored_meta["birdie_controller"])
    held_rows = birdie_objectives.ObjectiveRows(
        run.objectives.eval_stream, rows.arms, rows.markers, seq_len=rows.seq_len, length_scale=rows.length_scale
    )
    shard = (jax.process_index(), jax.process_count())
    seed = cfg.train.seed + birdie_controller.HELD_OUT_SEED
    size = {"batch_size": cfg.eval.batch_size, "num_batches": cfg.objectives.eval_batches, "seed": seed}
    held = [birdie_controller.held_out_batches(held_rows, i, shard=shard, **size) for i in range(len(rows.arms))]
    logging.info(
        "Birdie controller: %d arms, evaluations at steps %s, the reward model takes over at %d",
        len(rows.arms),
        controller.steps,
        controller.takeover,
    )
    return controller, held


def prepare_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe per process: every host of a multi-process run probes the same shared workdir at once.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test."):
            pass
    except OSError as e:
        raise ConfigError("workdir", f"cannot write to {workdir!r}: {e.strerror}") from None


def _initial_state(run: Run, workdir: str, init_from: str) -> tuple[dict[str, Any], Checkpointer, dict[str, Any]]:
    """Resumes from the workdir's latest valid checkpoint; else fresh state, with params from `init_from` if given.
    Returns (state, checkpointer, the restored checkpoint's metadata or {}).

    Everything that can fail happens before the workdir is created or written.
    """
    cfg, trainer = run.config, run.trainer
    options = {"max_to_keep": cfg.checkpoint.max_to_keep, "keep_every": cfg.checkpoint.keep_every}
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        checkpointer = Checkpointer.for_workdir(workdir, **options)
        if checkpointer.steps():
            state, meta, step = checkpointer.restore(trainer.abstract_state, expected_meta(run))
            data = meta.get("data", {})
            if data.get("seed") != cfg.train.seed or data.get("step") != step:
                raise ConfigError(
                    "train.seed",
                    f"={cfg.train.seed}, but checkpoint {step} was trained on data seed {data.get('seed')} at data "
                    f"step {data.get('step')}; resuming would change the data order (use --init_from for a new run)",
                )
            prepare_workdir(workdir)  # fail now, not at the next save, if it became read-only
            logging.info("resumed from %s at step %d", checkpointer.directory, step)
            return state, checkpointer, meta
        checkpointer.close()
    params = None
    if init_from:
        source = Checkpointer(_checkpoint_dir(init_from), read_only=True)
        restored, _, step = source.restore(
            {"params": trainer.abstract_state["params"]}, expected_meta(run), partial=True
        )
        source.close()
        params = restored["params"]
        logging.info("initializing parameters from %s step %d", source.directory, step)
    prepare_workdir(workdir)
    state = trainer.init_state(cfg.train.seed)
    if params is not None:
        state["params"] = params
    return state, Checkpointer.for_workdir(workdir, **options), {}


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
    state, checkpointer, restored_meta = _initial_state(run, workdir, init_from)
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

    controller, held_out = _controller(run, restored_meta)
    data_iter = pipeline.iterate_from(batches, start_step, cfg.data.num_threads)
    train_step = trainer.jit_train_step()
    eval_fns = eval_steps(run, state["params"], eval_sets)
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
            if controller is not None and controller.due(done):  # also when stopping: the checkpoint must hold it
                started = time.perf_counter()
                losses = [
                    evaluate(eval_fns["eval"], state["params"], b, trainer.device_batch, tokens_are_bytes=False)["loss"]
                    for b in held_out
                ]
                writer.write(done, "birdie", controller.update(done, np.asarray(losses)))
                # batches from `done` on follow the new mixture: drop what was prefetched under the old one
                data_iter = pipeline.iterate_from(batches, done, cfg.data.num_threads)
                progress.pause(time.perf_counter() - started)
            if done % cfg.checkpoint.every == 0 or last or stopping:
                started = time.perf_counter()
                checkpointer.save(done, state, _meta(run, done, controller))
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

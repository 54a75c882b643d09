"""Task scoring: the evaluation sums against a numpy reference, padding isolation, and the eval CLI end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.train import loop
from lcjax.train.metrics import read_metrics
from lcjax.train.step import eval_sums
from tests.conftest import make_config, run_main


def _reference(logits, batch):
    """eval_sums by hand: answers are maximal runs of masked targets, found with Python loops."""
    logits, targets = np.asarray(logits, np.float64), np.asarray(batch["targets"])
    mask, positions = np.asarray(batch["loss_mask"]), np.asarray(batch["positions"])
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    right = logits.argmax(-1) == targets
    out = dict.fromkeys(["answers", "answers_correct", "examples", "examples_correct", "examples_nonfinite"], 0)
    buckets = {}
    for row in range(mask.shape[0]):
        run = []
        for t in range(mask.shape[1] + 1):
            if t < mask.shape[1] and mask[row, t] > 0:
                run.append(bool(right[row, t]))
                p = int(positions[row, t])
                b = 0 if p == 0 else p.bit_length()
                nll_sum, count = buckets.get(b, (0.0, 0))
                buckets[b] = (nll_sum + nll[row, t], count + 1)
            elif run:
                out["answers"] += 1
                out["answers_correct"] += all(run)
                run = []
        if mask[row].any():
            out["examples"] += 1
            out["examples_correct"] += bool(right[row][mask[row] > 0].all())
            out["examples_nonfinite"] += bool(not np.isfinite(logits[row][mask[row] > 0]).all())
    out["nll_sum"], out["tokens"] = float((nll * mask).sum()), float(mask.sum())
    out["correct_tokens"] = float((right * mask).sum())
    return out, buckets


def test_eval_sums_match_a_reference():
    rng = np.random.default_rng(0)
    batch_size, length, vocab = 4, 24, 5
    logits = rng.normal(size=(batch_size, length, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (batch_size, length)).astype(np.int32)
    targets[:2, :12] = logits[:2, :12].argmax(-1)  # some answers entirely right
    mask = (rng.random((batch_size, length)) < 0.5).astype(np.float32)
    mask[3] = 0.0  # a row without answers counts as no example
    positions = np.stack([np.arange(length)] * 3 + [np.maximum(np.arange(length) - 5, 0)]).astype(np.int32)
    batch = {"targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask), "positions": jnp.asarray(positions)}
    got = jax.device_get(jax.jit(eval_sums)(jnp.asarray(logits), batch))
    want, buckets = _reference(logits, batch)
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=1e-5, err_msg=k)
    assert 0 < want["answers_correct"] < want["answers"] and want["examples"] == 3 and want["examples_nonfinite"] == 0
    assert got["bucket_nll"].shape == (length.bit_length() + 1,)
    diverged = logits.copy()
    diverged[1, np.flatnonzero(mask[1])[-1], 2] = np.nan  # at an answer: that example is non-finite (and wrong)
    diverged[0, np.flatnonzero(mask[0] == 0)[0], 1] = np.inf  # outside the answers: not counted
    diverged[3, 7, 0] = np.nan  # a row without answers is no example
    got_nan = jax.device_get(jax.jit(eval_sums)(jnp.asarray(diverged), batch))
    assert float(got_nan["examples_nonfinite"]) == 1 == _reference(diverged, batch)[0]["examples_nonfinite"]
    assert float(got_nan["examples_correct"]) <= float(got["examples_correct"])
    for b in range(len(got["bucket_nll"])):
        nll_sum, count = buckets.get(b, (0.0, 0))
        assert float(got["bucket_tokens"][b]) == count
        np.testing.assert_allclose(float(got["bucket_nll"][b]), nll_sum, rtol=1e-5, atol=1e-5)


def test_left_padding_in_segment_zero_changes_nothing():
    """Task examples are left-padded (JRT-Prompt, phonebook): the content's logits equal the unpadded run's."""
    model = models.build(make_config(), nnx.Rngs(0))
    content = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    plain = model({"inputs": content})[0]
    pad = 5
    junk = jax.random.randint(jax.random.key(2), (2, pad), 0, 64)
    padded = {
        "inputs": jnp.concatenate([junk, content], axis=1),
        "segment_ids": jnp.concatenate([jnp.zeros((2, pad), jnp.int32), jnp.ones((2, 12), jnp.int32)], axis=1),
        "positions": jnp.concatenate([jnp.zeros((2, pad), jnp.int32), jnp.arange(12)[None].repeat(2, 0)], axis=1),
    }
    np.testing.assert_allclose(model(padded)[0][:, pad:], plain, atol=1e-5)


@pytest.fixture(scope="module")
def trained_on_mqar(tmp_path_factory):
    """A small transformer trained a few steps on MQAR, scoring MQAR and passkey at every eval."""
    workdir = str(tmp_path_factory.mktemp("mqar"))
    config = make_config(
        model={"vocab_size": 320},
        data={"source": "mqar"},
        task={"num_kv_pairs": 4, "num_train_examples": 64},
        train={"steps": 4, "batch_size": 8, "seq_len": 128, "eval_every": 2, "log_every": 2},
        eval={"num_batches": 2, "batch_size": 8, "tasks": "mqar,passkey"},
        checkpoint={"every": 4},
    ).validate(jax.device_count())
    result = loop.train(config, workdir)
    return config, workdir, result


def test_training_on_a_task_reports_accuracy(trained_on_mqar):
    _, workdir, result = trained_on_mqar
    for key in ("answer_accuracy", "token_accuracy", "example_accuracy", "mqar/answer_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert "bits_per_byte" not in result  # bits/byte is for text, not task answers
    assert result["tokens"] == 2 * 8 * 4  # exactly D labelled positions per example
    evals = read_metrics(workdir, "eval_passkey")
    assert sorted(evals) == [2, 4] and 0.0 <= evals[4]["answer_accuracy"] <= 1.0
    buckets = [k for k in evals[4] if k.startswith("loss_pos/")]
    assert buckets == ["loss_pos/64-127"]  # the 5 digits sit near the end of a 128-token example


def test_eval_mode_writes_task_scores(trained_on_mqar):
    config, workdir, _ = trained_on_mqar
    args = [
        "--config=configs/transformer.py:tiny",
        f"--workdir={workdir}",
        "--mode=eval",
        "--config.model.num_layers=2",
        "--config.model.d_model=32",
        "--config.model.num_heads=4",
        "--config.model.num_kv_heads=2",
        "--config.model.mlp_dim=64",
        "--config.model.vocab_size=320",
        "--config.train.seq_len=128",
        "--config.data.source=mqar",
        "--config.task.num_kv_pairs=4",
        "--config.eval.num_batches=1",
        "--config.eval.batch_size=8",
        "--config.eval.tasks=mqar,passkey,selective_copy",
        "--config.eval.jrt_prompt=true",
        "--config.task.num_tokens=8",
    ]
    result = run_main(*args, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "eval.json")) as f:
        report = json.load(f)
    assert report["step"] == 4 and report["jrt_prompt"] is True and report["source"] == "mqar"
    assert sorted(report["tasks"]) == ["mqar", "passkey", "selective_copy"]
    for metrics in report["tasks"].values():
        assert 0.0 <= metrics["answer_accuracy"] <= 1.0 and metrics["tokens"] > 0
    # JRT-Prompt: the key-value block (2D = 8 tokens) comes twice, so every query sits at position >= 16
    mqar = report["tasks"]["mqar"]
    assert mqar["tokens"] == 8 * 4
    assert min(int(k.split("/")[1].split("-")[0]) for k in mqar if k.startswith("loss_pos/")) >= 16
    assert "eval at step 4:" in result.stdout and "mqar/answer_accuracy" in result.stdout
    assert 0.0 <= report["answer_accuracy"] <= 1.0 and any(k.startswith("loss_pos/") for k in report)

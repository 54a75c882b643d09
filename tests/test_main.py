"""End to end through `main.py`: train, outputs on disk, profile, eval, generate, resume."""

import json
import math

import numpy as np
import pytest

from tests.conftest import run_main as _main

RUN = [
    "--config=configs/transformer.py:tiny",
    "--config.model.d_model=64",
    "--config.model.mlp_dim=128",
    "--config.train.batch_size=8",
    "--config.train.seq_len=64",
    "--config.train.log_every=2",
    "--config.train.eval_every=4",
    "--config.train.warmup_steps=2",
    "--config.train.profile_start_step=2",
    "--config.train.profile_num_steps=2",
    "--config.checkpoint.every=4",
    "--config.eval.num_batches=2",
    "--config.eval.batch_size=8",
    "--config.generate.max_new_tokens=24",
]


def _records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_train_eval_generate_resume(tmp_path):
    workdir = tmp_path / "run"
    result = _main(*RUN, "--config.train.steps=8", f"--workdir={workdir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tok/s" in result.stderr and "MFU" in result.stderr and "ETA" in result.stderr

    records = _records(workdir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6, 8] and [r["step"] for r in evals] == [4, 8]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_second"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert math.isclose(evals[-1]["bits_per_byte"], evals[-1]["loss"] / math.log(2), rel_tol=1e-6)
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["d_model"] == 64 and config["train"]["steps"] == 8
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert (workdir / "checkpoints" / "8").is_dir()
    assert any(p.is_file() for p in (workdir / "profile").rglob("*"))

    stream = ["--config.eval.stream_tokens=100", "--config.eval.stream_piece=32"]
    result = _main(*RUN, "--config.train.steps=8", f"--workdir={workdir}", "--mode=eval", *stream)
    assert result.returncode == 0, result.stderr[-3000:]
    eval_json = json.loads((workdir / "eval.json").read_text())
    assert eval_json["step"] == 8 and abs(eval_json["loss"] - evals[-1]["loss"]) < 1e-5
    streamed = eval_json["stream"]  # 3 pieces of 32: the 4th would need a 101st target
    assert streamed["tokens"] == 96 and streamed["piece"] == 32 and math.isfinite(streamed["bits_per_byte"])
    assert "stream of 96 tokens (pieces of 32" in result.stdout

    prompt = "def main("
    result = _main(*RUN, f"--workdir={workdir}", "--mode=generate", f"--prompt={prompt}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(prompt) and len(result.stdout.encode()) >= len(prompt) + 24

    result = _main(*RUN, "--config.train.steps=10", f"--workdir={workdir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed" in result.stderr
    steps = [r["step"] for r in _records(workdir) if r["split"] == "train"]
    assert steps == [2, 4, 6, 8, 10]


# `slow` (about a minute on CI's 2 cores): the ring test trains through the flash kernel by default.
@pytest.mark.slow
def test_pallas_attention_trains_with_the_xla_losses(tmp_path):
    """model.attention.impl=pallas (the flash kernel in interpret mode on CPU) through main.py: the xla run's losses."""
    losses = {}
    for impl in ("xla", "pallas"):
        workdir = tmp_path / impl
        result = _main(
            *RUN[:5],
            "--config.train.steps=3",
            "--config.train.log_every=1",
            "--config.train.eval_every=100",
            f"--config.model.attention.impl={impl}",
            f"--workdir={workdir}",
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        losses[impl] = [r["loss"] for r in _records(workdir) if r["split"] == "train"]
    assert len(losses["pallas"]) == 3
    np.testing.assert_allclose(losses["pallas"], losses["xla"], atol=1e-4, rtol=0)

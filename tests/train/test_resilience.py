"""Checkpoint/resume, preemption and fault handling, through `main.py` on a small text corpus."""

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lcjax.config import from_dict
from lcjax.train import run as run_lib
from lcjax.train.metrics import read_metrics
from tests.conftest import ROOT
from tests.conftest import run_main as _main

SMALL = [
    "--config=configs/transformer.py:tiny",
    "--config.model.d_model=32",
    "--config.model.mlp_dim=64",
    "--config.model.num_layers=2",
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
    "--config.train.log_every=1",
    "--config.train.eval_every=1000",
    "--config.train.warmup_steps=2",
    "--config.checkpoint.every=1",
    "--config.eval.num_batches=1",
    "--config.eval.batch_size=8",
    "--config.data.source=text",
    "--config.data.eval_fraction=0.25",  # 4 of the 40 corpus files, whatever the tmp path
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lcjax.data.sources import stdlib_files

    directory = tmp_path_factory.mktemp("corpus")
    for path in stdlib_files()[1][:40]:
        shutil.copy(path, directory / f"{len(list(directory.iterdir()))}.py")
    return str(directory / "*.py")


def train_losses(workdir) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(str(workdir)).items()}


def final_params(workdir):
    with open(workdir / "config.json") as f:
        config = from_dict(json.load(f)).validate(jax.device_count())
    return jax.device_get(run_lib.restore_for_inference(config, str(workdir))[1])


def _spawn(args):
    return subprocess.Popen(
        [sys.executable, "main.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _committed_steps(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _wait_for_step(process, workdir, step, timeout=120, *, checkpointed=False):
    """Waits until the run logged `step` (and, if `checkpointed`, committed a checkpoint at or after it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logged = (workdir / "metrics.jsonl").exists() and max(train_losses(workdir), default=0) >= step
        if logged and (not checkpointed or max(_committed_steps(workdir), default=0) >= step):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


# One kill point by default; killing at 2 and 9 too (two more main.py runs, about a minute on CI's 2 cores) is `slow`.
@pytest.mark.parametrize("kill_steps", [(6,), pytest.param((2, 9), marks=pytest.mark.slow)])
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, corpus, kill_steps):
    args = [*SMALL, f"--config.data.path={corpus}", "--config.train.steps=12"]
    straight = tmp_path / "straight"
    result = _main(*args, f"--workdir={straight}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected_losses, expected_params = train_losses(straight), final_params(straight)
    assert sorted(expected_losses) == list(range(1, 13))
    for kill_step in kill_steps:
        workdir = tmp_path / f"killed_at_{kill_step}"
        process = _spawn([*args, f"--workdir={workdir}"])
        _wait_for_step(process, workdir, kill_step, checkpointed=True)
        process.send_signal(signal.SIGKILL)
        process.wait()
        result = _main(*args, f"--workdir={workdir}", timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "resumed from" in result.stderr
        assert train_losses(workdir) == expected_losses  # exact float equality, every step
        for a, b in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(expected_params), strict=True):
            np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus):
    workdir = tmp_path / "run"
    process = _spawn(
        [
            *SMALL,
            f"--config.data.path={corpus}",
            "--config.train.steps=100000",
            "--config.checkpoint.every=100000",
            f"--workdir={workdir}",
        ]
    )
    _wait_for_step(process, workdir, 3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, process.stderr.read()[-2000:]
    reached = max(train_losses(workdir))
    assert reached >= 3
    assert _committed_steps(workdir) == [reached]


# Two more main.py runs each (about a minute on CI's 2 cores): `slow`, run with -m slow. The kill test above covers
# resuming by default.
@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, corpus):
    args = [*SMALL, f"--config.data.path={corpus}", "--config.checkpoint.every=4", f"--workdir={tmp_path}"]
    assert _main(*args, "--config.train.steps=8", timeout=300).returncode == 0
    # The merged array data of the newest checkpoint (files the restore reads; some others are superseded
    # OCDBT nodes whose truncation is harmless: a probe found every truncation either detected or restoring
    # identical arrays).
    files = [p for p in (tmp_path / "checkpoints" / "8" / "state" / "d").iterdir() if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    result = _main(*args, "--config.train.steps=10", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint 8" in result.stderr and "trying the previous one" in result.stderr
    assert "at step 4" in result.stderr
    assert max(train_losses(tmp_path)) == 10
    assert (tmp_path / "checkpoints" / "corrupt-8").is_dir()  # set aside, not deleted
    assert _committed_steps(tmp_path) == [4, 8, 10]


@pytest.mark.slow  # about two minutes on CI's 2 cores
def test_resume_on_another_mesh_continues_the_same_losses(tmp_path, corpus):
    # A constant learning rate after warmup makes the schedule independent of train.steps.
    args = [*SMALL, f"--config.data.path={corpus}", "--config.train.min_lr_ratio=1.0"]
    straight = tmp_path / "straight"
    assert _main(*args, "--config.train.steps=8", f"--workdir={straight}", timeout=300).returncode == 0
    moved = tmp_path / "moved"
    assert (
        _main(*args, "--config.train.steps=4", "--config.mesh.data=8", f"--workdir={moved}", timeout=300).returncode
        == 0
    )
    result = _main(
        *args,
        "--config.train.steps=8",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        f"--workdir={moved}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected, resumed = train_losses(straight), train_losses(moved)
    assert sorted(resumed) == list(range(1, 9))
    np.testing.assert_allclose([resumed[s] for s in range(5, 9)], [expected[s] for s in range(5, 9)], atol=1e-6)

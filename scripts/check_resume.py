"""Checks that a run killed with SIGKILL and resumed reproduces the uninterrupted run bit for bit.

    python scripts/check_resume.py --kills=5 -- --config=configs/transformer.py:tiny --config.train.steps=40

Trains once straight, then `--kills` times: starts the same run in a fresh workdir, kills it with SIGKILL at a
random step once a checkpoint at or after that step has committed, resumes it, and compares every logged loss
and the final parameters with the straight run. Arguments after `--` go to main.py (checkpoint.every and
log_every are forced to 1).
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from lcjax.config import from_dict  # noqa: E402
from lcjax.train import run as run_lib  # noqa: E402
from lcjax.train.metrics import read_metrics  # noqa: E402

_KILLS = flags.DEFINE_integer("kills", 5, "Kill/resume rounds.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for choosing kill steps.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where to put the runs (default: a temporary directory).")


def losses(workdir: str) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(workdir).items()}


def committed_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if os.path.isdir(directory) else []


def main_command(args: list[str], workdir: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "main.py"), *args, f"--workdir={workdir}"]


def kill_at(args: list[str], workdir: str, step: int, timeout: float = 600) -> None:
    process = subprocess.Popen(main_command(args, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while max(committed_steps(workdir), default=0) < step:
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"run ended or stalled before a checkpoint at step {step}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def final_params(workdir: str):
    with open(os.path.join(workdir, "config.json")) as f:
        config = from_dict(json.load(f)).validate(jax.device_count())
    return jax.device_get(run_lib.restore_for_inference(config, workdir)[1])


def main(argv):
    args = [*argv[1:], "--config.checkpoint.every=1", "--config.train.log_every=1"]
    base = _WORKDIR.value or tempfile.mkdtemp(prefix="check_resume_")
    straight = os.path.join(base, "straight")
    subprocess.run(main_command(args, straight), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected, expected_params = losses(straight), final_params(straight)
    steps = max(expected)
    rng = random.Random(_SEED.value)
    print(f"straight run: {steps} steps in {straight}")
    print(f"{'kill at':>8} {'resumed':>8} {'losses equal':>13} {'params equal':>13}")
    all_ok = True
    for round_index in range(_KILLS.value):
        kill_step = rng.randint(1, steps - 1)
        workdir = os.path.join(base, f"kill{round_index}_at{kill_step}")
        kill_at(args, workdir, kill_step)
        resumed_from = max(committed_steps(workdir))
        subprocess.run(main_command(args, workdir), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        same_losses = losses(workdir) == expected
        same_params = all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(expected_params), strict=True)
        )
        all_ok &= same_losses and same_params
        print(f"{kill_step:>8} {resumed_from:>8} {same_losses!s:>13} {same_params!s:>13}")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    app.run(main)

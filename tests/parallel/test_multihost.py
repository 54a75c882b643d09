"""Two processes × 4 CPU devices (jax.distributed, gloo collectives) train like one process × 8 devices."""

import os
import socket
import subprocess
import sys
import time

import numpy as np

from tests.conftest import FAST_COMPILE, ROOT
from tests.train.test_resilience import SMALL, corpus, train_losses  # noqa: F401 (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(args, workdir, num_processes, devices_per_process, tag, timeout_s=300):
    """Runs main.py in `num_processes` processes; returns each one's log (stderr).

    Logs go to files, not pipes (a full pipe would block a process inside a collective). When one process fails,
    the others are killed at once; a hang is killed at `timeout_s`. Either way the assertion shows every log.
    """
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices_per_process}",
    }
    extra = []
    if num_processes > 1:
        extra = [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={num_processes}"]
    os.makedirs(workdir, exist_ok=True)
    logs = [os.path.join(workdir, f"{tag}.process{i}.log") for i in range(num_processes)]
    procs = []
    for i in range(num_processes):
        with open(logs[i], "w") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "main.py",
                        *args,
                        f"--workdir={workdir}",
                        *extra,
                        *([f"--process_id={i}"] if num_processes > 1 else []),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [open(path).read() for path in logs]
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}) ---\n{text[-3000:]}"
        for i, (p, text) in enumerate(zip(procs, texts, strict=True))
    )
    assert all(p.returncode == 0 for p in procs), f"a process failed or the run hung (exit -9: killed)\n{report}"
    return texts


def _train_then_resume(args, workdir, processes, devices):
    _run_processes([*args, "--config.train.steps=3"], workdir, processes, devices, "first")
    logs = _run_processes([*args, "--config.train.steps=5"], workdir, processes, devices, "resume")  # restore + 2
    assert all("resumed from" in log for log in logs)
    if processes > 1:
        assert all(f"process {i} of 2; 4 local / 8 global devices" in log for i, log in enumerate(logs))
    return train_losses(workdir)


def test_two_processes_match_one(tmp_path, corpus):  # noqa: F811
    args = [*SMALL, f"--config.data.path={corpus}", "--config.train.min_lr_ratio=1.0", "--config.checkpoint.every=3"]
    results = {"one": _train_then_resume(args, tmp_path / "one", 1, 8)}
    results["two"] = _train_then_resume(args, tmp_path / "two", 2, 4)
    assert sorted(results["two"]) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [results["two"][s] for s in range(1, 6)], [results["one"][s] for s in range(1, 6)], atol=1e-6, rtol=0
    )

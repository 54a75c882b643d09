"""Two processes × 4 CPU devices (jax.distributed, gloo collectives) train like one process × 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT
from tests.train.test_resilience import SMALL, corpus, train_losses  # noqa: F401 (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(args, workdir, num_processes, devices_per_process):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
    }
    extra = []
    if num_processes > 1:
        extra = [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={num_processes}"]
    procs = [
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
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [err for _, err in outputs]


def test_two_processes_match_one(tmp_path, corpus):  # noqa: F811
    args = [*SMALL, f"--config.data.path={corpus}", "--config.train.min_lr_ratio=1.0", "--config.checkpoint.every=3"]
    results = {}
    for name, processes, devices in (("one", 1, 8), ("two", 2, 4)):
        workdir = tmp_path / name
        _run_processes([*args, "--config.train.steps=3"], workdir, processes, devices)
        logs = _run_processes([*args, "--config.train.steps=5"], workdir, processes, devices)  # restore + 2 steps
        assert all("resumed from" in log for log in logs)
        if processes > 1:
            assert all(f"process {i} of 2; 4 local / 8 global devices" in log for i, log in enumerate(logs))
        results[name] = train_losses(workdir)
    assert sorted(results["two"]) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [results["two"][s] for s in range(1, 6)], [results["one"][s] for s in range(1, 6)], atol=1e-6, rtol=0
    )

"""Test set-up: 8 fake CPU devices (set before jax is imported) and small shared helpers."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
# libtpu (the `tpu` extra) compiles for TPU topologies here; let several test processes load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lcjax.config import from_dict  # noqa: E402

SMALL_MODEL = {
    "name": "transformer",
    "vocab_size": 64,
    "d_model": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mlp_dim": 64,
}


def make_config(model=None, **sections):
    """A validated-shape Config for tests: a small transformer unless `model` says otherwise."""
    values = {"model": {**SMALL_MODEL, **(model or {})}, **sections}
    return from_dict(values)


def run_main(*args, timeout=120):
    """Runs `python main.py ARGS` in the repository root on CPU; returns the CompletedProcess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def pytest_configure(config):
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices; was jax imported before conftest?"

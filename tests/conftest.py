"""Test set-up: 8 fake CPU devices (set before jax is imported) and small shared helpers."""

import os

# Tests compile far more than they compute (tiny shapes): LLVM's -O0 for the CPU backend cuts their compile time by
# half or more and leaves results IEEE-identical (XLA's own HLO passes still run; fast math stays off). A value in the
# caller's XLA_FLAGS comes later and wins. Subprocesses (main.py, notebooks, multihost) inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
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


def tiny_run_losses(tmp_path, config_arg: str, *overrides: str) -> list[float]:
    """Trains `--config=<config_arg>` through main.py for 40 steps (batch 8, length 64) and returns the logged train
    losses, after checking that the run exited cleanly."""
    import json

    result = run_main(
        f"--config={config_arg}",
        f"--workdir={tmp_path}",
        "--config.train.steps=40",
        "--config.train.batch_size=8",
        "--config.train.seq_len=64",
        "--config.train.log_every=5",
        "--config.train.eval_every=40",
        "--config.train.warmup_steps=5",
        "--config.eval.num_batches=2",
        *overrides,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def packed_batch(vocab: int = 64) -> dict:
    """4 rows of 12 tokens, two packed documents (7 + 5 tokens) per row, for sharded-vs-single-device checks."""
    import numpy as np

    tokens = np.random.default_rng(0).integers(0, vocab, (4, 13)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.repeat([[1] * 7 + [2] * 5], 4, 0).astype(np.int32),
        "positions": np.repeat([list(range(7)) + list(range(5))], 4, 0).astype(np.int32),
        "loss_mask": np.ones((4, 12), np.float32),
    }


def pattern_batch(batch_size=8, seq_len=32, seed=0) -> dict:
    """A learnable task: from a random start, each next token is (3 * token + 1) mod 64."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch_size, seq_len + 1), np.int32)
    tokens[:, 0] = rng.integers(0, 64, batch_size)
    for t in range(seq_len):
        tokens[:, t + 1] = (3 * tokens[:, t] + 1) % 64
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def assert_sharded_gradients_equal_one_device(config, batch, rtol_of_max: float = 1e-5):
    """Loss and gradients of `batch` on mesh data=2,tensor=2 equal those on one device (the gradients, not an
    optimizer step: Adam's first step would amplify reduction-order noise where a gradient is tiny). Returns the
    sharded gradients (to check their shardings)."""
    import numpy as np

    from lcjax.parallel.mesh import make_mesh
    from lcjax.train.step import Trainer

    def grads_on(mesh):
        trainer = Trainer.create(config, mesh)
        with jax.set_mesh(mesh):
            grads, metrics = jax.jit(trainer._grads)(trainer.init_state(seed=0)["params"], trainer.device_batch(batch))
        return float(metrics["loss"]), grads

    loss_1, grads_1 = grads_on(make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}, devices=jax.devices()[:1]))
    loss_4, grads_4 = grads_on(make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1}, devices=jax.devices()[:4]))
    assert abs(loss_1 - loss_4) < 1e-5
    leaves_1, leaves_4 = jax.tree.leaves(jax.device_get(grads_1)), jax.tree.leaves(jax.device_get(grads_4))
    scale = max(float(np.max(np.abs(g))) for g in leaves_1)
    for a, b in zip(leaves_1, leaves_4, strict=True):
        np.testing.assert_allclose(a, b, atol=rtol_of_max * scale, rtol=0)
    return grads_4


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def pytest_configure(config):
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices; was jax imported before conftest?"

"""Attention implementations: `pallas` (interpret mode here) == `xla` for a whole sharded train step, packed
documents included; `cudnn` on a machine without an NVIDIA GPU falls back to `xla` and says so."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import common
from lcjax.layers.attention import causal_attention
from lcjax.parallel.mesh import make_mesh
from lcjax.train.step import Trainer
from tests.conftest import make_config


def _packed_batch(batch_size=4, seq_len=48, seed=0):
    """Random tokens in 2-3 documents per row, with positions restarting per document."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 64, (batch_size, seq_len + 1)).astype(np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        cuts = sorted(rng.choice(np.arange(5, seq_len - 5), size=row % 2 + 1, replace=False))
        for doc, (start, stop) in enumerate(zip([0, *cuts], [*cuts, seq_len], strict=True)):
            segment_ids[row, start:stop] = doc + 1
            positions[row, start:stop] = np.arange(stop - start)
    return {
        "inputs": inputs[:, :-1],
        "targets": inputs[:, 1:],
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
    }


def _train_step(impl, mesh_sizes):
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **mesh_sizes}
    mesh = make_mesh(sizes, devices=jax.devices()[: int(np.prod(list(sizes.values())))])
    config = make_config(model={"attention": {"impl": impl}}, train={"batch_size": 4, "seq_len": 48, "warmup_steps": 0})
    trainer = Trainer.create(config, mesh)
    state, metrics = trainer.jit_train_step()(trainer.init_state(0), trainer.device_batch(_packed_batch()))
    return jax.device_get(state["params"]), float(metrics["loss"])


# The one-device case is `slow` (CI's 20-minute budget); the sharded case covers the same code on a mesh.
@pytest.mark.parametrize("mesh_sizes", [pytest.param({"data": 1}, marks=pytest.mark.slow), {"data": 2, "tensor": 2}])
def test_pallas_train_step_equals_xla(mesh_sizes):
    xla_params, xla_loss = _train_step("xla", mesh_sizes)
    pallas_params, pallas_loss = _train_step("pallas", mesh_sizes)
    assert abs(xla_loss - pallas_loss) < 1e-5
    # one AdamW step from the same init: equal updates mean equal gradients through the kernel
    for a, b in zip(jax.tree.leaves(xla_params), jax.tree.leaves(pallas_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_cudnn_without_gpu_falls_back_to_xla(caplog, monkeypatch):
    monkeypatch.setattr(common, "_said", set())  # said once per process: forget earlier tests' lines
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, 16, 4, 8))
    k, v = (jax.random.normal(key, (1, 16, 2, 8)) for key in keys[1:])
    with caplog.at_level(logging.INFO):
        out = causal_attention(q, k, v, None, scale=0.3, impl="cudnn")
    np.testing.assert_array_equal(out, causal_attention(q, k, v, None, scale=0.3, impl="xla"))
    assert any("attention.impl=cudnn" in r.message for r in caplog.records)
    assert jnp.isfinite(out).all()

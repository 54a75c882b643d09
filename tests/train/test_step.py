import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.parallel.mesh import make_mesh
from lcjax.train.step import Trainer, token_losses
from tests.conftest import make_config, pattern_batch


def _single_device_trainer(**sections):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}, devices=jax.devices()[:1])
    return Trainer.create(make_config(**sections), mesh)


def test_token_losses_match_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    nll, log_z = token_losses(logits, {"targets": targets})
    expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, expected, atol=1e-6)
    np.testing.assert_allclose(log_z, jax.nn.logsumexp(logits, -1), atol=1e-6)


def test_loss_mask_excludes_tokens():
    trainer = _single_device_trainer()
    state = trainer.init_state(0)
    batch = pattern_batch()
    full = trainer._loss(state["params"], batch)[1]
    masked = dict(batch, loss_mask=batch["loss_mask"].copy())
    masked["loss_mask"][:, 16:] = 0
    half = dict(batch, loss_mask=masked["loss_mask"])
    first_half = trainer._loss(state["params"], half)[1]
    model = trainer.model(state["params"])
    nll, _ = token_losses(model({"inputs": batch["inputs"]})[0], batch)
    np.testing.assert_allclose(first_half["loss"], nll[:, :16].mean(), rtol=1e-6)
    np.testing.assert_allclose(full["loss"], nll.mean(), rtol=1e-6)
    assert float(first_half["tokens"]) == 8 * 16


def test_z_loss_adds_mean_squared_log_partition():
    trainer = _single_device_trainer(train={"z_loss_weight": 0.01})
    state = trainer.init_state(0)
    batch = pattern_batch()
    total, metrics = trainer._loss(state["params"], batch)
    _, log_z = token_losses(trainer.model(state["params"])({"inputs": batch["inputs"]})[0], batch)
    np.testing.assert_allclose(metrics["z_loss"], 0.01 * jnp.mean(log_z**2), rtol=1e-5)
    np.testing.assert_allclose(total, metrics["loss"] + metrics["z_loss"], rtol=1e-6)


def test_train_step_learns_a_synthetic_task():
    trainer = _single_device_trainer(train={"learning_rate": 1e-2, "warmup_steps": 5, "steps": 60})
    state = trainer.init_state(0)
    step = trainer.jit_train_step()
    losses = []
    for i in range(60):
        state, metrics = step(state, trainer.device_batch(pattern_batch(seed=i)))
        losses.append(float(metrics["loss"]))
    assert int(state["step"]) == 60
    # From about log(64) to well under 1 nat: the model learned the rule, not just the unigram distribution.
    assert losses[0] > 3.5 and np.mean(losses[-5:]) < 0.5, losses


def test_non_finite_gradients_skip_the_update():
    trainer = _single_device_trainer(train={"warmup_steps": 0})
    state = trainer.init_state(0)
    state["params"]["final_norm"]["scale"] = state["params"]["final_norm"]["scale"].at[0].set(jnp.inf)
    before = jax.device_get(state)
    new_state, metrics = trainer.jit_train_step()(state, trainer.device_batch(pattern_batch()))
    assert float(metrics["skipped"]) == 1.0
    after = jax.device_get(new_state)
    assert int(after["step"]) == 1
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(after["opt_state"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
    f32 = _single_device_trainer()
    bf16 = _single_device_trainer(train={"compute_dtype": "bfloat16"})
    state = f32.init_state(0)
    batch = pattern_batch()
    loss32 = float(f32._loss(state["params"], batch)[1]["loss"])
    loss16 = float(bf16._loss(state["params"], batch)[1]["loss"])
    assert abs(loss16 - loss32) < 0.05 * loss32
    new_state, _ = bf16.jit_train_step()(state, bf16.device_batch(batch))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_state["params"]))


def _step_once(trainer, batch):
    state = trainer.init_state(0)
    new_state, metrics = trainer.jit_train_step()(state, trainer.device_batch(batch))
    return jax.device_get(new_state), float(metrics["loss"])


# The one-device case is `slow` (CI's 20-minute budget); the sharded case covers the same code on a mesh.
@pytest.mark.parametrize("mesh_sizes", [pytest.param({"data": 1}, marks=pytest.mark.slow), {"data": 2, "fsdp": 2}])
def test_gradient_accumulation_equals_one_big_batch(mesh_sizes):
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **mesh_sizes}
    devices = jax.devices()[: sizes["data"] * sizes["fsdp"]]
    mesh = make_mesh(sizes, devices=devices)
    batch = pattern_batch(batch_size=16, seed=3)
    batch["loss_mask"][:5, 20:] = 0  # uneven token counts across micro-batches
    train = {"batch_size": 16, "warmup_steps": 0, "z_loss_weight": 1e-3}
    one, loss_one = _step_once(Trainer.create(make_config(train=train), mesh), batch)
    four, loss_four = _step_once(Trainer.create(make_config(train={**train, "grad_accum_steps": 4}), mesh), batch)
    assert abs(loss_one - loss_four) < 1e-6
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(four["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(one["opt_state"]), jax.tree.leaves(four["opt_state"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_injected_nan_step_is_skipped_and_counted():
    trainer = _single_device_trainer(train={"warmup_steps": 0, "debug_nan_step": 2})
    state = trainer.init_state(0)
    step = trainer.jit_train_step()
    history = []
    for i in range(5):
        before = jax.device_get(state["params"])
        state, metrics = step(state, trainer.device_batch(pattern_batch(seed=i)))
        history.append((before, jax.device_get(state["params"]), float(metrics["skipped"])))
    assert [h[2] for h in history] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert int(state["skipped_steps"]) == 1 and int(state["step"]) == 5
    for a, b in zip(jax.tree.leaves(history[2][0]), jax.tree.leaves(history[2][1]), strict=True):
        np.testing.assert_array_equal(a, b)  # step 2 left params untouched
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(history[3][0]), jax.tree.leaves(history[3][1]), strict=True)
    ]
    assert all(changed)  # and training continued
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_weight_decay_spares_stacked_norm_scales():
    """Scanned stacks give norm scales a leading `layers` axis; they must still get no weight decay."""
    trainer = _single_device_trainer(
        train={"weight_decay": 0.5, "learning_rate": 0.1, "warmup_steps": 0, "grad_clip": 0.0}
    )
    state = trainer.init_state(0)
    params = state["params"]
    assert params["layers"]["blocks"]["attn_norm"]["scale"].ndim == 2  # [layers, d_model]
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = trainer.optimizer.update(zero_grads, state["opt_state"], params)
    blocks = updates["layers"]["blocks"]
    for norm in ("attn_norm", "mlp_norm"):
        np.testing.assert_array_equal(blocks[norm]["scale"], 0.0)
    np.testing.assert_array_equal(updates["final_norm"]["scale"], 0.0)
    assert float(jnp.abs(blocks["attn"]["wq"]).max()) > 0 and float(jnp.abs(updates["embed"]).max()) > 0


def test_sparse_logits_give_the_full_loss_and_gradients():
    """train.sparse_logits = n applies the head only at each row's labels (`lm_logits`, the same for every model):
    same loss, same gradients, for rows with 0..n labels anywhere (including the last position)."""
    from lcjax.config import from_dict
    from tests.conftest import SMALL_MODEL

    model = SMALL_MODEL
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}, devices=jax.devices()[:1])
    full = Trainer.create(from_dict({"model": model, "train": {"z_loss_weight": 1e-2}}), mesh)
    sparse = Trainer.create(from_dict({"model": model, "train": {"z_loss_weight": 1e-2, "sparse_logits": 3}}), mesh)
    batch = pattern_batch(batch_size=4, seq_len=16, seed=1)
    batch["loss_mask"][:] = 0
    batch["loss_mask"][0, [2, 9, 15]] = 1  # the row limit, the last position included
    batch["loss_mask"][1, [0]] = 1
    batch["loss_mask"][3, [5, 6]] = 1  # row 2 has none
    params = full.init_state(0)["params"]
    (loss_f, metrics_f), grads_f = jax.jit(jax.value_and_grad(full._loss, has_aux=True))(params, batch)
    (loss_s, metrics_s), grads_s = jax.jit(jax.value_and_grad(sparse._loss, has_aux=True))(params, batch)
    assert float(metrics_s["tokens"]) == 6.0
    np.testing.assert_allclose(loss_s, loss_f, rtol=1e-6)
    np.testing.assert_allclose(metrics_s["z_loss"], metrics_f["z_loss"], rtol=1e-6)
    flat_f, flat_s = jax.tree.leaves(grads_f), jax.tree.leaves(grads_s)
    assert max(float(jnp.abs(g).max()) for g in flat_f) > 0
    for a, b in zip(flat_f, flat_s, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_sparse_logits_reject_rows_with_more_labels():
    from lcjax.errors import ConfigError
    from lcjax.train.step import check_sparse_logits

    batch = {"loss_mask": np.zeros((2, 8), np.float32)}
    batch["loss_mask"][1, :3] = 1
    check_sparse_logits(batch, 3)
    with pytest.raises(ConfigError, match="train.sparse_logits.*3 labelled positions"):
        check_sparse_logits(batch, 2)

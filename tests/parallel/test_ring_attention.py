"""Ring attention on 8 fake CPU devices: == dense attention (outputs and gradients, every layout, causal and not,
packed segments, GQA); the per-step plans skip no visible pair; a sharded train step on `sequence=4, data=2` ==
the single-device dense step (packed documents); decode with a sequence-sharded KV cache == single-device decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_pallas.flash_attention import reference
from lcjax import models
from lcjax.parallel import ring_attention as ring
from lcjax.parallel import ring_layout
from lcjax.parallel.mesh import make_mesh
from lcjax.train.step import Trainer
from tests.conftest import make_config
from tests.layers.test_attention import _packed_batch

# id: (layout, causal, segments, heads, kv_heads, explicit mesh axes, block engine)
CASES = {
    "zigzag-causal-segments-gqa2": ("zigzag", True, True, 4, 2, True, "jnp"),
    "zigzag-noncausal-gqa4": ("zigzag", False, False, 4, 1, False, "jnp"),
    "contiguous-causal-gqa2": ("contiguous", True, False, 4, 2, False, "jnp"),
    "contiguous-noncausal-segments-mha": ("contiguous", False, True, 2, 2, True, "jnp"),
    "striped-causal-segments-gqa4": ("striped", True, True, 4, 1, False, "jnp"),
    "striped-noncausal-segments-gqa2": ("striped", False, True, 4, 2, False, "jnp"),
    # the Pallas flash kernel (interpret mode) as the per-block engine
    "pallas-zigzag-causal-segments-gqa2": ("zigzag", True, True, 4, 2, False, "pallas"),
    "pallas-contiguous-causal-gqa2": ("contiguous", True, False, 4, 2, False, "pallas"),
    "pallas-zigzag-noncausal-segments-mha": ("zigzag", False, True, 2, 2, False, "pallas"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_equals_dense_attention(case):
    layout, causal, segments, heads, kv_heads, explicit, engine = CASES[case]
    batch, length, head_dim = 2, 64, 16
    if explicit:  # jax.make_mesh's default (Explicit) axes, as a user would build them
        mesh = jax.make_mesh((8,), ("sequence",))
    else:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 8})
    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
    seg = jnp.sort(jax.random.randint(keys[3], (batch, length), 0, 4), axis=1) if segments else None
    probe = jax.random.normal(keys[4], q.shape)

    def outputs_and_grads(attend):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v) * probe)
        return jax.jit(lambda q, k, v: (attend(q, k, v), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    ring_fn = lambda q, k, v: ring.ring_attention(
        q, k, v, mesh=mesh, causal=causal, segment_ids=seg, layout=layout, scale=0.3, engine=engine
    )
    dense_fn = lambda q, k, v: reference(q, k, v, causal=causal, segment_ids=seg, scale=0.3)[0]
    with jax.set_mesh(mesh):
        got = outputs_and_grads(ring_fn)
        if engine == "pallas":  # the kernel really computes the blocks
            assert "pallas_call" in str(jax.make_jaxpr(ring_fn)(q, k, v))
    want = outputs_and_grads(dense_fn)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("layout", ring_layout.LAYOUTS)
@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_layout_is_a_permutation_and_plans_drop_no_visible_pair(layout, num_shards):
    length = 4 * num_shards
    perm = ring_layout.permutation(length, num_shards, layout)
    np.testing.assert_array_equal(np.sort(perm), np.arange(length))
    x = np.arange(3 * length).reshape(3, length)
    np.testing.assert_array_equal(ring_layout.from_layout(ring_layout.to_layout(x, perm), perm), x)
    block, half = length // num_shards, length // num_shards // 2
    for step in range(num_shards):
        for rank in range(num_shards):
            q_slots = np.asarray(ring_layout.local_slots(layout, rank, num_shards, block))
            k_slots = np.asarray(ring_layout.local_slots(layout, (rank - step) % num_shards, num_shards, block))
            visible = k_slots[None, :] <= q_slots[:, None]
            plan = int(ring_layout.step_plan(layout, True, step, rank, num_shards))
            dropped = {
                ring_layout._FULL: np.zeros_like(visible),
                ring_layout._DIAGONAL: np.zeros_like(visible),
                ring_layout._KEY_FIRST_HALF: np.arange(block)[None, :] >= half,
                ring_layout._QUERY_SECOND_HALF: np.arange(block)[:, None] < half,
                ring_layout._SKIP: np.ones_like(visible),
            }[plan]
            assert not (visible & dropped).any(), (layout, step, rank, plan)


def test_critical_path_work_per_layout():
    # zigzag: one full block (step 0), then exactly half a block on every device at every step
    assert ring_layout.critical_path_work("zigzag", 8) == 1 + 7 * 0.5
    # contiguous: the last device works at every step; striped computes full (half-masked) blocks
    assert ring_layout.critical_path_work("contiguous", 8) == 8
    assert ring_layout.critical_path_work("striped", 8) == 8
    assert ring_layout.critical_path_work("zigzag", 8, causal=False) == 8
    # zigzag and contiguous skip the same fully masked blocks (zigzag spreads them evenly over the devices);
    # striped computes every block, of which about half is visible
    zigzag, contiguous = (
        ring_layout.visible_fraction("zigzag", 8, 256),
        ring_layout.visible_fraction("contiguous", 8, 256),
    )
    assert zigzag == pytest.approx(contiguous) and zigzag > 0.85
    assert 0.45 < ring_layout.visible_fraction("striped", 8, 256) < 0.55


def test_bad_layout_and_length_say_what_was_expected():
    with pytest.raises(ValueError, match="unknown ring layout"):
        ring_layout.permutation(16, 4, "spiral")
    with pytest.raises(ValueError, match="multiple of 8 for the zigzag layout over 4 devices"):
        ring_layout.permutation(20, 4, "zigzag")


def _one_step(mesh_sizes, attention):
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **mesh_sizes}
    mesh = make_mesh(sizes, devices=jax.devices()[: int(np.prod(list(sizes.values())))])
    config = make_config(model={"attention": attention}, train={"batch_size": 4, "seq_len": 48, "warmup_steps": 0})
    trainer = Trainer.create(config, mesh)
    state, batch = trainer.init_state(0), trainer.device_batch(_packed_batch())
    if attention["impl"] == "ring":  # the ring really runs: K/V hop between the sequence devices
        assert "collective_permute" in trainer.jit_train_step().lower(state, batch).as_text()
    state, metrics = trainer.jit_train_step()(state, batch)
    return jax.device_get(state["params"]), float(metrics["loss"])


@pytest.mark.parametrize("layout, engine", [("zigzag", "jnp"), ("contiguous", "pallas")])
def test_ring_train_step_on_sequence_and_data_equals_single_device_dense(layout, engine):
    dense_params, dense_loss = _one_step({}, {"impl": "xla"})
    attention = {"impl": "ring", "ring_layout": layout, "ring_engine": engine}
    ring_params, ring_loss = _one_step({"sequence": 4, "data": 2}, attention)
    assert abs(ring_loss - dense_loss) < 1e-5
    for a, b in zip(jax.tree.leaves(dense_params), jax.tree.leaves(ring_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_decode_with_a_sequence_sharded_cache_equals_single_device_decode():
    config = make_config(model={"attention": {"impl": "ring"}})
    model = models.build(config, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, 64)

    def run(model, tokens):
        cache = model.init_cache(2, 16)
        prompt, cache = model.decode(tokens[:, :7], cache)
        steps = []
        for t in range(7, 10):
            logits, cache = model.decode(tokens[:, t : t + 1], cache)
            steps.append(logits)
        return jnp.concatenate([prompt, *steps], axis=1), cache

    graphdef, state = nnx.split(model)
    single, _ = run(model, tokens)  # no mesh: the plain cache path
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 4}, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        sharded, cache = jax.jit(lambda s, t: run(nnx.merge(graphdef, s), t))(state, tokens)
    # the cache really is split along its length over the 4 `sequence` devices
    assert cache["layers"]["k"].sharding.shard_shape(cache["layers"]["k"].shape)[2] == 4
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)
    # and equals the parallel form
    np.testing.assert_allclose(np.asarray(single), np.asarray(model({"inputs": tokens})[0]), atol=1e-5, rtol=0)

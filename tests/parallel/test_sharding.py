import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lcjax.config import from_config_dict
from lcjax.parallel.mesh import MESH_AXES, make_mesh
from lcjax.parallel.sharding import check_no_repeats, logical_to_spec
from lcjax.train.step import Trainer
from tests.conftest import make_config

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "transformer_tiny_specs.json")


def test_first_match_rules():
    assert logical_to_spec(("batch", "length", "embed"), MESH_AXES) == P(("data", "fsdp"), "sequence", None)
    assert logical_to_spec(("embed", "mlp"), MESH_AXES) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), MESH_AXES) == P(None, "fsdp", "tensor", None)
    # kv_heads and heads both want `tensor`: the second one falls through to replication.
    assert logical_to_spec(("heads", "kv_heads"), MESH_AXES) == P("tensor", None)
    # Without an fsdp axis, batch falls back to its second rule.
    assert logical_to_spec(("batch", "embed"), ("data", "tensor")) == P("data", None)


def test_repeated_mesh_axis_is_refused():
    with pytest.raises(ValueError, match="twice"):
        check_no_repeats(P("tensor", ("data", "tensor")))
    with pytest.raises(ValueError, match="unknown logical axis"):
        logical_to_spec(("embedding",), MESH_AXES)


def _tiny_trainer():
    import configs.transformer as transformer_config

    config = from_config_dict(transformer_config.get_config("tiny"))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1})
    return Trainer.create(config, mesh)


def _spec_table(tree) -> dict[str, str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): str(sharding.spec) for path, sharding in flat}


def test_golden_partition_specs():
    """Parameter and optimizer-state PartitionSpecs of the tiny preset on the data=2,fsdp=2,tensor=2 mesh."""
    trainer = _tiny_trainer()
    table = _spec_table(trainer.state_shardings)
    for spec in jax.tree.leaves(trainer.state_shardings):
        check_no_repeats(spec.spec)
    if os.environ.get("LCJAX_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    with open(GOLDEN) as f:
        assert table == json.load(f)
    assert table["['params']['layers']['blocks']['mlp']['w_gate']"] == str(P(None, "fsdp", "tensor"))


def _step_on(mesh, config, batch):
    trainer = Trainer.create(config, mesh)
    state = trainer.init_state(seed=0)
    new_state, metrics = trainer.jit_train_step()(state, trainer.device_batch(batch))
    return jax.device_get(new_state["params"]), float(metrics["loss"]), new_state


def test_sharded_step_equals_single_device():
    config = make_config(train={"batch_size": 8, "seq_len": 16, "warmup_steps": 0})
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.repeat([[1] * 10 + [2] * 6], 8, 0).astype(np.int32),
        "positions": np.repeat([list(range(10)) + list(range(6))], 8, 0).astype(np.int32),
        "loss_mask": np.ones((8, 16), np.float32),
    }
    single = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}, devices=jax.devices()[:1])
    sharded = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1})
    params_1, loss_1, _ = _step_on(single, config, batch)
    params_8, loss_8, state_8 = _step_on(sharded, config, batch)
    assert abs(loss_1 - loss_8) < 1e-5
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    wq = state_8["params"]["layers"]["blocks"]["attn"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(wq.addressable_shards) == 8

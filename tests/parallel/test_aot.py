"""The real TPU compiler runs on this CPU machine (libtpu from the `tpu` extra) for the sharded train step."""

import jax

import configs.transformer as transformer_config
from lcjax.config import from_config_dict
from lcjax.parallel.aot import compile_train_step


def test_tiny_train_step_compiles_for_tpu_topologies():
    config = from_config_dict(transformer_config.get_config("tiny"))
    for topology, chips in (("v5e:2x2", 4), ("v5p:2x2x2", 8)):
        report = compile_train_step(config, topology)
        assert report["chips"] == chips and report["mesh"]["data"] == chips and report["fits"] is True
        # The state (fp32 params + Adam mu and nu) is replicated over `data`: every chip holds all of it.
        state_bytes = 3 * 4 * report["params"]
        assert state_bytes <= report["arguments"] < state_bytes + 2**20
        assert report["aliased"] >= state_bytes  # the donated state is updated in place
        assert 0 < report["total"] < report["hbm"]
    assert jax.default_backend() == "cpu"  # compiling for TPU did not switch the test process's backend

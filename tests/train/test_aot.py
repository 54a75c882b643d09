"""The real TPU compiler runs on this CPU machine (libtpu from the `tpu` extra) for the sharded train step."""

import dataclasses

import jax
import pytest

import configs.transformer as transformer_config
from lcjax.config import from_config_dict
from lcjax.train.aot import compile_train_step


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
        assert report["pallas_kernel_calls"] == 0  # attention.impl=xla
    assert jax.default_backend() == "cpu"  # compiling for TPU did not switch the test process's backend


def test_train_step_with_the_pallas_kernel_compiles_for_tpu():
    """attention.impl=pallas inside the sharded step (shard_map over data and tensor): Mosaic kernels, compiled."""
    config = from_config_dict(transformer_config.get_config("tiny"))
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, attention=dataclasses.replace(config.model.attention, impl="pallas")),
        mesh=dataclasses.replace(config.mesh, data=2, tensor=2),
    )
    report = compile_train_step(config, "v5e:2x2")
    assert report["fits"] is True and report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1}
    # the forward kernel (in the scanned layers' forward and in the remat of the backward), dk/dv and dq
    assert report["pallas_kernel_calls"] >= 3


def test_train_step_with_ring_attention_compiles_for_tpu_with_pallas_blocks():
    """attention.impl=ring over sequence=4: the ring (shard_map, ppermute) compiles with the TPU compiler, and the
    default ring_engine=auto computes its blocks with the Mosaic flash kernels there."""
    config = from_config_dict(transformer_config.get_config("tiny"))
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, attention=dataclasses.replace(config.model.attention, impl="ring")),
        mesh=dataclasses.replace(config.mesh, data=1, sequence=4),
        train=dataclasses.replace(config.train, batch_size=4),
    )
    report = compile_train_step(config, "v5e:2x2")
    assert report["fits"] is True and report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 4}
    assert report["pallas_kernel_calls"] >= 3


def _recurrent_preset(module: str, preset: str, **model):
    import importlib

    config = from_config_dict(importlib.import_module(f"configs.{module}").get_config(preset))
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, **model),
        mesh=dataclasses.replace(config.mesh, data=2, tensor=2),
    )


@pytest.mark.parametrize(
    "module,preset,model,kernels",
    [
        ("titans", "lmm-tiny", {"memory_impl": "pallas"}, 4),  # with and without the restart terms (a lax.cond)
        ("xlstm", "large-tiny", {"mlstm_impl": "pallas"}, 2),
        ("mamba2", "tiny", {"ssd_impl": "pallas"}, 2),
    ],
)
def test_recurrent_kernels_compile_in_the_sharded_step_for_tpu(module, preset, model, kernels):
    """The Titans memory and chunkwise linear-attention kernels in a data=2,tensor=2 step: each runs per device shard
    (`per_shard`); without it the TPU compiler refuses ("Mosaic kernels cannot be automatically partitioned")."""
    report = compile_train_step(_recurrent_preset(module, preset, **model), "v5e:2x2")
    assert report["fits"] is True and report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1}
    assert report["pallas_kernel_calls"] >= kernels  # forward and backward

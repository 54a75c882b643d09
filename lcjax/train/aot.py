"""Ahead-of-time compilation of the real sharded train step for a TPU topology, on a machine without one.

With the `libtpu` package installed, `jax.experimental.topologies.get_topology_desc` gives abstract TPU devices;
the mesh is built on them and the train step is lowered with `ShapeDtypeStruct` inputs carrying the run's
shardings and compiled by the real TPU compiler, whose `memory_analysis()` gives per-chip memory. A sharding
mistake or an out-of-memory configuration shows up here, before a pod is booked.
"""

from __future__ import annotations

import dataclasses

import jax

from kernels_pallas.common import tracing_for
from lcjax.data import batch as batch_schema
from lcjax.parallel.mesh import make_mesh
from lcjax.train.step import Trainer

GIB = 2**30
# HBM per chip, by `device_kind` prefix (most specific first).
HBM_BYTES = {
    "TPU v5 lite": 16 * GIB,
    "TPU v5e": 16 * GIB,
    "TPU v5p": 95 * GIB,
    "TPU v5": 95 * GIB,
    "TPU v6 lite": 32 * GIB,
    "TPU v6e": 32 * GIB,
    "TPU v4": 32 * GIB,
}


def topology_devices(topology: str) -> list:
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def abstract_batch(trainer: Trainer, keys: tuple[str, ...] = batch_schema.PIPELINE_KEYS):
    """ShapeDtypeStructs of a training batch's `keys` (the batch schema's dtypes), with the batch sharding."""
    shape = (trainer.config.train.batch_size, trainer.config.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, batch_schema.DTYPES[k], sharding=trainer.batch_sharding) for k in keys}


def compile_train_step(config, topology: str) -> dict:
    """Compiles `config`'s train step for `topology` (e.g. "v5p:2x2x2"); returns per-chip memory in bytes."""
    devices = topology_devices(topology)
    config = config.validate(len(devices))
    mesh = make_mesh(config.mesh.shape(len(devices)), devices=devices)
    trainer = Trainer.create(config, mesh)
    kind = devices[0].device_kind
    hbm = next((v for k, v in HBM_BYTES.items() if kind.startswith(k)), None)
    report = {
        "topology": topology,
        "device_kind": kind,
        "chips": len(devices),
        "mesh": dict(mesh.shape),
        "hbm": hbm,
        "params": sum(int(a.size) for a in jax.tree.leaves(trainer.abstract_state["params"])),
        "config": dataclasses.asdict(config.model)
        | {
            "batch_size": config.train.batch_size,
            "seq_len": config.train.seq_len,
            "grad_accum_steps": config.train.grad_accum_steps,
        },
    }
    with tracing_for("tpu"):  # attention.impl=pallas traces the Mosaic kernels, not interpret mode
        lowered = trainer.jit_train_step().lower(trainer.abstract_state, abstract_batch(trainer))
    try:
        compiled = lowered.compile()
        memory = compiled.memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses programs that cannot fit; its message states what they need.
        return report | {"fits": False, "error": str(e).strip().splitlines()[0]}
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return report | {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "generated_code": memory.generated_code_size_in_bytes,
        "pallas_kernel_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
        "total": total,
        "fits": None if hbm is None else total <= hbm,
    }

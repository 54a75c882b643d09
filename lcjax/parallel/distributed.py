"""Multi-host start-up: `jax.distributed.initialize` when the run is configured for several processes.

Configured means a coordinator address from the flags or `JAX_COORDINATOR_ADDRESS` (with the process count and id
from flags or `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`), or a cluster jax detects by itself (a TPU pod slice, SLURM)
when `auto` is set. A single-host run skips it. CPU runs use gloo collectives, so a multi-process test runs on one
machine.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def maybe_initialize(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, *, auto: bool = False
) -> bool:
    """Initializes jax.distributed if configured; returns whether it did."""
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    index = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if address:
        if count <= 0 or index < 0:
            raise ValueError(
                "a coordinator address needs --num_processes and --process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
            )
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    elif auto:
        jax.distributed.initialize()
    else:
        return False
    logging.info(
        "process %d of %d; %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `name`, through the coordination service (as orbax does).

    Gloo gives the peers of a first CPU collective only 30 s to meet, so processes whose compile times differ
    by more than that must meet here first. A no-op for one process.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client has no public wrapper yet

    jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)

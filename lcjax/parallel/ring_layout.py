"""Ring attention's layouts and plans: which tokens each device of the ring holds, and which part of each ring step's
(query block × visiting key block) pairs is computed (`lcjax.parallel.ring_attention` runs them).

Causal load balancing is a permutation of the sequence ("layout"); device r holds
- `contiguous`: slots [r·c, (r+1)·c), c = T/N: step t > r is fully masked (skipped), so the busiest device works
  every step;
- `zigzag` (default): chunks r and 2N-1-r of 2N chunks: every step after the first is exactly half a block
  (all queries × the first half of the visiting keys, or the second half of the queries × all keys);
- `striped`: slots {r, r+N, r+2N, ...}: every block is about half visible (the work is not skipped here, the mask
  is applied to the full block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("zigzag", "contiguous", "striped")

# plan of one ring step: which part of the (query block × visiting key block) pairs is computed; _DIAGONAL is the
# first step of a causal ring (the local block, causal in local order for every layout)
_FULL, _KEY_FIRST_HALF, _QUERY_SECOND_HALF, _SKIP, _DIAGONAL = 0, 1, 2, 3, 4


def check_layout(length: int, num_shards: int, layout: str) -> None:
    """Raises ValueError naming what is wrong when `length` cannot use `layout` over `num_shards` devices."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring layout {layout!r}; expected one of {LAYOUTS}")
    multiple = 2 * num_shards if layout == "zigzag" else num_shards
    if length % multiple:
        raise ValueError(
            f"sequence length {length} must be a multiple of {multiple} for the {layout} layout over {num_shards} "
            "devices"
        )


def local_slots(layout: str, rank, num_shards: int, block: int):
    """Global token indices [block] held by device `rank` (an int: numpy; a traced scalar: jnp) under `layout`."""
    xp = np if isinstance(rank, int | np.integer) else jnp
    j = xp.arange(block)
    if layout == "contiguous":
        return rank * block + j
    if layout == "striped":
        return j * num_shards + rank
    half = block // 2
    second = 2 * num_shards - 1 - rank
    return xp.where(j < half, rank * half + j, second * half + j - half)


def permutation(length: int, num_shards: int, layout: str) -> np.ndarray:
    """perm [length]: position p of the layout-ordered sequence holds token perm[p] (device r holds block r)."""
    check_layout(length, num_shards, layout)
    block = length // num_shards
    return np.concatenate([np.asarray(local_slots(layout, r, num_shards, block)) for r in range(num_shards)])


def to_layout(x: jax.Array, perm: np.ndarray, axis: int = 1) -> jax.Array:
    return jnp.take(x, jnp.asarray(perm), axis=axis)


def from_layout(x: jax.Array, perm: np.ndarray, axis: int = 1) -> jax.Array:
    return jnp.take(x, jnp.asarray(np.argsort(perm)), axis=axis)


def step_plan(layout: str, causal: bool, step, rank, num_shards: int):
    """The plan of ring step `step` on device `rank`; the visiting block comes from (rank - step) mod N."""
    if not causal:
        return jnp.int32(_FULL)
    if layout == "striped":
        later = _FULL
    elif layout == "contiguous":
        later = jnp.where(step <= rank, _FULL, _SKIP)
    else:
        later = jnp.where(step <= rank, _KEY_FIRST_HALF, _QUERY_SECOND_HALF)
    return jnp.where(step == 0, _DIAGONAL, later).astype(jnp.int32)


def critical_path_work(layout: str, num_shards: int, causal: bool = True) -> float:
    """Σ over ring steps of the busiest device's work, in full blocks (the per-step wall time is the maximum)."""
    fraction = {_FULL: 1.0, _DIAGONAL: 1.0, _KEY_FIRST_HALF: 0.5, _QUERY_SECOND_HALF: 0.5, _SKIP: 0.0}
    total = 0.0
    for step in range(num_shards):
        work = []
        for rank in range(num_shards):
            plan = int(step_plan(layout, causal, step, rank, num_shards))
            work.append(fraction[plan])  # striped: full blocks are computed, about half of each masked
        total += max(work)
    return total


def visible_fraction(layout: str, num_shards: int, length: int) -> float:
    """Fraction of the computed (query, key) pairs that are causally visible, over all devices and steps."""
    block = length // num_shards
    computed = visible = 0
    for step in range(num_shards):
        for rank in range(num_shards):
            source = (rank - step) % num_shards
            q_slots = np.asarray(local_slots(layout, rank, num_shards, block))
            k_slots = np.asarray(local_slots(layout, source, num_shards, block))
            plan = int(step_plan(layout, True, step, rank, num_shards))
            half = block // 2
            if plan == _SKIP:
                continue
            if plan == _KEY_FIRST_HALF:
                k_slots = k_slots[:half]
            if plan == _QUERY_SECOND_HALF:
                q_slots = q_slots[half:]
            computed += q_slots.size * k_slots.size
            visible += int((k_slots[None, :] <= q_slots[:, None]).sum())
    return visible / computed

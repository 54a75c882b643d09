"""The device mesh: named axes `data, fsdp, tensor, sequence`, sizes from the config.

Axis types are chosen here, once: all axes are `AxisType.Auto`. jax 0.10 makes `jax.make_mesh` axes Explicit by
default, which would require every einsum to carry `out_sharding`; lcjax instead annotates parameters and
block-boundary activations with logical names and lets GSPMD propagate the rest. Ring attention and Pallas kernels
use `jax.shard_map` over this same mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the 4-axis mesh from `{"data": d, "fsdp": f, "tensor": t, "sequence": s}` (no -1 left)."""
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices or jax.devices()
    )

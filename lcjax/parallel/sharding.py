"""Logical axis names -> mesh axes, by one ordered, first-match rules table.

Parameters carry logical names in their `axes` metadata and activations are constrained at block boundaries with
`constrain(x, ("batch", "length", "embed"))`; no model names a mesh axis. For each logical name, the first rule
whose mesh axes all exist and are not yet used by an earlier dimension of the same array wins; if none fits the
dimension is replicated. So `("batch", "length", "embed")` gives `P(("data", "fsdp"), "sequence", None)`: `embed`
would take `fsdp`, which batch already holds, and falls through to replication.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Ordered: earlier rules win. A logical name may appear more than once (fallbacks).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("batch", ("data",)),
    ("length", ("sequence",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("embed", ("fsdp",)),
    ("state", ("tensor",)),
    ("memory", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),
)

LOGICAL_AXES = tuple(dict.fromkeys(name for name, _ in RULES))


def logical_to_spec(axes: Sequence[str | None], mesh_axis_names: Sequence[str], rules=RULES) -> PartitionSpec:
    """Resolves logical names to a PartitionSpec for a mesh with `mesh_axis_names`, first match wins."""
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is not None and name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r}; expected one of {LOGICAL_AXES}")
        chosen = None
        for rule_name, mesh_axes in rules:
            if rule_name != name:
                continue
            if all(a in mesh_axis_names and a not in used for a in mesh_axes):
                chosen = mesh_axes
                break
        if not chosen:
            spec.append(None)
            continue
        used.update(chosen)
        spec.append(chosen[0] if len(chosen) == 1 else tuple(chosen))
    check_no_repeats(PartitionSpec(*spec))
    return PartitionSpec(*spec)


def check_no_repeats(spec: PartitionSpec) -> None:
    """Raises if a mesh axis shards two dimensions of one array (an invalid spec)."""
    seen: list[str] = []
    for entry in spec:
        seen.extend([entry] if isinstance(entry, str) else list(entry or ()))
    if len(seen) != len(set(seen)):
        raise ValueError(f"PartitionSpec {spec} uses a mesh axis twice")


def named_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh.axis_names))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh.axis_names))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def per_shard(fn, args: Sequence, in_axes: Sequence, out_axes):
    """`fn(*args)` run on each device's shard under `jax.shard_map` over the current abstract mesh, or directly
    outside one: what a Pallas kernel needs, since XLA does not partition it. in_axes: logical names per argument
    (a tuple of names, or a pytree of such tuples for a pytree argument); out_axes: the same for the output. A
    dimension whose name maps to no mesh axis is gathered whole on every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    to_spec = lambda axes: jax.tree.map(lambda a: logical_to_spec(a, mesh.axis_names), axes, is_leaf=_is_axes)
    in_specs = tuple(to_spec(axes) for axes in in_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=to_spec(out_axes), check_vma=False)(*args)

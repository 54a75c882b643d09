"""What every kernel module needs: the backend, the implementation an `impl=` argument resolves to, a log line
said once, and lowering/compiling a function for a platform this machine does not have.

`impl` values: "auto" (the Pallas kernel on TPU/GPU, the reference on CPU), "pallas" (the kernel; on CPU it
runs in interpret mode and says so once), "interpret" (the kernel in interpret mode on any backend) and
"reference" (the plain-jnp specification).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "interpret", "reference")
_said: set[str] = set()
_lowering_for: list[str] = []  # the platform `lower_for`/`compile_for_tpu` are tracing for, innermost last


def backend() -> str:
    """ "tpu", "gpu" or "cpu": the platform being traced for (the default device's, unless lowering for another)."""
    platform = _lowering_for[-1] if _lowering_for else jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


@contextlib.contextmanager
def tracing_for(platform: str) -> Iterator[None]:
    """Within: `backend()` answers `platform`, so code traced here for another platform picks its kernels."""
    _lowering_for.append(platform)
    try:
        yield
    finally:
        _lowering_for.pop()


def say_once(message: str) -> None:
    """Logs `message` (a fallback, a mode switch) the first time it is seen in this process."""
    if message not in _said:
        _said.add(message)
        logging.info(message)


def resolve_impl(impl: str, kernel_name: str) -> str:
    """Maps an `impl=` argument to "pallas", "interpret" or "reference" for the current backend."""
    if impl not in IMPLS:
        raise ValueError(f"{kernel_name}: impl={impl!r}; expected one of {IMPLS}")
    platform = backend()
    if impl == "auto":
        return "pallas" if platform in ("tpu", "gpu") else "reference"
    if impl == "pallas" and platform not in ("tpu", "gpu"):
        say_once(f"{kernel_name}: no Pallas backend on {platform}; running the kernel in interpret mode")
        return "interpret"
    return impl


def lower_for(fn: Callable, args: Sequence, platforms: Sequence[str]):
    """Lowers `jax.jit(fn)(*args)` for `platforms` (e.g. ("tpu",), ("cuda",)) without such a device here.

    `args` may be arrays or `jax.ShapeDtypeStruct`s. While tracing, `backend()` answers the first platform, so
    `impl="auto"|"pallas"` pick that platform's kernels. Lowering runs the Pallas backend's own lowering (block-shape
    checks included) but not its compiler; `compile_for_tpu` runs Mosaic too.
    """
    with tracing_for(platforms[0]):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=tuple(platforms))


def compile_for_tpu(fn: Callable, args: Sequence, topology: str = "v5e:2x2"):
    """Compiles `fn` for one chip of a TPU `topology` with the real compiler (needs the `libtpu` package).

    `fn` runs per device under `jax.shard_map` over a mesh of the topology's abstract devices, with each argument
    (a `jax.ShapeDtypeStruct` with the per-chip shape) replicated; returns the compiled executable.
    """
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = jax.sharding.Mesh(devices, ("chips",))
    replicated = NamedSharding(mesh, PartitionSpec())
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False)
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in args]
    with tracing_for("tpu"):
        lowered = jax.jit(mapped).lower(*abstract)
    return lowered.compile()


def pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """`x` padded with `value` at the end of `axis` to a multiple of `multiple`."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)

"""The diagonal linear scan h_t = a_t ⊙ h_(t−1) + b_t of the RG-LRU and the Gated SSM (`lcjax.layers.rglru`), as a
sequential scan held in VMEM: the TPU form recurrentgemma uses, since a scan of elementwise products is bound by
memory traffic, and a sequential pass reads a and b once where an associative scan reads them log₂ T times.

Layout: a, b `[batch, time, width]`, the initial state h0 `[batch, width]`; computed in float32. The grid is
(batch, width blocks, time blocks) with time innermost and sequential ("arbitrary"): each step loads a `[block_t,
block_w]` tile of a and b, walks it 8 rows (one float32 sublane tile) at a time with the state in registers, and
writes h; the state between time blocks stays in a revisited output block. `reverse=True` walks the time blocks and
the rows inside them right to left (h_t = a_t h_(t+1) + b_t, Birdie's reverse half).

Backward (a custom VJP) is the same kernel run the other way: with g_t the cotangent of h_t, the cotangent of the
state after step t is δ_t = g_t + a_(t+1) δ_(t+1), a scan with the coefficients shifted by one step; then
db_t = δ_t, da_t = δ_t h_(t−1) (h_(−1) = h0) and dh0 = a_0 δ_0 (mirrored for reverse). So forward and backward are
two calls of one kernel, and the Mosaic compile test covers both.

Padding: time is padded at its end with a = 1, b = 0 (a reverse scan carries h0 through them unchanged; a forward
scan's padded outputs are dropped), width and batch need none beyond the tile: width is padded with zeros to the
block. `rglru_scan` is the public entry point; `impl` as in `kernels_pallas.common` ("auto" picks the kernel on TPU;
on GPU and CPU the reference, `reference`, which is a `lax.scan`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common

ROWS = 8  # rows per register tile: one float32 sublane tile


def reference(a, b, h0, *, reverse: bool = False):
    """The specification: (h `[batch, time, width]`, the last state: h at the final step, the first with reverse),
    by a `lax.scan` in float32 (float64 stays float64)."""
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)

    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    over_time = lambda x: jnp.moveaxis(x.astype(dtype), 1, 0)
    last, h = jax.lax.scan(step, h0.astype(dtype), (over_time(a), over_time(b)), reverse=reverse)
    return jnp.moveaxis(h, 0, 1), last


def rglru_scan(a, b, h0=None, *, reverse: bool = False, impl: str = "auto", block_t: int = 256, block_w: int = 512):
    """(h `[batch, time, width]` float32, last state `[batch, width]`) of the diagonal scan by `impl` ("auto" |
    "pallas" | "interpret" | "reference"). block_t, block_w: the tile per grid step (time rounded to a multiple of 8,
    width to a multiple of 128, each capped at the padded size)."""
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"rglru_scan: a {a.shape}, b {b.shape}; expected both [batch, time, width]")
    batch, time, width = a.shape
    if h0 is None:
        h0 = jnp.zeros((batch, width), jnp.float32)
    if h0.shape != (batch, width):
        raise ValueError(f"rglru_scan: h0 {h0.shape}; expected {(batch, width)}")
    if block_t < 1 or block_w < 1:
        raise ValueError(f"rglru_scan: block_t={block_t}, block_w={block_w}; expected >= 1")
    run = common.resolve_impl(impl, "rglru_scan")
    if run == "pallas" and common.backend() == "gpu":
        # a sequential time axis needs a grid that revisits its state block in order, which Triton does not give
        common.say_once("rglru_scan: the sequential kernel is TPU-only; using the reference scan (XLA) on GPU")
        run = "reference"
    if run == "reference":
        return reference(a, b, h0, reverse=reverse)
    tile_t = min(_round_up(block_t, ROWS), _round_up(time, ROWS))
    tile_w = min(_round_up(block_w, 128), _round_up(width, 128))
    call = _Call(reverse=reverse, block_t=tile_t, block_w=tile_w, interpret=run == "interpret")
    f32 = lambda x: x.astype(jnp.float32)
    a_p = common.pad_to(common.pad_to(f32(a), 1, tile_t, 1.0), 2, tile_w)
    b_p = common.pad_to(common.pad_to(f32(b), 1, tile_t), 2, tile_w)
    h0_p = common.pad_to(f32(h0), 1, tile_w)
    h = _scan(call, a_p, b_p, h0_p)[:, :time, :width]
    return h, (h[:, 0] if reverse else h[:, -1])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _Call:
    reverse: bool
    block_t: int
    block_w: int
    interpret: bool


def _kernel(a_ref, b_ref, h0_ref, h_ref, state_ref, *, call):
    @pl.when(pl.program_id(2) == 0)
    def _():
        state_ref[...] = h0_ref[...]

    groups = call.block_t // ROWS

    def group(g, h):
        start = pl.multiple_of(((groups - 1 - g) if call.reverse else g) * ROWS, ROWS)
        a = a_ref[0, pl.ds(start, ROWS), :]
        b = b_ref[0, pl.ds(start, ROWS), :]
        rows = [None] * ROWS
        for i in reversed(range(ROWS)) if call.reverse else range(ROWS):
            h = a[i : i + 1] * h + b[i : i + 1]
            rows[i] = h
        h_ref[0, pl.ds(start, ROWS), :] = jnp.concatenate(rows, axis=0)
        return h

    state_ref[0] = jax.lax.fori_loop(0, groups, group, state_ref[0])


def _call(call, a, b, h0):
    """h `[batch, time, width]` (padded shapes) by the kernel."""
    batch, time, width = a.shape
    count_t, count_w = time // call.block_t, width // call.block_w
    t_index = (lambda j: count_t - 1 - j) if call.reverse else (lambda j: j)
    tile = pl.BlockSpec((1, call.block_t, call.block_w), lambda n, w, j: (n, t_index(j), w))
    state = pl.BlockSpec((1, 1, call.block_w), lambda n, w, j: (n, 0, w))
    params = {}
    if not call.interpret:
        from jax.experimental.pallas import tpu as pltpu

        params["compiler_params"] = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    h, _ = pl.pallas_call(
        functools.partial(_kernel, call=call),
        grid=(batch, count_w, count_t),
        in_specs=[tile, tile, state],
        out_specs=[tile, state],
        out_shape=[jax.ShapeDtypeStruct(a.shape, jnp.float32), jax.ShapeDtypeStruct((batch, 1, width), jnp.float32)],
        interpret=call.interpret,
        name="rglru_scan",
        **params,
    )(a, b, h0[:, None, :])
    return h


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(call, a, b, h0):
    return _call(call, a, b, h0)


def _scan_fwd(call, a, b, h0):
    h = _call(call, a, b, h0)
    return h, (a, h, h0)


def _scan_bwd(call, residuals, dh):
    a, h, h0 = residuals
    zero = jnp.zeros_like(a[:, :1])
    if call.reverse:  # h_t = a_t h_(t+1) + b_t: δ_t = g_t + a_(t−1) δ_(t−1), a forward scan
        shifted = jnp.concatenate([zero, a[:, :-1]], axis=1)
        earlier = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)  # the state each step reads
    else:  # δ_t = g_t + a_(t+1) δ_(t+1), a reverse scan
        shifted = jnp.concatenate([a[:, 1:], zero], axis=1)
        earlier = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    delta = _call(dataclasses.replace(call, reverse=not call.reverse), shifted, dh, jnp.zeros_like(h0))
    first = -1 if call.reverse else 0  # the step that reads h0
    return delta * earlier, delta, a[:, first] * delta[:, first]


_scan.defvjp(_scan_fwd, _scan_bwd)

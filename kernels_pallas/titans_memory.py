"""Titans memory: the chunk-parallel (dual-form) scan of the neural long-term memory as one fused kernel.

Layout (chunk-major, as `lcjax.layers.neural_memory.memory_scan_from` builds it), per memory head:
  q, k `[chunks, batch, heads, c, d_k]`, v `[chunks, batch, heads, c, d_v]`;
  gamma `[chunks, batch, heads, c, c]` and cols `[chunks, batch, heads, c, 8]`, the chunk's scalar coefficients
    (`COLUMNS`: a_t, b_t, Γ_(c,t), σ_t, then e, a_c, b_c repeated on every row, then a zero column);
  weights M and momentum S: per memory layer `[batch, heads, d_in, d_out]`, float32.
Per chunk, with (M, S) the state at its start and every gradient taken there (W_ref = M: a call starts on a chunk
boundary), in the row-vector convention of the memory MLP (h^0 = k, z^l = h^(l−1) M^l, h^l = silu(z^l) below the
last layer):
  δ^L = 2 (z^L − v),  δ^l = (δ^(l+1) M^(l+1)ᵀ) ⊙ silu'(z^l)          per-token gradients u^l_t = h^(l−1)_tᵀ δ^l_t
  retrieval from g^0 = q:  z = a ⊙ (g M^l) + b ⊙ (g S^l) + (Γ ⊙ g h^(l−1)ᵀ) δ^l,  g^l = silu(z) (z on the last)
  M'^l = a_c M^l + b_c S^l + (Γ_c ⊙ h^(l−1))ᵀ δ^l          S'^l = e S^l + (σ ⊙ h^(l−1))ᵀ δ^l
(`max_grad_norm` > 0 scales each token's δ^l by min(1, G / ‖u_t‖), ‖u_t‖² = Σ_l ‖h^(l−1)_t‖² ‖δ^l_t‖²: the token's
whole gradient clipped to norm G.)
`chunk_step` is that chunk (the specification, any leading axes); `reference` scans it over the chunks in XLA. The
kernel runs `chunk_step` for one (batch, head) per program with the state resident across its chunks (TPU: a grid
axis of chunk blocks walked in order, the state in the revisited output blocks; GPU: one block of all chunks).
Its backward walks the chunks in reverse from the saved chunk-start states, each chunk's VJP being `jax.vjp` of
`chunk_step` traced inside the kernel, so forward and backward cannot drift apart.

`memory_chunks` is the public entry point (a custom VJP; `impl` as in `kernels_pallas.common`). It also returns
the chunk-start states (the backward's residuals, and what a streaming caller needs for an open chunk).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common

COLUMNS = ("a", "b", "gamma_last", "sigma", "e", "a_last", "b_last", "zero")
Weights = list[jax.Array]


def pack_columns(gamma, a, b, sigma, e) -> jax.Array:
    """cols `[..., c, 8]` from a, b, σ `[..., c]`, e `[...]` and the last row of gamma `[..., c, c]`."""
    every_row = lambda x: jnp.broadcast_to(x[..., None], a.shape)
    columns = (a, b, gamma[..., -1, :], sigma, every_row(e), every_row(a[..., -1]), every_row(b[..., -1]))
    return jnp.stack([*columns, jnp.zeros_like(a)], axis=-1)


def _column(cols, index):
    """Column `index` as `[..., c, 1]`, by a one-hot reduction, not a slice: Triton has no slice, and the transpose
    of a reduction is a broadcast, not a pad (Mosaic lowers it inside the backward kernel)."""
    onehot = (jnp.arange(cols.shape[-1]) == index).astype(cols.dtype)
    return jnp.sum(cols * onehot, axis=-1, keepdims=True)


def _last_row(x):
    """x `[..., c, n]` -> its last row `[..., 1, n]`, by the same one-hot reduction."""
    onehot = (jnp.arange(x.shape[-2]) == x.shape[-2] - 1).astype(x.dtype)[:, None]
    return jnp.sum(x * onehot, axis=-2, keepdims=True)


def _silu_grad(z):
    sig = jax.nn.sigmoid(z)
    return sig * (1 + z * (1 - sig))


def _rows_by_cols(x, y):  # x yᵀ over the last axes: [..., i, j], [..., k, j] -> [..., i, k]
    return jnp.einsum("...ij,...kj->...ik", x, y)


def _transposed_by(x, y):  # xᵀ y: [..., j, i], [..., j, k] -> [..., i, k]
    return jnp.einsum("...ji,...jk->...ik", x, y)


def _matmul(x, y):
    return jnp.einsum("...ij,...jk->...ik", x, y)


def _token_gradients(ref, k, v, max_grad_norm=0.0):
    """Per-token gradient factors at the memory `ref`: the layer inputs h^(l−1) and errors δ^l (u^l = h^(l−1)ᵀ δ^l).
    max_grad_norm > 0 clips each token's whole gradient (every layer's u^l) to that Frobenius norm by scaling its
    errors: ‖u^l‖ = ‖h^(l−1)‖ ‖δ^l‖, each u^l being an outer product."""
    inputs, pre, h = [], [], k
    for layer, w in enumerate(ref):
        inputs.append(h)
        pre.append(_matmul(h, w))
        if layer < len(ref) - 1:
            h = jax.nn.silu(pre[-1])
    errors = [2 * (pre[-1] - v)]
    for layer in range(len(ref) - 1, 0, -1):
        errors.insert(0, _rows_by_cols(errors[0], ref[layer]) * _silu_grad(pre[layer - 1]))
    if max_grad_norm:
        squares = [jnp.sum(x * x, axis=-1, keepdims=True) for x in (*inputs, *errors)]
        norm = jnp.sqrt(sum(h * d for h, d in zip(squares[: len(ref)], squares[len(ref) :], strict=True)) + 1e-12)
        scale = max_grad_norm / jnp.maximum(norm, max_grad_norm)  # [..., c, 1]; 1 below the bound (finite gradient)
        errors = [d * scale for d in errors]
    return inputs, errors


def chunk_step(weights, momentum, q, k, v, gamma, cols, ref=None, init=None, reset_cols=None, max_grad_norm=0.0):
    """One chunk (module docstring): returns (y `[..., c, d_v]`, new weights, new momentum). The gradients are taken
    at `ref` (default: the weights; a streaming caller resuming inside a chunk passes that chunk's start memory);
    max_grad_norm > 0 clips each token's gradient to that norm (`_token_gradients`).

    Document resets (`reset_cols` `[..., c, 2]`, with the restart memory `init` per layer): column 0 is c_t, the
    coefficient of `init` in M_t, column 1 is 1 from the chunk's first document start on (those tokens take their
    gradients at `init`); a, b, Γ, σ, e already vanish across a reset (`lcjax.layers.memory_scan._chunk_coefficients`).
    So M_t = a_t M + b_t S + c_t init + Σ Γ_(t,i) u_i, and retrieval gains c_t g init^l per layer."""
    a, b, last, sigma = (_column(cols, i) for i in range(4))
    e, a_last, b_last = (jnp.mean(_column(cols, i), axis=-2, keepdims=True) for i in (4, 5, 6))  # [..., 1, 1]
    ref = weights if ref is None else ref
    inputs, errors = _token_gradients(ref, k, v, max_grad_norm)
    if reset_cols is not None:
        restart, after = _column(reset_cols, 0), _column(reset_cols, 1) > 0  # [..., c, 1]
        restart_last = _last_row(restart)
        inputs_0, errors_0 = _token_gradients(init, k, v, max_grad_norm)
        inputs = [jnp.where(after, x0, x) for x0, x in zip(inputs_0, inputs, strict=True)]
        errors = [jnp.where(after, x0, x) for x0, x in zip(errors_0, errors, strict=True)]
    g = q
    for layer, (w, s, h, delta) in enumerate(zip(weights, momentum, inputs, errors, strict=True)):
        z = a * _matmul(g, w) + b * _matmul(g, s) + _matmul(gamma * _rows_by_cols(g, h), delta)
        if reset_cols is not None:
            z = z + restart * _matmul(g, init[layer])
        g = jax.nn.silu(z) if layer < len(weights) - 1 else z
    new_weights = [
        a_last * w + b_last * s + _transposed_by(last * h, delta)
        for w, s, h, delta in zip(weights, momentum, inputs, errors, strict=True)
    ]
    if reset_cols is not None:
        new_weights = [w + restart_last * w0 for w, w0 in zip(new_weights, init, strict=True)]
    new_momentum = [
        e * s + _transposed_by(sigma * h, delta) for s, h, delta in zip(momentum, inputs, errors, strict=True)
    ]
    return g, new_weights, new_momentum


def reference(weights, momentum, q, k, v, gamma, cols, init=None, reset_cols=None, max_grad_norm=0.0):
    """`chunk_step` under `lax.scan` (XLA). Returns (y `[chunks, ..., c, d_v]`, (final weights, final momentum),
    (chunk-start weights, chunk-start momentum) each `[chunks, ..., d_in, d_out]` per layer)."""

    def body(state, xs):
        *xs, rc = xs
        y, new_weights, new_momentum = chunk_step(*state, *xs, init=init, reset_cols=rc, max_grad_norm=max_grad_norm)
        return (new_weights, new_momentum), (y, state)

    final, (y, starts) = jax.lax.scan(body, (list(weights), list(momentum)), (q, k, v, gamma, cols, reset_cols))
    return y, final, starts


def memory_chunks(
    weights,
    momentum,
    q,
    k,
    v,
    gamma,
    cols,
    *,
    impl: str = "auto",
    chunks_per_block: int = 0,
    init=None,
    reset_cols=None,
    max_grad_norm: float = 0.0,
):
    """The chunked memory scan (module docstring for the layout) by `impl`: "auto" | "pallas" | "interpret" |
    "reference" (`kernels_pallas.common`). chunks_per_block: chunks per TPU grid step (0: all of them, up to 8 on
    TPU); the GPU kernel takes every chunk in one block. Document resets: `reset_cols` `[chunks, ..., c, 2]` and
    the restart memory `init` (per layer, shaped as the weights), as in `chunk_step`; the kernel then also returns
    the gradient of `init`. max_grad_norm > 0 clips every token's gradient to that norm (`chunk_step`). Returns what
    `reference` returns."""
    _check_inputs(weights, momentum, q, k, v, gamma, cols, init, reset_cols)
    mode = common.resolve_impl(impl, "titans_memory")
    target = "gpu" if common.backend() == "gpu" else "tpu"
    if mode != "reference":
        reason = _unsupported(weights, q, v, target)
        if reason:
            common.say_once(f"titans_memory: {reason}; using the reference (XLA) scan")
            mode = "reference"
    if mode == "reference":
        return reference(weights, momentum, q, k, v, gamma, cols, init, reset_cols, max_grad_norm)
    resets = reset_cols is not None
    extras = (list(init), reset_cols) if resets else ([], None)
    chunks = q.shape[0]
    if target == "gpu":  # one block of every chunk; Triton needs a power-of-two count: pad with no-op chunks
        padded = 1 << (chunks - 1).bit_length()
        if padded != chunks:
            q, k, v, gamma, cols, reset_cols = _pad_chunks((q, k, v, gamma, cols, reset_cols), padded - chunks)
            y, final, starts = _kernel_scan(
                _Call(len(weights), padded, mode == "interpret", resets=resets, max_grad_norm=float(max_grad_norm)),
                list(weights),
                list(momentum),
                q,
                k,
                v,
                gamma,
                cols,
                extras[0],
                reset_cols,
            )
            return y[:chunks], final, jax.tree.map(lambda x: x[:chunks], starts)
        block = chunks
    else:
        block = chunks_per_block or min(chunks, 8)
        while chunks % block:
            block -= 1
    call = _Call(len(weights), block, mode == "interpret", resets=resets, max_grad_norm=float(max_grad_norm))
    return _kernel_scan(call, list(weights), list(momentum), q, k, v, gamma, cols, *extras)


def _pad_chunks(inputs, extra):
    """Appends `extra` chunks that leave the state as it is: M' = 1·M + 0·S, S' = 1·S, no gradient terms (Γ = σ = 0),
    no reset; their outputs are dropped."""
    q, k, v, gamma, cols, reset_cols = inputs
    pad = lambda x: None if x is None else jnp.concatenate([x, jnp.zeros((extra, *x.shape[1:]), x.dtype)], axis=0)
    keep = jnp.zeros(len(COLUMNS), cols.dtype).at[COLUMNS.index("e")].set(1).at[COLUMNS.index("a_last")].set(1)
    no_op = jnp.broadcast_to(keep, (extra, *cols.shape[1:]))
    return (*(pad(x) for x in (q, k, v, gamma)), jnp.concatenate([cols, no_op], axis=0), pad(reset_cols))


def _check_inputs(weights, momentum, q, k, v, gamma, cols, init=None, reset_cols=None):
    if not weights or len(weights) != len(momentum):
        raise ValueError(f"titans_memory: {len(weights)} weight and {len(momentum)} momentum layers; need >= 1 each")
    chunks, *lead, size, key_dim = q.shape
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"titans_memory: q {q.shape}, k {k.shape}, v {v.shape}: expected [chunks, ..., c, dim]")
    if gamma.shape != (chunks, *lead, size, size) or cols.shape != (chunks, *lead, size, len(COLUMNS)):
        raise ValueError(
            f"titans_memory: gamma {gamma.shape} and cols {cols.shape}; expected {(chunks, *lead, size, size)} and"
            f" {(chunks, *lead, size, len(COLUMNS))}"
        )
    width = key_dim
    for layer, (w, s) in enumerate(zip(weights, momentum, strict=True)):
        if w.shape != s.shape or tuple(w.shape[:-2]) != tuple(lead) or w.shape[-2] != width:
            raise ValueError(
                f"titans_memory: layer {layer} weights {w.shape}, momentum {s.shape}; expected"
                f" [{', '.join(map(str, lead))}, {width}, d_out]"
            )
        width = w.shape[-1]
    if width != v.shape[-1]:
        raise ValueError(f"titans_memory: the memory gives width {width} but v has {v.shape[-1]}")
    if (init is None) != (reset_cols is None):
        raise ValueError("titans_memory: document resets need both init and reset_cols")
    if reset_cols is not None:
        if reset_cols.shape != (chunks, *lead, size, 2):
            raise ValueError(f"titans_memory: reset_cols {reset_cols.shape}; expected {(chunks, *lead, size, 2)}")
        if [w.shape for w in init] != [w.shape for w in weights]:
            raise ValueError(f"titans_memory: init {[w.shape for w in init]}; expected the weights' shapes")


def _unsupported(weights, q, v, target) -> str:
    if q.dtype != jnp.float32 or any(w.dtype != jnp.float32 for w in weights):
        return f"the kernel runs the memory in float32, got q {q.dtype}"
    if target == "gpu":  # Triton blocks: every dimension a power of two
        dims = [q.shape[-2], q.shape[-1], v.shape[-1]] + [d for w in weights for d in w.shape[-2:]]
        if any(d & (d - 1) for d in dims):  # (the chunk count is padded)
            return f"the GPU kernel needs power-of-two chunk sizes and widths, got {sorted(set(dims))}"
    return ""


@dataclasses.dataclass(frozen=True)
class _Call:
    depth: int  # memory layers
    block: int  # chunks per grid step
    interpret: bool
    resets: bool = False  # document resets: reset_cols per chunk and the restart memory init per layer
    max_grad_norm: float = 0.0  # > 0: every token's gradient clipped to this norm


def _to_programs(x):
    """[chunks, *lead, ...] -> [programs, chunks, ...] with programs = prod(lead)."""
    chunks = x.shape[0]
    lead = x.shape[1:-2]
    x = jnp.moveaxis(x, 0, len(lead))
    return x.reshape(-1, chunks, *x.shape[len(lead) + 1 :])


def _from_programs(x, lead):
    """[programs, chunks, ...] -> [chunks, *lead, ...]."""
    x = x.reshape(*lead, *x.shape[1:])
    return jnp.moveaxis(x, len(lead), 0)


def _grid_specs(call, chunks, shapes, states, reverse=False):
    count = chunks // call.block

    def spec(shape, is_state):
        if is_state:
            return pl.BlockSpec((1, *shape[1:]), lambda p, j: (p,) + (0,) * (len(shape) - 1))

        def index(p, j):
            return (p, (count - 1 - j) if reverse else j) + (0,) * (len(shape) - 2)

        return pl.BlockSpec((1, call.block, *shape[2:]), index)

    return [spec(shape, is_state) for shape, is_state in zip(shapes, states, strict=True)], count


def _params(call):
    if call.interpret:
        return {}
    if common.backend() == "gpu":  # the Triton lowering (Mosaic GPU would stage whole blocks in shared memory)
        from jax.experimental.pallas import triton as pltriton

        return {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=1)}
    from jax.experimental.pallas import tpu as pltpu

    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))}


def _take(refs, *sizes):
    """Splits `refs` into consecutive groups of the given sizes (a size of 0 gives an empty group)."""
    groups, at = [], 0
    for size in sizes:
        groups.append(list(refs[at : at + size]))
        at += size
    assert at == len(refs), (at, len(refs))
    return groups


def _forward_kernel(*refs, call):
    depth, block, r = call.depth, call.block, int(call.resets)
    chunk_ins, rc, w0, s0, init, (y_ref,), w_out, s_out, w_starts, s_starts = _take(
        refs, 5, r, depth, depth, r * depth, 1, depth, depth, depth, depth
    )
    q_ref, k_ref, v_ref, gamma_ref, cols_ref = chunk_ins

    @pl.when(pl.program_id(1) == 0)
    def _():
        for dst, src in zip((*w_out, *s_out), (*w0, *s0), strict=True):
            dst[...] = src[...]

    restart = [ref[0] for ref in init] if call.resets else None

    def body(i, state):
        weights, momentum = state
        for ref, value in zip((*w_starts, *s_starts), (*weights, *momentum), strict=True):
            ref[0, i] = value
        y, weights, momentum = chunk_step(
            weights,
            momentum,
            q_ref[0, i],
            k_ref[0, i],
            v_ref[0, i],
            gamma_ref[0, i],
            cols_ref[0, i],
            init=restart,
            reset_cols=rc[0][0, i] if call.resets else None,
            max_grad_norm=call.max_grad_norm,
        )
        y_ref[0, i] = y.astype(y_ref.dtype)
        return list(weights), list(momentum)

    state = ([ref[0] for ref in w_out], [ref[0] for ref in s_out])
    weights, momentum = jax.lax.fori_loop(0, block, body, state)
    for ref, value in zip((*w_out, *s_out), (*weights, *momentum), strict=True):
        ref[0] = value


def _backward_kernel(*refs, call):
    depth, block, r = call.depth, call.block, int(call.resets)
    groups = _take(refs, 5, r, depth, depth, 1, r * depth, depth, depth, depth, depth, 5, r, depth, depth, r * depth)
    chunk_ins, rc, w_starts, s_starts, (dy_ref,), init, dw_final, ds_final, dw_starts, ds_starts = groups[:10]
    chunk_outs, drc, dw_out, ds_out, dinit = groups[10:]

    @pl.when(pl.program_id(1) == 0)
    def _():
        for dst, src in zip((*dw_out, *ds_out), (*dw_final, *ds_final), strict=True):
            dst[...] = src[...]
        for ref in dinit:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    restart, clip = [ref[0] for ref in init], call.max_grad_norm

    def step(weights, momentum, q, k, v, gamma, cols, init, reset_cols):
        return chunk_step(
            weights, momentum, q, k, v, gamma, cols, init=init or None, reset_cols=reset_cols, max_grad_norm=clip
        )

    def body(t, state):
        dweights, dmomentum, dinit_sum = state
        i = block - 1 - t
        weights = [ref[0, i] for ref in w_starts]
        momentum = [ref[0, i] for ref in s_starts]
        reset_cols = rc[0][0, i] if call.resets else None
        primals = (weights, momentum, *(ref[0, i] for ref in chunk_ins), restart, reset_cols)
        _, vjp = jax.vjp(step, *primals)
        dw, ds, *dchunk, dinit_i, drc_i = vjp((dy_ref[0, i].astype(jnp.float32), dweights, dmomentum))
        for ref, value in zip((*chunk_outs, *drc), (*dchunk, *([drc_i] if call.resets else [])), strict=True):
            ref[0, i] = value.astype(ref.dtype)
        dweights = [a + ref[0, i] for a, ref in zip(dw, dw_starts, strict=True)]
        dmomentum = [a + ref[0, i] for a, ref in zip(ds, ds_starts, strict=True)]
        return dweights, dmomentum, [a + b for a, b in zip(dinit_sum, dinit_i, strict=True)]

    state = ([ref[0] for ref in dw_out], [ref[0] for ref in ds_out], [ref[0] for ref in dinit])
    dweights, dmomentum, dinit_sum = jax.lax.fori_loop(0, block, body, state)
    for ref, value in zip((*dw_out, *ds_out, *dinit), (*dweights, *dmomentum, *dinit_sum), strict=True):
        ref[0] = value


def _forward(call, weights, momentum, q, k, v, gamma, cols, init, reset_cols):
    lead = q.shape[1:-2]
    chunks = q.shape[0]
    ins = [_to_programs(x) for x in (q, k, v, gamma, cols, *([reset_cols] if call.resets else []))]
    states = [w.reshape(-1, *w.shape[-2:]) for w in (*weights, *momentum, *init)]
    programs = ins[0].shape[0]
    shapes_in = [x.shape for x in ins] + [s.shape for s in states]
    in_specs, count = _grid_specs(call, chunks, shapes_in, [False] * len(ins) + [True] * len(states))
    carried = states[: 2 * call.depth]
    y_shape = (programs, chunks, q.shape[-2], v.shape[-1])
    start_shapes = [(programs, chunks, *s.shape[1:]) for s in carried]
    out_shapes = [y_shape] + [s.shape for s in carried] + start_shapes
    out_specs, _ = _grid_specs(call, chunks, out_shapes, [False] + [True] * len(carried) + [False] * len(carried))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, call=call),
        grid=(programs, count),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
        interpret=call.interpret,
        name="titans_memory_fwd",
        **_params(call),
    )(*ins, *states)
    depth = call.depth
    y = _from_programs(outs[0], lead)
    unflat = lambda s, like: s.reshape(like.shape)
    final_w = [unflat(s, w) for s, w in zip(outs[1 : 1 + depth], weights, strict=True)]
    final_s = [unflat(s, w) for s, w in zip(outs[1 + depth : 1 + 2 * depth], momentum, strict=True)]
    starts = [_from_programs(s, lead) for s in outs[1 + 2 * depth :]]
    return y, (final_w, final_s), (starts[:depth], starts[depth:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_scan(call, weights, momentum, q, k, v, gamma, cols, init, reset_cols):
    """init: the restart memory per layer (empty without resets), reset_cols `[chunks, ..., c, 2]` or None."""
    return _forward(call, weights, momentum, q, k, v, gamma, cols, init, reset_cols)


def _kernel_scan_fwd(call, weights, momentum, q, k, v, gamma, cols, init, reset_cols):
    out = _forward(call, weights, momentum, q, k, v, gamma, cols, init, reset_cols)
    return out, (out[2], q, k, v, gamma, cols, init, reset_cols)


def _kernel_scan_bwd(call, residuals, cotangents):
    (w_starts, s_starts), q, k, v, gamma, cols, init, reset_cols = residuals
    dy, (dw_final, ds_final), (dw_starts, ds_starts) = cotangents
    lead = q.shape[1:-2]
    chunks = q.shape[0]
    zeros_like = lambda c, like: jnp.zeros(like.shape, jnp.float32) if c is None else c.astype(jnp.float32)
    dy = zeros_like(dy, jax.ShapeDtypeStruct((*q.shape[:-1], v.shape[-1]), jnp.float32))
    dw_final = [zeros_like(c, w[0]) for c, w in zip(dw_final, w_starts, strict=True)]
    ds_final = [zeros_like(c, w[0]) for c, w in zip(ds_final, s_starts, strict=True)]
    dw_starts = [zeros_like(c, w) for c, w in zip(dw_starts, w_starts, strict=True)]
    ds_starts = [zeros_like(c, w) for c, w in zip(ds_starts, s_starts, strict=True)]
    extra = [reset_cols] if call.resets else []
    chunk_ins = [_to_programs(x) for x in (q, k, v, gamma, cols, *extra, *w_starts, *s_starts, dy)]
    per_program = [x.reshape(-1, *x.shape[-2:]) for x in (*init, *dw_final, *ds_final)]
    start_cts = [_to_programs(x) for x in (*dw_starts, *ds_starts)]
    ins = chunk_ins + per_program + start_cts
    flags = [False] * len(chunk_ins) + [True] * len(per_program) + [False] * len(start_cts)
    in_specs, count = _grid_specs(call, chunks, [x.shape for x in ins], flags, reverse=True)
    data_outs = chunk_ins[: 5 + len(extra)]
    state_outs = per_program[len(init) :] + per_program[: len(init)]  # d weights, d momentum, then d init
    out_shapes = [x.shape for x in data_outs] + [x.shape for x in state_outs]
    out_specs, _ = _grid_specs(call, chunks, out_shapes, [False] * len(data_outs) + [True] * len(state_outs), True)
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, call=call),
        grid=(ins[0].shape[0], count),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
        interpret=call.interpret,
        name="titans_memory_bwd",
        **_params(call),
    )(*ins)
    likes = (q, k, v, gamma, cols, *extra)
    dq, dk, dv, dgamma, dcols, *drc = (
        _from_programs(x, lead).astype(like.dtype) for x, like in zip(outs[: len(likes)], likes, strict=True)
    )
    depth = call.depth
    rest = outs[len(likes) :]
    dw0 = [x.reshape(w.shape[1:]) for x, w in zip(rest[:depth], w_starts, strict=True)]
    ds0 = [x.reshape(w.shape[1:]) for x, w in zip(rest[depth : 2 * depth], s_starts, strict=True)]
    dinit = [x.reshape(w.shape) for x, w in zip(rest[2 * depth :], init, strict=True)]
    return dw0, ds0, dq, dk, dv, dgamma, dcols, dinit, drc[0] if drc else None


_kernel_scan.defvjp(_kernel_scan_fwd, _kernel_scan_bwd)

"""Chunkwise gated linear attention: one kernel family for the mLSTM (with its max-stabilizer and normalizer) and
Mamba-2's SSD (`reference/xlstm_ssm_birdie_jrt.md` §1.3 and §2.1).

Layout: per program (a batch element and head; any leading axes `...` are flattened into programs), a sequence cut
into chunks of L tokens:
  q, k `[..., chunks, L, dk]` (q already carries its scale), v `[..., chunks, L, dv]`;
  cols `[..., chunks, L, 4]` (`COLUMNS`, built by `pack_columns`): b, the inclusive in-chunk cumulative log decay
    (log σ(f̃) for the mLSTM, Δ·A for SSD); i, the log input weight (ĩ for the mLSTM, 0 for SSD, −∞ for a padding
    token); doc, the token's document counted from the initial state's (0) as a float; state_doc, the document of
    the state before the chunk (every row);
  state (C `[..., dk, dv]`, n `[..., 1, dk]`, m `[..., 1, 1]`): the state before the first chunk.
Per chunk, from its start state (C, n, m), with log D_ts = b_t − b_s + i_s for s ≤ t in t's document (−∞ elsewhere),
the end-state weights a_s = b_L − b_s + i_s (the chunk's last document only) and g = b_L (−∞ when the chunk starts a
new document, which drops the old state):
  advance:  m' = max(g + m, max_s a_s),  C' = e^(g+m−m') C + Σ_s e^(a_s−m') k_s v_sᵀ,
            n' = e^(g+m−m') n + Σ_s e^(a_s−m') k_s
  output:   m_t = max(max_s log D_ts, m^inter_t) with m^inter_t = b_t + m (−∞ if t is not in the state's document),
            num_t = Σ_s (q_t·k_s) e^(log D_ts − m_t) v_s + e^(m^inter_t − m_t) q_t C,  den_t likewise with n
            h_t = num_t / (max(|den_t|, e^(−m_t)) + eps)                                  (mode "mlstm")
  mode "ssd" keeps m = 0 and returns h_t = num_t: y_t = Σ_s (C_t·B_s) e^(b_t−b_s) x̂_s + e^(b_t) H C_t, i.e. q = C,
  k = B, v = x̂ = Δ x, and every exponent ≤ 0 (A < 0). Exponents are differences of in-chunk cumulative sums, as in
  the mLSTM kernels (not SSD's masked segment sums): within one chunk the cancellation is harmless in float32.
These two functions (`chunk_advance`, `chunk_output`) are the specification. `reference` runs them in XLA: a scan of
`chunk_advance` over the chunks, then `chunk_output` on every chunk at once. The kernel has the same two phases:
phase 1 walks the chunks of one program in order with the state resident (TPU: a grid axis of chunk blocks, the state
in revisited output blocks; GPU: one block of all chunks) and saves each chunk-start state; phase 2 computes every
chunk's outputs in parallel (grid over programs and chunks). The backward runs phase 2's VJP on every chunk in
parallel (giving dq and the cotangents of the chunk-start states) and then phase 1's VJP in reverse chunk order,
each VJP being `jax.vjp` of the specification traced inside the kernel, so forward and backward cannot drift apart.
The kernels compute in float32 whatever the input dtype; states are float32.

`chunked_linear_attention` is the public entry point (a custom VJP; `impl` as in `kernels_pallas.common`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common

COLUMNS = ("b", "i", "doc", "state_doc")
MODES = ("mlstm", "ssd")
State = tuple[jax.Array, jax.Array, jax.Array]  # C [..., dk, dv], n [..., 1, dk], m [..., 1, 1]


def pack_columns(log_decay: jax.Array, log_input: jax.Array, docs: jax.Array | None = None) -> jax.Array:
    """cols `[..., chunks, L, 4]` from the per-token log decay and log input weight `[..., chunks, L]` and the
    documents `[..., chunks, L]` (counted from the initial state's, 0; None: one document)."""
    dtype = jnp.promote_types(log_decay.dtype, jnp.float32)  # float64 stays float64 (the oracle tests)
    b = jnp.cumsum(log_decay.astype(dtype), axis=-1)
    docs = jnp.zeros(b.shape, dtype) if docs is None else docs.astype(dtype)
    before = jnp.concatenate([jnp.zeros_like(docs[..., :1, -1:]), docs[..., :-1, -1:]], axis=-2)
    columns = (b, log_input.astype(dtype), docs, jnp.broadcast_to(before, b.shape))
    return jnp.stack(columns, axis=-1)


def initial_state(lead: tuple[int, ...], dk: int, dv: int) -> State:
    return (
        jnp.zeros((*lead, dk, dv), jnp.float32),
        jnp.zeros((*lead, 1, dk), jnp.float32),
        jnp.zeros((*lead, 1, 1), jnp.float32),
    )


# the specification (any leading axes; also traced inside the kernels)


def _column(cols, index):
    """Column `index` as `[..., L, 1]`, by a masked reduction (Mosaic lowers it and its transpose; a product with a
    one-hot row would turn the −∞ of a padding token's i into NaN)."""
    onehot = jax.lax.broadcasted_iota(jnp.int32, (1, len(COLUMNS)), 1) == index
    return jnp.sum(jnp.where(onehot, cols, 0.0), axis=-1, keepdims=True)


def _iotas(size):
    return jax.lax.broadcasted_iota(jnp.int32, (size, size), 0), jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)


def _row(col):
    """`[..., L, 1]` -> `[..., 1, L]` (a masked reduction, not a transpose)."""
    rows, cols = _iotas(col.shape[-2])
    return jnp.sum(jnp.where(rows == cols, col, 0.0), axis=-2, keepdims=True)


def _last(col):
    """The last row of `[..., L, 1]` as `[..., 1, 1]`."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (col.shape[-2], 1), 0)
    return jnp.sum(jnp.where(rows == col.shape[-2] - 1, col, 0.0), axis=-2, keepdims=True)


def chunk_advance(state: State, k, v, cols, *, mode: str) -> State:
    """The state after one chunk from the state before it (module docstring)."""
    c0, n0, m0 = state
    b, i, doc, state_doc = (_column(cols, j) for j in range(len(COLUMNS)))
    g, last = _last(b), _last(doc)
    a = jnp.where(doc == last, g - b + i, -jnp.inf)  # [..., L, 1]
    g = jnp.where(_last(state_doc) == last, g, -jnp.inf)
    m = jnp.maximum(g + m0, jnp.max(a, axis=-2, keepdims=True)) if mode == "mlstm" else m0
    w = jnp.exp(a - m)
    decay = jnp.exp(g + m0 - m)
    c = decay * c0 + jnp.einsum("...ji,...jk->...ik", k, w * v)
    n = decay * n0 + jnp.sum(w * k, axis=-2, keepdims=True)
    return c, n, m


def chunk_output(state: State, q, k, v, cols, *, mode: str, eps: float):
    """h `[..., L, dv]` of one chunk from its start state (module docstring)."""
    c0, n0, m0 = state
    b, i, doc, state_doc = (_column(cols, j) for j in range(len(COLUMNS)))
    rows, columns = _iotas(q.shape[-2])
    visible = (rows >= columns) & (doc == _row(doc))
    log_d = jnp.where(visible, b - _row(b) + _row(i), -jnp.inf)  # [..., L, L]
    inter = jnp.where(doc == _last(state_doc), b + m0, -jnp.inf)  # [..., L, 1]
    m = jnp.maximum(jnp.max(log_d, axis=-1, keepdims=True), inter) if mode == "mlstm" else jnp.zeros_like(inter)
    scores = jnp.einsum("...td,...sd->...ts", q, k) * jnp.exp(log_d - m)
    decay = jnp.exp(inter - m)
    num = jnp.einsum("...ts,...se->...te", scores, v) + decay * jnp.einsum("...td,...de->...te", q, c0)
    if mode == "ssd":
        return num
    den = jnp.sum(scores, axis=-1, keepdims=True) + decay * jnp.sum(q * n0, axis=-1, keepdims=True)
    return num / (jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps)


def reference(q, k, v, cols, state: State, *, mode: str, eps: float = 0.0):
    """The specification in XLA: returns (h `[..., chunks, L, dv]`, final state, chunk-start states, each
    `[..., chunks, ·, ·]`). Computes in float32 (float64 for float64 inputs); h has q's dtype."""
    dtype = jnp.promote_types(jnp.result_type(q, k, v, cols), jnp.float32)
    f32 = lambda x: x.astype(dtype)
    q, k, v, cols = (f32(x) for x in (q, k, v, cols))
    state = tuple(f32(s) for s in state)
    chunk_axis = q.ndim - 3
    over_chunks = lambda x: jnp.moveaxis(x, chunk_axis, 0)

    def body(state, xs):
        return chunk_advance(state, *xs, mode=mode), state

    final, starts = jax.lax.scan(body, state, tuple(over_chunks(x) for x in (k, v, cols)))
    starts = tuple(jnp.moveaxis(s, 0, chunk_axis) for s in starts)
    h = chunk_output(starts, q, k, v, cols, mode=mode, eps=eps)  # every chunk at once
    return h, final, starts


# the public entry point


def chunked_linear_attention(
    q, k, v, cols, state: State | None = None, *, mode: str, eps: float = 0.0, impl: str = "auto", chunks_per_block=0
):
    """(h `[..., chunks, L, dv]` in q's dtype, final state) of the chunkwise recurrence (module docstring) by `impl`:
    "auto" | "pallas" | "interpret" | "reference" (`kernels_pallas.common`). state: (C, n, m) before the first chunk
    (zeros when None). chunks_per_block: chunks per TPU grid step of phase 1 (0: up to 8); the GPU kernel walks every
    chunk of a program in one block. Unsupported shapes fall back to the reference and say so once."""
    _check_inputs(q, k, v, cols, state, mode)
    lead, dk, dv = q.shape[:-3], q.shape[-1], v.shape[-1]
    run = common.resolve_impl(impl, "chunked_linear_attention")
    target = "gpu" if common.backend() == "gpu" else "tpu"
    if run != "reference":
        reason = _unsupported(q, v, target)
        if reason:
            common.say_once(f"chunked_linear_attention: {reason}; using the reference (XLA)")
            run = "reference"
    if state is None:
        state = initial_state(lead, dk, dv)
    if run == "reference":
        h, final, _ = reference(q, k, v, cols, state, mode=mode, eps=eps)
        return h.astype(q.dtype), final
    state = tuple(s.astype(jnp.float32) for s in state)
    chunks = q.shape[-3]
    if target == "gpu":  # one block of every chunk; Triton blocks need a power-of-two count: pad with no-op chunks
        padded = 1 << (chunks - 1).bit_length()
        q, k, v, cols = _pad_chunks(q, k, v, cols, padded - chunks)
        block = padded
    else:
        block = chunks_per_block or min(chunks, 8)
        while chunks % block:
            block -= 1
    call = _Call(mode=mode, eps=float(eps), block=block, interpret=run == "interpret")
    programs = lambda x: x.reshape(-1, *x.shape[len(lead) :])
    h, final = _kernel(call, *(programs(x) for x in (q, k, v, cols)), tuple(programs(s) for s in state))
    h = h[:, :chunks].reshape(*lead, chunks, *h.shape[2:])
    return h, tuple(s.reshape(*lead, *s.shape[1:]) for s in final)


def _pad_chunks(q, k, v, cols, extra):
    """Appends `extra` chunks that neither write (i = −∞) nor decay (b = 0), in the last token's document."""
    if not extra:
        return q, k, v, cols
    widths = lambda x: [(0, 0)] * (x.ndim - 3) + [(0, extra), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, widths(x)) for x in (q, k, v))
    last_doc = cols[..., -1:, -1:, 2]
    pad_cols = jnp.stack(
        [
            jnp.zeros(last_doc.shape, cols.dtype),
            jnp.full(last_doc.shape, -jnp.inf, cols.dtype),
            last_doc,
            last_doc,
        ],
        axis=-1,
    )
    pad_cols = jnp.broadcast_to(pad_cols, (*cols.shape[:-3], extra, cols.shape[-2], len(COLUMNS)))
    return q, k, v, jnp.concatenate([cols, pad_cols], axis=-3)


def _check_inputs(q, k, v, cols, state, mode):
    if mode not in MODES:
        raise ValueError(f"chunked_linear_attention: mode={mode!r}; expected one of {MODES}")
    if q.ndim < 3 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"chunked_linear_attention: q {q.shape}, k {k.shape}, v {v.shape}; expected q, k [..., chunks, L, dk] and"
            " v [..., chunks, L, dv]"
        )
    if cols.shape != (*q.shape[:-1], len(COLUMNS)):
        raise ValueError(
            f"chunked_linear_attention: cols {cols.shape}; expected {(*q.shape[:-1], len(COLUMNS))} (pack_columns)"
        )
    if state is not None:
        lead, dk, dv = q.shape[:-3], q.shape[-1], v.shape[-1]
        want = ((*lead, dk, dv), (*lead, 1, dk), (*lead, 1, 1))
        if tuple(tuple(s.shape) for s in state) != want:
            raise ValueError(
                f"chunked_linear_attention: state shapes {[tuple(s.shape) for s in state]}; expected {list(want)}"
            )


def _unsupported(q, v, target) -> str:
    if target == "gpu":  # Triton: power-of-two blocks, and tl.dot needs every dimension >= 16
        dims = (q.shape[-2], q.shape[-1], v.shape[-1])
        if any(d & (d - 1) or d < 16 for d in dims):
            return f"the GPU kernel needs powers of two >= 16 for the chunk size and widths, got {dims}"
    return ""


# the kernels


@dataclasses.dataclass(frozen=True)
class _Call:
    mode: str
    eps: float
    block: int  # chunks per phase-1 grid step
    interpret: bool


def _params(call, semantics):
    if call.interpret:
        return {}
    if common.backend() == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=1)}
    from jax.experimental.pallas import tpu as pltpu

    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}


def _specs(shapes, kinds, block, count, reverse=False):
    """BlockSpecs for a (programs, steps) grid. kinds: "state" (one per program, resident), "chunks" (`block` chunks
    per step, walked in order or in reverse) or "chunk" (one chunk per step)."""

    def spec(shape, kind):
        rest = (0,) * (len(shape) - 2)
        if kind == "state":
            return pl.BlockSpec((1, *shape[1:]), lambda p, j: (p,) + (0,) * (len(shape) - 1))
        if kind == "chunk":
            return pl.BlockSpec((1, 1, *shape[2:]), lambda p, j: (p, j, *rest))
        return pl.BlockSpec((1, block, *shape[2:]), lambda p, j: (p, (count - 1 - j) if reverse else j, *rest))

    return [spec(shape, kind) for shape, kind in zip(shapes, kinds, strict=True)]


def _states_kernel(k_ref, v_ref, cols_ref, c0, n0, m0, c_out, n_out, m_out, c_starts, n_starts, m_starts, *, call):
    f32 = lambda x: x.astype(jnp.float32)

    @pl.when(pl.program_id(1) == 0)
    def _():
        for dst, src in ((c_out, c0), (n_out, n0), (m_out, m0)):
            dst[...] = src[...]

    def body(j, state):
        for ref, value in zip((c_starts, n_starts, m_starts), state, strict=True):
            ref[0, j] = value
        return chunk_advance(state, f32(k_ref[0, j]), f32(v_ref[0, j]), cols_ref[0, j], mode=call.mode)

    state = jax.lax.fori_loop(0, call.block, body, (c_out[0], n_out[0], m_out[0]))
    for ref, value in zip((c_out, n_out, m_out), state, strict=True):
        ref[0] = value


def _outputs_kernel(q_ref, k_ref, v_ref, cols_ref, c_ref, n_ref, m_ref, h_ref, *, call):
    f32 = lambda x: x.astype(jnp.float32)
    state = (c_ref[0, 0], n_ref[0, 0], m_ref[0, 0])
    h = chunk_output(
        state, f32(q_ref[0, 0]), f32(k_ref[0, 0]), f32(v_ref[0, 0]), cols_ref[0, 0], mode=call.mode, eps=call.eps
    )
    h_ref[0, 0] = h.astype(h_ref.dtype)


def _outputs_backward_kernel(q_ref, k_ref, v_ref, cols_ref, c_ref, n_ref, m_ref, dh_ref, *out_refs, call):
    f32 = lambda x: x.astype(jnp.float32)
    primals = ((c_ref[0, 0], n_ref[0, 0], m_ref[0, 0]), *(f32(r[0, 0]) for r in (q_ref, k_ref, v_ref)), cols_ref[0, 0])
    _, vjp = jax.vjp(functools.partial(chunk_output, mode=call.mode, eps=call.eps), *primals)
    dstate, dq, dk, dv, dcols = vjp(f32(dh_ref[0, 0]))
    for ref, value in zip(out_refs, (dq, dk, dv, dcols, *dstate), strict=True):
        ref[0, 0] = value.astype(ref.dtype)


def _states_backward_kernel(*refs, call):
    k_ref, v_ref, cols_ref = refs[:3]
    starts, dstarts, dfinal = refs[3:6], refs[6:9], refs[9:12]
    dk_ref, dv_ref, dcols_ref = refs[12:15]
    dinit = refs[15:18]
    f32 = lambda x: x.astype(jnp.float32)

    @pl.when(pl.program_id(1) == 0)
    def _():
        for dst, src in zip(dinit, dfinal, strict=True):
            dst[...] = src[...]

    def body(t, dend):  # dend: the cotangent of chunk j's end state
        j = call.block - 1 - t
        primals = (tuple(ref[0, j] for ref in starts), f32(k_ref[0, j]), f32(v_ref[0, j]), cols_ref[0, j])
        _, vjp = jax.vjp(functools.partial(chunk_advance, mode=call.mode), *primals)
        dstart, dk, dv, dcols = vjp(dend)
        for ref, value in zip((dk_ref, dv_ref, dcols_ref), (dk, dv, dcols), strict=True):
            ref[0, j] = value.astype(ref.dtype)
        return tuple(a + ref[0, j] for a, ref in zip(dstart, dstarts, strict=True))

    dstate = jax.lax.fori_loop(0, call.block, body, tuple(ref[0] for ref in dinit))
    for ref, value in zip(dinit, dstate, strict=True):
        ref[0] = value


def _phase1(call, k, v, cols, state):
    programs, chunks = k.shape[:2]
    count = chunks // call.block
    start_shapes = [(programs, chunks, *s.shape[1:]) for s in state]
    return pl.pallas_call(
        functools.partial(_states_kernel, call=call),
        grid=(programs, count),
        in_specs=_specs(
            [k.shape, v.shape, cols.shape, *(s.shape for s in state)], ["chunks"] * 3 + ["state"] * 3, call.block, count
        ),
        out_specs=_specs([s.shape for s in state] + start_shapes, ["state"] * 3 + ["chunks"] * 3, call.block, count),
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in [*(s.shape for s in state), *start_shapes]],
        interpret=call.interpret,
        name="chunked_linear_attention_states",
        **_params(call, ("parallel", "arbitrary")),
    )(k, v, cols, *state)


def _phase2(call, q, k, v, cols, starts):
    programs, chunks = q.shape[:2]
    shapes = [q.shape, k.shape, v.shape, cols.shape, *(s.shape for s in starts)]
    h_shape = v.shape  # h has v's width, one block per chunk
    return pl.pallas_call(
        functools.partial(_outputs_kernel, call=call),
        grid=(programs, chunks),
        in_specs=_specs(shapes, ["chunk"] * len(shapes), 1, chunks),
        out_specs=_specs([h_shape], ["chunk"], 1, chunks)[0],
        out_shape=jax.ShapeDtypeStruct(h_shape, q.dtype),
        interpret=call.interpret,
        name="chunked_linear_attention_outputs",
        **_params(call, ("parallel", "parallel")),
    )(q, k, v, cols, *starts)


def _forward(call, q, k, v, cols, state):
    c, n, m, *starts = _phase1(call, k, v, cols, state)
    return _phase2(call, q, k, v, cols, starts), (c, n, m), tuple(starts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(call, q, k, v, cols, state):
    h, final, _ = _forward(call, q, k, v, cols, state)
    return h, final


def _kernel_fwd(call, q, k, v, cols, state):
    h, final, starts = _forward(call, q, k, v, cols, state)
    return (h, final), (q, k, v, cols, starts)


def _kernel_bwd(call, residuals, cotangents):
    q, k, v, cols, starts = residuals
    dh, dfinal = cotangents
    programs, chunks = q.shape[:2]
    # phase 2 backward, every chunk in parallel: dq, the outputs' share of dk, dv, dcols, and the chunk-start states'
    shapes = [q.shape, k.shape, v.shape, cols.shape, *(s.shape for s in starts), dh.shape]
    out_shapes = [q.shape, k.shape, v.shape, cols.shape, *(s.shape for s in starts)]
    outs = pl.pallas_call(
        functools.partial(_outputs_backward_kernel, call=call),
        grid=(programs, chunks),
        in_specs=_specs(shapes, ["chunk"] * len(shapes), 1, chunks),
        out_specs=_specs(out_shapes, ["chunk"] * len(out_shapes), 1, chunks),
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
        interpret=call.interpret,
        name="chunked_linear_attention_outputs_bwd",
        **_params(call, ("parallel", "parallel")),
    )(q, k, v, cols, *starts, dh)
    dq, dk_out, dv_out, dcols_out, *dstarts = outs
    # phase 1 backward, the chunks of a program in reverse: the advance's share, and the initial state's cotangent
    count = chunks // call.block
    dfinal = tuple(d.astype(jnp.float32) for d in dfinal)
    ins = [k, v, cols, *starts, *dstarts, *dfinal]
    kinds = ["chunks"] * 9 + ["state"] * 3
    out_shapes = [k.shape, v.shape, cols.shape, *(d.shape for d in dfinal)]
    outs = pl.pallas_call(
        functools.partial(_states_backward_kernel, call=call),
        grid=(programs, count),
        in_specs=_specs([x.shape for x in ins], kinds, call.block, count, reverse=True),
        out_specs=_specs(out_shapes, ["chunks"] * 3 + ["state"] * 3, call.block, count, reverse=True),
        out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
        interpret=call.interpret,
        name="chunked_linear_attention_states_bwd",
        **_params(call, ("parallel", "arbitrary")),
    )(*ins)
    dk_state, dv_state, dcols_state, *dinit = outs
    grads = (dq, dk_out + dk_state, dv_out + dv_state, dcols_out + dcols_state)
    grads = tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v, cols), strict=True))
    return (*grads, tuple(dinit))


_kernel.defvjp(_kernel_fwd, _kernel_bwd)

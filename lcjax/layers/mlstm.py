"""The stabilized mLSTM cell (xLSTM, Beck et al. 2024) in three forms: parallel, chunkwise and recurrent.

Notation of `reference/xlstm_ssm_birdie_jrt.md` §1.1–1.3, per batch element and head. Inputs q_t, k_t ∈ R^dqk,
v_t ∈ R^dv, gate pre-activations ĩ_t (input gate exp(ĩ)) and f̃_t (forget gate σ(f̃)); q' = q / √dqk. The true
recurrence C_t = f_t C_(t−1) + i_t k_t v_tᵀ, n_t = f_t n_(t−1) + i_t k_t, h_t = C_tᵀ q'_t / max(|n_tᵀ q'_t|, 1) is
computed with the max-stabilizer m (log domain): the state is (C̄, n̄, m) = (e^−m C, e^−m n, m), and

    m_t = max(log σ(f̃_t) + m_(t−1), ĩ_t),  i'_t = exp(ĩ_t − m_t),  f'_t = exp(log σ(f̃_t) + m_(t−1) − m_t)
    C̄_t = f'_t C̄_(t−1) + i'_t k_t v_tᵀ,   n̄_t = f'_t n̄_(t−1) + i'_t k_t
    h_t = C̄_tᵀ q'_t / (max(|n̄_tᵀ q'_t|, e^(−m_t)) + eps)

k is stored unscaled in the state (as mlstm_kernels does). The initial state is zeros with m = 0 unless given.
Without eps every form gives the same h whatever its stabilizer; with eps > 0 the forms differ by about
eps · e^m / |den| (they pick m differently), as the reference implementations do.

- "recurrent": a `lax.scan` of the step above (also `mlstm_step`, for decoding).
- "chunkwise": §1.3; the states at chunk boundaries by a scan over chunks (inter-chunk), then every chunk's outputs
  in parallel from its start state (intra-chunk): the two functions `chunk_advance` and `chunk_output` of
  `kernels_pallas.chunked_linear_attention`, the kernel's specification. A length that is not a multiple of
  `chunk_size` is padded at the end with tokens that neither write (ĩ = −∞) nor decay (f̃ = +∞), so the final state
  is exact. `impl` runs them in XLA ("xla": the kernel module's `reference`) or as the Pallas kernel ("pallas" |
  "interpret" | "auto", per device shard under a mesh; float32 inside, states float32).
- "parallel": §1.2, the quadratic form over the whole sequence (log D_ts = b_t − b_s + ĩ_s, b the cumulative
  log σ(f̃); row stabilizer max_s log D_ts, plus the initial state's term when one is given): the chunkwise form
  with one chunk of the whole length.
Packed documents (`segment_ids`) are exact resets in every form: a token sees only its own document's tokens, and the
state of an earlier document is dropped (masks, not a large negative forget gate).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import chunked_linear_attention as kernel
from lcjax.layers import chunkwise
from lcjax.layers.documents import document_starts

FORMS = ("parallel", "chunkwise", "recurrent")
IMPLS = ("xla", "pallas", "interpret", "auto")  # of the chunkwise form: XLA, or the Pallas kernel (`kernels_pallas`)
State = tuple[jax.Array, jax.Array, jax.Array]  # C̄ [B, H, dqk, dv], n̄ [B, H, dqk], m [B, H]


def initial_state(batch: int, heads: int, dqk: int, dv: int, dtype=jnp.float32) -> State:
    return (
        jnp.zeros((batch, heads, dqk, dv), dtype),
        jnp.zeros((batch, heads, dqk), dtype),
        jnp.zeros((batch, heads), dtype),
    )


@functools.partial(jax.jit, static_argnames=("form", "chunk_size", "impl", "eps"))
def mlstm_cell(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    igate: jax.Array,
    fgate: jax.Array,
    *,
    form: str = "chunkwise",
    chunk_size: int = 64,
    initial_state: State | None = None,
    eps: float = 1e-6,
    segment_ids: jax.Array | None = None,
    impl: str = "xla",
) -> tuple[jax.Array, State]:
    """h `[batch, heads, length, dv]` and the final state (C̄, n̄, m) of the mLSTM (module docstring).

    q, k `[batch, heads, length, dqk]`, v `[batch, heads, length, dv]`; igate, fgate: the pre-activations ĩ, f̃
    `[batch, heads, length]`. form: "parallel" | "chunkwise" | "recurrent". initial_state: (C̄, n̄, m) as returned
    (zeros and m = 0 when None), so two calls continue one sequence exactly. segment_ids `[batch, length]` int:
    packed documents; a token whose id differs from the previous token's starts from a fresh state (the initial
    state belongs to the first token's document), exactly as separate runs would. impl (`IMPLS`): how the
    chunkwise form runs; the other forms take only "xla".
    """
    _check(q, k, v, igate, fgate, form, chunk_size, initial_state)
    if impl not in IMPLS or (impl != "xla" and form != "chunkwise"):
        raise ValueError(
            f"mlstm_cell: impl={impl!r} with form={form!r}; expected one of {IMPLS}, and 'xla' unless form='chunkwise'"
        )
    if segment_ids is not None and segment_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"mlstm_cell: segment_ids {segment_ids.shape}; expected [batch, length] {(q.shape[0], q.shape[2])}"
        )
    batch, heads, _, dqk = q.shape
    dtype = jnp.result_type(q, k, v, igate, fgate)
    q, k, v, igate, fgate = (x.astype(dtype) for x in (q, k, v, igate, fgate))
    q = q * dqk**-0.5
    given = initial_state is not None
    state = initial_state if given else _zeros(batch, heads, dqk, v.shape[-1], dtype)
    state = tuple(s.astype(dtype) for s in state)
    # docs[b, h, t]: how many documents started after the initial state's, up to token t
    if segment_ids is None:
        docs = jnp.zeros(q.shape[:3], jnp.int32)
    else:
        starts = document_starts(segment_ids)
        docs = jnp.broadcast_to(jnp.cumsum(starts.astype(jnp.int32), axis=1)[:, None], q.shape[:3])
    if form == "recurrent":
        return _recurrent(q, k, v, igate, fgate, docs, state, eps)
    if form == "parallel":
        return _chunkwise(q, k, v, igate, fgate, docs, state, eps, q.shape[2], "xla")
    return _chunkwise(q, k, v, igate, fgate, docs, state, eps, chunk_size, impl)


def mlstm_step(q, k, v, igate, fgate, state: State, *, eps: float = 1e-6) -> tuple[jax.Array, State]:
    """One token: q, k `[batch, heads, dqk]`, v `[batch, heads, dv]`, gates `[batch, heads]` -> (h, state)."""
    state, h = _step(state, (q * q.shape[-1] ** -0.5, k, v, igate, fgate), eps)
    return h, state


def _zeros(batch, heads, dqk, dv, dtype) -> State:
    return initial_state(batch, heads, dqk, dv, dtype)


def _check(q, k, v, igate, fgate, form, chunk_size, state):
    if form not in FORMS:
        raise ValueError(f"mlstm_cell: form={form!r}; expected one of {FORMS}")
    if chunk_size < 1:
        raise ValueError(f"mlstm_cell: chunk_size={chunk_size} must be >= 1")
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"mlstm_cell: q {q.shape}, k {k.shape}, v {v.shape}; expected q, k [batch, heads, length, dqk] and v "
            "[batch, heads, length, dv]"
        )
    for name, gate in (("igate", igate), ("fgate", fgate)):
        if gate.shape != q.shape[:3]:
            raise ValueError(
                f"mlstm_cell: {name} has shape {gate.shape}; expected [batch, heads, length] {q.shape[:3]}"
            )
    if state is not None:
        batch, heads, _, dqk = q.shape
        want = ((batch, heads, dqk, v.shape[-1]), (batch, heads, dqk), (batch, heads))
        if tuple(s.shape for s in state) != want:
            raise ValueError(f"mlstm_cell: initial_state shapes {[s.shape for s in state]}; expected {list(want)}")


def _step(state, inputs, eps, fresh=None):
    c, n, m = state
    q, k, v, i, f = inputs  # q already scaled
    if fresh is not None:  # a new document starts here: from the zero state
        c, n, m = (jnp.where(fresh.reshape(fresh.shape + (1,) * (z.ndim - fresh.ndim)), 0.0, z) for z in (c, n, m))
    log_f = jax.nn.log_sigmoid(f)
    m_new = jnp.maximum(log_f + m, i)
    i_, f_ = jnp.exp(i - m_new), jnp.exp(log_f + m - m_new)
    c = f_[..., None, None] * c + i_[..., None, None] * k[..., :, None] * v[..., None, :]
    n = f_[..., None] * n + i_[..., None] * k
    num = jnp.einsum("bhd,bhde->bhe", q, c)
    den = jnp.maximum(jnp.abs(jnp.sum(n * q, axis=-1)), jnp.exp(-m_new)) + eps
    return (c, n, m_new), num / den[..., None]


def _recurrent(q, k, v, i, f, docs, state, eps):
    fresh = docs != jnp.concatenate([jnp.zeros_like(docs[..., :1]), docs[..., :-1]], axis=-1)
    time_major = [jnp.moveaxis(x, 2, 0) for x in (q, k, v, i, f, fresh)]
    state, h = jax.lax.scan(lambda s, x: _step(s, x[:5], eps, x[5]), state, time_major)
    return jnp.moveaxis(h, 0, 2), state


def _pad(q, k, v, i, f, docs, chunk_size):
    """Pads the length to a multiple of `chunk_size` with tokens of the last document that neither write nor decay."""
    count = -(-q.shape[2] // chunk_size)
    pad = count * chunk_size - q.shape[2]
    if pad:
        widths = ((0, 0), (0, 0), (0, pad))
        q, k, v = (jnp.pad(x, (*widths, (0, 0))) for x in (q, k, v))
        i = jnp.pad(i, widths, constant_values=-jnp.inf)
        f = jnp.pad(f, widths, constant_values=jnp.inf)
        docs = jnp.pad(docs, widths, mode="edge")
    return count, (q, k, v, i, f, docs)


def _chunkwise(q, k, v, i, f, docs, state, eps, chunk_size, impl):
    """The chunkwise form through `kernels_pallas.chunked_linear_attention`: its reference in XLA for impl="xla"
    (partitioned by XLA like any other op), the Pallas kernel per device shard otherwise."""
    batch, heads, length, _ = q.shape
    count, (q, k, v, i, f, docs) = _pad(q, k, v, i, f, docs, chunk_size)
    chunks = lambda x: x.reshape(batch, heads, count, chunk_size, *x.shape[3:])
    cols = kernel.pack_columns(chunks(jax.nn.log_sigmoid(f)), chunks(i), chunks(docs))
    c0, n0, m0 = state
    args = (chunks(q), chunks(k), chunks(v), cols, (c0, n0[..., None, :], m0[..., None, None]))
    if impl == "xla":
        h, (c, n, m) = kernel.chunked_linear_attention(*args, mode="mlstm", eps=eps, impl="reference")
    else:
        h, (c, n, m) = chunkwise.chunked_linear_attention(*args, mode="mlstm", eps=eps, impl=impl)
    h = h.reshape(batch, heads, count * chunk_size, -1)[:, :, :length]
    return h, (c.astype(q.dtype), n[..., 0, :].astype(q.dtype), m[..., 0, 0].astype(q.dtype))

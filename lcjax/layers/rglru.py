"""The RG-LRU (Real-Gated Linear Recurrent Unit of Hawk/Griffin, De et al. 2024) and the diagonal linear scans it runs
on, plus the Gated SSM of Birdie (Blouir et al. 2024, §3.4). Notation of `reference/xlstm_ssm_birdie_jrt.md` §2.2–2.3.

RG-LRU, width W split into `num_blocks` diagonal blocks for its gates (block-diagonal linear layers with bias):

    r_t = σ(BD_a(x_t)),   i_t = σ(BD_x(x_t)),   log a_t = −c · softplus(λ) · r_t   (c = 8)
    h_t = a_t ⊙ h_(t−1) + √(1 − a_t²) ⊙ (i_t ⊙ x_t)

so the base decay (r = 1) is exp(−c·softplus(λ)) = σ(−λ)^c, and λ is initialised with σ(−λ)² uniform in [0.9², 0.999²]
(the decay per unit of gate, a_base = σ(−λ), spread uniformly over a ring's area). At a document start (`resets`)
a_t = 0 and the input multiplier is 1, so nothing of the previous document is carried. The √ has a clipped derivative
(`sqrt_bounded_derivative`): its backward pass clamps the argument at ≥ 1/(4·1000²), so the gradient stays finite where
a_t → 1.

Scans of h_t = a_t h_(t−1) + b_t over time (axis 1 of [batch, time, ...]): `linear_scan` (a `lax.scan`, the reference),
`associative_scan` (`lax.associative_scan` on (a, b) pairs: log-depth), each with an initial state and `reverse=True`
for right-to-left (h_t = a_t h_(t+1) + b_t, Birdie's reverse half), and `pallas_scan`, the sequential-in-VMEM scan
of `kernels_pallas.rglru_scan` for TPU (run per shard of the mesh's batch and width axes; interpret mode on CPU, the
reference `lax.scan` on GPU). `scan(..., impl=)` picks one.

Gated SSM (Birdie §3.4), a fused SSM + MLP mixer with input-only gates:

    i = σ(W_i x), z = W_z x, o = GELU(W_o x), f = σ(W_f x),   h_t = f ⊙ h_(t−1) + i ⊙ z,   y = W_out(o ⊙ h)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import common, rglru_scan
from lcjax.layers.params import normal, param, zeros
from lcjax.parallel.sharding import logical_to_spec, per_shard

C = 8.0  # the RG-LRU's decay sharpness c
MAX_SQRT_GRADIENT = 1000.0  # the clipped √ derivative: the argument is clamped at >= 1 / (4 · 1000²) backwards
SCANS = ("auto", "linear", "associative", "pallas")  # auto: the kernel on TPU, associative elsewhere


@jax.custom_vjp
def sqrt_bounded_derivative(x: jax.Array) -> jax.Array:
    """√x whose derivative 1 / (2√x) is bounded by MAX_SQRT_GRADIENT (the argument clamped backwards only)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
    floor = 1.0 / (4.0 * MAX_SQRT_GRADIENT**2)
    return (g / (2.0 * jnp.sqrt(jnp.maximum(x, floor))),)


sqrt_bounded_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def _expand(a: jax.Array, like: jax.Array) -> jax.Array:
    return a.reshape(*a.shape, *(1,) * (like.ndim - a.ndim))


def linear_scan(a, b, h0=None, *, reverse: bool = False):
    """h_t = a_t ⊙ h_(t∓1) + b_t over axis 1 of a, b [batch, time, ...] from h0 [batch, ...] (zeros when None).
    Returns (h [batch, time, ...], the last state: h at the final step, the first one with reverse)."""
    if h0 is None:
        h0 = jnp.zeros((b.shape[0], *b.shape[2:]), b.dtype)

    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    last, h = jax.lax.scan(step, h0.astype(b.dtype), (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
    return jnp.moveaxis(h, 0, 1), last


def associative_scan(a, b, h0=None, *, reverse: bool = False):
    """`linear_scan` as a `lax.associative_scan` of the affine maps h -> a h + b (composition is associative)."""
    if h0 is not None:  # fold the initial state into the first step's offset
        first = -1 if reverse else 0
        b = b.at[:, first].add(a[:, first] * h0.astype(b.dtype))

    def combine(earlier, later):  # apply `earlier`, then `later`
        a1, b1 = earlier
        a2, b2 = later
        return a1 * a2, a2 * b1 + b2

    _, h = jax.lax.associative_scan(combine, (a, b), axis=1, reverse=reverse)
    return h, (h[:, 0] if reverse else h[:, -1])


def pallas_scan(a, b, h0=None, *, reverse: bool = False):
    """`linear_scan` by the Pallas kernel (`kernels_pallas.rglru_scan`), once per device shard of the batch and, where
    the mesh's tensor axes divide it, the width (the scan never mixes rows or channels; time is gathered whole)."""
    if h0 is None:
        h0 = jnp.zeros((b.shape[0], *b.shape[2:]), jnp.float32)
    mesh = jax.sharding.get_abstract_mesh()
    width = None
    if not mesh.empty:
        split = logical_to_spec(("mlp",), mesh.axis_names)[0] or ()
        split = (split,) if isinstance(split, str) else split
        width = "mlp" if b.shape[-1] % math.prod(mesh.shape[n] for n in split) == 0 else None
    run = lambda a, b, h0: rglru_scan.rglru_scan(a, b, h0, reverse=reverse, impl="pallas")
    tiles, states = ("batch", None, width), ("batch", width)
    return per_shard(run, (a, b, h0), (tiles, tiles, states), (tiles, states))


def scan(a, b, h0=None, *, reverse: bool = False, impl: str = "associative"):
    """The diagonal scan with `impl` in SCANS (the reference `linear`, `associative`, the kernel `pallas`, or `auto`:
    the kernel when tracing for TPU, `associative` elsewhere)."""
    if impl == "auto":
        impl = "pallas" if common.backend() == "tpu" else "associative"
    if impl == "linear":
        return linear_scan(a, b, h0, reverse=reverse)
    if impl == "associative":
        return associative_scan(a, b, h0, reverse=reverse)
    if impl == "pallas":
        return pallas_scan(a, b, h0, reverse=reverse)
    raise ValueError(f"rglru scan impl {impl!r}; expected one of {SCANS}")


def reset_mask(resets, width: int, reset_width: int | None = None):
    """[batch, time, width] bool: the document starts `resets` [batch, time] on the first `reset_width` channels
    (all when None). A bidirectional layer resets its forward half only: the reverse half's decay at a document's
    first token reads that document's second token (`bidirectional_scan` cuts it at the document's end instead)."""
    channels = jnp.arange(width) < (width if reset_width is None else reset_width)
    return resets[..., None] & channels


def rglru_coefficients(x, gate_a, gate_x, a_param, resets=None, reset_width=None):
    """The RG-LRU's scan coefficients (a_t, b_t) for inputs x [batch, time, W], gate pre-activations gate_a, gate_x
    (like x) and λ = a_param [W]; resets [batch, time] bool marks document starts (a = 0, multiplier 1) on the first
    `reset_width` channels (`reset_mask`)."""
    log_a = -C * jax.nn.softplus(a_param) * jax.nn.sigmoid(gate_a)
    a = jnp.exp(log_a)
    multiplier = sqrt_bounded_derivative(1.0 - jnp.exp(2.0 * log_a))
    if resets is not None:
        start = reset_mask(resets, x.shape[-1], reset_width)
        a = jnp.where(start, 0.0, a)
        multiplier = jnp.where(start, 1.0, multiplier)
    return a, multiplier * jax.nn.sigmoid(gate_x) * x


def rglru_reference_float64(x, gate_a, gate_x, a_param, resets=None, h0=None):
    """The recurrence step by step in numpy float64 (the oracle): returns (h [batch, time, W], last state)."""
    import numpy as np

    x, gate_a, gate_x, a_param = (np.asarray(v, np.float64) for v in (x, gate_a, gate_x, a_param))
    batch, time, width = x.shape
    h = np.zeros((batch, width)) if h0 is None else np.asarray(h0, np.float64).copy()
    out = np.zeros_like(x)
    softplus = np.logaddexp(0.0, a_param)
    for t in range(time):
        r, i = 1 / (1 + np.exp(-gate_a[:, t])), 1 / (1 + np.exp(-gate_x[:, t]))
        a = np.exp(-C * softplus * r)
        mult = np.sqrt(1 - a**2)
        if resets is not None:
            start = np.asarray(resets)[:, t, None]
            a, mult = np.where(start, 0.0, a), np.where(start, 1.0, mult)
        h = a * h + mult * i * x[:, t]
        out[:, t] = h
    return out, h


def segment_resets(segment_ids: jax.Array) -> jax.Array:
    """[batch, time] bool: where the segment id differs from the previous token's (the first token of a call
    continues the carried state)."""
    previous = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != previous


def a_param_init(min_rad: float = 0.9, max_rad: float = 0.999):
    """λ with σ(−λ)² uniform in [min_rad², max_rad²]: softplus(λ) = −log σ(−λ), so λ = softplus⁻¹(−½ log u)."""

    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, dtype, min_rad**2, max_rad**2)
        neg_log_a = -0.5 * jnp.log(u)  # softplus(λ)
        return jnp.log(jnp.expm1(neg_log_a))  # softplus⁻¹

    return init


class BlockDiagonalLinear(nnx.Module):
    """x [..., W] -> [..., W] with `num_blocks` independent [W/n, W/n] blocks and a bias."""

    def __init__(self, width: int, num_blocks: int, rngs: nnx.Rngs):
        if width % num_blocks:
            raise ValueError(f"BlockDiagonalLinear: width {width} is not a multiple of num_blocks {num_blocks}")
        self.num_blocks, size = num_blocks, width // num_blocks
        self.w = param(rngs, (num_blocks, size, size), (None, None, None), normal(1 / math.sqrt(size)))
        self.b = param(rngs, (num_blocks, size), (None, None), zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        blocks = x.reshape(*x.shape[:-1], self.num_blocks, -1)
        y = jnp.einsum("...hi,hij->...hj", blocks, self.w[...].astype(x.dtype)) + self.b[...].astype(x.dtype)
        return y.reshape(x.shape)


class RGLRU(nnx.Module):
    """The RG-LRU over [batch, time, W] with carried state h [batch, W]; `reverse=True` scans right to left."""

    def __init__(self, width: int, num_blocks: int, rngs: nnx.Rngs, *, impl: str = "associative"):
        if impl not in SCANS:
            raise ValueError(f"RGLRU impl {impl!r}; expected one of {SCANS}")
        self.impl = impl
        self.gate_a = BlockDiagonalLinear(width, num_blocks, rngs)
        self.gate_x = BlockDiagonalLinear(width, num_blocks, rngs)
        self.a_param = param(rngs, (width,), (None,), a_param_init())

    def coefficients(self, x, resets=None, reset_width=None):
        xf = x.astype(jnp.float32)
        return rglru_coefficients(xf, self.gate_a(xf), self.gate_x(xf), self.a_param[...], resets, reset_width)

    def __call__(self, x, h0=None, resets=None, *, reverse: bool = False):
        a, b = self.coefficients(x, resets)
        h, last = scan(a, b, h0, reverse=reverse, impl=self.impl)
        return h.astype(x.dtype), last


def bidirectional_scan(a, b, resets=None, causal=None, h0=None, *, impl: str = "associative"):
    """Birdie's bidirectional layer (§3.3) on scan coefficients a, b [batch, time, W] (W even).

    The first W/2 channels scan left to right over the whole sequence, from h0 [batch, W/2], with decay 0 at a
    start in `resets`. The last W/2 scan right to left and read the prefix only: their decay is 0 wherever `causal`
    [batch, time] (the causal suffix, where the reverse half is then b_t alone, so nothing flows back from later
    tokens) and at the token before a document start (no flow across packed samples), so the reverse half of `a`
    must not be reset at a document's first token (`reset_mask` with reset_width W/2). Returns (h [batch, time, W],
    the forward half's last state)."""
    half = a.shape[-1] // 2
    if a.shape[-1] % 2:
        raise ValueError(f"bidirectional_scan: width {a.shape[-1]} must be even (the state is split in half)")
    a_fwd = a[..., :half]
    if resets is not None:  # a sample start carries nothing in (the coefficients may already say so)
        a_fwd = jnp.where(resets[..., None], 0.0, a_fwd)
    forward, last = scan(a_fwd, b[..., :half], h0, impl=impl)
    a_rev = a[..., half:]
    if causal is not None:
        a_rev = jnp.where(causal[..., None], 0.0, a_rev)
    if resets is not None:  # h_t = a_t h_(t+1) + b_t must not read t + 1 when t + 1 starts another document
        next_starts = jnp.concatenate([resets[:, 1:], jnp.zeros_like(resets[:, :1])], axis=1)
        a_rev = jnp.where(next_starts[..., None], 0.0, a_rev)
    backward, _ = scan(a_rev, b[..., half:], reverse=True, impl=impl)
    return jnp.concatenate([forward, backward], axis=-1), last


class GatedSSM(nnx.Module):
    """Birdie's Gated SSM mixer (§3.4) on [batch, time, d_model] with state width `width`; `bidirectional` splits
    the state in half as `bidirectional_scan` does. Call: (x, h0, resets, causal) -> (y, last forward state)."""

    def __init__(self, d_model: int, width: int, rngs: nnx.Rngs, *, bidirectional: bool = False, impl="associative"):
        if bidirectional and width % 2:
            raise ValueError(f"GatedSSM: a bidirectional state width must be even, got {width}")
        init = normal(1 / math.sqrt(d_model))
        self.bidirectional, self.impl = bidirectional, impl
        self.w_in = param(rngs, (d_model, 4, width), ("embed", None, "mlp"), init)  # i, z, o, f
        self.b_f = param(rngs, (width,), ("mlp",), zeros)  # a learned forget bias, 0 at init: the paper's σ(W_f x)
        self.w_out = param(rngs, (width, d_model), ("mlp", "embed"), normal(1 / math.sqrt(width)))

    def coefficients(self, x, resets=None):
        proj = jnp.einsum("btd,dgw->btgw", x, self.w_in[...].astype(x.dtype)).astype(jnp.float32)
        i, z, o, f = (proj[:, :, g] for g in range(4))
        f = jax.nn.sigmoid(f + self.b_f[...])
        if resets is not None:
            f = jnp.where(reset_mask(resets, f.shape[-1], f.shape[-1] // 2 if self.bidirectional else None), 0.0, f)
        return f, jax.nn.sigmoid(i) * z, jax.nn.gelu(o)

    def __call__(self, x, h0=None, resets=None, causal=None):
        f, b, o = self.coefficients(x, resets)
        if self.bidirectional:
            h, last = bidirectional_scan(f, b, resets, causal, h0, impl=self.impl)
        else:
            h, last = scan(f, b, h0, impl=self.impl)
        return jnp.einsum("btw,wd->btd", (o * h).astype(x.dtype), self.w_out[...].astype(x.dtype)), last

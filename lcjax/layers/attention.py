"""Multi-head self-attention with grouped-query heads, RoPE, packed-document masking and a KV cache.

softmax(Q K^T * scale + mask) V per head, where query head h reads KV head h // (num_heads / num_kv_heads).
The core of the parallel form is chosen by `attention.impl`: `xla` is the plain-jnp path and the specification the
others are tested against; `pallas` is `kernels_pallas.flash_attention` (interpret mode on CPU), run per device
under `shard_map` with batch and heads sharded as the activations are; `cudnn` is
`jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs; `ring` is ring attention over the mesh's
`sequence` axis (`lcjax.parallel.ring_attention`), with the model's activations in the `attention.ring_layout`
order (the model permutes its inputs once, see `Transformer.__call__`); `landmark` is landmark attention's grouped
softmax over the model's expanded sequence (`lcjax.layers.landmark_attention`: a landmark after every
`attention.mem_freq` tokens, which the transformer inserts and removes), dense (`landmark_impl=xla`) or the
blockwise Pallas kernel (`pallas`: Mosaic on TPU, Triton on GPU; `auto`, the default: the kernel on TPU where
`mem_freq` allows it). An
implementation the backend or mesh lacks falls back to `xla` and says so once. The KV-cache form (`step`) uses
`xla`, except that with `ring` on a `sequence`-sharded mesh each shard of the cache computes a partial softmax and
the shards merge by LSE, and that landmark attention's may retrieve top-k blocks (`attention.retrieval_top_k`).
Shapes at the module boundary are [batch, length, heads, head_dim].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas import common as kernel_common
from kernels_pallas.flash_attention import flash_attention
from lcjax.errors import ConfigError
from lcjax.layers import landmark_attention as landmark
from lcjax.layers.params import normal, param
from lcjax.layers.rope import apply_rope
from lcjax.parallel import ring_attention as ring
from lcjax.parallel import ring_layout
from lcjax.parallel.sharding import constrain, logical_to_spec

IMPLS = ("xla", "pallas", "cudnn", "ring", "landmark")
LANDMARK_IMPLS = landmark.IMPLS
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The `attention` section of a model that attends (`model.attention.impl=...`)."""

    impl: str = "xla"
    ring_layout: str = "zigzag"  # impl=ring: zigzag | contiguous | striped (causal load balancing)
    ring_engine: str = "auto"  # impl=ring: per-block computation, auto (pallas on TPU, else jnp) | jnp | pallas
    mem_freq: int = 0  # impl=landmark: regular tokens per landmark block (the block is mem_freq + 1 slots)
    landmark_impl: str = "auto"  # impl=landmark: xla (dense grouped softmax) | pallas (blockwise kernel) | auto
    retrieval_top_k: int = 0  # impl=landmark, decode: 0 = every cached block in place; k > 0 = the paper's top-k
    retrieval_mode: str = "per_token_and_head"  # impl=landmark, top-k per query and head | max_over_tokens
    # impl=landmark with retrieval_top_k > 0, decode: keys and values in host memory (`pinned_host`), the landmark
    # keys on the device, and each layer fetches only the blocks its queries retrieve
    offload_cache: bool = False

    def validate(self, *, mesh: dict[str, int], seq_len: int, impls: tuple[str, ...] = IMPLS) -> None:
        """`impls`: the implementations the model's attention offers (a model may offer fewer than `IMPLS`)."""
        if self.impl not in impls:
            raise ConfigError("model.attention.impl", f"={self.impl!r}; this model's attention offers {list(impls)}")
        if self.ring_layout not in ring_layout.LAYOUTS:
            raise ConfigError(
                "model.attention.ring_layout",
                f"unknown layout {self.ring_layout!r}; expected one of {ring_layout.LAYOUTS}",
            )
        if self.ring_engine not in ring.ENGINES:
            raise ConfigError(
                "model.attention.ring_engine", f"unknown engine {self.ring_engine!r}; expected one of {ring.ENGINES}"
            )
        if self.impl == "landmark":
            self._validate_landmark(mesh)
        elif self.offload_cache:
            raise ConfigError(
                "model.attention.offload_cache", f"=True needs model.attention.impl=landmark, got {self.impl!r}"
            )
        if self.impl == "ring" and mesh["sequence"] > 1:
            multiple = mesh["sequence"] * (2 if self.ring_layout == "zigzag" else 1)
            if seq_len % multiple:
                raise ConfigError(
                    "train.seq_len",
                    f"={seq_len} must be divisible by {multiple} for model.attention.impl=ring with "
                    f"model.attention.ring_layout={self.ring_layout} over mesh.sequence={mesh['sequence']}",
                )

    def _validate_landmark(self, mesh: dict[str, int]) -> None:
        from kernels_pallas.landmark_attention import MAX_TILE, tile_multiple

        if self.mem_freq < 1:
            raise ConfigError(
                "model.attention.mem_freq", f"={self.mem_freq} must be >= 1 with model.attention.impl=landmark"
            )
        if self.landmark_impl not in LANDMARK_IMPLS:
            raise ConfigError(
                "model.attention.landmark_impl",
                f"={self.landmark_impl!r}; expected one of {list(LANDMARK_IMPLS)}",
            )
        if self.landmark_impl == "pallas" and kernel_common.backend() == "gpu":
            from kernels_pallas.landmark_attention_gpu import MAX_GROUP, group_slots

            if group_slots(self.mem_freq) > MAX_GROUP:
                raise ConfigError(
                    "model.attention.mem_freq",
                    f"={self.mem_freq}: the GPU landmark kernel pads each block of mem_freq+1 slots to a power of "
                    f"two, at most {MAX_GROUP}; use mem_freq < {MAX_GROUP} or model.attention.landmark_impl=xla",
                )
        elif self.landmark_impl == "pallas" and tile_multiple(self.mem_freq) > MAX_TILE:
            raise ConfigError(
                "model.attention.mem_freq",
                f"={self.mem_freq}: the landmark kernel's tiles must hold whole blocks of mem_freq+1="
                f"{self.mem_freq + 1} slots and be multiples of 128, so lcm({self.mem_freq + 1}, 128)="
                f"{tile_multiple(self.mem_freq)} > {MAX_TILE}; use mem_freq+1 dividing 1024 (127, 63, 31, ...) or "
                "model.attention.landmark_impl=xla (on GPU the kernel takes any mem_freq < 256)",
            )
        if mesh["sequence"] > 1:
            raise ConfigError(
                "mesh.sequence", f"={mesh['sequence']}: landmark attention does not shard the sequence; use 1"
            )
        if self.retrieval_top_k < 0:
            raise ConfigError(
                "model.attention.retrieval_top_k", f"={self.retrieval_top_k} must be >= 0 (0: every cached block)"
            )
        if self.retrieval_mode not in landmark.RETRIEVAL_MODES:
            raise ConfigError(
                "model.attention.retrieval_mode",
                f"={self.retrieval_mode!r}; expected one of {list(landmark.RETRIEVAL_MODES)}",
            )
        if self.offload_cache and self.retrieval_top_k == 0:
            raise ConfigError(
                "model.attention.offload_cache",
                "=True needs model.attention.retrieval_top_k > 0 (the device fetches only the retrieved blocks)",
            )


def ring_shards(config: AttentionConfig) -> int:
    """Devices on the current mesh's `sequence` axis when ring attention is in use, else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if config.impl != "ring" or mesh.empty:
        return 1
    return mesh.shape.get("sequence", 1)


def ring_permutation(config: AttentionConfig, length: int) -> np.ndarray | None:
    """The token order of ring attention's layout (device r holds block r of the permuted sequence) when it shards
    the sequence, else None: a model permutes its inputs with `ring_layout.to_layout` once and its hidden states
    back with `ring_layout.from_layout`."""
    shards = ring_shards(config)
    return ring_layout.permutation(length, shards, config.ring_layout) if shards > 1 else None


def causal_segment_mask(
    q_positions: jax.Array, k_positions: jax.Array, q_segments: jax.Array | None, k_segments: jax.Array | None
) -> jax.Array:
    """[batch, q_len, k_len] bool: key slot j visible to query i iff j <= i (by slot) and same segment.

    `q_positions`/`k_positions` are absolute slot indices [batch, len]; `*_segments` are document ids or None.
    """
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float) -> jax.Array:
    """The xla core: q [B, T, H, D], k/v [B, S, K, D] with H % K == 0, mask [B, T, S] bool -> [B, T, H, D]."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    scale: float,
    impl: str,
    ring_layout: str = "zigzag",
    ring_engine: str = "auto",
    mem_freq: int = 0,
    landmark_impl: str = "auto",
) -> jax.Array:
    """Causal self-attention within segments: q [B, T, H, D], k/v [B, T, K, D] -> [B, T, H, D], by `impl`.
    With `impl="ring"` on a mesh whose `sequence` axis is > 1, the inputs are in `ring_layout` order; with
    `impl="landmark"` they are the expanded sequence (a landmark after every `mem_freq` tokens)."""
    if impl == "ring":
        if ring_shards(AttentionConfig(impl="ring")) > 1:
            return _ring_per_device(q, k, v, segment_ids, scale, ring_layout, ring_engine)
        kernel_common.say_once("model.attention.impl=ring needs a mesh with sequence > 1; using xla")
        impl = "xla"
    if impl == "cudnn" and kernel_common.backend() != "gpu":
        kernel_common.say_once(
            f"model.attention.impl=cudnn needs an NVIDIA GPU, not {kernel_common.backend()}; using xla"
        )
        impl = "xla"
    if impl == "cudnn":
        mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation="cudnn")
    if impl == "pallas":
        return _flash_per_device(q, k, v, segment_ids, scale)
    if impl == "landmark":
        if landmark.resolve_impl(landmark_impl, mem_freq) == "xla":
            return landmark.reference(q, k, v, segment_ids, mem_freq=mem_freq, scale=scale)
        kernel = lambda q, k, v, seg: landmark.causal_landmark_attention(
            q, k, v, seg, mem_freq=mem_freq, scale=scale, impl="pallas"
        )
        return _kernel_per_device(kernel, q, k, v, segment_ids)
    slots = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    mask = causal_segment_mask(slots, slots, segment_ids, segment_ids)
    return dot_product_attention(q, k, v, mask, scale=scale)


def _flash_per_device(q, k, v, segment_ids, scale):
    kernel = lambda q, k, v, seg: flash_attention(q, k, v, causal=True, segment_ids=seg, scale=scale, impl="pallas")
    return _kernel_per_device(kernel, q, k, v, segment_ids)


def _kernel_per_device(kernel, q, k, v, segment_ids):
    """A Pallas kernel `kernel(q, k, v, segment_ids)` under `shard_map`: a kernel is not partitioned by XLA, so each
    device runs it on its shard (batch over data/fsdp, heads over tensor). Every device needs the whole sequence: a
    `sequence`-sharded mesh gathers it here (ring attention is the implementation that keeps it sharded)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids)
    if mesh.shape.get("sequence", 1) > 1:
        kernel_common.say_once(
            "model.attention.impl=pallas gathers the sequence axis on every device (not ring attention)"
        )
    q_spec = logical_to_spec(("batch", None, "heads", None), mesh.axis_names)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), mesh.axis_names)
    seg_spec = logical_to_spec(("batch", None), mesh.axis_names)
    if segment_ids is None:
        return jax.shard_map(
            lambda q, k, v: kernel(q, k, v, None),
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec),
            out_specs=q_spec,
            check_vma=False,
        )(q, k, v)
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
    )(q, k, v, segment_ids)


def _ring_per_device(q, k, v, segment_ids, scale, layout, engine):
    """Ring attention under `shard_map`: batch over data/fsdp, heads over tensor, the sequence over `sequence`."""
    mesh = jax.sharding.get_abstract_mesh()
    q_spec = logical_to_spec(("batch", "length", "heads", None), mesh.axis_names)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", None), mesh.axis_names)
    seg_spec = logical_to_spec(("batch", "length"), mesh.axis_names)
    body = lambda q, k, v, seg: ring.ring_attention_local(
        q,
        k,
        v,
        seg,
        axis_name="sequence",
        num_shards=mesh.shape["sequence"],
        layout=layout,
        causal=True,
        scale=scale,
        engine=engine,
    )[0]
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
    )(q, k, v, segment_ids)


def _sharded_cache_attention(q, k_cache, v_cache, q_slots, scale):
    """Attention of a few queries to a KV cache sharded along its length on `sequence`: each shard computes the
    softmax statistics of its part and the shards merge by LSE (max, then rescaled sums): no ring for one query."""
    mesh = jax.sharding.get_abstract_mesh()
    q_spec = logical_to_spec(("batch", None, "heads", None), mesh.axis_names)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", None), mesh.axis_names)
    slot_spec = logical_to_spec(("batch", None), mesh.axis_names)

    def body(q, k, v, q_slots):
        batch, n, heads, head_dim = q.shape
        kv_heads, block = k.shape[2], k.shape[1]
        k_slots = jax.lax.axis_index("sequence") * block + jnp.arange(block)
        qg = q.reshape(batch, n, kv_heads, heads // kv_heads, head_dim)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
        visible = k_slots[None, None, None, None, :] <= q_slots[:, None, None, :, None]
        s = jnp.where(visible, s, -jnp.inf)
        m_local = s.max(axis=-1)
        m = jax.lax.pmax(m_local, "sequence")  # a query always sees slot 0, so m is finite
        p = jnp.exp(s - m[..., None])
        l = jax.lax.psum(p.sum(axis=-1), "sequence")
        o = jax.lax.psum(jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(jnp.float32)), "sequence")
        out = o / jnp.moveaxis(l, -1, 1)[..., None]
        return out.reshape(q.shape).astype(q.dtype)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, slot_spec), out_specs=q_spec, check_vma=False
    )(q, k_cache, v_cache, q_slots)


class SelfAttention(nnx.Module):
    """Projections + RoPE + attention core. `__call__` is the parallel form, `step` the KV-cache form."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rope_theta: float,
        config: AttentionConfig,
        init_std: float,
        out_std: float,
        rngs: nnx.Rngs,
        qkv_bias: bool = False,
    ):
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.config = config
        self.wq = param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), normal(init_std))
        self.wk = param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), normal(init_std))
        self.wv = param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), normal(init_std))
        self.wo = param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"), normal(out_std))
        self.qkv_bias = qkv_bias
        if qkv_bias:  # Qwen-style biases: content-independent query/key parts let RoPE attend by offset alone
            zeros = lambda key, shape, dtype: jnp.zeros(shape, dtype)
            self.bq = param(rngs, (num_heads, head_dim), ("heads", "head_dim"), zeros)
            self.bk = param(rngs, (num_kv_heads, head_dim), ("kv_heads", "head_dim"), zeros)
            self.bv = param(rngs, (num_kv_heads, head_dim), ("kv_heads", "head_dim"), zeros)

    def _project(self, x: jax.Array, positions: jax.Array | None):
        """q, k, v [B, T, heads, head_dim]; RoPE at `positions` (None: not rotated)."""
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...])
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...])
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...])
        if self.qkv_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        if (
            self.rope_theta > 0 and positions is not None
        ):  # 0: no rotary embedding (a model with learned absolute positions)
            q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, constrain(v, ("batch", "length", "kv_heads", "head_dim"))

    def _output(self, out: jax.Array) -> jax.Array:
        return jnp.einsum("bthk,hkd->btd", out, self.wo[...])

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """x [B, T, d_model]; positions [B, T] (RoPE); segment_ids [B, T] or None. Causal within a segment."""
        q, k, v = self._project(x, positions)
        out = causal_attention(
            q,
            k,
            v,
            segment_ids,
            scale=self.head_dim**-0.5,
            impl=self.config.impl,
            ring_layout=self.config.ring_layout,
            ring_engine=self.config.ring_engine,
            mem_freq=self.config.mem_freq,
            landmark_impl=self.config.landmark_impl,
        )
        return self._output(out)

    def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
        shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def _cache_mask(self, q_slots: jax.Array, k_slots: jax.Array) -> jax.Array:
        """[B, n, S] bool: which cache slots each new query sees (subclasses narrow it, e.g. to a window)."""
        return causal_segment_mask(q_slots, k_slots, None, None)

    def step(
        self, x: jax.Array, positions: jax.Array, cache: dict[str, jax.Array], index: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Consumes x [B, n, d_model] at slots index..index+n-1 (positions [B, n]); returns (y, new cache)."""
        if self.config.impl == "landmark" and self.config.retrieval_top_k > 0:
            return self._retrieval_step(x, positions, cache, index)
        q, k, v = self._project(x, positions)
        k_cache = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
        batch, n = x.shape[:2]
        q_slots = jnp.broadcast_to(index + jnp.arange(n), (batch, n))
        if ring_shards(self.config) > 1 and k_cache.shape[1] % ring_shards(self.config) == 0:
            k_cache = constrain(k_cache, ("batch", "length", "kv_heads", "head_dim"))
            v_cache = constrain(v_cache, ("batch", "length", "kv_heads", "head_dim"))
            k_all, v_all = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
            out = _sharded_cache_attention(q, k_all, v_all, q_slots, self.head_dim**-0.5)
            return self._output(out), {"k": k_cache, "v": v_cache}
        if self.config.impl == "landmark":  # the grouped softmax over every cached block (no retrieval yet)
            w = landmark.weights(
                q, k_cache.astype(q.dtype), q_slots, mem_freq=self.config.mem_freq, scale=self.head_dim**-0.5
            )
            return self._output(landmark.attend(w, v_cache.astype(q.dtype)).astype(q.dtype)), {
                "k": k_cache,
                "v": v_cache,
            }
        k_slots = jnp.broadcast_to(jnp.arange(k_cache.shape[1]), (batch, k_cache.shape[1]))
        mask = self._cache_mask(q_slots, k_slots)
        out = dot_product_attention(
            q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask, scale=self.head_dim**-0.5
        )
        return self._output(out), {"k": k_cache, "v": v_cache}

    def _retrieval_step(self, x, positions, cache, index):
        """Landmark decode with top-k block retrieval: the cache holds keys before RoPE (they are re-rotated at
        the positions retrieval gives them, `landmark.retrieval_attention`)."""
        if self.config.offload_cache:
            return self._offloaded_retrieval_step(x, positions, cache, index)
        q_raw, k, v = self._project(x, None)
        k_cache = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
        rope = lambda t, p: apply_rope(t, p, self.rope_theta)
        q_slots = jnp.broadcast_to(index + jnp.arange(x.shape[1]), x.shape[:2])
        out = landmark.retrieval_attention(
            rope(q_raw, positions),
            q_raw,
            k_cache.astype(q_raw.dtype),
            v_cache.astype(q_raw.dtype),
            q_slots,
            mem_freq=self.config.mem_freq,
            scale=self.head_dim**-0.5,
            top_k=self.config.retrieval_top_k,
            mode=self.config.retrieval_mode,
            rope=rope,
        )
        return self._output(out), {"k": k_cache, "v": v_cache}

    def _offloaded_retrieval_step(self, x, positions, cache, index):
        """`_retrieval_step` with the host-offloaded cache (`landmark.offload`): the new keys and values are
        written in host memory, the selection reads the device's landmark keys, and only the blocks the chunk's
        queries retrieve (and their own blocks) are copied to the device (`landmark.fetch_blocks`)."""
        q_raw, k, v = self._project(x, None)
        cfg = self.config
        block = cfg.mem_freq + 1
        k_host, v_host = landmark.write_host(cache["k"], cache["v"], k, v, index)
        lm_keys = landmark.write_landmark_keys(cache["lm"], k, index, cfg.mem_freq)
        rope = lambda t, p: apply_rope(t, p, self.rope_theta)
        q_slots = jnp.broadcast_to(index + jnp.arange(x.shape[1]), x.shape[:2])
        chosen, usable, new_block = landmark.select_blocks(
            q_raw, lm_keys.astype(q_raw.dtype), q_slots, mem_freq=cfg.mem_freq, top_k=cfg.retrieval_top_k,
            mode=cfg.retrieval_mode, rope=rope,
        )  # fmt: skip
        kb, vb, where = landmark.fetch_blocks(
            k_host, v_host, chosen, usable, q_slots, block=block, mode=cfg.retrieval_mode
        )
        out = landmark.attend_blocks(
            rope(q_raw, positions), kb.astype(q_raw.dtype), vb.astype(q_raw.dtype), where, chosen, usable,
            new_block, q_slots, mem_freq=cfg.mem_freq, scale=self.head_dim**-0.5, rope=rope,
        )  # fmt: skip
        return self._output(out), {"k": k_host, "v": v_host, "lm": lm_keys}

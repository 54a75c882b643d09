"""HMT, the Hierarchical Memory Transformer (He et al., arXiv 2405.06067, NAACL 2025), around any lcjax backbone.

The input row is cut into segments of L = `segment_len` new tokens. For segment n (tokens H_n, embedded):

    sensory    the last k = `sensory_tokens` embedded tokens of H_{n-1} (none for the first segment)
    summary    S = FinalNorm(backbone([T ‖ window ‖ T]))[-1], T a learned vector, window j = round(L·sum_fraction)
               tokens: the paper's first j of H_n (`summary="paper"`), or, by default, the last j of H_{n-1}
               (`summary="causal"`, below)
    search     P_n = softmax((S W_q)(M W_k)ᵀ / √h) · M over the FIFO cache M of the last N = `cache_size` memory
               embeddings (no value or output projection; the same √h in training and streaming); P_1 = a learned
               memory token (empty cache)
    main pass  backbone([P_n ‖ sensory ‖ H_n ‖ P_n]) at ordinary positions 0..; the H_n slots give the logits and
               m_n = FinalNorm(h)[last slot] is pushed into M (the oldest entry drops out beyond N)

`stage=1` is the paper's first training stage: no summary pass and no search, P_n = m_{n-1} (RMT with sensory
memory); `stage=2` adds the search, started from a stage-1 run with `--init_from` (the parameters are the same).

Causal summary. In the paper the query of segment n reads the first half of segment n itself, so the logits of
H_n's first j positions depend, through the retrieval weights, on tokens after them (up to log2 N bits of the
future: enough to leak a byte-level target). The default takes the query from the last j tokens of the previous
segment instead, which keeps every logit causal and lets `decode` stream; `summary="paper"` is the paper's form
(the parallel form only; `decode` refuses it). The two coincide for the first two segments.

Gradients flow through everything the recurrence carries (the cache keeps its history, as the paper intends).
`bptt_depth = d > 0` truncates them: the row's segments form blocks of d, and what a block's first segment receives
(the cache, the sensory embeddings, the query) is used under `stop_gradient`, so a segment's loss reaches back at
most d − 1 segment boundaries (d = 1: none). The paper's code means to truncate but does not (its detach is a no-op).

Packed documents (`segment_ids`, numbered upward inside a row) stay isolated: a segment retrieves only memory
embeddings of its first token's document (else P_n is the learned memory token), sensory tokens of another document
are left out of the pass (moved in front of it under their own id, so attention masks them and recurrent backbones
restart after them), and the trailing slot carries the learned memory token and the last document's id when the
segment ends in a document it did not start with.

Streaming (`init_cache`/`decode`) holds the cache (N embeddings), the current segment's inputs and the backbone's
state for one segment: O(N + L) whatever the number of tokens consumed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers.params import normal, param
from lcjax.models.lm import CausalLM, ModelConfig
from lcjax.models.transformer import TransformerConfig
from lcjax.parallel.sharding import constrain

# The shared fields an HMT section mirrors from its backbone (the backbone's embedding, blocks and head are HMT's).
MIRRORED = ("vocab_size", "d_model", "num_layers", "norm_eps", "tie_embeddings", "logit_soft_cap", "scan_layers")
MIRRORED += ("remat",)
SUMMARY_MODES = ("causal", "paper")
LOSS_SEGMENTS = ("all", "last")


@dataclasses.dataclass(frozen=True)
class HMTConfig(ModelConfig):
    name: str = "hmt"
    backbone: ModelConfig = TransformerConfig()  # any registered model: `model.backbone.name`, then its own fields
    segment_len: int = 256  # L: new tokens per segment (the backbone sees L + sensory_tokens + 2 slots)
    sensory_tokens: int = 32  # k
    sum_fraction: float = 0.5  # the summary window: round(L * sum_fraction) tokens
    cache_size: int = 300  # N: memory embeddings kept for the search
    recall_dim: int = 0  # h: width of W_q and W_k (0: d_model)
    stage: int = 2  # 1: no memory search (P_n = m_{n-1}); 2: the search
    summary: str = "causal"  # causal | paper (module docstring)
    bptt_depth: int = 0  # > 0: truncated BPTT in blocks of this many segments (module docstring); 0: the whole row
    loss_segments: str = "all"  # all | last: train on every segment, or (the paper's) the last one only

    def __post_init__(self):
        for name in MIRRORED:
            default = HMTConfig.__dataclass_fields__[name].default
            mine, theirs = getattr(self, name), getattr(self.backbone, name)
            if mine != theirs and mine != default:
                raise ConfigError(f"model.{name}", f"={mine!r} differs from model.backbone.{name}={theirs!r}; set that")
            object.__setattr__(self, name, theirs)

    @property
    def summary_len(self) -> int:
        return max(1, round(self.segment_len * self.sum_fraction))

    @property
    def slots(self) -> int:
        """Length of the main pass: P ‖ sensory ‖ segment ‖ P."""
        return self.segment_len + self.sensory_tokens + 2

    @property
    def resolved_recall_dim(self) -> int:
        return self.recall_dim or self.d_model

    def validate(self, *, mesh: dict[str, int], seq_len: int, max_len: int) -> None:
        super().validate(mesh=mesh, seq_len=seq_len, max_len=max_len)
        if self.backbone.name == self.name:
            raise ConfigError("model.backbone.name", "HMT wraps another model; expected one that is not hmt")
        if self.segment_len <= 0:
            raise ConfigError("model.segment_len", f"must be > 0, got {self.segment_len}")
        for length, what in ((seq_len, "train.seq_len"), (max_len, "the longest input")):
            if length % self.segment_len:
                raise ConfigError(
                    "model.segment_len", f"={self.segment_len} must divide {what}={length} (whole segments per row)"
                )
        if not 0 <= self.sensory_tokens <= self.segment_len:
            raise ConfigError(
                "model.sensory_tokens", f"={self.sensory_tokens} must be in [0, model.segment_len={self.segment_len}]"
            )
        if not 0.0 < self.sum_fraction <= 1.0:
            raise ConfigError("model.sum_fraction", f"={self.sum_fraction} must be in (0, 1]")
        if self.cache_size < 1:
            raise ConfigError("model.cache_size", f"={self.cache_size} must be >= 1")
        if self.recall_dim < 0:
            raise ConfigError("model.recall_dim", f"={self.recall_dim} must be >= 0 (0: model.d_model)")
        if self.stage not in (1, 2):
            raise ConfigError("model.stage", f"={self.stage}; expected 1 (no memory search) or 2")
        if self.summary not in SUMMARY_MODES:
            raise ConfigError("model.summary", f"={self.summary!r}; expected one of {SUMMARY_MODES}")
        if self.bptt_depth < 0:
            raise ConfigError("model.bptt_depth", f"={self.bptt_depth} must be >= 0 (0: through the whole row)")
        if self.loss_segments not in LOSS_SEGMENTS:
            raise ConfigError("model.loss_segments", f"={self.loss_segments!r}; expected one of {LOSS_SEGMENTS}")
        if getattr(self.backbone, "position_embedding", "rope") != "rope":
            raise ConfigError(
                "model.backbone.position_embedding", "HMT's memory slots need relative positions; expected rope"
            )
        self.check_divisible("tensor", mesh, recall_dim=self.resolved_recall_dim)
        try:
            self.backbone.validate(mesh=mesh, seq_len=self.slots, max_len=self.slots)
        except ConfigError as e:
            field = e.field.removeprefix("model.")
            raise ConfigError(f"model.backbone.{field}", e.message.replace("model.", "model.backbone.")) from None

    def train_loss_mask(self, loss_mask: np.ndarray) -> np.ndarray:
        """`loss_segments="last"`: the training loss covers the last segment of each row only."""
        if self.loss_segments == "all":
            return loss_mask
        keep = np.zeros(loss_mask.shape[-1], loss_mask.dtype)
        keep[-self.segment_len :] = 1
        return loss_mask * keep

    def flops_per_token(self, seq_len: int) -> float:
        """The backbone's per-token FLOPs at the main pass's length, times the slots per token (main pass plus the
        summary pass in stage 2)."""
        del seq_len
        per_token = getattr(self.backbone, "flops_per_token", None)
        if per_token is None:
            return 0.0
        slots = self.slots + (self.summary_len + 2 if self.stage == 2 else 0)
        return per_token(self.slots) * slots / self.segment_len


def _fifo_push(array: jax.Array, new: jax.Array) -> jax.Array:
    """array [B, N, ...] with `new` [B, ...] appended at the end and the oldest entry (index 0) dropped."""
    return jnp.concatenate([array[:, 1:], new[:, None].astype(array.dtype)], axis=1)


class HMT(CausalLM):
    """Segment-level recurrence around `cfg.backbone` (module docstring). Parameters: `backbone/...` (the wrapped
    model's own names), `summary_token` T, `memory_token` (P_1), `w_q` and `w_k`."""

    sequence_parallel: ClassVar[bool] = False

    def __init__(self, cfg: HMTConfig, *, rngs: nnx.Rngs):
        from lcjax.models import registry  # the registry lists HMT itself

        self.cfg = cfg
        self.backbone = registry.model_class(cfg.backbone.name)(cfg.backbone, rngs=rngs)
        d, h = cfg.d_model, cfg.resolved_recall_dim
        std = jnp.std(self.backbone.embed[...])  # the paper: randn × the embedding table's std
        like_embedding = lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)
        self.summary_token = param(rngs, (d,), ("embed",), like_embedding)
        self.memory_token = param(rngs, (d,), ("embed",), like_embedding)
        self.w_q = param(rngs, (d, h), ("embed", "mlp"), normal(d**-0.5))
        self.w_k = param(rngs, (d, h), ("embed", "mlp"), normal(d**-0.5))

    # -- what the skeleton delegates to the backbone -------------------------------------------------------

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        return self.backbone.embed_tokens(tokens, positions)

    def final_hidden(self, h: jax.Array) -> jax.Array:
        return self.backbone.final_hidden(h)

    def head(self, h: jax.Array) -> jax.Array:
        return self.backbone.head(h)

    # -- pieces --------------------------------------------------------------------------------------------

    def _summaries(self, windows: jax.Array, ids: jax.Array) -> jax.Array:
        """windows [B, S, j, d] (S windows per row) with document ids [B, S, j] -> summaries [B, S, d]: the last
        slot of [T ‖ window ‖ T], the T's under the ids of the window's first and last tokens."""
        b, s, j, d = windows.shape
        t = jnp.broadcast_to(self.summary_token[...].astype(windows.dtype), (b, s, 1, d))
        x = jnp.concatenate([t, windows, t], axis=2).reshape(b * s, j + 2, d)
        seg = jnp.concatenate([ids[..., :1], ids, ids[..., -1:]], axis=2).reshape(b * s, j + 2)
        positions = jnp.broadcast_to(jnp.arange(j + 2), (b * s, j + 2))
        h, _ = self.backbone.hidden_embedded(x, positions=positions, segment_ids=seg)
        return self.final_hidden(h[:, -1]).reshape(b, s, d)

    def _retrieve(self, query: jax.Array, memory: jax.Array, usable: jax.Array) -> jax.Array:
        """P = softmax((q W_q)(M W_k)ᵀ / √h) M over the usable entries (memory [B, N, d], usable [B, N]); the
        learned memory token where none is usable. Stage 1: the newest usable entry (P = m_{n-1})."""
        dtype = memory.dtype
        fallback = jnp.broadcast_to(self.memory_token[...].astype(dtype), memory[:, 0].shape)
        if self.cfg.stage == 1:
            return jnp.where(usable[:, -1:], memory[:, -1], fallback)
        q = query.astype(dtype) @ self.w_q[...].astype(dtype)
        k = memory @ self.w_k[...].astype(dtype)
        scores = jnp.einsum("bh,bnh->bn", q, k).astype(jnp.promote_types(dtype, jnp.float32))  # softmax in fp32+
        scores = scores / math.sqrt(q.shape[-1])
        weights = jax.nn.softmax(jnp.where(usable, scores, -1e30), axis=-1)
        retrieved = jnp.einsum("bn,bnd->bd", weights.astype(dtype), memory)
        return jnp.where(jnp.any(usable, axis=-1, keepdims=True), retrieved, fallback)

    def _main_pass(self, retrieved, sensory, sensory_visible, sensory_ids, x, ids):
        """backbone([P ‖ sensory ‖ H ‖ P']) with the sensory slots that must stay unseen moved to the front under id
        −1. retrieved [B, d]; sensory [B, k, d] with sensory_visible, sensory_ids [B, k]; x [B, L, d] with ids
        [B, L]. -> (hidden of the H slots [B, L, d], memory embedding [B, d], aux)."""
        b, length, _ = x.shape
        k = sensory.shape[1]
        first, last = ids[:, :1], ids[:, -1:]
        trailing = jnp.where(last == first, retrieved, self.memory_token[...].astype(x.dtype))
        slots = jnp.concatenate([retrieved[:, None], sensory.astype(x.dtype), x, trailing[:, None]], axis=1)
        visible = jnp.concatenate([jnp.ones((b, 1), bool), sensory_visible, jnp.ones((b, length + 1), bool)], axis=1)
        seg = jnp.concatenate([first, jnp.where(sensory_visible, sensory_ids, -1), ids, last], axis=1)
        positions = jnp.where(visible, jnp.cumsum(visible, axis=1) - 1, 0).astype(jnp.int32)
        if k:  # invisible sensory slots first, the rest in order: recurrent backbones restart after them
            order = jnp.argsort(visible, axis=1, stable=True)
            take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
            slots, seg, positions = take(slots), take(seg), take(positions)
        h, aux = self.backbone.hidden_embedded(slots, positions=positions, segment_ids=seg)
        if k:
            back = jnp.argsort(order, axis=1)
            h = jnp.take_along_axis(h, back[..., None], axis=1)
        return h[:, 1 + k : 1 + k + length], self.final_hidden(h[:, -1]), aux

    def _truncated(self, tree: Any, index: jax.Array) -> Any:
        """`tree` (state carried into segment `index`) with its gradient stopped where a BPTT block starts."""
        depth = self.cfg.bptt_depth
        if depth == 0:
            return tree
        cut = index % depth == 0
        return jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a), tree)

    # -- the parallel form ---------------------------------------------------------------------------------

    def hidden_embedded(self, x, *, positions, segment_ids=None):
        """x [B, T, d] (T a multiple of segment_len) -> hidden [B, T, d], unrolled over the T / L segments.
        `positions` is not used: every pass numbers its own slots."""
        del positions
        cfg = self.cfg
        b, total, d = x.shape
        length, k, n = cfg.segment_len, cfg.sensory_tokens, cfg.cache_size
        if total % length:
            raise ValueError(f"HMT: the input length {total} is not a multiple of model.segment_len={length}")
        count = total // length
        ids = jnp.ones((b, total), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        x_seg = x.reshape(b, count, length, d)
        id_seg = ids.reshape(b, count, length)
        queries = jnp.zeros((b, count, d), x.dtype)
        if cfg.stage == 2:
            j = cfg.summary_len
            if cfg.summary == "paper":  # segment n's own first j tokens
                queries = self._summaries(x_seg[:, :, :j], id_seg[:, :, :j])
            elif count > 1:  # segment n - 1's last j tokens
                s = self._summaries(x_seg[:, :-1, length - j :], id_seg[:, :-1, length - j :])
                queries = jnp.concatenate([jnp.zeros((b, 1, d), x.dtype), s], axis=1)
        carried_query = cfg.summary == "causal"  # made from the previous segment

        def body(carry, inputs):
            memory, tags, born, sensory, sensory_ids, sensory_ok = carry
            x_n, ids_n, query, index = inputs
            first = ids_n[:, :1]
            usable = (born >= 0) & (tags == first)
            memory, sensory = self._truncated((memory, sensory), index)
            if carried_query:
                query = self._truncated(query, index)
            retrieved = self._retrieve(query, memory, usable)
            visible = sensory_ok & (sensory_ids == first)
            h, m, aux = self._main_pass(retrieved, sensory, visible, sensory_ids, x_n, ids_n)
            memory = constrain(_fifo_push(memory, m), ("batch", None, "embed"))
            tags, born = _fifo_push(tags, ids_n[:, -1]), _fifo_push(born, jnp.broadcast_to(index, (b,)))
            carry = (memory, tags, born, x_n[:, length - k :], ids_n[:, length - k :], jnp.ones_like(sensory_ok))
            return carry, (h, aux)

        carry = (
            jnp.zeros((b, n, d), x.dtype),
            jnp.zeros((b, n), jnp.int32),
            jnp.full((b, n), -1, jnp.int32),
            jnp.zeros((b, k, d), x.dtype),
            jnp.zeros((b, k), jnp.int32),
            jnp.zeros((b, k), bool),
        )
        xs = (jnp.moveaxis(x_seg, 1, 0), jnp.moveaxis(id_seg, 1, 0), jnp.moveaxis(queries, 1, 0), jnp.arange(count))
        _, (h, aux) = jax.lax.scan(body, carry, xs)
        h = jnp.moveaxis(h, 0, 1).reshape(b, total, d)
        return constrain(h, ("batch", "length", "embed")), jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)

    # -- the recurrent form --------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
        """The streaming state; `max_len` is not needed (the stream is unbounded). Its size is O(N + L):
        memory [B, N, d] with `filled` (entries made so far, at most N), the current segment's inputs [B, L, d],
        the sensory embeddings of the last segment, the next query, the retrieved P_n and the backbone's state for
        one segment's main pass."""
        del max_len
        cfg = self.cfg
        d, length = cfg.d_model, cfg.segment_len
        return {
            "index": jnp.zeros((), jnp.int32),
            "memory": jnp.zeros((batch_size, cfg.cache_size, d), dtype),
            "filled": jnp.zeros((), jnp.int32),
            "segment": jnp.zeros((batch_size, length, d), dtype),
            "sensory": jnp.zeros((batch_size, cfg.sensory_tokens, d), dtype),
            "query": jnp.zeros((batch_size, d), dtype),
            "retrieved": jnp.zeros((batch_size, d), dtype),
            "backbone": self.backbone.init_cache(batch_size, cfg.slots, dtype),
        }

    def _start_segment(self, cache: dict[str, Any]) -> dict[str, Any]:
        """At a segment's first token: P_n from the search, a fresh backbone state, and P_n ‖ sensory consumed."""
        cfg = self.cfg
        memory = cache["memory"]
        usable = jnp.broadcast_to(jnp.arange(cfg.cache_size) >= cfg.cache_size - cache["filled"], memory.shape[:2])
        retrieved = self._retrieve(cache["query"], memory, usable)
        fresh = self.backbone.init_cache(memory.shape[0], cfg.slots, memory.dtype)
        _, state = self.backbone.decode_embedded(retrieved[:, None], fresh)
        if cfg.sensory_tokens:
            state = jax.lax.cond(
                cache["filled"] > 0,
                lambda s: self.backbone.decode_embedded(cache["sensory"], s)[1],
                lambda s: s,
                state,
            )
        return {**cache, "retrieved": retrieved, "backbone": state}

    def _end_segment(self, cache: dict[str, Any]) -> dict[str, Any]:
        """After a segment's last token: P_n through the trailing slot gives m_n; the cache, the sensory
        embeddings and the next query follow."""
        cfg = self.cfg
        h, _ = self.backbone.decode_embedded(cache["retrieved"][:, None], cache["backbone"])
        segment = cache["segment"]
        new = {
            **cache,
            "memory": _fifo_push(cache["memory"], self.final_hidden(h[:, 0])),
            "filled": jnp.minimum(cache["filled"] + 1, cfg.cache_size),
            "sensory": segment[:, cfg.segment_len - cfg.sensory_tokens :],
        }
        if cfg.stage == 2:
            window = segment[:, None, cfg.segment_len - cfg.summary_len :]
            ids = jnp.ones(window.shape[:3], jnp.int32)
            new["query"] = self._summaries(window, ids)[:, 0].astype(segment.dtype)
        return new

    def decode_embedded(self, x: jax.Array, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """Embedded tokens x [B, n, d] (one document) after the cached ones, a token at a time: a segment starts
        with the search, ends with its memory embedding. -> (hidden [B, n, d], cache)."""
        cfg = self.cfg
        if cfg.summary != "causal":
            raise ValueError(
                "HMT decode needs model.summary='causal': with 'paper' a segment's memory depends on the segment's "
                "own first tokens, which a stream has not read yet"
            )
        length = cfg.segment_len

        def body(cache, x_t):
            at = cache["index"] % length
            cache = jax.lax.cond(at == 0, self._start_segment, lambda c: c, cache)
            h, state = self.backbone.decode_embedded(x_t[:, None].astype(cache["segment"].dtype), cache["backbone"])
            segment = jax.lax.dynamic_update_slice_in_dim(cache["segment"], x_t[:, None], at, axis=1)
            cache = {**cache, "backbone": state, "segment": segment, "index": cache["index"] + 1}
            cache = jax.lax.cond(at == length - 1, self._end_segment, lambda c: c, cache)
            return cache, h[:, 0]

        cache, h = jax.lax.scan(body, cache, jnp.moveaxis(x, 1, 0))
        return jnp.moveaxis(h, 0, 1), cache

    def decode(self, tokens: jax.Array, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        h, cache = self.decode_embedded(self.embed_tokens(tokens, None), cache)
        return self.head(h), cache

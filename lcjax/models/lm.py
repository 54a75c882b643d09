"""The causal-LM skeleton every model family stands on: shared config fields and checks, embedding, head and decode.

A family writes its config (a `ModelConfig` with its own fields and `validate`), its blocks, and a `CausalLM`
subclass that implements `hidden_embedded(x, ...)` (the parallel form up to the last block, on embedded inputs) and
`layer_cache` (one unit's decode state). The skeleton supplies the rest of the model protocol (`docs/design.md`):

    x_0 = E[tokens]                                    `embed_tokens` (a family may add to it)
    h, aux = model.hidden(batch)                       [batch, length, d_model]; = hidden_embedded(x_0, ...), the
                                                       parallel form on embeddings (what HMT runs its slots through)
    logits = model.head(h)                             cap · tanh(s · Norm(h) W / cap), W = Eᵀ when tied, else lm_head;
                                                       s = d_model^-1/2 for tied families with unit-variance
                                                       embeddings (`scale_tied_logits`), else 1; no cap when cap = 0
    logits, aux = model(batch)                         head(hidden(batch)), for notebooks and tests
    cache = model.init_cache(batch_size, max_len)      {"index": tokens consumed, "layers": per-unit state stacked}
    logits, cache = model.decode(tokens, cache)        any number of new tokens; == the parallel form

The train step, eval and generation apply the head themselves (at the sparse-logit positions where the train step
asks for them), so no model sees `logit_positions`. A block of any family is called as
`block(x, cache, *, positions, segment_ids, index)` and returns `(x, cache)`; `cache` is None in the parallel form.
Parameter names (`embed`, the family's final norm, `lm_head`) are part of the checkpoint format.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers.params import Initializer, param
from lcjax.layers.stack import REMAT_POLICIES
from lcjax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Fields every model section has; a family's config subclasses it (and may change the defaults)."""

    name: str = ""
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    logit_soft_cap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots

    # May the mesh shard the sequence (`mesh.sequence` > 1)? Only models whose mixers can run sequence-parallel.
    sequence_parallel: ClassVar[bool] = False

    def validate(self, *, mesh: dict[str, int], seq_len: int, max_len: int) -> None:
        """What every model must satisfy. `seq_len` is the training length, `max_len` the longest input the model
        will see (an eval with JRT-Prompt doubles it). Families extend this with their own checks."""
        del seq_len, max_len
        for name in ("vocab_size", "d_model", "num_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.vocab_size % mesh["tensor"]:
            raise ConfigError(
                "model.vocab_size", f"={self.vocab_size} must be divisible by mesh.tensor={mesh['tensor']}"
            )
        if self.d_model % mesh["fsdp"]:
            raise ConfigError("model.d_model", f"={self.d_model} must be divisible by mesh.fsdp={mesh['fsdp']}")
        if self.logit_soft_cap < 0:
            raise ConfigError("model.logit_soft_cap", f"must be >= 0 (0: no cap), got {self.logit_soft_cap}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if mesh["sequence"] > 1 and not self.sequence_parallel:
            raise ConfigError(
                "mesh.sequence",
                f"={mesh['sequence']}: model {self.name} is recurrent over the sequence; use mesh.sequence=1",
            )

    def train_loss_mask(self, loss_mask: Any) -> Any:
        """The training loss mask of a host batch ([batch, length] numpy) as this model trains on it; the eval sets
        keep theirs. A family that trains on part of each row (HMT's last segment) narrows it here."""
        return loss_mask

    def train_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A host training batch ([batch, length] numpy fields) as this model trains on it: by default the loss
        mask of `train_loss_mask`. A family with an objective of its own on part of the row (JRT's masked-token
        loss on its encoder's tokens) rewrites the inputs, targets and weights here, as a pure function of the
        batch (so the batch at step k stays a function of the seed and k)."""
        return {**batch, "loss_mask": self.train_loss_mask(batch["loss_mask"])}

    def eval_loss_mask(self, batch: dict[str, Any]) -> Any:
        """The loss mask of a host text eval batch as this model is scored on it: a family whose parallel form
        reads some targets (JRT's encoder reads its tokens both ways) drops those positions. Default: unchanged."""
        return batch["loss_mask"]

    def check_divisible(self, mesh_axis: str, mesh: dict[str, int], **widths: int) -> None:
        """Each `model.<name>` (a field, or the width a field gives) must be divisible by mesh axis `mesh_axis`."""
        size = mesh[mesh_axis]
        for name, width in widths.items():
            if width % size:
                said = f"={width}" if getattr(self, name, None) == width else f" gives {width}, which"
                raise ConfigError(f"model.{name}", f"{said} must be divisible by mesh.{mesh_axis}={size}")


def stacked(tree: Any, units: int) -> Any:
    """A per-unit cache pytree stacked along a leading `layers` axis of `units` (zeros, as `LayerStack` scans)."""
    return jax.tree.map(lambda a: jnp.zeros((units, *a.shape), a.dtype), tree)


class CausalLM(nnx.Module):
    """Embedding, head and decode shared by every family (module docstring)."""

    # The attribute name of the final norm: part of each family's checkpoint format.
    final_norm_name: ClassVar[str] = "final_norm"
    # Tied logits scaled by d_model^-1/2: for embeddings initialized with unit variance.
    scale_tied_logits: ClassVar[bool] = False
    # The parallel form reads the batch's `prefix_mask` (1: the bidirectional prefix; Birdie, JRT): `hidden` passes
    # it to `hidden_embedded` as `prefix_mask=`.
    reads_prefix_mask: ClassVar[bool] = False

    def _init_embedding(self, cfg: ModelConfig, rngs: nnx.Rngs, init: Initializer) -> None:
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), init)

    def _init_head(self, final_norm: nnx.Module, rngs: nnx.Rngs, init: Initializer) -> None:
        """The final norm and, when embeddings are untied, `lm_head` [d_model, vocab] drawn with `init`."""
        cfg = self.cfg
        setattr(self, self.final_norm_name, final_norm)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), init)

    # -- the parallel form ----------------------------------------------------------------------------------

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens [B, T] at `positions` [B, T] -> x_0 [B, T, d_model]."""
        del positions
        return constrain(jnp.take(self.embed[...], tokens, axis=0), ("batch", "length", "embed"))

    def hidden(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The parallel form up to the last block: batch (`lcjax.data.batch.MODEL_KEYS`) -> ([B, T, d_model], aux)."""
        positions = parallel_positions(batch)
        x = self.embed_tokens(batch["inputs"], positions)
        extra = {"prefix_mask": batch.get("prefix_mask")} if self.reads_prefix_mask else {}
        return self.hidden_embedded(x, positions=positions, segment_ids=batch.get("segment_ids"), **extra)

    def hidden_embedded(
        self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The parallel form on embedded inputs x [B, T, d_model]: what `embed_tokens` gives, or vectors of a
        wrapper's own (HMT's memory slots). `positions` [B, T] as in the batch; `segment_ids` [B, T] or None (one
        document). -> (hidden [B, T, d_model], aux). Every family implements this."""
        raise NotImplementedError

    def final_hidden(self, h: jax.Array) -> jax.Array:
        """The final norm of hidden states h [..., d_model]: the last layer's output as the head reads it (what
        HF calls `hidden_states[-1]`; HMT's summaries and memory embeddings)."""
        return getattr(self, self.final_norm_name)(h)

    def head(self, h: jax.Array) -> jax.Array:
        """Hidden states [..., d_model] -> logits [..., vocab] (module docstring)."""
        cfg = self.cfg
        x = self.final_hidden(h)
        w = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = x @ w.astype(x.dtype)
        if cfg.tie_embeddings and self.scale_tied_logits:
            logits = logits * cfg.d_model**-0.5
        if cfg.logit_soft_cap > 0:
            logits = cfg.logit_soft_cap * jnp.tanh(logits.astype(jnp.float32) / cfg.logit_soft_cap)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits [B, T, V] and aux of the parallel form."""
        h, aux = self.hidden(batch)
        return self.head(h), aux

    # -- the recurrent form ---------------------------------------------------------------------------------

    def layer_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> Any:
        """One unit's decode state (unstacked) for `max_len` tokens; the skeleton stacks it along `layers`."""
        raise NotImplementedError

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
        """{"index": 0, "layers": `layer_cache` stacked along `layers`}. Recurrent families ignore `max_len`;
        KV caches hold `max_len` tokens (the most `decode` will be given)."""
        one = self.layer_cache(batch_size, max_len, dtype)
        return {"index": jnp.zeros((), jnp.int32), "layers": stacked(one, self.layers.num_layers)}

    def decode_embedded(self, x: jax.Array, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """Runs embedded inputs x [B, n, d_model] at slots index..index+n-1 through the blocks' recurrent form."""
        index = cache["index"]
        positions = jnp.broadcast_to(index + jnp.arange(x.shape[1]), x.shape[:2])
        x, layers = self.layers(x, cache["layers"], positions=positions, index=index)
        return x, {"index": index + x.shape[1], "layers": layers}

    def decode(self, tokens: jax.Array, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """Recurrent form: consumes tokens [B, n] after the cached ones; returns (logits [B, n, V], cache)."""
        positions = jnp.broadcast_to(cache["index"] + jnp.arange(tokens.shape[1]), tokens.shape)
        h, cache = self.decode_embedded(self.embed_tokens(tokens, positions), cache)
        return self.head(h), cache


def parallel_positions(batch: dict[str, jax.Array]) -> jax.Array:
    """`batch["positions"]`, else 0..T−1 for every row."""
    tokens = batch["inputs"]
    positions = batch.get("positions")
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions

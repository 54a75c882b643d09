"""Titans (arXiv 2501.00663): language models around the neural long-term memory of `lcjax.layers.neural_memory`.

lmm/mag/mal start from x_0 = P ‖ E[tokens] with N_p learned persistent tokens P (Eq. 19), mac from E[tokens];
every variant ends with logits = RMSNorm(x) E^T on the token positions, and has an MLP sublayer
x <- x + MLP(RMSNorm(x)) in each block.
The mixing sublayer, by `model.variant`:
  lmm  "Titans (LMM)": x <- x + LMM(RMSNorm(x)).
  mag  memory as a gate (Fig. 3b): h = RMSNorm(x), y = SWA(h), m = LMM(h),
       x <- x + (RMSNorm_y(y) ⊙ σ(RMSNorm_m(m))) W_g   (the paper's "normalize with learnable vector-valued weights,
       then a non-linearity"; the output projection W_g keeps the residual branch small at init).
  mal  memory as a layer: x <- x + LMM(RMSNorm(x));  x <- x + SWA(RMSNorm(x)).
  mac  memory as context (Fig. 3a, Eq. 21–25), over segments S of `model.segment` tokens, with h = RMSNorm(x):
       r = RMSNorm_r(M*_(s−1)(q(h)))   read the memory as the previous segment left it, one read per token;
       y = Attn(P ‖ r ‖ h)              causal attention inside the segment only, N_p learned tokens P per layer;
       m = LMM(y)                       store the attention output (keys/values from y) and read it back per token
                                        (`model.mac_store="residual"`: LMM(h + y), see below);
       x <- x + (RMSNorm_y(y) ⊙ σ(RMSNorm_m(m))) W_g,  the gate o = y ⊗ M*(y) as for mag.
       The read r_j uses token j's query, so it sits at token j's time: token i attends to r_j and h_j for j <= i
       (the paper's causal mask over P ‖ r ‖ S would otherwise let token i see x_j, j > i, through r_j). Likewise
       M*(y_i) is the per-token read after storing y_(<=i), not the memory after the whole segment. The reads are
       the literal Eq. 21 (one per token: option A of reference §1.4), and persistent tokens are per layer and per
       segment, so mac has no sequence-level prefix.
       The paper does not say whether y_t in M_t = M_(t−1)(y_t) includes the block's input. Literally (the default)
       the memory sees only what attention passes on: at initialization a blur of the segment, so it stores little
       until attention has learned to carry tokens through, and on passkey mac-tiny stays at chance for thousands
       of steps (docs/benchmarks.md). `mac_store="residual"` stores h + y instead (attention's output projection
       starts small, so the memory starts out as LMM's over the tokens).
SWA is causal sliding-window attention (RoPE on the slot index, grouped-query heads) in which a token sees the
`model.window` latest slots of its own document and the persistent prefix at any distance (Fig. 3b):
`lcjax.layers.window_attention`, whose core `model.attention.impl` chooses (xla, or pallas: the flash kernel). mac's
segment attention is the jnp (xla) core with an explicit mask.

The recurrent form (`init_cache`/`decode`) carries each layer's memory state (and for mag/mal its key/value
cache, sized N_p + max_len; for mac the segment's keys/values and the memory at the segment start); `init_cache`
already holds the persistent tokens, so decoding a sequence in any pieces gives the logits of the parallel form.
mac decodes one token at a time inside each layer (a prefill of n tokens is n sequential steps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.layers.attention import AttentionConfig
from lcjax.layers.mlp import SwiGLU
from lcjax.layers.neural_memory import GATES as MEMORY_GATES
from lcjax.layers.neural_memory import IMPLS as MEMORY_IMPLS
from lcjax.layers.neural_memory import MOMENTA as MEMORY_MOMENTA
from lcjax.layers.neural_memory import NeuralMemory, memory_widths
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal, param
from lcjax.layers.stack import LayerStack
from lcjax.layers.window_attention import IMPLS as WINDOW_IMPLS
from lcjax.layers.window_attention import WindowAttention
from lcjax.models.lm import CausalLM, ModelConfig
from lcjax.models.titans_mac import mac_parallel, mac_step
from lcjax.parallel.sharding import constrain

VARIANTS = ("lmm", "mac", "mag", "mal")
ATTENTION_VARIANTS = ("mac", "mag", "mal")
MAC_STORES = ("attention", "residual")


@dataclasses.dataclass(frozen=True)
class TitansConfig(ModelConfig):
    name: str = "titans"
    variant: str = "lmm"
    mlp_dim: int = 384
    memory_heads: int = 4
    memory_head_dim: int = 0  # 0: d_model // memory_heads
    # Layers of the memory MLP (1: a linear matrix memory). Depth >= 2 needs memory_max_grad_norm (below; why:
    # docs/titans_memory_stability.md).
    memory_depth: int = 1
    memory_expansion: int = 2  # hidden width of a deep memory, in multiples of memory_head_dim
    chunk_size: int = 16  # tokens per chunk: gradients inside a chunk are taken at its start memory
    conv_size: int = 4
    # θ = max_lr * sigmoid(...). 0: 1 / chunk_size (the bound: docs/titans_memory_stability.md).
    memory_max_lr: float = 0.0
    # The memory's momentum: "paper" (Eq. 10), "ema" (θ (1 − η) steps) or "chunk" (one momentum step per chunk): see
    # `NeuralMemory` and docs/titans_memory_stability.md.
    memory_momentum: str = "paper"
    # > 0: each token's memory gradient (all layers, Frobenius norm) is clipped to this norm before the momentum. Not
    # in the paper (0), but depth >= 2 needs it.
    memory_max_grad_norm: float = 0.0
    # The memory's chunk scan: xla (lax.scan) | pallas (the fused kernel of kernels_pallas/titans_memory.py: Mosaic on
    # TPU, Triton on GPU, interpret mode on CPU) | auto (the kernel on TPU/GPU, xla on CPU) | interpret.
    memory_impl: str = "xla"
    memory_gates: str = "token"  # θ, η, α per token | per chunk (those of the chunk's first token; paper §3.2)
    # Packed documents restart the memory at M_0 (XLA scan and kernel alike); False: the memory runs across them.
    memory_resets: bool = True
    # Learned persistent-memory tokens: prepended to the sequence (lmm/mag/mal), or per layer to every segment's
    # attention context (mac).
    num_persistent: int = 4
    segment: int = 32  # mac: tokens per segment (attention context = persistent ‖ retrieved ‖ segment)
    # mac: what the memory stores (and its gate read uses as queries): "attention", the attention output y (the
    # paper's Eq. 24 read literally), or "residual", h + y, the attention block's output with its (normalized)
    # input, so the memory sees the tokens themselves from the first step (see the module docstring).
    mac_store: str = "attention"
    # mag/mal sliding-window attention: the `window` latest slots of the document, plus the persistent prefix
    window: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    init_std: float = 0.02
    embed_init_std: float = 1.0
    # mag/mal: the window attention's core, xla | pallas (the flash kernel with a sliding window, merged with the
    # persistent prefix by log-sum-exp); mac's segment attention is xla only; lmm does not attend.
    attention: AttentionConfig = AttentionConfig()

    @property
    def resolved_head_dim(self) -> int:
        return self.memory_head_dim or self.d_model // self.memory_heads

    @property
    def resolved_max_lr(self) -> float:
        return self.memory_max_lr or 1.0 / self.chunk_size

    def validate(self, *, mesh: dict[str, int], seq_len: int, max_len: int) -> None:
        super().validate(mesh=mesh, seq_len=seq_len, max_len=max_len)
        if self.variant not in VARIANTS:
            raise ConfigError("model.variant", f"={self.variant!r}; expected one of {list(VARIANTS)}")
        positive = ("mlp_dim", "memory_heads", "memory_depth", "memory_expansion", "chunk_size", "conv_size")
        for name in positive + ("window", "num_heads", "num_kv_heads", "segment"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.variant in ATTENTION_VARIANTS:
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    "model.num_kv_heads", f"={self.num_kv_heads} must divide model.num_heads={self.num_heads}"
                )
            if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
                raise ConfigError(
                    "model.num_heads", f"={self.num_heads} must divide model.d_model={self.d_model} into even heads"
                )
            self.check_divisible("tensor", mesh, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)
        if self.variant == "lmm":
            if self.attention != AttentionConfig():
                raise ConfigError(
                    "model.attention.impl",
                    f"={self.attention.impl!r}: Titans lmm does not attend; leave model.attention at its defaults",
                )
        else:  # mac's segment attention has the xla core only
            impls = ("xla",) if self.variant == "mac" else WINDOW_IMPLS
            self.attention.validate(mesh=mesh, seq_len=seq_len, impls=impls)
        if self.num_persistent < 0:
            raise ConfigError("model.num_persistent", f"must be >= 0, got {self.num_persistent}")
        if not self.memory_head_dim and self.d_model % self.memory_heads:
            raise ConfigError("model.memory_heads", f"={self.memory_heads} must divide model.d_model={self.d_model}")
        if self.memory_max_grad_norm < 0:
            raise ConfigError(
                "model.memory_max_grad_norm", f"must be >= 0 (0: no clipping), got {self.memory_max_grad_norm}"
            )
        if self.memory_max_lr < 0:
            raise ConfigError("model.memory_max_lr", f"must be >= 0 (0: 1/chunk_size), got {self.memory_max_lr}")
        if self.memory_depth > 1 and not self.memory_max_grad_norm:
            logging.warning(
                "model.memory_depth=%d without model.memory_max_grad_norm: a deep memory's unclipped updates diverge "
                "(NaN losses) within ~100 steps on text; 1.0 trains stably (docs/benchmarks.md)",
                self.memory_depth,
            )
        self.check_divisible("tensor", mesh, memory_heads=self.memory_heads, mlp_dim=self.mlp_dim)
        choices = {"memory_impl": list(MEMORY_IMPLS), "mac_store": list(MAC_STORES), "memory_gates": list(MEMORY_GATES)}
        choices |= {"memory_momentum": list(MEMORY_MOMENTA)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}", f"={getattr(self, name)!r}; expected one of {allowed}")

    def memory_widths(self) -> list[int]:
        return memory_widths(self.resolved_head_dim, self.memory_depth, self.memory_expansion)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (an estimate): 6 * matmul params, plus per layer and head the memory's
        gradient at the chunk start, its update and its read (~8 |W|) and the dual-form chunk mixing
        (~4 * chunk_size * sum of widths), times 3 for forward + backward; mag/mal add the windowed attention."""
        hd, heads = self.resolved_head_dim, self.memory_heads
        widths = self.memory_widths()
        memory_size = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
        mixer = self.d_model * heads * hd * 5 + self.d_model * heads * 3
        matmul_params = self.num_layers * (mixer + 3 * self.d_model * self.mlp_dim) + self.d_model * self.vocab_size
        memory = self.num_layers * heads * (8 * memory_size + 4 * self.chunk_size * sum(widths))
        attention = 0
        if self.variant in ATTENTION_VARIANTS:
            head_dim = self.d_model // self.num_heads
            matmul_params += self.num_layers * self.d_model * head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
            if self.variant in ("mag", "mac"):
                matmul_params += self.num_layers * self.d_model * self.d_model
            seen = min(self.window, seq_len) + self.num_persistent  # keys per query (at most)
            if self.variant == "mac":  # a query sees ~segment/2 tokens and as many reads, each read at ~2 |W|
                seen = min(self.segment, seq_len) + self.num_persistent
                matmul_params += self.num_layers * 3 * self.d_model * heads * hd  # read: query, gate, output
                memory += self.num_layers * heads * 2 * memory_size
            attention = self.num_layers * 4 * self.num_heads * head_dim * seen
        return 6 * matmul_params + 3 * memory + 3 * attention


class Block(nnx.Module):
    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.variant = cfg.variant
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mixer = NeuralMemory(
            cfg.d_model,
            num_heads=cfg.memory_heads,
            head_dim=cfg.resolved_head_dim,
            depth=cfg.memory_depth,
            expansion=cfg.memory_expansion,
            chunk_size=cfg.chunk_size,
            conv_size=cfg.conv_size,
            max_lr=cfg.resolved_max_lr,
            init_std=cfg.init_std,
            out_std=out_std,
            rngs=rngs,
            impl=cfg.memory_impl,
            gates=cfg.memory_gates,
            document_resets=cfg.memory_resets,
            max_grad_norm=cfg.memory_max_grad_norm,
            momentum=cfg.memory_momentum,
        )
        if cfg.variant in ATTENTION_VARIANTS:  # mac's attention is segment-local: the window does not apply
            self.attn = WindowAttention(
                cfg.d_model,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.d_model // cfg.num_heads,
                window=cfg.window,
                prefix=cfg.num_persistent,
                rope_theta=cfg.rope_theta,
                config=cfg.attention,
                init_std=cfg.init_std,
                out_std=out_std,
                rngs=rngs,
            )
        if cfg.variant == "mal":
            self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        if cfg.variant in ("mag", "mac"):
            self.gate_norm_attn = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
            self.gate_norm_memory = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
            self.gate_out = param(rngs, (cfg.d_model, cfg.d_model), ("mlp", "embed"), normal(out_std))
        if cfg.variant == "mac":
            self.segment, self.num_persistent = cfg.segment, cfg.num_persistent
            self.store_residual = cfg.mac_store == "residual"
            self.read_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
            self.persistent = param(
                rngs, (cfg.num_persistent, cfg.d_model), (None, "embed"), normal(cfg.embed_init_std)
            )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, init_std=cfg.init_std, out_std=out_std, rngs=rngs)

    def _memory(self, h, cache, segment_ids):
        if cache is None:
            return self.mixer(h, segment_ids), None
        return self.mixer.step(h, cache)

    def _attention(self, h, cache, positions, segment_ids, index):
        if cache is None:
            return self.attn(h, positions, segment_ids), None
        return self.attn.step(h, positions, cache, index)

    def _gate(self, y, m):
        gated = self.gate_norm_attn(y) * jax.nn.sigmoid(self.gate_norm_memory(m))
        return gated @ self.gate_out[...].astype(gated.dtype)

    def __call__(self, x, cache, *, segment_ids=None, positions=None, index=None):
        if self.variant == "mac":
            h = self.mixer_norm(x)
            y, m, cache = mac_parallel(self, h, segment_ids) if cache is None else mac_step(self, h, cache, index)
            x = x + self._gate(y, m)
            x = x + self.mlp(self.mlp_norm(x))
            return constrain(x, ("batch", "length", "embed")), cache
        if cache is None or self.variant == "lmm":
            memory_cache, attn_cache = cache, None
        else:
            memory_cache, attn_cache = cache["memory"], cache["attn"]
        if self.variant == "lmm":
            h, memory_cache = self._memory(self.mixer_norm(x), memory_cache, segment_ids)
            x = x + h
        elif self.variant == "mal":
            h, memory_cache = self._memory(self.mixer_norm(x), memory_cache, segment_ids)
            x = x + h
            h, attn_cache = self._attention(self.attn_norm(x), attn_cache, positions, segment_ids, index)
            x = x + h
        else:  # mag
            h = self.mixer_norm(x)
            m, memory_cache = self._memory(h, memory_cache, segment_ids)
            y, attn_cache = self._attention(h, attn_cache, positions, segment_ids, index)
            x = x + self._gate(y, m)
        if cache is not None:
            cache = memory_cache if self.variant == "lmm" else {"memory": memory_cache, "attn": attn_cache}
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "embed")), cache


class Titans(CausalLM):
    scale_tied_logits = True

    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        self._init_embedding(cfg, rngs, normal(cfg.embed_init_std))
        # mac keeps its persistent tokens in every layer (prepended to each segment's attention context)
        self.prefix = 0 if cfg.variant == "mac" else cfg.num_persistent
        if self.prefix:
            self.persistent = param(rngs, (self.prefix, cfg.d_model), (None, "embed"), normal(cfg.embed_init_std))
        self.layers = LayerStack(
            lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs=rngs, scan=cfg.scan_layers, remat=cfg.remat
        )
        self._init_head(RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs), rngs, normal(cfg.init_std))

    def _with_persistent(self, x: jax.Array) -> jax.Array:
        if not self.prefix:
            return x
        prefix = jnp.broadcast_to(self.persistent[...].astype(x.dtype), (x.shape[0], *self.persistent.shape))
        return jnp.concatenate([prefix, x], axis=1)

    def hidden_embedded(self, x, *, positions, segment_ids=None):
        """Parallel form on embedded inputs x [B, T, d_model]; segment_ids or None. -> hidden [B, T, d_model] at the
        token positions. Positions are the slot indices of P ‖ tokens (`positions` is not used)."""
        del positions
        prefix = self.prefix
        if segment_ids is not None and prefix:  # the persistent tokens belong to the first document of the row
            segment_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], prefix, axis=1), segment_ids], axis=1)
        x = self._with_persistent(x)
        slots = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        x, _ = self.layers(x, None, segment_ids=segment_ids, positions=slots)
        return x[:, prefix:], {}

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
        """Per-layer memory state (stacked along `layers`) after the persistent tokens; for mag/mal a key/value
        cache of N_p + `max_len` slots (`max_len` is then required: the most tokens `decode` will be given); for
        mac the memory as the current segment found it, the read queries' conv history and the segment's keys and
        values (no `max_len` needed)."""
        cfg, blocks = self.cfg, self.layers.blocks
        layers = blocks.mixer.init_cache(batch_size)  # parameters stacked on `layers`: so is this
        if cfg.variant == "mac":
            attn, mixer = blocks.attn, blocks.mixer
            kv = jnp.zeros((cfg.num_layers, batch_size, 2 * cfg.segment, attn.num_kv_heads, attn.head_dim), dtype)
            conv = jnp.zeros((cfg.num_layers, batch_size, cfg.conv_size - 1, 1, mixer.num_heads, mixer.head_dim))
            read = {"conv": conv, "weights": layers["weights"]}
            return {
                "index": jnp.zeros((), jnp.int32),
                "layers": {"memory": layers, "read": read, "attn": {"k": kv, "v": kv}},
            }
        if cfg.variant in ATTENTION_VARIANTS:
            if max_len <= 0:
                raise ValueError(f"init_cache: Titans variant {cfg.variant!r} needs max_len > 0, got {max_len}")
            attn = blocks.attn
            shape = (cfg.num_layers, batch_size, cfg.num_persistent + max_len, attn.num_kv_heads)
            kv = jnp.zeros((*shape, attn.head_dim), dtype)
            layers = {"memory": layers, "attn": {"k": kv, "v": kv}}
        cache = {"index": jnp.zeros((), jnp.int32), "layers": layers}
        if self.prefix:
            empty = jnp.zeros((batch_size, 0, cfg.d_model), self.embed[...].dtype)
            cache = self.decode_embedded(self._with_persistent(empty), cache)[1]
        return cache

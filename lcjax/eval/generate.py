"""Sampling through the recurrent form: prefill the prompt with `decode`, then one token per step.

Greedy when temperature == 0; otherwise softmax(logits / temperature) restricted to the smallest set of tokens
whose probability mass reaches `top_p` (nucleus sampling).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def sample_token(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """logits [B, V] -> token ids [B]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_before < top_p  # the most likely token is always kept
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "prefix_len"))
def generate(
    graphdef: Any,
    params: Any,
    prompt: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    prefix_len: int | None = None,
) -> jax.Array:
    """prompt [B, P] int32 -> new tokens [B, max_new_tokens]. `prefix_len`: the prompt's first tokens read
    bidirectionally by the model's `prefill` (Birdie), None: the prompt is causal."""
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt.shape
    if prefix_len is None:
        cache = model.init_cache(batch, prompt_len + max_new_tokens, jnp.float32)
        logits, cache = model.decode(prompt, cache)
    else:
        logits, cache = model.prefill(prompt, prefix_len)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_token(logits[:, -1], keys[0], temperature=temperature, top_p=top_p)

    def body(carry, step_key):
        token, cache = carry
        logits, cache = model.decode(token[:, None], cache)
        next_token = sample_token(logits[:, -1], step_key, temperature=temperature, top_p=top_p)
        return (next_token, cache), token

    (last, _), tokens = jax.lax.scan(body, (first, cache), keys[1:])
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)

"""AdamW with linear warmup, cosine decay and global-norm clipping; no weight decay on norm scales and
biases, also when a scanned layer stack gives them a leading `layers` axis."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
    lr = train_config.learning_rate
    warmup = train_config.warmup_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(train_config.steps, warmup + 1),
        end_value=lr * train_config.min_lr_ratio,
    )


def decay_mask_from_axes(axes_tree) -> object:
    """Weight decay only for weight matrices: >= 2 logical axes besides `layers`, one of them `embed` (so norm
    scales and per-head biases are spared)."""
    return jax.tree.map(
        lambda axes: sum(a != "layers" for a in axes) >= 2 and "embed" in axes,
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def make_optimizer(train_config, decay_mask=None) -> optax.GradientTransformation:
    """`decay_mask`: a tree of bools like the params (see `decay_mask_from_axes`); default: ndim >= 2."""
    if decay_mask is None:
        decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(
        learning_rate_schedule(train_config),
        b1=train_config.b1,
        b2=train_config.b2,
        weight_decay=train_config.weight_decay,
        mask=decay_mask,
    )
    if train_config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adamw)
    return adamw

"""Birdie's reward-driven controller (Blouir et al. 2024, §3.3 and A.1; `reference/xlstm_ssm_birdie_jrt.md` §3.4): a
bandit over the objective mixture (`lcjax.data.birdie_objectives`) whose reward model predicts, from the history of
(mixture, per-arm validation loss), how much each arm's loss will fall under a proposed mixture.

At every evaluation step (the paper's 10, 50, 250, 500, 1000, 1500, 2000 and every 1000 after, times
`objectives.schedule_scale`) each arm's loss is measured on fixed held-out rows of that arm alone (from the validation
split). Between two evaluations with losses L_o, L_n the reward of each arm is, with Δ = (L_n − L_o)/L_o,
S = √(L_o L_n) and r = e,

    R = clip(−100 r tanh(r S Δ³), −1, 1)          (positive when the loss falls: the code's sign; `reward="paper"`
                                                   uses the paper's printed Δ = (L_o − L_n)/L_o)

Until the paper's step 250 the mixture stays uniform (the evaluations there seed the history). From then on, at each
evaluation the reward model is fitted (`reward_model_steps` AdamW steps on the whole history) and the next mixture is
chosen: `num_candidates` mixtures drawn uniformly and normalised, each appended to the history with the current losses
and scored by the predicted rewards, each arm's scaled by 1/(arms in its family) and summed (every family weighs the
same), and the `top_k` best averaged. That mixture is applied until the next evaluation (`MixtureSchedule.set_from`).

Reward models: "gated_ssm" (the paper's) reads the history as a sequence of [action_t ; loss before t], each half
RMS-normalised on its own, through `reward_model_layers` causal Gated-SSM blocks of width `reward_model_width`, and
predicts the per-arm rewards at every step; "mlp" (the code's agent) reads only the current pair through as many
GELU layers. The paper does not say whether the reward model carries over between evaluations; here it is fitted
afresh (from a key of the run's seed and the evaluation's step) on the whole history at each one, so the controller's
state is its history, which the checkpoint holds (`state` / `load`): a resumed run refits the same model and picks
the same mixtures, bit for bit. The code's exploration schedule and Pareto candidates are not implemented.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lcjax.data import birdie_objectives as bo
from lcjax.layers import rglru
from lcjax.layers.norms import RMSNorm
from lcjax.layers.params import normal, param, zeros

PAPER_STEPS = (10, 50, 250, 500, 1000, 1500, 2000)  # then every 1000
UNIFORM_UNTIL = 250  # the controller takes over at this (paper) step
HELD_OUT_SEED = 2_000_003  # the held-out rows of each arm: validation text, seed train.seed + this


def evaluation_steps(total_steps: int, scale: float) -> list[int]:
    """The evaluation steps up to `total_steps`: the paper's, times `scale`, at least 1 and distinct."""
    steps, paper = set(), list(PAPER_STEPS)
    while paper[-1] * scale <= total_steps:
        paper.append(paper[-1] + 1000)
    for s in paper:
        step = max(1, int(round(s * scale)))
        if step <= total_steps:
            steps.add(step)
    return sorted(steps)


def reward(old: np.ndarray, new: np.ndarray, convention: str = "code") -> np.ndarray:
    """Per-arm reward of the losses moving from `old` to `new` (module docstring)."""
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    delta = (new - old) / old
    if convention == "paper":
        delta = -delta
    r = math.e
    return np.clip(-100.0 * r * np.tanh(r * np.sqrt(old * new) * delta**3), -1.0, 1.0)


class RewardModel(nnx.Module):
    """[batch, time, 2K] (action ; losses) -> [batch, time, K] predicted rewards."""

    def __init__(self, num_arms: int, kind: str, width: int, layers: int, rngs: nnx.Rngs):
        self.kind = kind
        self.norm_action = RMSNorm(num_arms, rngs=rngs)
        self.norm_loss = RMSNorm(num_arms, rngs=rngs)
        self.w_in = param(rngs, (2 * num_arms, width), (None, None), normal(1 / math.sqrt(2 * num_arms)))
        if kind == "gated_ssm":
            self.norms = nnx.List([RMSNorm(width, rngs=rngs) for _ in range(layers)])
            self.blocks = nnx.List([rglru.GatedSSM(width, width, rngs) for _ in range(layers)])
        else:
            self.hidden = nnx.List(
                [param(rngs, (width, width), (None, None), normal(1 / math.sqrt(width))) for _ in range(layers)]
            )
            self.biases = nnx.List([param(rngs, (width,), (None,), zeros) for _ in range(layers)])
        self.w_out = param(rngs, (width, num_arms), (None, None), normal(1 / math.sqrt(width)))

    def __call__(self, x: jax.Array) -> jax.Array:
        k = x.shape[-1] // 2
        h = jnp.concatenate([self.norm_action(x[..., :k]), self.norm_loss(x[..., k:])], axis=-1) @ self.w_in[...]
        if self.kind == "gated_ssm":
            for norm, block in zip(self.norms, self.blocks, strict=True):
                h = h + block(norm(h))[0]
        else:
            for w, b in zip(self.hidden, self.biases, strict=True):
                h = jax.nn.gelu(h @ w[...] + b[...])
        return h @ self.w_out[...]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _fit_and_score(num_arms, kind, width, layers, steps, lr, key, inputs, targets, mask, candidates, length):
    """Fits a fresh reward model on the history (inputs [1, T, 2K], targets [1, T, K], mask [1, T]) and returns the
    predicted rewards [N, K] of each candidate [N, 2K] appended at position `length` (a sequence model reads the
    history before it; the MLP reads the candidate alone)."""
    model = RewardModel(num_arms, kind, width, layers, nnx.Rngs(key))
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(lr, weight_decay=0.1)
    opt_state = optimizer.init(params)

    def loss_fn(params):
        predicted = nnx.merge(graphdef, params)(inputs)
        error = jnp.mean((predicted - targets) ** 2, axis=-1)
        return jnp.sum(error * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt_state), None, length=steps)
    model = nnx.merge(graphdef, params)
    if kind == "gated_ssm":
        sequences = jnp.broadcast_to(inputs, (candidates.shape[0], *inputs.shape[1:]))
        sequences = jax.lax.dynamic_update_slice_in_dim(sequences, candidates[:, None, :], length, axis=1)
        predicted = jax.lax.dynamic_index_in_dim(model(sequences), length, axis=1, keepdims=False)
    else:
        predicted = model(candidates[:, None, :])[:, 0]
    return predicted, losses[-1]


class Controller:
    """The controller of one run: its evaluation steps, its history, and the schedule it writes."""

    def __init__(self, config, arms: list[bo.Arm], schedule: bo.MixtureSchedule, *, seed: int, total_steps: int):
        self.cfg, self.arms, self.schedule, self.seed = config, arms, schedule, seed
        self.steps = evaluation_steps(total_steps, config.schedule_scale)
        self.takeover = max(1, int(round(UNIFORM_UNTIL * config.schedule_scale)))
        families = [a.family for a in arms]
        self.arm_scale = np.array([1.0 / families.count(f) for f in families])
        self.eval_at: list[int] = []  # the steps evaluated so far
        self.losses: list[np.ndarray] = []  # per-arm losses at those steps
        self.actions: list[np.ndarray] = []  # the mixture in force up to each of those steps

    def due(self, step: int) -> bool:
        return step in self.steps and (not self.eval_at or step > self.eval_at[-1])

    def update(self, step: int, losses: np.ndarray) -> dict[str, float]:
        """Records the per-arm `losses` at `step` and, from the takeover on, sets the next mixture from `step`.
        Returns the figures to log."""
        losses = np.asarray(losses, np.float64)
        self.actions.append(self.schedule.at(step - 1))
        self.eval_at.append(step)
        self.losses.append(losses)
        log = {f"val_loss/{a.key}": float(v) for a, v in zip(self.arms, losses, strict=True)}
        if len(self.losses) > 1:
            rewards = reward(self.losses[-2], losses, self.cfg.reward)
            log["reward"] = float(np.sum(rewards * self.arm_scale))
        if step >= self.takeover and len(self.losses) > 1:
            action, fit_loss = self.choose(step)
            self.schedule.set_from(step, action)
            log["reward_model_loss"] = fit_loss
        log |= {f"mixture/{a.key}": float(w) for a, w in zip(self.arms, self.schedule.at(step), strict=True)}
        return log

    def choose(self, step: int) -> tuple[np.ndarray, float]:
        """The next mixture: the mean of the `top_k` best of `num_candidates` random ones under a reward model fitted
        on the history."""
        cfg, k = self.cfg, len(self.arms)
        # history: x_t = [action over (eval t-1, eval t] ; losses at eval t-1], target the rewards seen at eval t
        xs = [np.concatenate([a, lo]) for a, lo in zip(self.actions[1:], self.losses[:-1], strict=True)]
        ys = [reward(lo, ln, cfg.reward) for lo, ln in zip(self.losses[:-1], self.losses[1:], strict=True)]
        length = len(xs)
        capacity = max(8, 1 << length.bit_length())  # room for the candidate; a few shapes, a few compiles
        inputs = np.zeros((1, capacity, 2 * k), np.float32)
        targets = np.zeros((1, capacity, k), np.float32)
        mask = np.zeros((1, capacity), np.float32)
        inputs[0, :length], targets[0, :length], mask[0, :length] = xs, ys, 1.0
        rng = np.random.default_rng((self.seed, step))
        mixtures = rng.uniform(size=(cfg.num_candidates, k))
        mixtures /= mixtures.sum(axis=1, keepdims=True)
        candidates = np.concatenate([mixtures, np.broadcast_to(self.losses[-1], mixtures.shape)], axis=1)
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        predicted, fit_loss = _fit_and_score(
            k,
            cfg.reward_model,
            cfg.reward_model_width,
            cfg.reward_model_layers,
            cfg.reward_model_steps,
            cfg.reward_model_lr,
            key,
            jnp.asarray(inputs),
            jnp.asarray(targets),
            jnp.asarray(mask),
            jnp.asarray(candidates, jnp.float32),
            length,
        )
        scores = np.asarray(predicted, np.float64) @ self.arm_scale
        best = np.argsort(-scores, kind="stable")[: cfg.top_k]
        action = mixtures[best].mean(axis=0)
        return action / action.sum(), float(fit_loss)

    def state(self) -> dict[str, Any]:
        """The controller's state as JSON-able lists (floats round-trip exactly)."""
        return {
            "eval_at": list(self.eval_at),
            "losses": [v.tolist() for v in self.losses],
            "actions": [v.tolist() for v in self.actions],
            "schedule_steps": list(self.schedule.steps),
            "schedule_weights": [w.tolist() for w in self.schedule.weights],
        }

    def load(self, state: dict[str, Any]) -> None:
        self.eval_at = [int(s) for s in state["eval_at"]]
        self.losses = [np.asarray(v, np.float64) for v in state["losses"]]
        self.actions = [np.asarray(v, np.float64) for v in state["actions"]]
        self.schedule.load({"steps": state["schedule_steps"], "weights": state["schedule_weights"]})


def held_out_batches(rows: bo.ObjectiveRows, arm: int, *, batch_size: int, num_batches: int, seed: int, shard):
    """Fixed held-out batches of one arm alone (this process's rows of each)."""
    made = rows.arm_rows(arm, batch_size * num_batches, seed)
    p, count = shard
    batches = []
    for b in range(num_batches):
        mine = made[b * batch_size : (b + 1) * batch_size][p::count]
        batches.append(bo.stack_rows(mine))
    return batches

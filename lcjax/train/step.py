"""The train and eval steps: pure functions of (state, batch), jitted once with explicit shardings.

State is a dict {"params": pure dict of fp32 arrays, "opt_state": optax state, "step": int32, "skipped_steps":
int32}. The model is rebuilt inside the step with `nnx.merge(graphdef, params)`, with params cast to the compute
dtype first, so gradients flow back to the fp32 master copy. Loss = mean over `loss_mask` of -log p(target) +
z_loss_weight * mean(logsumexp^2) + every `aux` entry whose name ends in "loss". With `grad_accum_steps = A` the
batch is split into A micro-batches scanned with `lax.scan`; token sums are divided by the whole batch's token
count, so the update equals the one-batch update. A step whose gradients are not finite leaves params and
optimizer state untouched, reports `skipped=1` and increments `skipped_steps`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax import models
from lcjax.data.batch import model_inputs
from lcjax.errors import ConfigError
from lcjax.layers.params import logical_axes
from lcjax.models.lm import CausalLM
from lcjax.parallel.sharding import constrain, named_sharding
from lcjax.train.optimizer import decay_mask_from_axes, learning_rate_schedule, make_optimizer

BATCH_AXES = ("batch", "length")


def token_losses(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both [B, T] float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def lm_logits(model: CausalLM, batch: dict[str, jax.Array], logit_positions: jax.Array | None = None):
    """(logits, aux) of `model` on `batch`: the backbone's hidden states, taken at `logit_positions` [B, K] when
    given ([B, K, V] logits), through the model's head. The one place the train and eval steps apply a head."""
    h, aux = model.hidden(model_inputs(batch))
    if logit_positions is not None:
        h = jnp.take_along_axis(h, logit_positions[..., None], axis=1)
    return model.head(h), aux


def at_labels(batch: dict[str, jax.Array], n: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`train.sparse_logits = n`: (positions [B, n], each row's labelled (`loss_mask`) positions in order and then
    unlabelled ones; the batch with `targets`/`loss_mask` taken there). The head then runs only at those positions;
    the loss is unchanged as long as no row has more than n labels (`check_sparse_logits`)."""
    unlabelled = batch["loss_mask"] <= 0
    index = jnp.argsort(unlabelled, axis=1, stable=True)[:, :n].astype(jnp.int32)

    def take(a):
        return jnp.take_along_axis(a, index, axis=1)

    return index, {**batch, "targets": take(batch["targets"]), "loss_mask": take(batch["loss_mask"])}


def check_sparse_logits(local_batch: dict[str, Any], n: int) -> None:
    """Host-side guard for `at_labels`: a row with more than n labels would lose some, so that is an error."""
    most = int((np.asarray(local_batch["loss_mask"]) > 0).sum(axis=1).max(initial=0))
    if most > n:
        raise ConfigError(
            "train.sparse_logits",
            f"={n} but a training row has {most} labelled positions; set it to at least the most labels a row "
            "holds (MQAR: task.num_kv_pairs), or 0 for logits at every position",
        )


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything the jitted steps close over: model graph, optimizer, config, mesh and shardings."""

    config: Any
    mesh: Mesh
    graphdef: Any
    optimizer: optax.GradientTransformation
    state_shardings: Any
    batch_sharding: NamedSharding
    abstract_state: Any

    @classmethod
    def create(cls, config, mesh: Mesh) -> Trainer:
        abstract_model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
        graphdef, model_state = nnx.split(abstract_model)
        non_params = [p for p, v in nnx.to_flat_state(model_state) if not isinstance(v, nnx.Param)]
        if non_params:
            raise TypeError(f"models may hold only nnx.Param state, found {non_params}")
        optimizer = make_optimizer(config.train, decay_mask_from_axes(logical_axes(abstract_model)))
        param_shardings = jax.tree.map(
            lambda axes: named_sharding(mesh, axes),
            logical_axes(abstract_model),
            is_leaf=lambda x: isinstance(x, tuple),
        )
        abstract_params = nnx.to_pure_dict(model_state)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_shardings = optax.tree_map_params(
            optimizer, lambda _, s: s, abstract_opt, param_shardings, transform_non_params=lambda _: replicated
        )
        state_shardings = {
            "params": param_shardings,
            "opt_state": opt_shardings,
            "step": replicated,
            "skipped_steps": replicated,
        }
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        abstract_state = {"params": abstract_params, "opt_state": abstract_opt, "step": scalar, "skipped_steps": scalar}
        abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings
        )
        return cls(config, mesh, graphdef, optimizer, state_shardings, named_sharding(mesh, BATCH_AXES), abstract_state)

    # -- state ---------------------------------------------------------------------------------------------

    def _init(self, key: jax.Array) -> dict[str, Any]:
        params = nnx.to_pure_dict(nnx.state(models.build(self.config, nnx.Rngs(params=key))))
        zero = jnp.zeros((), jnp.int32)
        return {"params": params, "opt_state": self.optimizer.init(params), "step": zero, "skipped_steps": zero}

    def init_state(self, seed: int) -> dict[str, Any]:
        """Initial state, created directly with its shardings (no unsharded copy)."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init, out_shardings=self.state_shardings)(jax.random.key(seed))

    def model(self, params: Any) -> CausalLM:
        return nnx.merge(self.graphdef, params)

    # -- steps ---------------------------------------------------------------------------------------------

    def _compute_params(self, params: Any) -> Any:
        dtype = jnp.dtype(self.config.train.compute_dtype)
        return jax.tree.map(lambda p: p.astype(dtype), params)

    def _objective(self, params: Any, batch: dict[str, jax.Array], total_tokens: jax.Array, num_micro: int):
        """This (micro-)batch's share of the batch objective, and its metric sums."""
        positions = None
        if self.config.train.sparse_logits:
            positions, batch = at_labels(batch, self.config.train.sparse_logits)
        logits, aux = lm_logits(self.model(self._compute_params(params)), batch, positions)
        nll, log_z = token_losses(logits, batch)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll_sum = (nll * mask).sum()
        z_sum = self.config.train.z_loss_weight * (jnp.square(log_z) * mask).sum()
        aux_losses = sum((v for k, v in aux.items() if k.endswith("loss")), jnp.zeros(()))
        objective = (nll_sum + z_sum) / total_tokens + aux_losses / num_micro
        return objective, {"nll_sum": nll_sum, "z_sum": z_sum, "tokens": mask.sum(), **aux}

    def _loss(self, params: Any, batch: dict[str, jax.Array]):
        """(objective, metrics) of one batch, no accumulation: for tests and analysis."""
        total = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        objective, sums = self._objective(params, batch, total, 1)
        return objective, _finish_metrics(sums, total, 1)

    def _grads(self, params: Any, batch: dict[str, jax.Array]):
        total = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        grad_fn = jax.grad(self._objective, has_aux=True)
        accum = self.config.train.grad_accum_steps
        if accum == 1:
            grads, sums = grad_fn(params, batch, total, 1)
            return grads, _finish_metrics(sums, total, 1)

        def split(x):  # micro-batch a takes rows a, a+A, ...: each device keeps its own rows
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return constrain(x, (None, *BATCH_AXES, *(None,) * (x.ndim - 3)))

        def body(carry, micro_batch):
            grads, sums = grad_fn(params, micro_batch, total, accum)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        micro_batches = jax.tree.map(split, batch)
        shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), total, accum)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        (grads, sums), _ = jax.lax.scan(body, zeros, micro_batches)
        return grads, _finish_metrics(sums, total, accum)

    def _train_step(self, state: dict[str, Any], batch: dict[str, jax.Array]):
        params, opt_state, step = state["params"], state["opt_state"], state["step"]
        grads, metrics = self._grads(params, batch)
        nan_step = self.config.train.debug_nan_step
        if nan_step >= 0:  # debug switch: poison the gradients of one step to exercise the skip path
            grads = jax.tree.map(lambda g: jnp.where(step == nan_step, jnp.nan, g), grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm)
        updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = 1 - finite.astype(jnp.int32)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt_state, opt_state),
            "step": step + 1,
            "skipped_steps": state["skipped_steps"] + skipped,
        }
        metrics |= {
            "grad_norm": grad_norm,
            "learning_rate": learning_rate_schedule(self.config.train)(step),
            "skipped": skipped.astype(jnp.float32),
            "skipped_steps": new_state["skipped_steps"].astype(jnp.float32),
        }
        return new_state, metrics

    def _eval_step(self, params: Any, batch: dict[str, jax.Array]):
        logits, _ = lm_logits(self.model(self._compute_params(params)), batch)
        return eval_sums(logits, batch)

    def jit_train_step(self) -> Callable:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        return _under_mesh(step, self.mesh)

    def jit_eval_step(self) -> Callable:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        step = jax.jit(
            self._eval_step,
            in_shardings=(self.state_shardings["params"], self.batch_sharding),
            out_shardings=replicated,
        )
        return _under_mesh(step, self.mesh)

    def device_batch(self, local_batch: dict[str, Any]) -> dict[str, jax.Array]:
        """Assembles global arrays from this process's rows (all rows when there is one process)."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}


def eval_sums(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums for evaluation over the `loss_mask` targets of a batch (all replicated, so any host can read them).

    nll_sum, tokens; correct_tokens (argmax == target); answers / answers_correct: an answer is a maximal run of
    consecutive masked targets in a row (an MQAR query, a passkey's digits), correct when every token of it is, which
    under teacher forcing is exactly "greedy decoding reproduces the answer"; examples / examples_correct: rows with
    any masked target, correct when all are; examples_nonfinite: such rows with an inf/NaN logit at a masked
    target (a diverging model; counted wrong, and reported apart so that it is not read as a wrong answer);
    bucket_nll / bucket_tokens [n]: by position p (`positions`, else the index), bucket 0 holds p = 0 and bucket
    b >= 1 holds 2^(b-1) <= p < 2^b.
    """
    nll, _ = token_losses(logits, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    on = mask > 0
    correct = jnp.argmax(logits, axis=-1) == batch["targets"]
    wrong = jnp.where(on & ~correct, 1.0, 0.0)
    length = on.shape[1]
    starts = on & ~jnp.pad(on[:, :-1], ((0, 0), (1, 0)))
    answer_id = jnp.where(on, jnp.cumsum(starts, axis=1), 0)
    wrong_per_answer = jax.vmap(lambda w, a: jax.ops.segment_sum(w, a, num_segments=length // 2 + 2))(wrong, answer_id)
    answers = starts.sum().astype(jnp.float32)
    rows = on.any(axis=1)
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length), on.shape)
    num_buckets = length.bit_length() + 1
    bucket = sum((positions >= 2**k).astype(jnp.int32) for k in range(num_buckets - 1))
    return {
        "nll_sum": (nll * mask).sum(),
        "tokens": mask.sum(),
        "correct_tokens": (correct * mask).sum(),
        "answers": answers,
        "answers_correct": answers - (wrong_per_answer[:, 1:] > 0).sum().astype(jnp.float32),
        "examples": rows.sum().astype(jnp.float32),
        "examples_correct": (rows & (wrong.sum(axis=1) == 0)).sum().astype(jnp.float32),
        "examples_nonfinite": (on & ~jnp.isfinite(logits).all(axis=-1)).any(axis=1).sum().astype(jnp.float32),
        "bucket_nll": jax.ops.segment_sum((nll * mask).ravel(), bucket.ravel(), num_segments=num_buckets),
        "bucket_tokens": jax.ops.segment_sum(mask.ravel(), bucket.ravel(), num_segments=num_buckets),
    }


def _finish_metrics(sums: dict[str, jax.Array], total_tokens: jax.Array, num_micro: int) -> dict[str, jax.Array]:
    metrics = {"loss": sums.pop("nll_sum") / total_tokens, "z_loss": sums.pop("z_sum") / total_tokens}
    metrics["tokens"] = sums.pop("tokens")
    return metrics | {k: v / num_micro for k, v in sums.items()}


def _under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Calls `fn` with `mesh` as the current mesh, so logical activation constraints resolve against it."""

    def wrapped(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    wrapped.lower = lambda *args: _lower(fn, mesh, *args)
    return wrapped


def _lower(fn, mesh, *args):
    with jax.set_mesh(mesh):
        return fn.lower(*args)

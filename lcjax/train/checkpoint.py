"""Checkpoints: the only module that imports orbax.

One composite checkpoint per step under `<workdir>/checkpoints/<step>`: `state` (params, optimizer state, step,
skipped-step count) and `meta` (resolved config, model name, layer layout, parameter layout, the data position,
lcjax version). The data pipeline is a pure function of (seed, step), so the data-iterator state is that pair,
recorded in `meta` and checked on resume. Saves are async and commit atomically (orbax writes to a temporary
directory and renames it), so a run killed mid-save leaves the previous checkpoint as the latest.

Restores go against an abstract state carrying the *current* shardings, so a checkpoint saved on one mesh loads
onto another. A checkpoint of another architecture is refused with the mismatch named; an unreadable one is
reported and the previous one is used.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

import lcjax
from lcjax.errors import ConfigError


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_every: int = 0, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        policies = [preservation.LatestN(max_to_keep)]
        if keep_every > 0:
            policies.append(preservation.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=True,
            preservation_policy=preservation.AnyPreservationPolicy(policies),
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    @classmethod
    def for_workdir(cls, workdir: str, **kwargs) -> Checkpointer:
        return cls(os.path.join(workdir, "checkpoints"), **kwargs)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        meta = {**meta, "lcjax_version": lcjax.__version__, "step": int(step)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, expected_meta: dict[str, Any], *, partial: bool = False):
        """Restores the newest readable checkpoint into the shardings of `abstract_state`.

        `expected_meta` holds the current run's "model" and "parameter_layout"; a checkpoint that disagrees is
        refused with a ConfigError naming the difference. A checkpoint that cannot be read is skipped with a
        warning in favour of the previous one. `partial=True` restores only the subtree given (params only).
        Returns (state, meta, step).
        """
        steps = self.steps()
        if not steps:
            raise ConfigError("checkpoint", f"no checkpoint in {self.directory}")
        bad = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                logging.warning(
                    "checkpoint %d in %s is unreadable (%s); trying the previous one",
                    step,
                    self.directory,
                    _first_line(e),
                )
                bad.append(step)
                continue
            check_compatible(meta, expected_meta, f"{self.directory}/{step}")
            try:
                args = ocp.args.Composite(state=_restore_args(abstract_state, partial))
                state = self._manager.restore(step, args=args)["state"]
            except Exception as e:
                logging.warning(
                    "checkpoint %d in %s is corrupt (%s); trying the previous one", step, self.directory, _first_line(e)
                )
                bad.append(step)
                continue
            if bad and not self.read_only:
                self._set_aside(bad)
            return state, meta, step
        raise ConfigError("checkpoint", f"no valid checkpoint in {self.directory} (tried steps {steps})")

    def _set_aside(self, steps: list[int]) -> None:
        """Renames damaged checkpoints to `corrupt-<step>` (kept for inspection) so the run can save those steps."""
        if jax.process_index() == 0:
            for step in steps:
                os.rename(os.path.join(self.directory, str(step)), os.path.join(self.directory, f"corrupt-{step}"))
                logging.warning("moved damaged checkpoint %d to %s/corrupt-%d", step, self.directory, step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("lcjax_checkpoint_set_aside")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _restore_args(abstract_state: Any, partial: bool) -> ocp.args.CheckpointArgs:
    if not partial:
        return ocp.args.StandardRestore(abstract_state)
    shardings = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_state)
    return ocp.args.PyTreeRestore(item=abstract_state, restore_args=shardings, partial_restore=True)


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Refuses a checkpoint of another architecture or parameter layout, naming the first difference."""
    if meta.get("model") != expected["model"]:
        raise ConfigError("checkpoint", f"{where} holds model {meta.get('model')!r}, this run is {expected['model']!r}")
    saved, current = meta.get("parameter_layout", {}), expected["parameter_layout"]
    for path in sorted(set(saved) | set(current)):
        if saved.get(path) != current.get(path):
            raise ConfigError(
                "checkpoint",
                f"{where}: parameter {path} has shape {saved.get(path)} in the checkpoint, {current.get(path)} "
                "in this run (a different model size or layout)",
            )


def parameter_layout(abstract_params: Any) -> dict[str, list[int]]:
    """{"path/to/param": shape}: the checkpoint's parameter layout, recorded in its metadata."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape) for path, leaf in flat}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"

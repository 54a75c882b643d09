"""Checkpoints: the only module that imports orbax.

One composite checkpoint per step under `<workdir>/checkpoints/<step>`: `state` (params, optimizer state, step)
and `meta` (resolved config, model name, parameter layout, lcjax version). Saves are async; restores go against
an abstract state carrying the current shardings, so a checkpoint loads onto whatever mesh the run has now.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

import lcjax


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only, enable_async_checkpointing=True
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        meta = {**meta, "lcjax_version": lcjax.__version__, "step": int(step)}
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores `step` (default: latest) into the shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def parameter_layout(abstract_params: Any) -> dict[str, list[int]]:
    """{"path/to/param": shape}: the checkpoint's parameter layout, recorded in its metadata."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape) for path, leaf in flat}

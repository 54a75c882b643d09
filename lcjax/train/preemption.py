"""Preemption: SIGTERM (or Ctrl-C) asks the loop to checkpoint at the next step boundary and exit cleanly.

On one process the signal handler sets a flag. With several processes every host must stop at the same step,
so the decision comes from jax's preemption sync point (the coordination service relays SIGTERM to all hosts).
"""

from __future__ import annotations

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._requested = False
        self._previous = {}

    def __enter__(self) -> PreemptionWatcher:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if not self._requested:
            logging.warning("received %s: will checkpoint and stop after the current step", signal.Signals(signum).name)
        self._requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self._requested or multihost_utils.reached_preemption_sync_point(step)
        return self._requested

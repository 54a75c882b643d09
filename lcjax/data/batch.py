"""The one batch schema: the fields a batch may carry, which go to the device and which reach the model.

Every device field is `[batch, length]`. Sources and data transforms may add host-only fields (a task's context
span, ...): they stay on the host. A field a transform adds for the model (Birdie's and JRT's `prefix_mask`) must
be listed in `MODEL_KEYS`, or it would never arrive; `tests/data/test_pipeline.py` follows one from a transform
through the pipeline and the train step into a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# What models read (`CausalLM.hidden`): tokens, and optionally positions (restarting per packed document),
# document ids, and the bidirectional prefix (1 where a position belongs to the prefix read non-causally).
MODEL_KEYS = ("inputs", "positions", "segment_ids", "prefix_mask")
# What the loss and the metrics read.
TARGET_KEYS = ("targets", "loss_mask")
DEVICE_KEYS = MODEL_KEYS + TARGET_KEYS
DTYPES = {
    "inputs": np.int32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "prefix_mask": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
}
# The fields every pipeline batch has (text rows and synthetic tasks alike); `prefix_mask` only where a transform
# makes one.
PIPELINE_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def device_fields(example: dict[str, Any]) -> dict[str, Any]:
    """The fields of `example` that go to the device (host-only metadata dropped)."""
    return {k: v for k, v in example.items() if k in DEVICE_KEYS}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The fields of `batch` that a model reads."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}

"""Run outputs: `metrics.jsonl` (one JSON object per logged step or eval), TensorBoard events, progress lines.

Only process 0 writes. MFU is estimated as model FLOPs/s over the devices' peak bf16 FLOPs/s (dense), from a
table of known chips or `train.peak_flops_per_device`; on CPU the peak is a nominal figure and MFU is indicative.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
from absl import logging

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}
CPU_NOMINAL_FLOPS_PER_CORE = 50e9


def peak_flops_per_device(override: float = 0.0) -> float:
    if override > 0:
        return override
    device = jax.devices()[0]
    for prefix, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return flops
    if device.platform == "cpu":
        return CPU_NOMINAL_FLOPS_PER_CORE * (os.cpu_count() or 1) / jax.local_device_count()
    return float("nan")


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class Progress:
    """Throughput and time left over the window since the last report."""

    def __init__(self, total_steps: int, start_step: int, tokens_per_step: int, flops_per_token: float):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_device() * jax.device_count()
        self._last_time = time.perf_counter()
        self._last_step = start_step

    def pause(self, seconds: float) -> None:
        """Excludes time spent outside training (eval, checkpointing) from throughput."""
        self._last_time += seconds

    def report(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        seconds = max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        tokens_per_second = steps * self.tokens_per_step / seconds
        mfu = tokens_per_second * self.flops_per_token / self.peak
        eta = (self.total_steps - step) * seconds / steps
        logging.info(
            "step %d/%d  loss %.4f  %.0f tok/s  MFU %.1f%%  %.3f s/step  ETA %s",
            step,
            self.total_steps,
            metrics["loss"],
            tokens_per_second,
            100 * mfu,
            seconds / steps,
            _hms(eta),
        )
        return {"tokens_per_second": tokens_per_second, "mfu": mfu, "seconds_per_step": seconds / steps}


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def bits_per_byte(nll_per_token: float, tokens: float, num_bytes: float) -> float:
    return nll_per_token * tokens / (math.log(2) * num_bytes)


def summarize(metrics_list: list[dict[str, Any]]) -> dict[str, float]:
    """Reduces a logging window's per-step scalars (fetched to host once): counts are summed, running totals
    keep their last value, everything else is averaged."""
    host = jax.device_get(metrics_list)
    summed, last = ("skipped", "tokens"), ("skipped_steps",)
    reduced = {}
    for k in host[0]:
        values = [float(m[k]) for m in host]
        reduced[k] = sum(values) if k in summed else values[-1] if k in last else sum(values) / len(values)
    return reduced


def read_metrics(workdir: str, split: str = "train") -> dict[int, dict[str, float]]:
    """{step: record} from `<workdir>/metrics.jsonl`; after a resume the re-logged step replaces the earlier one."""
    records = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record["split"] == split:
                    records[record["step"]] = record
    return records


class _QuietLibraries(logging.logging.Filter):
    """Drops INFO chatter from orbax and grain so lcjax's progress lines stay readable."""

    def filter(self, record) -> bool:
        noisy = ("/orbax/", "/grain/")
        return record.levelno >= logging.logging.WARNING or not any(n in record.pathname for n in noisy)


def quiet_library_logs() -> None:
    """Keeps orbax's and grain's INFO lines out of the absl log (warnings and errors still show)."""
    logging.get_absl_handler().addFilter(_QuietLibraries())

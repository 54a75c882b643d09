"""Training-step throughput: tokens/s and estimated MFU of a config on the current backend.

    python scripts/bench_train.py --config=configs/transformer.py:tiny --steps=20 --out=bench_train.json

Times `--steps` jitted train steps (after `--warmup` steps that include compilation) on random tokens, so data
loading is excluded. Prints a table and writes JSON.
"""

import json
import os
import platform
import sys
import time

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lcjax.config import from_config_dict  # noqa: E402
from lcjax.errors import ConfigError  # noqa: E402
from lcjax.parallel.mesh import make_mesh  # noqa: E402
from lcjax.train.metrics import peak_flops_per_device  # noqa: E402
from lcjax.train.step import Trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/transformer.py:tiny", "Config and preset.", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation included).")
_OUT = flags.DEFINE_string("out", "bench_train.json", "JSON output path.")


def random_batch(config, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, t = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, config.model.vocab_size, (b, t + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((b, t), np.float32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": np.ones((b, t), np.int32),
    }


def main(argv):
    del argv
    try:
        config = from_config_dict(_CONFIG.value).validate(jax.device_count())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    trainer = Trainer.create(config, make_mesh(config.mesh.shape(jax.device_count())))
    state = trainer.init_state(config.train.seed)
    step = trainer.jit_train_step()
    batches = [trainer.device_batch(random_batch(config, i)) for i in range(4)]
    started = time.perf_counter()
    for i in range(_WARMUP.value):
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics)
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(_STEPS.value):
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - started) / _STEPS.value
    tokens = config.train.batch_size * config.train.seq_len
    flops_per_token = config.model.flops_per_token(config.train.seq_len)
    peak = peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count()
    result = {
        "config": _CONFIG.value.model.name,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "batch_size": config.train.batch_size,
        "seq_len": config.train.seq_len,
        "compute_dtype": config.train.compute_dtype,
        "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(state["params"]))),
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds,
        "model_tflops_per_second": tokens / seconds * flops_per_token / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": tokens / seconds * flops_per_token / peak,
        "warmup_seconds": warmup_seconds,
        "final_loss": float(metrics["loss"]),
    }
    print(f"{'metric':<24}{'value':>16}")
    for k, v in result.items():
        print(f"{k:<24}{v:>16.4g}" if isinstance(v, float) else f"{k:<24}{v!s:>16}")
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

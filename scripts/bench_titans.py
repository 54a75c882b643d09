"""Titans memory: chunk-parallel `memory_scan` vs the per-token `lax.scan` reference, tokens/s side by side.

    python scripts/bench_titans.py                       # T = 1k and 4k, the table of docs/benchmarks.md
    python scripts/bench_titans.py --seq_lens=1024 --chunk_sizes=16 --depths=1

Each row times the jitted forward (retrieved outputs and final state) and forward + backward (gradients of
Σ y·probe w.r.t. q, k, v, the gates and M_0) of both forms on the same inputs, f32, [batch, heads, T, head_dim],
median of `--repeats` runs after a compile. The ratio chunked / per-token is the figure the Titans issue asks for.
A form that runs out of memory shows OOM (null in the JSON) and the row goes on.
On a GPU or TPU (`--kernel=auto`), each row also times the fused Pallas kernel (`memory_scan(impl="pallas")`,
kernels_pallas/titans_memory.py) and reports kernel / XLA-chunked speed ratios; on CPU `--kernel=on` would time
interpret mode, which says nothing about speed.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from lcjax.layers.neural_memory import memory_scan, memory_scan_reference, memory_widths  # noqa: E402

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "4096"], "Sequence lengths.")
_CHUNKS = flags.DEFINE_list("chunk_sizes", ["16", "64"], "Chunk sizes.")
_DEPTHS = flags.DEFINE_list("depths", ["1", "2"], "Memory depths (1: linear).")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Memory heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "Head dim.")
_EXPANSION = flags.DEFINE_integer("expansion", 2, "Hidden width of a deep memory, in head dims.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per row; the median is reported.")
_OUT = flags.DEFINE_string("out", "bench_titans.json", "JSON output path.")
_KERNEL = flags.DEFINE_enum("kernel", "auto", ["auto", "on", "off"], "Also time the Pallas kernel (auto: on GPU/TPU).")


def _inputs(length, depth):
    keys = jax.random.split(jax.random.key(0), 8)
    dim, heads, batch = _HEAD_DIM.value, _HEADS.value, _BATCH.value
    widths = memory_widths(dim, depth, _EXPANSION.value)
    init = [
        0.1 * jax.random.normal(keys[i], (heads, a, b))
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    ]
    shape = (batch, heads, length)
    q, k, v = (jax.random.normal(keys[4 + i], (*shape, dim)) for i in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    gates = jax.random.uniform(keys[7], (3, *shape))
    return init, (q, k, v, 0.02 * gates[0], 0.9 * gates[1], 0.01 * gates[2])


def _time(fn, *args):
    """Median seconds per call after a compile; None when the call runs out of memory (the per-token scan's backward
    keeps several memory-sized arrays per token: 50 GB for a depth-2 memory at batch 4, 8 heads, head dim 64, T = 4k).
    """
    try:
        jax.block_until_ready(fn(*args))  # compile
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return None
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ratio(slow, fast):
    return None if slow is None or fast is None else slow / fast


def _rate(tokens, seconds):
    return f"{'OOM':>10}" if seconds is None else f"{tokens / seconds:>10.0f}"


def _show(ratio):
    return f"{'-':>6}" if ratio is None else f"{ratio:>6.1f}"


def _functions(scan, chunk_size, **kwargs):
    def forward(init, sequence):
        return scan(init, *sequence, chunk_size=chunk_size, **kwargs)

    def loss(init, sequence, probe):
        return jnp.sum(forward(init, sequence)[0] * probe)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def main(argv):
    del argv
    rows = []
    kernel = _KERNEL.value == "on" or (_KERNEL.value == "auto" and jax.default_backend() in ("gpu", "tpu"))
    header = f"{'T':>6} {'chunk':>5} {'depth':>5} | {'fwd tok/s':>10} {'ref tok/s':>10} {'ratio':>6} | "
    header += f"{'f+b tok/s':>10} {'ref tok/s':>10} {'ratio':>6}"
    if kernel:
        header += f" | {'kern fwd':>10} {'x xla':>6} {'kern f+b':>10} {'x xla':>6}"
    print(header)
    for length in map(int, _SEQ_LENS.value):
        for depth in map(int, _DEPTHS.value):
            init, sequence = _inputs(length, depth)
            probe = jnp.ones_like(sequence[2])
            for chunk_size in map(int, _CHUNKS.value):
                fwd, grad = _functions(memory_scan, chunk_size)
                fwd_ref, grad_ref = _functions(memory_scan_reference, chunk_size)
                tokens = _BATCH.value * length
                row = {"seq_len": length, "chunk_size": chunk_size, "depth": depth, "tokens": tokens}
                row["fwd_s"], row["fwd_ref_s"] = _time(fwd, init, sequence), _time(fwd_ref, init, sequence)
                row["fwdbwd_s"] = _time(grad, init, sequence, probe)
                row["fwdbwd_ref_s"] = _time(grad_ref, init, sequence, probe)
                row["fwd_ratio"] = _ratio(row["fwd_ref_s"], row["fwd_s"])
                row["fwdbwd_ratio"] = _ratio(row["fwdbwd_ref_s"], row["fwdbwd_s"])
                line = (
                    f"{length:>6} {chunk_size:>5} {depth:>5} | {_rate(tokens, row['fwd_s'])} "
                    f"{_rate(tokens, row['fwd_ref_s'])} {_show(row['fwd_ratio'])} | "
                    f"{_rate(tokens, row['fwdbwd_s'])} {_rate(tokens, row['fwdbwd_ref_s'])} "
                    f"{_show(row['fwdbwd_ratio'])}"
                )
                if kernel:
                    fwd_k, grad_k = _functions(memory_scan, chunk_size, impl="pallas")
                    out_k, out_x = fwd_k(init, sequence), fwd(init, sequence)
                    row["kernel_max_abs_err"] = float(jnp.max(jnp.abs(out_k[0] - out_x[0])))
                    row["kernel_fwd_s"] = _time(fwd_k, init, sequence)
                    row["kernel_fwdbwd_s"] = _time(grad_k, init, sequence, probe)
                    row["kernel_fwd_ratio"] = _ratio(row["fwd_s"], row["kernel_fwd_s"])
                    row["kernel_fwdbwd_ratio"] = _ratio(row["fwdbwd_s"], row["kernel_fwdbwd_s"])
                    line += (
                        f" | {_rate(tokens, row['kernel_fwd_s'])} {_show(row['kernel_fwd_ratio'])} "
                        f"{_rate(tokens, row['kernel_fwdbwd_s'])} {_show(row['kernel_fwdbwd_ratio'])}"
                    )
                rows.append(row)
                print(line, flush=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "batch": _BATCH.value,
        "heads": _HEADS.value,
        "head_dim": _HEAD_DIM.value,
        "expansion": _EXPANSION.value,
    }
    with open(_OUT.value, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

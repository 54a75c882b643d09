"""Landmark attention: the blockwise Pallas kernel against the dense grouped softmax, side by side in one run.

    python scripts/bench_landmark.py --out=docs/benchmarks/landmark_kernel.json

For each (slots, mem_freq) row, forward + backward of both on q [1, S, heads, head_dim], k/v [1, S, kv_heads, head_dim]:
- the kernel's largest error against the dense form (output and the three gradients, relative to each array's
  largest entry);
- time per call on this machine (on CPU the kernel runs in interpret mode, so its time says nothing about a TPU;
  the dense form is XLA's; on a GPU the kernel is the Triton one, `kernels_pallas.landmark_attention_gpu`), and
  for scale causal flash attention over the same slots (`kernels_pallas.flash_attention`, impl=auto: the Pallas
  kernel on TPU/GPU, the jnp reference on CPU);
- the temporary memory the TPU compiler (libtpu, `--topology`, one chip) asks for each: the dense form holds the
  [S, S] weights per head, the kernel O(S) row statistics. Nothing runs on a TPU. Rows whose mem_freq the TPU
  kernel refuses (lcm(mem_freq + 1, 128) > 1024, e.g. the paper's 50) get "-" there.

On a GPU: `python scripts/bench_landmark.py --topology= --mem_freqs=127,63,50 --slots=2048,8192,32768`.
"""

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from kernels_pallas import common
from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.landmark_attention import MAX_TILE, landmark_attention, tile_multiple
from lcjax.layers import landmark_attention as dense

_SLOTS = flags.DEFINE_list("slots", ["512", "1024", "2048"], "Expanded sequence lengths.")
_MEM_FREQS = flags.DEFINE_list("mem_freqs", ["127", "31"], "Regular tokens per landmark block.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per implementation; the median is reported.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology for the compiled-memory columns ('' to skip).")
_OUT = flags.DEFINE_string("out", "bench_landmark.json", "JSON output path.")


def _fwd_bwd(attend):
    def fn(q, k, v, probe):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(probe.astype(out.dtype)))

    return fn


def _seconds(fn, args) -> float:
    jax.block_until_ready(fn(*args))
    timings = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _tpu_temp_bytes(fn, args) -> int | None:
    if not _TOPOLOGY.value:
        return None
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    compiled = common.compile_for_tpu(fn, abstract, _TOPOLOGY.value)
    return int(compiled.memory_analysis().temp_size_in_bytes)


def bench_row(slots: int, mem_freq: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 4)
    shape_q = (1, slots, _HEADS.value, _HEAD_DIM.value)
    shape_kv = (1, slots, _KV_HEADS.value, _HEAD_DIM.value)
    q = jax.random.normal(keys[0], shape_q)
    k, v = jax.random.normal(keys[1], shape_kv), jax.random.normal(keys[2], shape_kv)
    probe = jax.random.normal(keys[3], shape_q)
    scale = _HEAD_DIM.value**-0.5
    compiled = common.backend() in ("tpu", "gpu")
    tpu_ok = tile_multiple(mem_freq) <= MAX_TILE
    # the kernel family: this backend's; on CPU the TPU one where it takes mem_freq, else the GPU one (interpreted)
    target = "gpu" if common.backend() == "gpu" or not tpu_ok else "tpu"
    kernel = _fwd_bwd(
        lambda q, k, v: landmark_attention(q, k, v, mem_freq=mem_freq, interpret=not compiled, target=target)
    )
    reference = _fwd_bwd(lambda q, k, v: dense.reference(q, k, v, None, mem_freq=mem_freq, scale=scale))
    flash = _fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=True, scale=scale))
    args = (q, k, v, probe)
    got, want = jax.jit(kernel)(*args), jax.jit(reference)(*args)
    error = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(got, want, strict=True))
    row = {
        "slots": slots,
        "mem_freq": mem_freq,
        "max_rel_error": error,
        "kernel_s": _seconds(jax.jit(kernel), args),
        "dense_s": _seconds(jax.jit(reference), args),
        "flash_s": _seconds(jax.jit(flash), args),
        "kernel_mode": f"{target} " + ("compiled" if compiled else "interpret"),
    }
    kernel_tpu = _fwd_bwd(lambda q, k, v: landmark_attention(q, k, v, mem_freq=mem_freq, target="tpu"))
    row["tpu_temp_bytes_kernel"] = _tpu_temp_bytes(kernel_tpu, args) if tpu_ok else None
    row["tpu_temp_bytes_dense"] = _tpu_temp_bytes(reference, args)
    return row


def main(argv):
    del argv
    rows = []
    for mem_freq in map(int, _MEM_FREQS.value):
        for slots in map(int, _SLOTS.value):
            rows.append(bench_row(slots, mem_freq))
            print(json.dumps(rows[-1]), flush=True)
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
    print(
        f"\n{'slots':>6} {'freq':>5} {'max err':>9} {'kernel s':>9} {'dense s':>8} {'flash s':>8}"
        f" {'TPU MiB kernel':>15} {'dense':>8}"
    )
    for r in rows:
        print(
            f"{r['slots']:>6} {r['mem_freq']:>5} {r['max_rel_error']:>9.1e} {r['kernel_s']:>9.3f} {r['dense_s']:>8.3f}"
            f" {r['flash_s']:>8.3f} {mib(r['tpu_temp_bytes_kernel']):>15} {mib(r['tpu_temp_bytes_dense']):>8}"
        )
    result = {
        "machine": platform.node(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"heads": _HEADS.value, "kv_heads": _KV_HEADS.value, "head_dim": _HEAD_DIM.value},
        "topology": _TOPOLOGY.value,
        "rows": rows,
    }
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

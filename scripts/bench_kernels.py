"""Flash-attention throughput: the Pallas kernel against `jax.nn.dot_product_attention` (XLA and cuDNN), side by side.

    python scripts/bench_kernels.py --out=bench_kernels.json                # GPU: the issue's sweep
    python scripts/bench_kernels.py --seq_lens=256,512 --tokens=1024        # CPU: interpret check + XLA timings

Shapes follow the FlashAttention papers: batch · length = `--tokens` and heads · head_dim = `--hidden`, bf16,
q/k/v [batch, length, heads, head_dim]. FLOPs are 4 · B · H · T² · D for the forward (halved when causal) and
3.5× that for forward + backward (the backward counts 2.5×). Every row times each implementation in the same
run (median of `--repeats` timings of `--iters` calls), so the ratios are robust to a noisy shared machine, and
records the kernel's largest error against XLA's output and gradients (relative to each array's largest entry;
cuDNN's where XLA runs out of memory).
On CPU there is no Pallas backend and no cuDNN: the kernel runs in interpret mode once per row for correctness
only, and XLA is timed.
"""

import json
import platform
import statistics
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from kernels_pallas import common  # noqa: E402
from kernels_pallas.flash_attention import BlockSizes, flash_attention  # noqa: E402

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "4096", "8192", "16384"], "Sequence lengths.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims.")
_CAUSAL = flags.DEFINE_list("causal", ["false", "true"], "Causal settings to run.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "batch * length per call.")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "heads * head_dim.")
_IMPLS = flags.DEFINE_list("impls", ["pallas", "cudnn", "xla"], "Implementations to time (where the backend has them).")
_ITERS = flags.DEFINE_integer("iters", 10, "Calls per timing.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timings per row; the median is reported.")
_BLOCKS = flags.DEFINE_list("blocks", [], "Kernel blocks block_q,block_k,block_q_bwd,block_k_bwd (default: backend's).")
_OUT = flags.DEFINE_string("out", "bench_kernels.json", "JSON output path.")


def attention_fn(impl: str, causal: bool, blocks):
    if impl == "pallas":
        kernel_impl = "pallas" if common.backend() in ("tpu", "gpu") else "interpret"
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, impl=kernel_impl, block_sizes=blocks)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def fwd_and_train_fns(attend):
    fwd = jax.jit(attend)

    @jax.jit
    def fwd_bwd(q, k, v, probe):
        out, vjp = jax.vjp(attend, q, k, v)
        return vjp(probe.astype(out.dtype))

    return fwd, fwd_bwd


def seconds_per_call(fn, args) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    timings = []
    for _ in range(_REPEATS.value):
        started = time.perf_counter()
        for _ in range(_ITERS.value):
            result = fn(*args)
        jax.block_until_ready(result)
        timings.append((time.perf_counter() - started) / _ITERS.value)
    return statistics.median(timings)


def max_error(got, want) -> float:
    """Largest error over (out, dq, dk, dv), each relative to the largest magnitude of XLA's array."""
    errors = []
    for a, b in zip(got, want, strict=True):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        errors.append(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))))
    return max(errors)


def bench_row(seq_len: int, head_dim: int, causal: bool, impls, blocks) -> dict:
    batch, heads = max(_TOKENS.value // seq_len, 1), _HIDDEN.value // head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (batch, seq_len, heads, head_dim)
    q, k, v, probe = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    flops = 4 * batch * heads * seq_len * seq_len * head_dim / (2 if causal else 1)
    row = {"seq_len": seq_len, "head_dim": head_dim, "causal": causal, "batch": batch, "heads": heads}
    want = None
    for reference_impl in ("xla", "cudnn") if "cudnn" in impls else ("xla",):
        ref_fwd, ref_train = fwd_and_train_fns(attention_fn(reference_impl, causal, blocks))
        try:  # XLA materializes the T x T scores and can run out of memory at long T: fall back to cuDNN
            want = jax.block_until_ready((ref_fwd(q, k, v), *ref_train(q, k, v, probe)))
            row["error_reference"] = reference_impl
            break
        except Exception as e:
            row[f"{reference_impl}_reference_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for impl in impls:
        fwd, train = fwd_and_train_fns(attention_fn(impl, causal, blocks))
        try:
            if impl != row.get("error_reference") and want is not None:
                row[f"{impl}_max_error"] = max_error((fwd(q, k, v), *train(q, k, v, probe)), want)
            if impl == "pallas" and common.backend() == "cpu":
                continue  # interpret mode: correctness only
            row[f"{impl}_fwd_ms"] = 1e3 * seconds_per_call(fwd, (q, k, v))
            row[f"{impl}_fwd_bwd_ms"] = 1e3 * seconds_per_call(train, (q, k, v, probe))
            row[f"{impl}_fwd_tflops"] = flops / row[f"{impl}_fwd_ms"] / 1e9
            row[f"{impl}_fwd_bwd_tflops"] = 3.5 * flops / row[f"{impl}_fwd_bwd_ms"] / 1e9
        except Exception as e:  # an out-of-memory XLA row or an unsupported shape; the rest of the table still runs
            row[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for base in ("cudnn", "xla"):
        for kind in ("fwd", "fwd_bwd"):
            if f"pallas_{kind}_ms" in row and f"{base}_{kind}_ms" in row:
                row[f"pallas_vs_{base}_{kind}"] = row[f"{base}_{kind}_ms"] / row[f"pallas_{kind}_ms"]
    return row


def print_table(rows, impls) -> None:
    columns = ["seq_len", "head_dim", "causal"]
    for impl in impls:
        columns += [f"{impl}_fwd_tflops", f"{impl}_fwd_bwd_tflops"]
    columns += ["pallas_vs_cudnn_fwd", "pallas_vs_cudnn_fwd_bwd", "pallas_max_error"]
    print(" | ".join(f"{c:>22}" for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "-")
            cells.append(f"{value:>22.4g}" if isinstance(value, float) else f"{value!s:>22}")
        print(" | ".join(cells))
    for row in rows:
        for key, value in row.items():
            if key.endswith("_error") and isinstance(value, str):
                print(f"T={row['seq_len']} D={row['head_dim']} causal={row['causal']}: {key} {value}")


def main(argv):
    del argv
    platform_name = common.backend()
    impls = [i for i in _IMPLS.value if i != "cudnn" or platform_name == "gpu"]
    blocks = BlockSizes(*(int(b) for b in _BLOCKS.value)) if _BLOCKS.value else None
    rows = []
    for seq_len in (int(t) for t in _SEQ_LENS.value):
        for head_dim in (int(d) for d in _HEAD_DIMS.value):
            for causal in (c.lower() == "true" for c in _CAUSAL.value):
                rows.append(bench_row(seq_len, head_dim, causal, impls, blocks))
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows, impls)
    result = {
        "backend": platform_name,
        "device": jax.devices()[0].device_kind,
        "host": platform.node(),
        "jax": jax.__version__,
        "dtype": "bfloat16",
        "tokens": _TOKENS.value,
        "hidden": _HIDDEN.value,
        "rows": rows,
    }
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

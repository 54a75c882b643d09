"""Recurrent layers and models: the forms of the mLSTM and SSD scans side by side, and decode cost vs context.

    python scripts/bench_recurrent.py                               # both parts, the tables of docs/benchmarks.md
    python scripts/bench_recurrent.py --part=forms --seq_lens=1024,4096
    python scripts/bench_recurrent.py --part=decode --contexts=1024,65536
    JAX_PLATFORMS=cuda python scripts/bench_recurrent.py --part=kernel --batch=8 --heads=8   # on a GPU (or TPU)
    python scripts/bench_recurrent.py --part=pla --seq_lens=1024,4096,16384 --max_parallel=4096

Part "forms": for T in `--seq_lens`, the jitted forward + backward (gradients of Σ h·probe w.r.t. every input) of
`mlstm_cell` in its parallel, chunkwise and recurrent forms and of `ssd_scan` chunked vs `ssd_sequential`, f32, on
the same inputs: seconds (median of `--repeats` after a compile) and the compiled program's temporary memory
(XLA's memory analysis). The parallel mLSTM materializes a T×T matrix per head; above `--max_parallel` it is skipped.

Part "kernel" (GPU/TPU only; on CPU it prints why it is skipped): the chunkwise mLSTM and chunked SSD through the
Pallas kernel (`kernels_pallas.chunked_linear_attention`, impl="pallas") vs the XLA chunkwise form on the same inputs,
forward and forward + backward, with the kernel's largest error relative to XLA's largest output/gradient.

Part "pla": JRT's prefix linear attention (`lcjax.layers.prefix_linear_attention`; Based feature map of dim 16, so
F = 280 features, `--heads` heads of value dim `--head_dim`, the encoder over the first T/2 tokens): the chunkwise
form (XLA) vs the explicit quadratic form (the T×T masked φ(q)·φ(k) scores plus the encoder state, skipped above
`--max_parallel`), and on a GPU/TPU the Pallas kernel, forward + backward; each row's largest error relative to the
chunkwise form.

Part "decode": seconds per generated token of the tiny presets (xlstm large-tiny, mamba2 tiny, and the
transformer tiny for contrast) after a context of C tokens, for C in `--contexts`. The recurrent models' state is
really prefilled (the context is fed through `decode` in pieces of 4096 tokens); the transformer's KV cache is filled
with random keys and values up to C (a real prefill of 64k tokens would take hours on a CPU; the cost of a step
does not depend on the values). Each figure is the median over `--decode_steps` single-token steps. The ratio of
the largest to the smallest context is the figure the issue asks for (flat: ≤ 1.1 for the recurrent models).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from lcjax import models  # noqa: E402
from lcjax.layers import prefix_linear_attention as pla  # noqa: E402
from lcjax.layers.mlstm import mlstm_cell  # noqa: E402
from lcjax.layers.ssd import ssd_scan, ssd_sequential  # noqa: E402

_PART = flags.DEFINE_enum("part", "all", ["all", "forms", "kernel", "pla", "decode"], "Which part to run.")
_KERNEL_IMPL = flags.DEFINE_enum(
    "kernel_impl", "pallas", ["pallas", "interpret"], "Kernel: interpret runs the kernel's part on CPU (a smoke test)."
)
_BATCH = flags.DEFINE_integer("batch", 1, "Forms and kernel: batch size.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Forms: sequence lengths.")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 8192, "Forms: longest T for the quadratic parallel mLSTM.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Forms: chunk size of the chunkwise mLSTM and the SSD.")
_HEADS = flags.DEFINE_integer("heads", 4, "Forms: heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Forms: head dim (mLSTM dqk = dv; SSD head_dim and state).")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096", "16384", "65536"], "Decode: context lengths.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 50, "Decode: timed single-token steps per context.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Forms: timings per row; the median is reported.")
_OUT = flags.DEFINE_string("out", "bench_recurrent.json", "JSON output path.")

DECODE_MODELS = (
    ("xlstm", "configs/xlstm.py", "large-tiny"),
    ("mamba2", "configs/mamba2.py", "tiny"),
    ("transformer", "configs/transformer.py", "tiny"),
)


def _time(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _temp_mib(fn, *args):
    analysis = fn.lower(*args).compile().memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes / 2**20


def _grad_fn(forward, num_args):
    def loss(*args):
        *inputs, probe = args
        return jnp.sum(forward(*inputs)[0] * probe)

    return jax.jit(jax.grad(loss, argnums=tuple(range(num_args))))


def _inputs(length):
    """The mLSTM (q, k, v, ĩ, f̃) and SSD (x, Δ, A, B, C) inputs of one row."""
    batch, heads, dim = _BATCH.value, _HEADS.value, _HEAD_DIM.value
    keys = jax.random.split(jax.random.key(length), 8)
    q, k, v = (jax.random.normal(keys[i], (batch, heads, length, dim)) for i in range(3))
    i_gate = jax.random.normal(keys[3], (batch, heads, length))
    f_gate = 3.0 + jax.random.normal(keys[4], (batch, heads, length))
    x = jax.random.normal(keys[5], (batch, length, heads, dim))
    dt = jax.nn.softplus(jax.random.normal(keys[6], (batch, length, heads)) - 2.0)
    a = -jnp.exp(jnp.linspace(0.0, 2.0, heads))
    b, c = (jax.random.normal(key, (batch, length, 1, dim)) for key in jax.random.split(keys[7]))
    return (q, k, v, i_gate, f_gate), (x, dt, a, b, c)


def _max_error(got, want):
    leaves = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    scale = max(float(jnp.max(jnp.abs(w))) for _, w in leaves)
    return max(float(jnp.max(jnp.abs(g - w))) for g, w in leaves) / scale


def kernel():
    """The Pallas kernel vs the XLA chunkwise form (module docstring)."""
    if jax.default_backend() not in ("gpu", "tpu") and _KERNEL_IMPL.value == "pallas":
        print(f"part kernel: needs a GPU or TPU (backend is {jax.default_backend()}; set JAX_PLATFORMS); skipped")
        return []
    rows, chunk = [], _CHUNK.value
    print(f"{'layer':>6} {'T':>6} {'pass':>5} | {'xla ms':>8} {'pallas ms':>9} {'speedup':>8} | {'max rel err':>11}")
    for length in map(int, _SEQ_LENS.value):
        mlstm_inputs, ssd_inputs = _inputs(length)
        layers = (
            ("mlstm", lambda *z, impl: mlstm_cell(*z, chunk_size=chunk, impl=impl), mlstm_inputs),
            ("ssd", lambda *z, impl: ssd_scan(*z, chunk_size=chunk, impl=impl), ssd_inputs),
        )
        for layer, call, inputs in layers:
            probe = jnp.ones_like(call(*inputs, impl="xla")[0])
            for kind in ("fwd", "fwd+bwd"):
                fns = {}
                for impl in ("xla", "pallas"):
                    forward = lambda *z, impl=impl, call=call: call(
                        *z, impl=_KERNEL_IMPL.value if impl == "pallas" else impl
                    )
                    fns[impl] = jax.jit(forward) if kind == "fwd" else _grad_fn(forward, 5)
                args = inputs if kind == "fwd" else (*inputs, probe)
                seconds = {impl: _time(fn, *args) for impl, fn in fns.items()}
                error = _max_error(fns["pallas"](*args), fns["xla"](*args))
                row = {"layer": layer, "seq_len": length, "pass": kind, "error": error}
                row.update({f"{impl}_seconds": t for impl, t in seconds.items()})
                row["speedup"] = seconds["xla"] / seconds["pallas"]
                rows.append(row)
                print(
                    f"{layer:>6} {length:>6} {kind:>5} | {seconds['xla'] * 1e3:>8.2f} {seconds['pallas'] * 1e3:>9.2f} "
                    f"{row['speedup']:>8.2f} | {error:>11.1e}",
                    flush=True,
                )
    return rows


def forms():
    rows = []
    chunk = _CHUNK.value
    print(f"{'layer':>6} {'form':>10} {'T':>6} | {'f+b s':>8} {'tok/s':>9} {'temp MiB':>9} | {'vs slowest':>10}")
    for length in map(int, _SEQ_LENS.value):
        mlstm_inputs, ssd_inputs = _inputs(length)
        probe = jnp.ones_like(mlstm_inputs[2])
        group = []
        for form in ("parallel", "chunkwise", "recurrent"):
            if form == "parallel" and length > _MAX_PARALLEL.value:
                continue

            def forward(*inputs, form=form):
                return mlstm_cell(*inputs, form=form, chunk_size=chunk)

            fn = _grad_fn(forward, 5)
            row = {"layer": "mlstm", "form": form, "seq_len": length, "seconds": _time(fn, *mlstm_inputs, probe)}
            row["temp_mib"] = _temp_mib(fn, *mlstm_inputs, probe)
            group.append(row)
        ssd_probe = jnp.ones_like(ssd_inputs[0])
        for form, forward in (
            ("chunked", lambda *z: ssd_scan(*z, chunk_size=chunk)),
            ("sequential", ssd_sequential),
        ):
            fn = _grad_fn(forward, 5)
            row = {"layer": "ssd", "form": form, "seq_len": length, "seconds": _time(fn, *ssd_inputs, ssd_probe)}
            row["temp_mib"] = _temp_mib(fn, *ssd_inputs, ssd_probe)
            group.append(row)
        for layer in ("mlstm", "ssd"):
            rows_of = [r for r in group if r["layer"] == layer]
            slowest = max(r["seconds"] for r in rows_of)
            for r in rows_of:
                r["speedup_vs_slowest"] = slowest / r["seconds"]
                mib = "n/a" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
                print(
                    f"{layer:>6} {r['form']:>10} {length:>6} | {r['seconds']:>8.3f} {length / r['seconds']:>9.0f} "
                    f"{mib:>9} | {r['speedup_vs_slowest']:>10.1f}",
                    flush=True,
                )
        rows.extend(group)
    return rows


def _pla_inputs(length):
    """φ(q), φ(k) [batch, T, heads, F], v [batch, T, heads, dv] and the encoder state of the first T/2 tokens."""
    batch, heads, dim = _BATCH.value, _HEADS.value, _HEAD_DIM.value
    keys = jax.random.split(jax.random.key(length), 5)
    q, k, ke = (pla.feature_map(0.5 * jax.random.normal(keys[i], (batch, length, heads, 16))) for i in range(3))
    v, ve = (jax.random.normal(keys[i], (batch, length, heads, dim)) for i in (3, 4))
    weights = (jnp.arange(length) < length // 2).astype(jnp.float32)[None].repeat(batch, 0)
    return q, k, v, pla.encoder_state(ke, ve, weights)


def _pla_chunked(phi_q, phi_k, v, s_enc, *, impl):
    docs = jnp.zeros(phi_q.shape[:2], jnp.int32)  # one document
    return pla.prefix_linear_attention(phi_q, phi_k, v, docs, s_enc, chunk_size=_CHUNK.value, impl=impl)


def _pla_quadratic(phi_q, phi_k, v, s_enc):
    """y_i = (Σ_{j≤i} φ(q_i)·φ(k_j) v_j + φ(q_i) S_enc[:, :dv]) / (Σ_{j≤i} φ(q_i)·φ(k_j) + φ(q_i) S_enc[:, dv])."""
    length, dv = phi_q.shape[1], v.shape[-1]
    scores = jnp.einsum("bihf,bjhf->bhij", phi_q, phi_k) * jnp.tril(jnp.ones((length, length)))
    enc = jnp.einsum("bihf,bhfv->bihv", phi_q, s_enc)
    num = jnp.einsum("bhij,bjhv->bihv", scores, v) + enc[..., :dv]
    den = jnp.moveaxis(scores.sum(-1), 1, 2)[..., None] + enc[..., dv:]
    return num / (den + pla.EPS), None


def pla_forms():
    """The chunkwise PLA vs the quadratic form and (GPU/TPU) the Pallas kernel (module docstring)."""
    rows = []
    accelerator = jax.default_backend() in ("gpu", "tpu")
    print(f"{'form':>10} {'T':>6} | {'f+b s':>8} {'tok/s':>9} {'temp MiB':>9} | {'vs chunked':>10} {'max rel err':>11}")
    for length in map(int, _SEQ_LENS.value):
        inputs = _pla_inputs(length)
        probe = jnp.ones_like(inputs[2])
        forms = {"chunked": functools.partial(_pla_chunked, impl="xla")}
        if length <= _MAX_PARALLEL.value:
            forms["quadratic"] = _pla_quadratic
        if accelerator:
            forms["pallas"] = functools.partial(_pla_chunked, impl="pallas")
        group = []
        for form, forward in forms.items():
            fn = _grad_fn(forward, 4)
            row = {"layer": "pla", "form": form, "seq_len": length, "seconds": _time(fn, *inputs, probe)}
            row["temp_mib"] = _temp_mib(fn, *inputs, probe)
            row["grads"] = fn(*inputs, probe)
            group.append(row)
        base = group[0]
        for r in group:
            r["speedup_vs_chunked"] = base["seconds"] / r["seconds"]
            r["error"] = _max_error(r.pop("grads"), base["grads"]) if r is not base else 0.0
        base.pop("grads")
        for r in group:
            mib = "n/a" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
            print(
                f"{r['form']:>10} {length:>6} | {r['seconds']:>8.3f} {length / r['seconds']:>9.0f} {mib:>9} | "
                f"{r['speedup_vs_chunked']:>10.2f} {r['error']:>11.1e}",
                flush=True,
            )
        rows.extend(group)
    return rows


def _build(config_path, preset):
    import importlib.util

    from lcjax.config import from_config_dict

    spec = importlib.util.spec_from_file_location("config_module", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = from_config_dict(module.get_config(preset))
    return models.build(config, nnx.Rngs(0)), config


def decode():
    rows = []
    contexts = sorted(map(int, _CONTEXTS.value))
    print(f"{'model':>12} {'context':>8} | {'ms/token':>9} | {'vs shortest':>11}")
    for name, path, preset in DECODE_MODELS:
        model, config = _build(path, preset)
        graphdef, state = nnx.split(model)
        decode_fn = jax.jit(
            lambda state, tokens, cache, graphdef=graphdef: nnx.merge(graphdef, state).decode(tokens, cache)
        )

        def step(model, tokens, cache, state=state, decode_fn=decode_fn):
            del model
            return decode_fn(state, tokens, cache)

        base = None
        for context in contexts:
            key = jax.random.key(context)
            if name == "transformer":
                cache = model.init_cache(1, context + _DECODE_STEPS.value + 2)
                cache["layers"] = jax.tree.map(
                    lambda a, key=key: jax.random.normal(key, a.shape, a.dtype) * 0.1, cache["layers"]
                )
                cache["index"] = jnp.asarray(context, jnp.int32)
            else:
                cache = model.init_cache(1)
                tokens = jax.random.randint(key, (1, context), 0, config.model.vocab_size)
                piece = 4096
                for start in range(0, context, piece):
                    _, cache = step(model, tokens[:, start : start + piece], cache)
            token = jnp.zeros((1, 1), jnp.int32)
            logits, cache = step(model, token, cache)  # compile
            jax.block_until_ready(logits)
            times = []
            for _ in range(_DECODE_STEPS.value):
                start = time.perf_counter()
                logits, cache = step(model, token, cache)
                jax.block_until_ready(logits)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            base = base or seconds
            row = {"model": f"{name}:{preset}", "context": context, "seconds_per_token": seconds}
            row["ratio_vs_shortest"] = seconds / base
            rows.append(row)
            label = f"{name}:{preset}"
            print(f"{label:>12} {context:>8} | {seconds * 1e3:>9.3f} | {seconds / base:>11.2f}", flush=True)
    return rows


def main(argv):
    del argv
    result = {
        "meta": {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "batch": _BATCH.value,
            "heads": _HEADS.value,
            "head_dim": _HEAD_DIM.value,
            "chunk_size": _CHUNK.value,
        }
    }
    if _PART.value in ("all", "forms"):
        result["forms"] = forms()
    if _PART.value in ("all", "kernel"):
        result["kernel"] = kernel()
    if _PART.value in ("all", "pla"):
        result["pla"] = pla_forms()
    if _PART.value in ("all", "decode"):
        result["decode"] = decode()
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

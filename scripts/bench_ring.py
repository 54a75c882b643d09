"""Ring attention vs dense attention on fake CPU devices: compiled per-device memory, step time, critical path.

    python scripts/bench_ring.py                         # the sweep of docs/benchmarks.md (a few minutes)
    python scripts/bench_ring.py --seq_lens=4096 --time_up_to=4096 --budget_gib=0.25

A "step" is the attention forward + backward (gradients of Σ out·probe w.r.t. q, k, v), causal, f32, with
q/k/v [batch, T, heads, head_dim] sharded on the `sequence` axis of an 8-device mesh. Per-device memory is the
compiled program's `memory_analysis()` (arguments + outputs + temporaries), nothing is run to get it. The ring
runs as the model runs it: data already in layout order (`Transformer` permutes its tokens once), each device
calling `ring_attention_local` under `shard_map`. "dense" is
the plain attention core (`lcjax.layers.attention.dot_product_attention`) compiled for the same mesh and shardings
(XLA then gathers K/V and holds a [T/N, T] score block per device), and "dense, 1 device" the same without a mesh.
Step times are measured side by side in one run (median of `--repeats`) up to `--time_up_to` tokens: the 8 fake
devices share this machine's cores, so they show total work, not the parallel wall time of a real ring. The
critical path counts, per ring step, the busiest device's work in blocks (`ring_attention.critical_path_work`).
The scaling sweep finds, for `sequence` = 2, 4, 8, the longest T (a power of two) whose ring step fits
`--budget_gib` per device.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lcjax.layers.attention import causal_segment_mask, dot_product_attention  # noqa: E402
from lcjax.parallel import ring_attention as ring
from lcjax.parallel import ring_layout  # noqa: E402
from lcjax.parallel.mesh import make_mesh  # noqa: E402

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768", "65536"], "Sequence lengths.")
_TIME_UP_TO = flags.DEFINE_integer("time_up_to", 8192, "Time steps only up to this T (CPU time grows as T²).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim.")
_LAYOUT = flags.DEFINE_string("layout", "zigzag", "Ring layout of the memory sweep.")
_BUDGET = flags.DEFINE_float("budget_gib", 1.0, "Per-device budget of the scaling sweep, GiB.")
_MAX_T = flags.DEFINE_integer("max_seq_len", 1 << 20, "Largest T tried by the scaling sweep.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per row; the median is reported.")
_OUT = flags.DEFINE_string("out", "bench_ring.json", "JSON output path.")

GIB = 1024**3


def _dense(q, k, v):
    slots = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return dot_product_attention(q, k, v, causal_segment_mask(slots, slots, None, None), scale=q.shape[-1] ** -0.5)


def _step_fn(attend):
    def step(q, k, v, probe):
        out, vjp = jax.vjp(attend, q, k, v)
        return vjp(probe)

    return step


def _abstract(length, mesh):
    shape_q = (_BATCH.value, length, _HEADS.value, _HEAD_DIM.value)
    shape_kv = (_BATCH.value, length, _KV_HEADS.value, _HEAD_DIM.value)
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(None, "sequence"))
    return [jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding) for s in (shape_q, shape_kv, shape_kv, shape_q)]


def _ring_in_layout_order(mesh, layout):
    """The model's path: data already in layout order, each device runs `ring_attention_local` on its block."""
    spec = PartitionSpec(None, "sequence")
    body = lambda q, k, v: ring.ring_attention_local(
        q, k, v, axis_name="sequence", num_shards=mesh.shape["sequence"], layout=layout, causal=True
    )[0]
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)


def _compile(kind, length, mesh, layout):
    if kind == "ring":
        attend = _ring_in_layout_order(mesh, layout)
    else:
        attend = _dense
    fn = jax.jit(_step_fn(attend))
    start = time.perf_counter()
    if mesh is None:
        compiled = fn.lower(*_abstract(length, None)).compile()
    else:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*_abstract(length, mesh)).compile()
    stats = compiled.memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    total -= stats.alias_size_in_bytes
    return compiled, total / GIB, time.perf_counter() - start


def _time(compiled, length, mesh):
    keys = jax.random.split(jax.random.key(0), 4)
    args = [jax.random.normal(key, a.shape, a.dtype) for key, a in zip(keys, _abstract(length, None), strict=True)]
    if mesh is not None:
        args = [jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "sequence"))) for x in args]
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mesh(sequence):
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": sequence}, devices=jax.devices()[:sequence])


def main(argv):
    del argv
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} fake "
        f"devices, jax {jax.__version__}",
        "shape": {
            "batch": _BATCH.value,
            "heads": _HEADS.value,
            "kv_heads": _KV_HEADS.value,
            "head_dim": _HEAD_DIM.value,
        },
        "memory": [],
        "critical_path": {},
        "scaling": [],
    }
    mesh8 = _mesh(8)
    print(f"per-device memory of one causal attention step (fwd + bwd), f32, sequence=8, layout {_LAYOUT.value}")
    print("| T | ring GiB | dense (mesh) GiB | dense (1 device) GiB | ring / dense (mesh) | ring s | dense (mesh) s |")
    print("|---|---|---|---|---|---|---|")
    for length in (int(t) for t in _SEQ_LENS.value):
        ring_exe, ring_gib, _ = _compile("ring", length, mesh8, _LAYOUT.value)
        dense_exe, dense_gib, _ = _compile("dense", length, mesh8, None)
        _, single_gib, _ = _compile("dense", length, None, None)
        row = {"T": length, "ring_gib": ring_gib, "dense_mesh_gib": dense_gib, "dense_single_gib": single_gib}
        if length <= _TIME_UP_TO.value:
            row["ring_s"] = _time(ring_exe, length, mesh8)
            row["dense_mesh_s"] = _time(dense_exe, length, mesh8)
        results["memory"].append(row)
        fmt = lambda key, row=row: f"{row[key]:.3f}" if key in row else "—"
        print(
            f"| {length} | {ring_gib:.4f} | {dense_gib:.4f} | {single_gib:.4f} | {ring_gib / dense_gib:.4f} | "
            f"{fmt('ring_s')} | {fmt('dense_mesh_s')} |",
            flush=True,
        )
    print("\ncritical-path work of a causal ring over 8 devices (full blocks; 8 = no load balancing)")
    print("| layout | critical path | visible fraction of the computed pairs | step s (T=4096) |")
    print("|---|---|---|---|")
    for layout in ring_layout.LAYOUTS:
        exe, _, _ = _compile("ring", 4096, mesh8, layout)
        entry = {
            "critical_path_blocks": ring_layout.critical_path_work(layout, 8),
            "visible_fraction": ring_layout.visible_fraction(layout, 8, 4096),
            "step_s_T4096": _time(exe, 4096, mesh8),
        }
        results["critical_path"][layout] = entry
        print(f"| {layout} | {entry['critical_path_blocks']:.2f} | {entry['visible_fraction']:.3f} | "
              f"{entry['step_s_T4096']:.3f} |", flush=True)  # fmt: skip
    print(f"\nlongest T whose ring step fits {_BUDGET.value} GiB per device (powers of two)")
    print("| sequence devices | longest T | GiB at that T |")
    print("|---|---|---|")
    for sequence in (1, 2, 4, 8):
        mesh = _mesh(sequence)
        length, best = 2 * sequence * 256, None
        while length <= _MAX_T.value:
            if sequence == 1:
                _, gib, _ = _compile("dense", length, None, None)
            else:
                _, gib, _ = _compile("ring", length, mesh, _LAYOUT.value)
            if gib > _BUDGET.value:
                break
            best = (length, gib)
            length *= 2
        entry = {"sequence": sequence, "longest_T": best[0] if best else 0, "gib": best[1] if best else None}
        results["scaling"].append(entry)
        name = "1 (dense)" if sequence == 1 else str(sequence)
        print(
            f"| {name} | {entry['longest_T']} | {entry['gib']:.3f} |" if best else f"| {name} | none | — |", flush=True
        )
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)

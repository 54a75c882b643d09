"""Language models on the default corpus at equal training compute: validation bits/byte and loss by position.

Each entry of `--models` is `name=family:preset[,section.key=value...]` (the defaults: issue 26's HMT comparison).
The first entry fixes the budget: it trains `--steps` steps, and every other entry trains for as many steps as
make the same training FLOPs (`model.flops_per_token(seq_len)` × batch × seq_len per step; the learning-rate
schedule stretches with the steps). All are scored on the same rows: the first `--eval_len` + 1 tokens of each of
the first `--eval_rows` validation documents that long, so position p is position p of a document. A model whose
`--context` is shorter than `--eval_len` reads each row as independent windows of that length (what a model with
that context does). Loss by segment of `--segment` tokens, per model, goes to the table and the PNG.

Results of a model are saved to `<out>/scores/<name>.json` and not recomputed (a model's training resumes from its
checkpoints in `<workdir>/<name>`), so a comparison can stop and go on.

python scripts/compare_corpus.py --workdir=runs/compare_hmt --out=docs/hmt_comparison --steps=150
python scripts/compare_corpus.py --report_only --out=docs/hmt_comparison   # the table and PNGs from saved scores

A sweep names its entries `group@x` (for instance `hmt@4=hmt:tiny,train.seq_len=512,train.batch_size=16`: HMT
trained on rows of 4 segments); the report then adds a table and `sweep.png` of each group's bits/byte (on the
`--long` rows where scored) against x. The HMT/RMT training-unroll sweep (docs/hmt_comparison/unroll):

python scripts/compare_corpus.py --models="$(python scripts/compare_corpus.py --print_unroll_sweep)" \
  --steps=100 --long=all --workdir=runs/compare_hmt --out=docs/hmt_comparison/unroll
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# HMT and RMT trained on rows of 2, 4, 8 and 16 segments of 128 tokens, 8192 tokens per step (the paper: RMT stops
# improving with the unrolled depth near 5 segments, HMT goes on to 15).
UNROLL_SWEEP = ";".join(
    f"{group}@{n}={spec},train.seq_len={128 * n},train.batch_size={64 // n}"
    for n in (8, 2, 4, 16)  # the first (HMT at 8) sets the budget: the default comparison's hmt row
    for group, spec in (("hmt", "hmt:tiny"), ("rmt", "hmt:tiny,model.stage=1,model.cache_size=1"))
)
DEFAULT_MODELS = ";".join(
    [
        "hmt=hmt:tiny",
        "transformer-128=transformer:tiny,train.seq_len=128,train.batch_size=64,context=128",
        "transformer-1024=transformer:tiny,train.seq_len=1024,train.batch_size=8",
        "rmt=hmt:tiny,model.stage=1,model.cache_size=1",
        "hmt-mamba2=hmt:tiny:mamba2",
        "mamba2-1024=mamba2:tiny,train.seq_len=1024,train.batch_size=8",
    ]
)
flags.DEFINE_string("models", DEFAULT_MODELS, "';'-separated name=family:preset[,key=value...] (first: the budget)")
flags.DEFINE_integer("steps", 150, "training steps of the first model; the others get its FLOPs")
flags.DEFINE_integer("eval_len", 1024, "scored tokens per validation row")
flags.DEFINE_integer("eval_rows", 24, "validation documents scored")
flags.DEFINE_string(
    "long", "hmt,rmt", "models also scored on rows of --long_len tokens (loss vs segments read); all: every model"
)
flags.DEFINE_integer("long_len", 2048, "row length of the --long scoring")
flags.DEFINE_integer("segment", 128, "loss-by-position bucket (tokens)")
flags.DEFINE_string("workdir", "runs/compare_corpus", "training runs, one folder per model")
flags.DEFINE_string("out", "docs/hmt_comparison", "report folder: README.md, PNGs, scores/")
flags.DEFINE_bool("report_only", False, "write the report from saved scores; train nothing")
flags.DEFINE_bool("print_unroll_sweep", False, "print the HMT/RMT training-unroll sweep's --models and exit")
FLAGS = flags.FLAGS


def parse_models(text: str) -> list[tuple[str, str, dict[str, str]]]:
    models = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, rest = item.partition("=")
        spec, *pairs = rest.split(",")
        if not name or not spec or any("=" not in p for p in pairs):
            raise SystemExit(f"error: --models entry {item!r} is not name=family:preset[,section.key=value...]")
        models.append((name, spec, dict(p.split("=", 1) for p in pairs)))
    return models


def _typed(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def build_config(spec: str, overrides: dict[str, str], steps: int | None = None):
    """The typed config of `family:preset` with `section.key=value` overrides (`context` is ours, not a key)."""
    from lcjax import config as config_lib
    from lcjax.experiments.compare import load_preset

    values = load_preset(spec, os.path.join(os.path.dirname(__file__), "..", "configs")).to_dict()
    for dotted, value in overrides.items():
        if dotted == "context":
            continue
        *path, key = dotted.split(".")
        section = values
        for part in path:
            section = section[part]
        section[key] = _typed(value)
    if steps is not None:
        train = values["train"]
        scale = steps / train["steps"]
        train["warmup_steps"] = max(1, round(train["warmup_steps"] * scale))
        train["steps"] = steps
        train["eval_every"] = steps
        train["log_every"] = max(1, steps // 10)
        values["checkpoint"]["every"] = max(1, steps // 4)
        values["eval"]["num_batches"] = 2  # the loop's own final eval; the comparison scores its own rows
    return config_lib.from_dict(values)


def step_flops(config) -> float:
    """Training FLOPs of one step."""
    train = config.train
    return config.model.flops_per_token(train.seq_len) * train.batch_size * train.seq_len


def document_rows(stream, length: int, rows: int) -> np.ndarray:
    """[rows, length + 1]: the first length + 1 tokens of each of the first `rows` documents at least that long."""
    tokens, starts = stream.read(0, stream.num_tokens)
    tokens, starts = np.asarray(tokens), np.flatnonzero(np.asarray(starts))
    ends = np.append(starts[1:], len(tokens))
    picked = [tokens[s : s + length + 1] for s, e in zip(starts, ends, strict=True) if e - s >= length + 1][:rows]
    if len(picked) < rows:
        raise SystemExit(f"error: only {len(picked)} validation documents hold {length + 1} tokens")
    return np.stack(picked).astype(np.int32)


def position_nll(config, workdir: str, rows: np.ndarray, context: int) -> np.ndarray:
    """Mean NLL (nats) at each position over `rows` [R, T + 1] under the latest checkpoint of `workdir`; a model
    with `context` < T reads each row as independent windows of `context` tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lcjax.train.run import restore_for_inference

    run, params, _ = restore_for_inference(config, workdir)
    graphdef = run.trainer.graphdef

    @jax.jit
    def nll(params, inputs, targets):
        logits = nnx.merge(graphdef, params)({"inputs": inputs})[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    inputs, targets = rows[:, :-1], rows[:, 1:]
    r, t = inputs.shape
    window = min(context or t, t)
    out = []
    for i in range(0, r, 4):  # a few rows at a time bounds the activation memory
        part = (inputs[i : i + 4], targets[i : i + 4])
        n = part[0].shape[0]
        got = nll(params, part[0].reshape(-1, window), part[1].reshape(-1, window))
        out.append(np.asarray(got, np.float64).reshape(n, t))
    return np.concatenate(out).mean(axis=0)


def by_segment(curve: np.ndarray, segment: int) -> list[float]:
    return [float(curve[i : i + segment].mean()) for i in range(0, len(curve), segment)]


def run_model(name, spec, overrides, steps, budget_flops, rows, long_rows) -> dict:
    from lcjax.train import loop

    config = build_config(spec, overrides, steps).validate(__import__("jax").device_count())
    workdir = os.path.join(FLAGS.workdir, name)
    print(f"== {name}: {spec} {overrides or ''} for {steps} steps -> {workdir}", flush=True)
    began = time.perf_counter()
    final = loop.train(config, workdir)
    seconds = time.perf_counter() - began
    context = int(overrides.get("context", 0))
    curve = position_nll(config, workdir, rows, context)
    result = {
        "name": name,
        "spec": spec,
        "overrides": overrides,
        "steps": steps,
        "train_tokens": steps * config.train.batch_size * config.train.seq_len,
        "train_flops": steps * step_flops(config),
        "budget_flops": budget_flops,
        "train_seconds": seconds,
        "final_train_eval_bits_per_byte": final.get("bits_per_byte"),
        "bits_per_byte": float(curve.mean() / math.log(2)),
        "loss_by_segment": by_segment(curve, FLAGS.segment),
        "parameters": _parameters(config),
    }
    if long_rows is not None:
        long_curve = position_nll(config, workdir, long_rows, context)
        result["long_loss_by_segment"] = by_segment(long_curve, FLAGS.segment)
        result["long_bits_per_byte"] = float(long_curve.mean() / math.log(2))
    return result


def _parameters(config) -> int:
    from lcjax.experiments.compare import count_parameters

    return count_parameters(config)


def _header(cells: list[str], per_segment: list[str]) -> list[str]:
    """A markdown table's header row and rule: fixed columns, then one per segment."""
    names = cells + per_segment
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def write_report(results: list[dict], out: str) -> None:
    seg = FLAGS.segment
    lines = [
        "# Default corpus at equal training compute",
        "",
        "Written by `scripts/compare_corpus.py`; each row trained for the training FLOPs of the first. Scored on the",
        f"first {FLAGS.eval_len} tokens of {FLAGS.eval_rows} validation documents (bits/byte over all positions; loss",
        f"in nats by segment of {seg} tokens of the document). How to read these numbers, and what they do not",
        "show: the HMT section of `docs/benchmarks.md`.",
        "",
        *_header(
            ["model", "config", "params", "steps", "train tokens", "train PFLOP", "train s", "bits/byte"],
            [f"loss {i * seg}-{(i + 1) * seg - 1}" for i in range(len(results[0]["loss_by_segment"]))],
        ),
    ]
    for r in results:
        config = r["spec"] + "".join(f", {k}={v}" for k, v in r["overrides"].items())
        lines.append(
            f"| {r['name']} | `{config}` | {r['parameters'] / 1e6:.2f} M | {r['steps']} | {r['train_tokens']:,} | "
            f"{r['train_flops'] / 1e15:.3f} | {r['train_seconds']:.0f} | {r['bits_per_byte']:.4f} | "
            + " | ".join(f"{v:.3f}" for v in r["loss_by_segment"])
            + " |"
        )
    long = [r for r in results if "long_loss_by_segment" in r]
    if long:
        lines += [
            "",
            f"Loss by segment on {FLAGS.long_len}-token rows (more segments read than in training):",
            "",
            *_header(["model", "bits/byte"], [f"seg {i + 1}" for i in range(len(long[0]["long_loss_by_segment"]))]),
        ]
        for r in long:
            lines.append(
                f"| {r['name']} | {r['long_bits_per_byte']:.4f} | "
                + " | ".join(f"{v:.3f}" for v in r["long_loss_by_segment"])
                + " |"
            )
    sweep = sweep_groups(results)
    if sweep:
        lines += [
            "",
            "Sweep (`group@x` entries): bits/byte against x"
            + (f" on the {FLAGS.long_len}-token rows" if any("long_bits_per_byte" in r for r in results) else "")
            + ":",
            "",
            "| group | " + " | ".join(f"x = {x:g}" for x in sorted({x for g in sweep.values() for x, _ in g})) + " |",
            "|---|" + "---|" * len({x for g in sweep.values() for x, _ in g}),
        ]
        xs = sorted({x for g in sweep.values() for x, _ in g})
        for group, points in sweep.items():
            got = dict(points)
            lines.append(f"| {group} | " + " | ".join(f"{got[x]:.4f}" if x in got else "" for x in xs) + " |")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'): wrote the table only", flush=True)
        return
    for key, file, title in (
        ("loss_by_segment", "loss_by_position.png", "validation loss by position, equal training compute"),
        ("long_loss_by_segment", "loss_by_segments_read.png", "loss by segment index (segments read so far)"),
    ):
        chosen = [r for r in results if key in r]
        if not chosen:
            continue
        fig, ax = plt.subplots(figsize=(8.5, 4))
        for r in chosen:
            xs = [(i + 0.5) * seg for i in range(len(r[key]))]
            ax.plot(xs, r[key], marker="o", label=r["name"])
        ax.set_xlabel("position in document (tokens)")
        ax.set_ylabel("loss (nats per byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        fig.tight_layout()
        fig.savefig(os.path.join(out, file), dpi=110)
        plt.close(fig)
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for group, points in sweep.items():
            ax.plot(*zip(*points, strict=True), marker="o", label=group)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("x (the number after @: segments per training row in the unroll sweep)")
        ax.set_ylabel("bits per byte")
        ax.set_title("sweep, equal training compute")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "sweep.png"), dpi=110)
        plt.close(fig)


def sweep_groups(results: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{group: [(x, bits/byte), ...] sorted by x} for results named `group@x` (the --long score where present)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        group, at, x = r["name"].rpartition("@")
        if not at:
            continue
        try:
            value = float(x)
        except ValueError:
            raise SystemExit(f"--models entry {r['name']!r}: the part after @ must be a number") from None
        groups.setdefault(group, []).append((value, r.get("long_bits_per_byte", r["bits_per_byte"])))
    return {g: sorted(p) for g, p in groups.items()}


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if FLAGS.print_unroll_sweep:
        print(UNROLL_SWEEP)
        return
    models = parse_models(FLAGS.models)
    scores = os.path.join(FLAGS.out, "scores")
    os.makedirs(scores, exist_ok=True)
    results = []
    if not FLAGS.report_only:
        from lcjax.data import sources
        from lcjax.data.tokenizers import ByteTokenizer

        first = build_config(models[0][1], models[0][2])
        budget = FLAGS.steps * step_flops(first)
        stream = sources.load_stream(first.data, ByteTokenizer(), "eval")
        rows = document_rows(stream, FLAGS.eval_len, FLAGS.eval_rows)
        long_rows = document_rows(stream, FLAGS.long_len, FLAGS.eval_rows // 2)
        long = {name for name, _, _ in models} if FLAGS.long == "all" else set(filter(None, FLAGS.long.split(",")))
        for name, spec, overrides in models:
            path = os.path.join(scores, f"{name}.json")
            if os.path.exists(path):
                print(f"== {name}: scored before ({path})", flush=True)
                continue
            steps = max(1, round(budget / step_flops(build_config(spec, overrides))))
            result = run_model(name, spec, overrides, steps, budget, rows, long_rows if name in long else None)
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
            print(f"== {name}: bits/byte {result['bits_per_byte']:.4f} in {result['train_seconds']:.0f} s", flush=True)
    for name, _, _ in models:
        path = os.path.join(scores, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    if results:
        write_report(results, FLAGS.out)
        print(f"wrote {FLAGS.out}/README.md", flush=True)


if __name__ == "__main__":
    app.run(main)

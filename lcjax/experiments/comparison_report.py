"""The comparison's report: `comparison.md` and `comparison.json` (a table of answer accuracy by sequence length and
the swept task parameter, per model) and PNG plots of accuracy and of the loss by position."""

from __future__ import annotations

import json
import os
from typing import Any

SWEEP_PARAMETER = {  # the task parameter swept with the sequence length, per task
    "mqar": "num_kv_pairs",
    "passkey": "depth",
    "niah_number": "depth",
    "niah_word": "depth",
    "phonebook": "num_entries",
    "selective_copy": "num_tokens",
    "set_disjointness": "long_set",
}


def write_report(results: dict[str, list[dict]], task: str, out_dir: str, meta: dict[str, Any]) -> list[str]:
    """comparison.md (+ comparison.json) and PNG plots in `out_dir`; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    parameter = SWEEP_PARAMETER[task]
    seq_lens = sorted({r["seq_len"] for rows in results.values() for r in rows})
    values = sorted({r[parameter] for rows in results.values() for r in rows})
    lines = [f"# {task}: answer accuracy (exact match) by sequence length and {parameter}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    header = ["model"] + [f"L={s} {_short(parameter)}={v:g}" for s in seq_lens for v in values]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, rows in results.items():
        cells = {(r["seq_len"], r[parameter]): r for r in rows}
        row = [model]
        for s in seq_lens:
            for v in values:
                r = cells.get((s, v), {})
                row.append("n/a" if "answer_accuracy" not in r else f"{100 * r['answer_accuracy']:.1f}%")
                if r.get("nonfinite_fraction", 0) > 0:
                    row[-1] += f" ({100 * r['nonfinite_fraction']:.0f}% inf/NaN)"
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "n/a: the task cannot be built at that point (see comparison.json for the reason)."]
    if any(r.get("nonfinite_fraction", 0) > 0 for rows in results.values() for r in rows):
        lines += [
            "(x% inf/NaN): the share of examples whose logits at an answer are not finite (the model diverged); "
            "they count as wrong."
        ]
    paths = [os.path.join(out_dir, "comparison.md"), os.path.join(out_dir, "comparison.json")]
    with open(paths[0], "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths[1], "w") as f:
        json.dump({"task": task, "meta": meta, "results": results}, f, indent=2)
    try:
        paths += _plots(results, parameter, seq_lens, values, out_dir)
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'): wrote the table only", flush=True)
    return paths


def _short(parameter: str) -> str:
    """A sweep parameter's column label; others (depth, set disjointness's long_set) keep their name."""
    return {"num_kv_pairs": "D", "num_entries": "entries", "num_tokens": "tokens"}.get(parameter, parameter)


def _plots(results, parameter, seq_lens, values, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def accuracy(rows, s, v):
        r = next((r for r in rows if r["seq_len"] == s and r[parameter] == v), {})
        return 100 * r["answer_accuracy"] if "answer_accuracy" in r else float("nan")

    fig, (by_len, by_value) = plt.subplots(1, 2, figsize=(11, 4))
    for model, rows in results.items():
        for v in values:
            by_len.plot(
                seq_lens,
                [accuracy(rows, s, v) for s in seq_lens],
                marker="o",
                label=f"{model} {_short(parameter)}={v:g}",
            )
        for s in seq_lens:
            by_value.plot(values, [accuracy(rows, s, v) for v in values], marker="o", label=f"{model} L={s}")
    by_len.set(
        xlabel="sequence length", ylabel="accuracy (%)", xscale="log", ylim=(-2, 102), title="by sequence length"
    )
    by_value.set(xlabel=parameter, ylabel="accuracy (%)", ylim=(-2, 102), title=f"by {parameter}")
    by_len.set_xticks(seq_lens, [str(s) for s in seq_lens])
    by_len.minorticks_off()
    if parameter == "num_kv_pairs":  # MQAR: copying any value of the context scores 1/D
        by_value.plot(values, [100 / v for v in values], "k--", linewidth=1, label="1/D (copy a context value)")
    accuracy_png = _save(plt, fig, (by_len, by_value), os.path.join(out_dir, "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    longest = max(seq_lens)
    for model, rows in results.items():
        for r in rows:
            if r["seq_len"] != longest or "answer_accuracy" not in r:
                continue
            buckets = sorted(
                (int(k.split("/")[1].split("-")[0]), val) for k, val in r.items() if k.startswith("loss_pos/")
            )
            ax.plot(
                [max(b, 1) for b, _ in buckets],
                [val for _, val in buckets],
                marker="o",
                label=f"{model} {_short(parameter)}={r[parameter]:g}",
            )
    ax.set(
        xscale="log",
        xlabel="position (bucket start)",
        ylabel="loss at answers (nats)",
        title=f"loss by position, L={longest}",
    )
    position_png = _save(plt, fig, (ax,), os.path.join(out_dir, "loss_by_position.png"))
    return [accuracy_png, position_png]


def _save(plt, fig, axes, path: str) -> str:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

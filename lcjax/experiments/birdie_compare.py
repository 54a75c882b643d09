"""Birdie's comparison (paper §4, phone-book retrieval after fine-tuning): one model pretrained three ways on the same
text for the same steps (Birdie's mixture under its controller, next-token prediction only, a fixed decoder-only UL2
mixture), each then fine-tuned on phone-book lookup the same way (`task.prefix_mask`: the book and question read as
the bidirectional prefix) and scored on single- and multi-number lookup; with each pretraining's next-token
bits/byte on the validation text, and the controller's mixture trajectory plotted.

Every run keeps its workdir, so an interrupted comparison resumes where it stopped (a finished run only re-reports).
`scripts/compare_birdie.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax

from lcjax import config as config_lib
from lcjax.experiments import compare
from lcjax.train import loop
from lcjax.train.metrics import read_metrics

RECIPES = {  # objective overrides of each pretraining
    "birdie": {"objectives.mixture": "birdie-small", "objectives.controller": True},
    "next_token": {"objectives.mixture": "", "objectives.controller": False},
    "ul2": {"objectives.mixture": "ul2", "objectives.controller": False},
}


def build(base, overrides: dict[str, Any]):
    """The validated config of preset `base` (a ConfigDict) with dotted `overrides`."""
    values = base.to_dict()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        values.setdefault(section, {})[key] = value
    return config_lib.from_dict(values).validate(jax.device_count())


def _train(config, workdir: str, init_from: str = "") -> None:
    """One stage; a preempted stage (SIGTERM/SIGINT) stops the comparison, and the next run resumes it."""
    result = loop.train(config, workdir, init_from=init_from)
    if "stopped_at_step" in result:
        raise KeyboardInterrupt(f"stopped during {workdir} at step {int(result['stopped_at_step'])}")


def run(
    preset: str,
    workdir: str,
    out_dir: str,
    *,
    pretrain: dict[str, Any],
    finetune: dict[str, Any],
    queries: list[int],
    recipes: list[str],
    configs_dir: str = "configs",
) -> dict[str, Any]:
    """Pretrains, fine-tunes and scores every recipe; writes `birdie_comparison.json`/`.md` and the mixture PNG."""
    base = compare.load_preset(preset, configs_dir)
    results = {}
    for name in recipes:
        pre_dir, ft_dir = os.path.join(workdir, name, "pretrain"), os.path.join(workdir, name, "phonebook")
        started = time.perf_counter()
        print(f"== {name}: pretraining -> {pre_dir}", flush=True)
        _train(build(base, {**pretrain, **RECIPES[name]}), pre_dir)
        print(f"== {name}: phone-book fine-tuning -> {ft_dir}", flush=True)
        ft_config = build(base, {"objectives.mixture": "", "objectives.controller": False, **finetune})
        _train(ft_config, ft_dir, init_from=pre_dir)
        final = read_metrics(pre_dir, "eval")
        row = {
            "next_token_bits_per_byte": final[max(final)]["bits_per_byte"],
            "seconds": time.perf_counter() - started,
        }
        for q in queries:
            scored = dataclasses.replace(ft_config, task=dataclasses.replace(ft_config.task, num_queries=q))
            grid = compare.score_grid(
                scored, ft_dir, "phonebook", [ft_config.train.seq_len], [ft_config.task.num_entries]
            )
            row[f"phonebook_{q}"] = grid[0].get("answer_accuracy")
            row[f"phonebook_{q}_example"] = grid[0].get("example_accuracy")
            row[f"phonebook_{q}_token"] = grid[0].get("token_accuracy")  # per answer digit: progress below 100%
        results[name] = row
        print(f"[{name}] {row}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    report = {"preset": preset, "pretrain": pretrain, "finetune": finetune, "results": results}
    with open(os.path.join(out_dir, "birdie_comparison.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    lines = [
        f"# Birdie comparison: {preset}",
        "",
        f"- pretraining: {', '.join(f'{k}={v}' for k, v in pretrain.items())}",
        f"- phone-book fine-tuning: {', '.join(f'{k}={v}' for k, v in finetune.items())}",
        "",
        "| pretraining | next-token bits/byte | "
        + " | ".join(f"phone book, {q} number{'s' if q > 1 else ''} (number / all / digit)" for q in queries)
        + " |",
        "|---|---|" + "---|" * len(queries),
    ]
    for name, row in results.items():
        cells = [
            f"{100 * row[f'phonebook_{q}']:.1f}% / {100 * row[f'phonebook_{q}_example']:.1f}% / "
            f"{100 * row[f'phonebook_{q}_token']:.1f}%"
            for q in queries
        ]
        lines.append(f"| {name} | {row['next_token_bits_per_byte']:.3f} | " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "birdie_comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if "birdie" in results:
        plot_mixture(os.path.join(workdir, "birdie", "pretrain"), os.path.join(out_dir, "birdie_mixture.png"))
    return report


def plot_mixture(workdir: str, path: str) -> None:
    """The controller's mixture at each evaluation (a stacked area per arm) from the run's metrics."""
    records = read_metrics(workdir, "birdie")
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(records)
    arms = [k for k in records[steps[0]] if k.startswith("mixture/")]
    # the mixture set at an evaluation holds until the next: one stacked bar per interval (the last evaluation's
    # mixture, set when training ends, as a narrow bar after it)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    tail = max(1, (steps[-1] - steps[0]) // 25)
    widths = [b - a for a, b in zip(steps[:-1], steps[1:], strict=True)] + [tail]
    bottom = [0.0] * len(steps)
    for arm in arms:
        shares = [records[s][arm] for s in steps]
        ax.bar(steps, shares, widths, bottom=bottom, align="edge", label=arm[8:], alpha=0.85, linewidth=0)
        bottom = [b + x for b, x in zip(bottom, shares, strict=True)]
    ax.set_xlabel("training step")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1)
    ax.set_title("Birdie controller: objective mixture over training")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

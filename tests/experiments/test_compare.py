"""The comparison driver end to end on a tiny budget: curriculum stages, the scoring grid, the report files."""

import json
import os

import pytest

from lcjax.errors import ConfigError
from lcjax.experiments import compare
from lcjax.train.metrics import read_metrics
from tests.conftest import ROOT

OVERRIDES = {
    "model.d_model": 32,
    "model.mlp_dim": 64,
    "model.num_layers": 2,
    "model.vocab_size": 160,
    "train.batch_size": 8,
    "train.log_every": 1,
    "train.eval_every": 1000,
    "eval.batch_size": 8,
    "eval.num_batches": 1,
    "task.num_train_examples": 64,
}


def test_compare_trains_stages_scores_the_grid_and_writes_the_report(tmp_path, capsys):
    stages = compare.parse_stages("32:2:2, 64:4:1")
    results = compare.compare(
        ["transformer:tiny"],
        "mqar",
        stages,
        seq_lens=[32, 64],
        values=[2, 16],
        overrides=OVERRIDES,
        workdir=str(tmp_path / "runs"),
        out_dir=str(tmp_path / "out"),
        configs_dir=os.path.join(ROOT, "configs"),
    )
    rows = results["transformer:tiny"]
    assert [(r["seq_len"], r["num_kv_pairs"]) for r in rows] == [(32, 2), (32, 16), (64, 2), (64, 16)]
    assert "2*D*p + 2*D = 64 <= train.seq_len=32" in rows[1]["skipped"]  # L=32 cannot hold 16 pairs
    for r in (rows[0], rows[2], rows[3]):
        assert 0.0 <= r["answer_accuracy"] <= 1.0 and r["step"] == 1
    assert rows[3]["tokens"] == 16 * 8  # D labelled positions per example, one batch of 8
    # the second stage started from the first one's parameters and trained its own step
    for i, steps in enumerate([2, 1]):
        stage_dir = tmp_path / "runs" / "transformer_tiny" / f"stage{i}"
        assert sorted(int(p) for p in os.listdir(stage_dir / "checkpoints") if p.isdigit())[-1] == steps
    assert "stage 2/2" in capsys.readouterr().out
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "| model | L=32 D=2 | L=32 D=16 | L=64 D=2 | L=64 D=16 |" in table
    # d 32, 2 layers of (4 attention matrices 32x32 with 4 heads and 2 kv heads of 8 + SwiGLU 3x32x64 + 2 norms),
    # the final norm, tied embeddings 160x32
    attention = 32 * 32 + 2 * 32 * 16 + 32 * 32
    assert f"- parameters: transformer:tiny {(2 * (attention + 3 * 32 * 64 + 64) + 32 + 160 * 32) / 1e6:.2f}M" in table
    line = next(x for x in table.splitlines() if x.startswith("| transformer:tiny"))
    assert line.split(" | ")[2] == "n/a" and line.count("%") == 3
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["results"]["transformer:tiny"] == json.loads(json.dumps(rows))
    for png in ("accuracy.png", "loss_by_position.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun finds both stages done and trains no step again
    last = tmp_path / "runs" / "transformer_tiny" / "stage1"
    before = read_metrics(str(last), "train")
    seconds = [compare.stage_seconds(str(last.parent / f"stage{i}")) for i in range(2)]
    assert all(s > 0 for s in seconds)
    record = json.loads((tmp_path / "out" / "scores" / "transformer_tiny.json").read_text())
    assert record["training_seconds"] == sum(seconds)  # both stages' seconds, as each stage recorded them
    base = compare.load_preset("transformer:tiny", os.path.join(ROOT, "configs"))
    _, total = compare.train_model("transformer:tiny", base, "mqar", stages, OVERRIDES, str(tmp_path / "runs"))
    assert read_metrics(str(last), "train") == before
    # the rerun's (short) visits are added to what each stage recorded before: earlier sittings keep counting
    again = [compare.stage_seconds(str(last.parent / f"stage{i}")) for i in range(2)]
    assert all(a > s for a, s in zip(again, seconds, strict=True)) and total == sum(again)
    # the scores outlive the runs: with the training runs gone, the same recipe reuses them and trains nothing
    assert record["rows"] == saved["results"]["transformer:tiny"] and record["recipe"]["stages"] == [
        [32, 2, 2],
        [64, 4, 1],
    ]

    def rerun(models, **kw):  # the same recipe, the training runs gone
        grid = ([32, 64], [2, 16], OVERRIDES, str(tmp_path / "gone"), str(tmp_path / "out"))
        return compare.compare(models, "mqar", stages, *grid, os.path.join(ROOT, "configs"), **kw)

    again = rerun(["transformer:tiny"])
    assert again == saved["results"] and not (tmp_path / "gone").exists()
    assert "scored before with this recipe" in capsys.readouterr().out
    # a report from the saved scores alone: a model without them is listed as not scored, and nothing trains; the
    # report names the machine each model was scored on (its scores file), not the one writing it
    assert record["devices"] == "8 x cpu"
    path = tmp_path / "out" / "scores" / "transformer_tiny.json"
    path.write_text(json.dumps({**record, "devices": "1 x NVIDIA H200"}))
    only = rerun(["transformer:tiny", "mamba2:tiny"], train=False)
    assert list(only) == ["transformer:tiny"] and not (tmp_path / "gone").exists()
    report = (tmp_path / "out" / "comparison.md").read_text()
    assert "- not scored yet: mamba2:tiny" in report and "- devices: 1 x NVIDIA H200" in report
    # another recipe (here one more grid point) is not served from them
    assert compare.load_scores(str(tmp_path / "out"), "transformer:tiny", {**record["recipe"], "values": [2]}) is None
    # --init_from: the first stage starts from another run's parameters (here the trained stage 1), so its first
    # step's loss differs from the fresh first stage's on the same batch; the recipe and the report say so
    fresh_first = read_metrics(str(tmp_path / "runs" / "transformer_tiny" / "stage0"), "train")[1]
    warm = compare.compare(
        ["transformer:tiny"], "mqar", stages[:1], [32], [2], OVERRIDES, str(tmp_path / "warm"), str(tmp_path / "warm"),
        os.path.join(ROOT, "configs"), init_from={"transformer:tiny": str(last)},
    )  # fmt: skip
    warm_first = read_metrics(str(tmp_path / "warm" / "transformer_tiny" / "stage0"), "train")[1]
    assert warm_first["step"] == fresh_first["step"] == 1 and warm_first["loss"] != fresh_first["loss"]
    assert warm["transformer:tiny"][0]["step"] == 2
    warm_record = json.loads((tmp_path / "warm" / "scores" / "transformer_tiny.json").read_text())
    assert warm_record["recipe"]["init_from"] == str(last)
    assert f"- first stage starts from: transformer:tiny {last}" in (tmp_path / "warm" / "comparison.md").read_text()
    for bad, message in [
        ({"mamba2:tiny": str(last)}, "not one of --models"),
        ({"transformer:tiny": "/nope"}, "no such"),
    ]:
        with pytest.raises(ConfigError, match=message):
            compare.compare(["transformer:tiny"], "mqar", stages, [32], [2], OVERRIDES, str(tmp_path / "x"),
                            str(tmp_path / "x"), os.path.join(ROOT, "configs"), init_from=bad)  # fmt: skip


def test_family_overrides_apply_only_to_their_models():
    import pytest

    from lcjax.errors import ConfigError

    overrides = {"model.num_layers": 2, "transformer:model.num_kv_heads": 4, "titans:mac-tiny:model.window": 8}
    assert compare.overrides_for("transformer:tiny", overrides) == {"model.num_layers": 2, "model.num_kv_heads": 4}
    assert compare.overrides_for("titans:mac-tiny", overrides) == {"model.num_layers": 2, "model.window": 8}
    assert compare.overrides_for("titans:mag-tiny", overrides) == {"model.num_layers": 2}
    assert compare.overrides_for("mamba2:tiny", {"model.d_model": 64, "mamba2:model.d_model": 96}) == {
        "model.d_model": 96
    }  # the family's value wins
    configs = os.path.join(ROOT, "configs")
    # a family left out of the comparison (the default list names transformer) applies to nothing
    compare.check_overrides(["titans:lmm-tiny"], {"transformer:model.num_kv_heads": 4}, configs)
    with pytest.raises(ConfigError, match="names 'xlstmm'"):  # a typo
        compare.check_overrides(["transformer:tiny"], {"xlstmm:model.num_heads": 8}, configs)
    with pytest.raises(ConfigError, match="names 'xlstmm'"):
        compare.compare(["transformer:tiny"], "mqar", [], [], [], {"xlstmm:model.num_heads": 8}, "/no", "/no", configs)


def test_report_marks_points_where_the_model_diverged(tmp_path):
    rows = [
        {"seq_len": 64, "depth": 0.5, "answer_accuracy": 0.75, "nonfinite_fraction": 0.25},
        {"seq_len": 256, "depth": 0.5, "answer_accuracy": 1.0, "nonfinite_fraction": 0.0},
    ]
    compare.write_report({"titans:mac-tiny": rows}, "passkey", str(tmp_path), {})
    table = (tmp_path / "comparison.md").read_text()
    assert "| titans:mac-tiny | 75.0% (25% inf/NaN) | 100.0% |" in table
    assert "the model diverged" in table
    compare.write_report({"titans:mac-tiny": rows[1:]}, "passkey", str(tmp_path), {})
    assert "inf/NaN" not in (tmp_path / "comparison.md").read_text()


def test_every_task_writes_its_report(tmp_path):
    for task, parameter in compare.SWEEP_PARAMETER.items():
        rows = [{"seq_len": 64, parameter: 8, "answer_accuracy": 0.5, "nonfinite_fraction": 0.0}]
        compare.write_report({"jrt:tiny": rows}, task, str(tmp_path / task), {})
        assert "| jrt:tiny | 50.0% |" in (tmp_path / task / "comparison.md").read_text(), task

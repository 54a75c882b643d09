"""Malformed configs and inputs: each exits with status 2 and one line naming the problem, before anything is
compiled, and leaves the workdir and its checkpoints exactly as they were."""

import os

import numpy as np
import pytest

from lcjax.data import arrayrecord, sources
from tests.conftest import run_main
from tests.train.test_resilience import SMALL, corpus  # noqa: F401 (fixture)


def _snapshot(directory) -> dict | None:
    if not os.path.exists(directory):
        return None
    return {
        os.path.relpath(os.path.join(root, name), directory): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, dirs, files in os.walk(directory)
        for name in files + dirs
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus):  # noqa: F811
    """Files the cases point at, and a workdir holding a checkpoint of a 2-layer model."""
    base = tmp_path_factory.mktemp("inputs")
    (base / "garbage.model").write_bytes(b"this is not a sentencepiece model")
    (base / "a_file").write_text("not a directory")
    (base / "bad.jsonl").write_text('{"body": "no text key"}\n')
    stream = sources.concat_documents([np.arange(300, dtype=np.int32)] * 40)
    for split in sources.SPLITS:
        arrayrecord.write_stream(stream, str(base / "shards"), split, chunk_len=512, records_per_shard=8)
    arrayrecord.write_meta(
        str(base / "shards"),
        chunk_len=512,
        tokenizer="bytes",
        vocab_size=256,
        max_token=299,
        num_tokens={s: stream.num_tokens for s in sources.SPLITS},
    )
    trained = base / "trained"
    result = run_main(
        *SMALL, f"--config.data.path={corpus}", "--config.train.steps=2", f"--workdir={trained}", timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return base


CASES = {
    "unknown key": (["--config.train.stpes=5"], "--config.train.stpes: unknown config key 'stpes'"),
    "unknown section": (["--config.optim.lr=1"], "unknown config key 'optim'"),
    "attention outside the model": (
        ["--config.attention.impl=pallas"],
        "are in the model section: --config.model.attention",
    ),
    "unknown preset": (["--config=configs/transformer.py:huge"], "unknown preset 'huge'"),
    "wrong type": (["--config.train.steps=abc"], "--config.train.steps=abc"),
    "negative batch size": (["--config.train.batch_size=-8"], "train.batch_size: must be > 0"),
    "zero layers": (["--config.model.num_layers=0"], "model.num_layers: must be > 0"),
    "zero sequence length": (["--config.train.seq_len=0"], "train.seq_len: must be > 0"),
    "unknown model": (["--config.model.name=gpt5"], "model.name: unknown model 'gpt5'"),
    "mesh larger than devices": (["--config.mesh.data=16"], "mesh: data=16"),
    "heads vs tensor axis": (["--config.mesh.tensor=8", "--config.mesh.data=1"], "model.num_heads=4 must be divisible"),
    "seq_len vs sequence axis": (
        ["--config.train.seq_len=100", "--config.mesh.sequence=8", "--config.mesh.data=1"],
        "train.seq_len=100 must be divisible by mesh.sequence=8",
    ),
    "grad accumulation vs batch": (["--config.train.grad_accum_steps=3"], "train.grad_accum_steps=3"),
    "bad dtype": (["--config.train.compute_dtype=float16"], "train.compute_dtype"),
    "missing data path": (["--config.data.source=text", "--config.data.path="], "data.path: is required"),
    "data path matches nothing": (
        ["--config.data.source=text", "--config.data.path=/nonexistent/*.txt"],
        "data.path: no files match",
    ),
    "jsonl without text key": (
        [
            "--config.data.source=jsonl",
            "--config.data.path={base}/bad.jsonl",
            "--config.data.eval_path={base}/bad.jsonl",
        ],
        "bad.jsonl:1",
    ),
    "missing tokenizer file": (["--config.data.tokenizer={base}/missing.model"], "data.tokenizer: no readable"),
    "unreadable tokenizer file": (["--config.data.tokenizer={base}/garbage.model"], "data.tokenizer: cannot load"),
    "token ids >= vocab in shard": (
        ["--config.data.source=arrayrecord", "--config.data.path={base}/shards", "--config.model.vocab_size=260"],
        "token id 299 >= model.vocab_size=260",
    ),
    "landmark attention without mem_freq": (
        ["--config.model.attention.impl=landmark"],
        "model.attention.mem_freq=0 must be >= 1 with model.attention.impl=landmark",
    ),
    "unknown eval task": (["--config.eval.tasks=mqar,needle"], "eval.tasks: unknown task 'needle'"),
    "mqar with too many pairs": (
        ["--config.data.source=mqar", "--config.model.vocab_size=512", "--config.task.num_kv_pairs=9"],
        "task.num_kv_pairs=9 with task.num_passes=1 needs 2*D*p + 2*D = 36 <= train.seq_len=32",
    ),
    "sparse logits below the labels per row": (
        [
            "--config.data.source=mqar",
            "--config.model.vocab_size=512",
            "--config.task.num_kv_pairs=4",
            "--config.train.sparse_logits=2",
        ],
        "train.sparse_logits=2 but a training row has 4 labelled positions",
    ),
    "negative sparse logits": (["--config.train.sparse_logits=-1"], "train.sparse_logits: must be >= 0"),
    "passkey longer than seq_len": (["--config.eval.tasks=passkey"], "train.seq_len=32 leaves no room"),
    "unknown objective": (["--config.objectives.mixture=copying,lstm"], "objectives.mixture: unknown objective 'lstm'"),
    "objective weights summing to zero": (
        ["--config.objectives.mixture=copying:0,infilling:0"],
        "objectives.mixture: the weights [0.0, 0.0] sum to 0",
    ),
    "objective prefix longer than the row": (
        ["--config.objectives.mixture=next_token,copying"],
        "objective copying(len=64-256) needs at least 151 tokens (its prefix and markers included), longer than a "
        "row of train.seq_len=32",
    ),
    "unwritable workdir": (["--workdir={base}/a_file/run"], "workdir: cannot write"),
    "init_from missing": (["--init_from={base}/nowhere"], "init_from"),
    "checkpoint of another shape": (
        ["--workdir={base}/trained", "--config.model.num_layers=3"],
        "parameter layers/blocks/attn/wk has shape [2, 32, 2, 8] in the checkpoint",
    ),
    "stream longer than the validation split": (
        ["--workdir={base}/trained", "--mode=eval", "--config.eval.stream_tokens=100000000"],
        "eval.stream_tokens=100000000 needs 100000001 validation tokens",
    ),
    "generate paradigm of a causal model": (
        ["--workdir={base}/trained", "--mode=generate", "--prompt=Hi", "--config.generate.paradigm=prefix_lm"],
        "generate.paradigm: needs a model that reads a bidirectional prefix (birdie)",
    ),
    "unknown generate paradigm": (["--config.generate.paradigm=chat"], "generate.paradigm: must be '' or one of"),
    "checkpoint with another width": (["--workdir={base}/trained", "--config.model.d_model=64"], "in the checkpoint"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(name, inputs, corpus, tmp_path):  # noqa: F811
    overrides, expected = CASES[name]
    overrides = [o.format(base=inputs) for o in overrides]
    args = [*SMALL, f"--config.data.path={corpus}", f"--workdir={tmp_path / 'run'}", "--config.train.steps=2"]
    args += overrides  # later flags win
    workdirs = [a.split("=", 1)[1] for a in args if a.startswith("--workdir=")]
    before = {w: _snapshot(w) for w in workdirs}
    result = run_main(*args, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], (errors, result.stderr[-1500:])
    assert {w: _snapshot(w) for w in workdirs} == before


def test_checkpoint_of_another_model_is_refused():
    from lcjax.errors import ConfigError
    from lcjax.train.checkpoint import check_compatible

    with pytest.raises(ConfigError, match="holds model 'titans', this run is 'transformer'"):
        check_compatible(
            {"model": "titans", "parameter_layout": {}}, {"model": "transformer", "parameter_layout": {}}, "ckpt/4"
        )


def test_case_table_is_large_enough():
    assert len(CASES) >= 15

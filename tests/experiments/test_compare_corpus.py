"""scripts/compare_corpus.py's bookkeeping (no training): equal training compute sets the step counts, and the
scored rows start at document starts."""

import importlib.util
import os

import numpy as np
import pytest

from lcjax.data import sources
from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("compare_corpus", os.path.join(ROOT, "scripts", "compare_corpus.py"))
compare_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_corpus)


def test_every_default_model_gets_the_first_ones_training_flops():
    models = compare_corpus.parse_models(compare_corpus.DEFAULT_MODELS)
    first = compare_corpus.build_config(models[0][1], models[0][2])
    budget = 100 * compare_corpus.step_flops(first)
    for _, spec, overrides in models:
        config = compare_corpus.build_config(spec, overrides)
        steps = round(budget / compare_corpus.step_flops(config))
        scheduled = compare_corpus.build_config(spec, overrides, steps)
        assert abs(steps * compare_corpus.step_flops(scheduled) / budget - 1) < 0.01
        assert scheduled.train.steps == steps and 1 <= scheduled.train.warmup_steps < steps
        assert config.train.batch_size * config.train.seq_len == 8192  # the same tokens per step
    rmt = compare_corpus.build_config(models[3][1], models[3][2]).model
    assert (rmt.stage, rmt.cache_size) == (1, 1)
    assert compare_corpus.step_flops(first) > compare_corpus.step_flops(compare_corpus.build_config(*models[2][1:]))


def test_rows_are_document_prefixes_and_bad_entries_are_refused():
    docs = [np.full(n, i, np.int32) for i, n in enumerate([5, 12, 3, 20, 11])]
    rows = compare_corpus.document_rows(sources.concat_documents(docs), 10, 3)
    np.testing.assert_array_equal(rows[:, 0], [1, 3, 4])  # documents 1, 3, 4 hold 11 tokens
    assert rows.shape == (3, 11) and (rows == rows[:, :1]).all()  # never across a document boundary
    with pytest.raises(SystemExit, match="only 3 validation documents"):
        compare_corpus.document_rows(sources.concat_documents(docs), 10, 4)
    with pytest.raises(SystemExit, match="is not name=family:preset"):
        compare_corpus.parse_models("hmt=hmt:tiny,model.stage")


def test_unroll_sweep_keeps_tokens_per_step_and_groups_by_depth():
    models = compare_corpus.parse_models(compare_corpus.UNROLL_SWEEP)
    assert [name for name, _, _ in models[:2]] == ["hmt@8", "rmt@8"]  # the default comparison's hmt row sets the budget
    for name, spec, overrides in models:
        config = compare_corpus.build_config(spec, overrides)
        n = int(name.partition("@")[2])
        assert config.train.seq_len == n * config.model.segment_len
        assert config.train.batch_size * config.train.seq_len == 8192
    results = [
        {"name": "hmt@8", "bits_per_byte": 9.0, "long_bits_per_byte": 3.0},
        {"name": "hmt@2", "bits_per_byte": 9.0, "long_bits_per_byte": 2.0},
        {"name": "rmt@4", "bits_per_byte": 1.5},  # no long score: the short one
        {"name": "transformer-128", "bits_per_byte": 7.0},  # not a sweep entry
    ]
    assert compare_corpus.sweep_groups(results) == {"hmt": [(2.0, 2.0), (8.0, 3.0)], "rmt": [(4.0, 1.5)]}
    with pytest.raises(SystemExit, match="after @ must be a number"):
        compare_corpus.sweep_groups([{"name": "hmt@deep", "bits_per_byte": 1.0}])

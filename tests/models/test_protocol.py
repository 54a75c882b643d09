"""The model protocol, checked for every registered model (`lcjax.models.registry.names()`): a family needs only
its entry in `SPECS` here, and its per-family test file keeps what is specific to it (oracles, family options).

For each model: decode in ragged pieces == the parallel form; causality; packed documents isolated (a document's
outputs do not depend on the document packed before it, and equal those of the same document at a row start); a
left-padded row (JRT-Prompt's layout) isolates its padding;
loss and gradients on data=2,tensor=2 == one device; parameter names and logical axes == the golden file
(`tests/golden/params/<model>.json`, written at the commit before the model skeleton landed: checkpoints keep
restoring); every preset in `configs/<model>.py` builds
and validates; a jitted train step lowers the loss on a learnable task; the train step compiles for a TPU topology.

Regenerate a golden file only for a deliberate change of parameter names: LCJAX_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from lcjax import models
from lcjax.config import from_config_dict, from_dict
from lcjax.layers.params import logical_axes
from lcjax.models import registry
from lcjax.parallel.mesh import make_mesh
from lcjax.train.step import Trainer
from tests.conftest import ROOT, assert_sharded_gradients_equal_one_device, packed_batch, pattern_batch

LENGTH = 12  # tokens per row in the checks


@dataclasses.dataclass(frozen=True)
class Spec:
    model: dict  # the smallest model section that still exercises the family's mixers
    pieces: tuple[int, ...] = (5, 1, 6)  # decode piece sizes (sum LENGTH): a prefill, one token, a longer prefill
    atol: float = 2e-5  # decode == parallel
    perturb: float = 0.0  # add N(0, perturb²) to every parameter: zero-initialized gates would hide mistakes
    tensor_param: tuple[str, ...] = ()  # a parameter (path) the sharded check expects split over `tensor`
    # A document packed after another == the same document at the start of a row. Not for Titans: its persistent
    # tokens belong to a row's first document (`tests/models/test_titans.py` checks its own resets); not for HMT.
    packed_equals_alone: bool = True
    # A variant: a registered model (this name) run with other settings, checked under its own key (landmark
    # attention is the transformer with attention.impl=landmark; its presets are configs/<key>.py).
    model_name: str = ""


SPECS = {
    "transformer": Spec(
        {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64},
        atol=1e-5,
        tensor_param=("layers", "blocks", "attn", "wq"),
    ),
    # mag: the memory, the window attention and the persistent prefix in one model
    "titans": Spec(
        {"variant": "mag", "window": 4, "vocab_size": 64, "d_model": 32, "num_layers": 2, "mlp_dim": 64}
        | {"memory_heads": 2, "chunk_size": 4, "num_persistent": 2},
        tensor_param=("layers", "blocks", "attn", "wq"),
        packed_equals_alone=False,
    ),
    "xlstm": Spec(
        {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 2, "chunk_size": 4},
        perturb=0.1,
        tensor_param=("layers", "blocks", "mlstm", "w_q"),
    ),
    "mamba2": Spec(
        {"vocab_size": 64, "d_model": 32, "num_layers": 2, "d_state": 8, "head_dim": 16, "n_groups": 2}
        | {"chunk_size": 4},
        perturb=0.3,
        tensor_param=("layers", "blocks", "mixer", "w_x"),
    ),
    # Hawk: one (bidirectional, causal) pair of layers; gates perturbed so the decays are not all alike
    "birdie": Spec(
        {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_gate_blocks": 2},
        perturb=0.1,
        tensor_param=("layers", "blocks", "causal", "w_x"),
    ),
}
# JRT: one BaseConv, PLA and window-attention layer each; the encoder reads the first 4 tokens
SPECS["jrt"] = Spec(
    {"vocab_size": 64, "d_model": 32, "num_layers": 3, "layer_pattern": "cpw", "num_heads": 2, "num_kv_heads": 2}
    | {"feature_dim": 4, "prefix_len": 4, "window": 4, "chunk_size": 4},
    perturb=0.1,
    tensor_param=("layers", "blocks", "l1", "mixer", "w_q"),
    packed_equals_alone=False,  # the encoder is the row's prompt: only the row's first document reads it
)
SPECS["hmt"] = Spec(  # three segments of 4 tokens with 2 sensory ones around the transformer; the cache evicts
    {"backbone": {"name": "transformer", **SPECS["transformer"].model}, "segment_len": 4, "sensory_tokens": 2}
    | {"cache_size": 2},
    atol=1e-5,
    tensor_param=("backbone", "layers", "blocks", "attn", "wq"),
    packed_equals_alone=False,  # a document's segments start where the row's do, not at the document
)
SPECS["landmark"] = Spec(  # blocks of 3 tokens + a landmark: 12 tokens are 16 slots, 4 blocks, the last one gated
    SPECS["transformer"].model | {"attention": {"impl": "landmark", "mem_freq": 3}},
    atol=1e-5,
    tensor_param=("layers", "blocks", "attn", "wq"),
    # blocks are cut from the row's start: a packed document is isolated, but its blocks are not those it would
    # have at a row start (tests/layers/test_landmark_attention.py checks the isolation inside a shared block)
    packed_equals_alone=False,
    model_name="transformer",
)
NAMES = registry.names() + [key for key, spec in SPECS.items() if spec.model_name]


def _spec(name: str) -> Spec:
    if name not in SPECS:
        pytest.fail(f"model {name!r} is registered but has no entry in tests/models/test_protocol.py SPECS")
    return SPECS[name]


def _config(name: str, **sections):
    return from_dict({"model": {"name": _spec(name).model_name or name, **_spec(name).model}, **sections})


@functools.cache
def _model_and_forward(name: str):
    """The spec's model (perturbed as the spec says) and its jitted parallel form (one compile per model)."""
    spec = _spec(name)
    graphdef, state = nnx.split(models.build(_config(name), nnx.Rngs(0)))
    if spec.perturb:
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
        state = jax.tree.map(lambda a: a + spec.perturb * jax.random.normal(next(keys), a.shape, a.dtype), state)
    model = nnx.merge(graphdef, state)
    return model, nnx.jit(lambda model, batch: model(batch)[0])


def _tokens(shape, seed):
    return jax.random.randint(jax.random.key(seed), shape, 0, 64)


@pytest.mark.parametrize("name", NAMES)
def test_decode_in_ragged_pieces_equals_the_parallel_form(name):
    spec = _spec(name)
    model, forward = _model_and_forward(name)
    tokens = _tokens((2, LENGTH), seed=1)
    segments = jnp.ones((2, LENGTH), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH))
    logits = forward(model, {"inputs": tokens, "segment_ids": segments, "positions": positions})
    assert logits.shape == (2, LENGTH, 64) and float(jnp.std(logits)) > 0.1
    decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    cache, outputs, start = model.init_cache(2, LENGTH), [], 0
    assert sum(spec.pieces) == LENGTH
    for n in spec.pieces:
        out, cache = decode(model, tokens[:, start : start + n], cache)
        outputs.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), logits, atol=spec.atol, rtol=0)
    assert int(cache["index"]) >= LENGTH


@pytest.mark.parametrize("name", NAMES)
def test_causal_and_packed_documents_are_isolated(name):
    model, forward = _model_and_forward(name)
    doc1, other_doc1, doc2 = _tokens((7,), seed=2), _tokens((7,), seed=4), _tokens((5,), seed=3)
    # rows 0 and 1: the same second document after two different first ones; row 2: it at the start of the row
    rows = [[doc1, doc2], [other_doc1, doc2], [doc2, _tokens((7,), seed=5)]]
    inputs = jnp.stack([jnp.concatenate(row) for row in rows])
    segments = jnp.array([[1] * 7 + [2] * 5] * 2 + [[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.array([list(range(7)) + list(range(5))] * 2 + [list(range(5)) + list(range(7))], jnp.int32)
    packed = forward(model, {"inputs": inputs, "segment_ids": segments, "positions": positions})
    np.testing.assert_allclose(packed[0, 7:], packed[1, 7:], atol=2e-5, rtol=0)  # it does not see the one before
    assert float(jnp.max(jnp.abs(packed[0, :7] - packed[1, :7]))) > 1e-4
    if _spec(name).packed_equals_alone:  # and it starts from a fresh state
        np.testing.assert_allclose(packed[0, 7:], packed[2, :5], atol=2e-5, rtol=0)
    # causality: a change at t = 8 leaves the outputs before 8 unchanged and changes some after
    changed = inputs.at[:, 8].set((inputs[:, 8] + 1) % 64)
    later = forward(model, {"inputs": changed, "segment_ids": segments, "positions": positions})
    np.testing.assert_allclose(later[:, :8], packed[:, :8], atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(later[:, 8:] - packed[:, 8:]))) > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_a_left_padded_row_as_jrt_prompt_builds_it_isolates_the_padding(name):
    """JRT-Prompt (`synthetic.JRTPrompt`) left-pads each example in segment 0 with positions 0: whatever the padding
    holds, the content's outputs are the same and finite; where a document equals itself at a row start, they equal
    the content's alone."""
    model, forward = _model_and_forward(name)
    content = _tokens((2, LENGTH - 4), seed=6)
    segments = jnp.array([[0] * 4 + [1] * (LENGTH - 4)] * 2, jnp.int32)
    positions = jnp.array([[0] * 4 + list(range(LENGTH - 4))] * 2, jnp.int32)
    rows = lambda pad: {"inputs": jnp.concatenate([pad, content], 1), "segment_ids": segments, "positions": positions}
    zeros = forward(model, rows(jnp.zeros((2, 4), jnp.int32)))
    other = forward(model, rows(_tokens((2, 4), seed=7)))
    assert bool(jnp.all(jnp.isfinite(zeros[:, 4:])))
    np.testing.assert_allclose(other[:, 4:], zeros[:, 4:], atol=2e-5, rtol=0)
    if _spec(name).packed_equals_alone:
        alone = jnp.concatenate([content, _tokens((2, 4), seed=8)], 1)  # the content at a row start
        ones = jnp.ones((2, LENGTH), jnp.int32)
        want = forward(
            model,
            {"inputs": alone, "segment_ids": ones, "positions": jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH))},
        )
        np.testing.assert_allclose(zeros[:, 4:], want[:, : LENGTH - 4], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_loss_and_gradients_equal_one_device(name):
    grads = assert_sharded_gradients_equal_one_device(_config(name, train={"batch_size": 4}), packed_batch())
    spec = _spec(name).tensor_param
    leaf = functools.reduce(lambda tree, key: tree[key], spec, grads)
    assert "tensor" in jax.tree.leaves(tuple(leaf.sharding.spec)), (spec, leaf.sharding.spec)


def _golden_table(model) -> dict:
    join = lambda path: "/".join(map(str, path))
    shapes = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    axes = traverse_util.flatten_dict(logical_axes(model), is_leaf=lambda _, v: isinstance(v, tuple))
    return {join(k): {"shape": list(v.shape), "axes": list(axes[k])} for k, v in sorted(shapes.items())}


@pytest.mark.parametrize("name", NAMES)
def test_parameter_names_and_axes_are_pinned(name):
    table = _golden_table(nnx.eval_shape(lambda: models.build(_config(name), nnx.Rngs(0))))
    path = os.path.join(ROOT, "tests", "golden", "params", f"{name}.json")
    if os.environ.get("LCJAX_UPDATE_GOLDEN") == "1":
        with open(path, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    assert os.path.exists(path), f"no golden parameter file {path}; write it once with LCJAX_UPDATE_GOLDEN=1"
    with open(path) as f:
        assert table == json.load(f)


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_builds_and_validates(name):
    presets = importlib.import_module(f"configs.{name}")
    assert presets.PRESETS, f"configs/{name}.py has no presets"
    for preset in getattr(presets, "VARIANTS", presets.PRESETS):  # a wrapper's presets around each backbone
        config = from_config_dict(presets.get_config(preset)).validate(device_count=8)
        assert config.model.name == (_spec(name).model_name or name)
        if _spec(name).model_name:  # a variant's presets are that variant (an attention variant, so far)
            assert config.model.attention.impl == _spec(name).model["attention"]["impl"], preset
        abstract = nnx.eval_shape(lambda config=config: models.build(config, nnx.Rngs(0)))
        assert sum(a.size for a in jax.tree.leaves(nnx.state(abstract, nnx.Param))) > 0


@pytest.mark.parametrize("name", NAMES)
def test_jitted_train_step_lowers_the_loss_on_a_learnable_task(name):
    config = _config(name, train={"learning_rate": 1e-2, "warmup_steps": 3, "steps": 30, "batch_size": 8})
    trainer = Trainer.create(config, make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}, jax.devices()[:1]))
    state, step, losses = trainer.init_state(0), trainer.jit_train_step(), []
    for i in range(30):
        state, metrics = step(state, trainer.device_batch(pattern_batch(batch_size=8, seq_len=16, seed=i)))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0] - 1.0, losses


@pytest.mark.parametrize("name", NAMES)
def test_train_step_compiles_for_a_tpu_topology(name):
    from lcjax.train.aot import compile_train_step

    config = _config(name, train={"batch_size": 4, "seq_len": 16}, mesh={"data": 2, "tensor": 2})
    report = compile_train_step(config, "v5e:2x2")
    assert report["fits"] is True and report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1}
    assert jax.default_backend() == "cpu"


def test_a_registered_model_without_a_test_file_is_collected_by_every_protocol_check():
    """Registers the throwaway `tests/models/probe.py` model before collection (as a plugin) and lists the tests:
    every check above is collected for it, with nothing written for it but its registration."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.models.probe", "--collect-only", "-q", __file__],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    checks = [n for n, f in globals().items() if n.startswith("test_") and hasattr(f, "pytestmark")]
    assert len(checks) == 8
    for check in checks:
        assert f"{check}[probe]" in result.stdout, (check, result.stdout[-2000:])

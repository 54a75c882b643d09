import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.errors import ConfigError
from lcjax.layers.params import logical_axes
from lcjax.models import xlstm
from tests.conftest import assert_sharded_gradients_equal_one_device, packed_batch, tiny_run_losses

SMALL = {"name": "xlstm", "vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 2, "chunk_size": 4}
NEURIPS = {"variant": "neurips", "pattern": "ms", "num_layers": 4, "norm_eps": 1e-5, "tie_embeddings": True}


def _config(model=None, **sections):
    return from_dict({"model": {**SMALL, **(model or {})}, **sections})


def _model(seed=0, **overrides):
    model = models.build(_config(overrides), nnx.Rngs(seed))
    # non-trivial gates and recurrences: the initial gate weights and sLSTM recurrent weights are zero
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape, a.dtype), state)
    return nnx.merge(graphdef, state)


_forward = nnx.jit(lambda model, batch: model(batch)[0])


def _tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, 64)


@pytest.mark.parametrize(
    "overrides,pieces",
    [
        ({"cell_form": "parallel"}, [3, 8]),  # prefill pieces continue the state in the chunkwise form
        pytest.param(NEURIPS, [4, 7], marks=pytest.mark.slow),  # about a minute on CI's 2 cores
    ],
)
def test_decode_matches_parallel(overrides, pieces):
    model = _model(**overrides)
    tokens = _tokens((2, 11))
    logits = _forward(model, {"inputs": tokens})
    assert logits.shape == (2, 11, 64)
    decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    cache, outputs, start = model.init_cache(2), [], 0
    for n in pieces:
        out, cache = decode(model, tokens[:, start : start + n], cache)
        outputs.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), logits, atol=2e-5, rtol=1e-5)
    assert int(cache["index"]) == 11


# The NeurIPS layout (sLSTM blocks too) is `slow` (about 45 s on CI's 2 cores); the protocol test checks the large one.
@pytest.mark.slow
def test_neurips_packed_documents_are_isolated_and_later_tokens_never_change_earlier_logits():
    model = _model(**NEURIPS)
    tokens = _tokens((2, 12))
    segments = jnp.array([[1] * 5 + [2] * 7, [3] * 12])
    packed = _forward(model, {"inputs": tokens, "segment_ids": segments})
    np.testing.assert_allclose(packed[:1, 5:], _forward(model, {"inputs": tokens[:1, 5:]}), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[:1, :5], _forward(model, {"inputs": tokens[:1, :5]}), atol=2e-5, rtol=1e-5)
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % 64)
    np.testing.assert_array_equal(
        _forward(model, {"inputs": changed})[:, :8], _forward(model, {"inputs": tokens})[:, :8]
    )
    # the state carries context: a different first token changes the last prediction
    first = tokens.at[:, 0].set((tokens[:, 0] + 3) % 64)
    assert (
        float(jnp.max(jnp.abs(_forward(model, {"inputs": first})[:, -1] - _forward(model, {"inputs": tokens})[:, -1])))
        > 1e-4
    )


def test_cell_forms_give_the_same_model():
    tokens = _tokens((2, 10))
    logits = {
        form: _forward(_model(cell_form=form), {"inputs": tokens}) for form in ("parallel", "chunkwise", "recurrent")
    }
    np.testing.assert_allclose(logits["chunkwise"], logits["parallel"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(logits["recurrent"], logits["parallel"], atol=2e-5, rtol=1e-5)


def test_logits_are_soft_capped():
    model = _model(logit_soft_cap=0.5)
    logits = _forward(model, {"inputs": _tokens((1, 6))})
    assert float(jnp.max(jnp.abs(logits))) < 0.5


def test_slstm_forget_bias_is_the_block_dependent_power_law():
    model = models.build(_config({**NEURIPS, "num_layers": 6, "pattern": "mms"}), nnx.Rngs(0))
    bias = model.layers.blocks.s2.bias[...]  # [units, 4 gates, heads, head_dim]
    dh = bias.shape[-1]
    for unit, block in enumerate((2, 5)):
        d = np.arange(dh) / (dh - 1)
        want = -(-5 + 12 * d ** (0.3 + 1.3 * block / 5))
        np.testing.assert_allclose(bias[unit, 1, 0], want, atol=1e-5)
        np.testing.assert_array_equal(bias[unit, 0], 0.0)


def test_neurips_parameter_names_and_axes_are_pinned():
    """The NeurIPS stacks' names (the protocol test pins the large variant's)."""
    neurips = models.build(_config(NEURIPS), nnx.Rngs(0))
    blocks = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(neurips)))["layers"]["blocks"]
    assert set(blocks) == {"m0", "s1"}
    assert blocks["m0"]["w_q"] == (2, 2, 8, 4, 4)  # [units, heads, blocks, in, out]: 4x4 headwise blocks
    assert blocks["s1"]["recurrent"] == (2, 2, 16, 4, 16)
    axes = logical_axes(neurips)["layers"]["blocks"]
    assert axes["m0"]["w_up"] == ("layers", "embed", "heads", "head_dim")
    assert axes["s1"]["w_gate"] == ("layers", "embed", "mlp")


def test_presets_have_the_reference_widths():
    import configs.xlstm as xlstm_config
    from lcjax.config import from_config_dict

    assert sorted(xlstm_config.PRESETS) == ["7-1-tiny", "7b", "large-tiny", "small"]
    config = from_config_dict(xlstm_config.get_config("7b")).model
    assert (config.qk_dim, config.v_dim, config.ffn_dim) == (2048, 4096, 10944)  # §1.6: F = 10944 for D = 4096
    assert from_config_dict(xlstm_config.get_config("7-1-tiny")).model.pattern == "mmmmmmms"


@pytest.mark.parametrize(
    "model,mesh,field",
    [
        ({"variant": "slstm"}, {}, "model.variant"),
        ({"pattern": "ms"}, {}, "model.pattern"),  # the large variant is pure mLSTM
        ({**NEURIPS, "pattern": "mx"}, {}, "model.pattern"),
        ({**NEURIPS, "num_layers": 3}, {}, "model.num_layers"),
        ({"num_heads": 3}, {}, "model.qk_dim_factor"),
        ({"cell_form": "quadratic"}, {}, "model.cell_form"),
        ({"chunk_size": 0}, {}, "model.chunk_size"),
        ({}, {"sequence": 2, "data": -1}, "mesh.sequence"),
        ({"num_heads": 1}, {"tensor": 2, "data": -1}, "model.num_heads"),
    ],
)
def test_bad_configs_name_the_field(model, mesh, field):
    with pytest.raises(ConfigError) as error:
        _config(model, mesh=mesh).validate(jax.device_count())
    assert error.value.field == field


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        pytest.param({"mlstm_impl": "interpret"}, marks=pytest.mark.slow),  # Mamba-2's sharded test runs the kernel
        pytest.param(NEURIPS, marks=pytest.mark.slow),
    ],
)
def test_sharded_gradients_on_data_2_tensor_2_equal_one_device(overrides):
    """mlstm_impl=interpret: the Pallas kernel runs per device shard (batch over data, heads over tensor)."""
    grads = assert_sharded_gradients_equal_one_device(
        _config(overrides, train={"batch_size": 4, "seq_len": 12}), packed_batch()
    )
    if not overrides:
        assert grads["layers"]["blocks"]["mlstm"]["w_q"].sharding.spec[2] == "tensor"  # heads split


# `slow` (CI budget; run with -m slow): about 17 s (large-tiny) and 34 s (7-1-tiny) on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["large-tiny", "7-1-tiny"])
def test_tiny_preset_trains_through_main(tmp_path, preset):
    losses = tiny_run_losses(tmp_path, f"configs/xlstm.py:{preset}")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.5, losses


@pytest.mark.parametrize("overrides", [{}, pytest.param(NEURIPS, marks=pytest.mark.slow)])
def test_pallas_cell_gives_the_xla_logits(overrides):
    """model.mlstm_impl=interpret runs the chunkwise Pallas kernel (interpret mode): the same logits with packed
    documents and a length that is not a multiple of the chunk."""
    tokens = _tokens((2, 11))
    batch = {"inputs": tokens, "segment_ids": jnp.array([[1] * 6 + [2] * 5, [1] * 11])}
    want = _forward(_model(**overrides), batch)
    got = _forward(_model(**overrides, mlstm_impl="interpret"), batch)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_unrolled_equals_scanned():
    tokens = _tokens((2, 9))
    np.testing.assert_allclose(
        _forward(_model(**NEURIPS), {"inputs": tokens}),
        _forward(_model(**NEURIPS, scan_layers=False), {"inputs": tokens}),
        atol=1e-5,
        rtol=0,
    )


def test_round_up_matches_the_reference_widths():
    assert xlstm.round_up(128 * 2.667, 64) == 384
    assert xlstm.round_up(64 * 1.3, 64) == 128


def test_loading_the_config_file_does_not_shadow_the_xlstm_package():
    """configs/xlstm.py puts its directory on sys.path only while importing base.py: otherwise `import xlstm` (which
    transformers probes) would find the config file instead of the PyPI package."""
    import importlib.util
    import os
    import runpy
    import sys

    runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "xlstm.py"))
    assert not any(p.rstrip("/").endswith("configs") for p in sys.path)
    spec = importlib.util.find_spec("xlstm")
    assert spec is None or "configs" not in (spec.origin or "")

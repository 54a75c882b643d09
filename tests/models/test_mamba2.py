import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.errors import ConfigError
from lcjax.layers.params import logical_axes
from tests.conftest import assert_sharded_gradients_equal_one_device, packed_batch, tiny_run_losses

SMALL = {
    "name": "mamba2",
    "vocab_size": 64,
    "d_model": 32,
    "num_layers": 2,
    "d_state": 8,
    "head_dim": 16,
    "n_groups": 2,
    "chunk_size": 4,
}


def _config(model=None, **sections):
    return from_dict({"model": {**SMALL, **(model or {})}, **sections})


def _model(seed=0, **overrides):
    model = models.build(_config(overrides), nnx.Rngs(seed))
    graphdef, state = nnx.split(model)  # larger logits than the 0.02 init gives, so tolerances mean something
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape, a.dtype), state)
    return nnx.merge(graphdef, state)


_forward = nnx.jit(lambda model, batch: model(batch)[0])


def _tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, 64)


@pytest.mark.parametrize("overrides,pieces", [({"n_groups": 1, "tie_embeddings": False}, [4, 1, 6])])
def test_decode_matches_parallel(overrides, pieces):
    model = _model(**overrides)
    tokens = _tokens((2, 11))
    logits = _forward(model, {"inputs": tokens})
    assert logits.shape == (2, 11, 64) and float(jnp.std(logits)) > 0.1
    decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    cache, outputs, start = model.init_cache(2), [], 0
    for n in pieces:
        out, cache = decode(model, tokens[:, start : start + n], cache)
        outputs.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), logits, atol=2e-5, rtol=1e-5)
    assert cache["layers"]["ssm"].shape == (2, 2, 4, 16, 8)  # [layers, batch, heads, head_dim, state]: fixed size


def test_the_state_carries_context_beyond_the_convolution():
    model = _model()
    tokens = _tokens((2, 12))
    plain = _forward(model, {"inputs": tokens})
    first = tokens.at[:, 0].set((tokens[:, 0] + 3) % 64)  # 11 tokens before the last: far beyond the conv's 3 taps
    assert float(jnp.max(jnp.abs(_forward(model, {"inputs": first})[:, -1] - plain[:, -1]))) > 1e-4


def test_chunk_size_does_not_change_the_model():
    tokens = _tokens((2, 13))
    logits = [_forward(_model(chunk_size=c), {"inputs": tokens}) for c in (1, 4, 64)]
    np.testing.assert_allclose(logits[0], logits[2], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[1], logits[2], atol=2e-5, rtol=1e-5)


def test_initialization_follows_the_reference():
    model = models.build(_config(), nnx.Rngs(0))
    mixer = model.layers.blocks.mixer
    a = -jnp.exp(mixer.a_log[...])
    assert bool(jnp.all((a <= -1.0) & (a >= -16.0)))  # A ~ −U(1, 16)
    delta = jax.nn.softplus(mixer.dt_bias[...])
    assert bool(jnp.all((delta >= 1e-3 * 0.999) & (delta <= 0.1 * 1.001)))  # Δ ~ log-U(1e-3, 0.1) at init
    assert logical_axes(model)["layers"]["blocks"]["mixer"]["w_x"] == ("layers", "embed", "heads", "head_dim")


def test_presets_have_the_reference_sizes():
    import configs.mamba2 as mamba2_config
    from lcjax.config import from_config_dict

    assert sorted(mamba2_config.PRESETS) == ["130m", "370m", "tiny"]
    counts = {}
    for preset in ("130m", "370m"):
        config = from_config_dict(mamba2_config.get_config(preset))
        shapes = nnx.eval_shape(lambda config=config: models.build(config, nnx.Rngs(0)))
        counts[preset] = sum(a.size for a in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    assert 120e6 < counts["130m"] < 140e6 and 350e6 < counts["370m"] < 390e6, counts


@pytest.mark.parametrize(
    "model,mesh,field",
    [
        ({"head_dim": 24}, {}, "model.head_dim"),
        ({"n_groups": 3}, {}, "model.n_groups"),
        ({"d_state": 0}, {}, "model.d_state"),
        ({"chunk_size": 0}, {}, "model.chunk_size"),
        ({"dt_min": 0.5}, {}, "model.dt_min"),
        ({}, {"sequence": 2, "data": -1}, "mesh.sequence"),
        ({"head_dim": 64, "n_groups": 1}, {"tensor": 2, "data": -1}, "mesh.tensor"),  # one head: no split over 2
    ],
)
def test_bad_configs_name_the_field(model, mesh, field):
    with pytest.raises(ConfigError) as error:
        _config(model, mesh=mesh).validate(jax.device_count())
    assert error.value.field == field


def test_pallas_scan_gives_the_xla_logits():
    """model.ssd_impl=interpret runs SSD as the chunkwise Pallas kernel (interpret mode): the same logits with packed
    documents and a length that is not a multiple of the chunk."""
    tokens = _tokens((2, 11))
    batch = {"inputs": tokens, "segment_ids": jnp.array([[1] * 6 + [2] * 5, [1] * 11])}
    want = _forward(_model(), batch)
    np.testing.assert_allclose(_forward(_model(ssd_impl="interpret"), batch), want, atol=2e-5, rtol=1e-5)


# The XLA path's sharded gradients are the protocol test's (tests/models/test_protocol.py).
def test_pallas_scan_sharded_gradients_on_data_2_tensor_2_equal_one_device():
    """ssd_impl=interpret: the Pallas kernel runs per device shard (batch over data, heads over tensor)."""
    config = _config({"ssd_impl": "interpret"}, train={"batch_size": 4, "seq_len": 12})
    grads = assert_sharded_gradients_equal_one_device(config, packed_batch())
    assert grads["layers"]["blocks"]["mixer"]["w_x"].sharding.spec[2] == "tensor"  # heads split


@pytest.mark.slow  # about 20 s on 2 cores (CI budget); run with -m slow
def test_tiny_preset_trains_through_main(tmp_path):
    losses = tiny_run_losses(tmp_path, "configs/mamba2.py:tiny")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.5, losses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.layers.params import logical_axes
from tests.conftest import make_config


def _model(**overrides):
    return models.build(make_config(model=overrides), nnx.Rngs(0))


def _tokens(shape, seed=1, vocab=64):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_shapes_and_aux():
    model = _model()
    logits, aux = model({"inputs": _tokens((3, 10))})
    assert logits.shape == (3, 10, 64) and logits.dtype == jnp.float32
    assert aux == {}


def test_learned_positions_decode_matches_parallel_and_positions_matter():
    model = _model(position_embedding="learned", max_seq_len=16)
    tokens = _tokens((2, 12))
    parallel, _ = model({"inputs": tokens})
    cache = model.init_cache(2, 16)
    first, cache = model.decode(tokens[:, :5], cache)
    rest, _ = model.decode(tokens[:, 5:], cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), parallel, atol=1e-5, rtol=0)
    shifted = model({"inputs": tokens, "positions": jnp.broadcast_to(jnp.arange(12) + 3, (2, 12))})[0]
    assert not np.allclose(shifted, parallel, atol=1e-3)  # absolute, unlike RoPE's shift invariance
    rope = _model()
    np.testing.assert_allclose(
        rope({"inputs": tokens, "positions": jnp.broadcast_to(jnp.arange(12) + 3, (2, 12))})[0],
        rope({"inputs": tokens})[0],
        atol=1e-5,
    )


def test_decode_depends_on_cached_context():
    """Guards the decode test: the cache must matter (a model ignoring it would still match at position 0)."""
    model = _model()
    a, b = _tokens((1, 6), seed=1), _tokens((1, 6), seed=2)
    cache_a = model.decode(a, model.init_cache(1, 8))[1]
    cache_b = model.decode(b, model.init_cache(1, 8))[1]
    next_token = _tokens((1, 1), seed=3)
    assert not np.allclose(model.decode(next_token, cache_a)[0], model.decode(next_token, cache_b)[0])


@pytest.mark.parametrize(
    "overrides", [{"tie_embeddings": False}, {"num_kv_heads": 1}, {"num_kv_heads": 4}, {"qkv_bias": True}]
)
def test_unrolled_equals_scanned(overrides):
    tokens = _tokens((2, 9))
    scanned = _model(**overrides)
    unrolled = _model(**overrides, scan_layers=False)
    np.testing.assert_allclose(scanned({"inputs": tokens})[0], unrolled({"inputs": tokens})[0], atol=1e-5, rtol=0)
    cache = unrolled.decode(tokens[:, :4], unrolled.init_cache(2, 9))[1]
    np.testing.assert_allclose(
        unrolled.decode(tokens[:, 4:], cache)[0], scanned({"inputs": tokens})[0][:, 4:], atol=1e-5, rtol=0
    )


def test_remat_gives_same_gradients():
    tokens = _tokens((2, 8))

    def grads(remat):
        model = _model(remat=remat)
        graphdef, state = nnx.split(model)
        loss = lambda s: nnx.merge(graphdef, s)({"inputs": tokens})[0].std()
        return jax.grad(loss)(state)

    for a, b in zip(jax.tree.leaves(grads("none")), jax.tree.leaves(grads("full")), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_untied_parameter_names_and_axes_are_pinned():
    """With untied embeddings (the protocol test pins the tied default): `lm_head` joins the checkpoint format."""
    model = models.build(make_config(model={"tie_embeddings": False}), nnx.Rngs(0))
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(model)))
    assert shapes == {
        "embed": (64, 32),
        "final_norm": {"scale": (32,)},
        "lm_head": (32, 64),
        "layers": {
            "blocks": {
                "attn": {"wq": (2, 32, 4, 8), "wk": (2, 32, 2, 8), "wv": (2, 32, 2, 8), "wo": (2, 4, 8, 32)},
                "attn_norm": {"scale": (2, 32)},
                "mlp": {"w_gate": (2, 32, 64), "w_up": (2, 32, 64), "w_down": (2, 64, 32)},
                "mlp_norm": {"scale": (2, 32)},
            }
        },
    }
    axes = logical_axes(model)
    assert axes["embed"] == ("vocab", "embed")
    assert axes["layers"]["blocks"]["attn"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert axes["layers"]["blocks"]["mlp"]["w_down"] == ("layers", "mlp", "embed")

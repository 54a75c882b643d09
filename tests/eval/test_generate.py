import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax import models
from lcjax.eval.generate import generate, sample_token
from tests.conftest import make_config


def test_greedy_generation_equals_argmax_of_parallel_form():
    model = models.build(make_config(), nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
    new = generate(
        graphdef, nnx.to_pure_dict(params), prompt, jax.random.key(0), max_new_tokens=6, temperature=0.0, top_p=1.0
    )
    sequence = prompt
    for _ in range(6):
        next_token = jnp.argmax(model({"inputs": sequence})[0][:, -1], axis=-1)
        sequence = jnp.concatenate([sequence, next_token[:, None]], axis=1)
    np.testing.assert_array_equal(new, sequence[:, 5:])


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_token(logits, k, temperature=1.0, top_p=0.7))(
        jax.random.split(jax.random.key(0), 400)
    )
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4)
    assert counts[2] == counts[3] == 0 and counts[0] > counts[1] > 0
    tiny = jax.vmap(lambda k: sample_token(logits, k, temperature=1.0, top_p=1e-6))(
        jax.random.split(jax.random.key(1), 50)
    )
    assert np.all(np.asarray(tiny) == 0)
    full = jax.vmap(lambda k: sample_token(logits, k, temperature=1.0, top_p=1.0))(
        jax.random.split(jax.random.key(2), 2000)
    )
    freq = np.bincount(np.asarray(full).ravel(), minlength=4) / 2000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)

"""HMT: the paper's recurrence as an independent float64 loop, its reductions, streaming with FIFO eviction,
truncated BPTT and the memory search's gradients. The protocol checks (decode, causality, packed documents,
sharding, golden names, presets, learning, TPU compile) are in test_protocol.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.errors import ConfigError

TRANSFORMER = {"name": "transformer", "vocab_size": 32, "d_model": 16, "num_layers": 1, "num_heads": 2}
TRANSFORMER |= {"num_kv_heads": 1, "mlp_dim": 32}
MAMBA2 = {"name": "mamba2", "vocab_size": 32, "d_model": 16, "num_layers": 1, "d_state": 4, "head_dim": 8}
MAMBA2 |= {"n_groups": 1, "chunk_size": 4}
L, K = 4, 2  # segment length, sensory tokens


def _model(backbone=TRANSFORMER, dtype=jnp.float32, perturb=0.0, **fields):
    """An HMT around `backbone` (segments of 4, 2 sensory tokens, a cache of 2 unless given), parameters in
    `dtype`, with N(0, perturb²) added (so Mamba-2's zero-initialized pieces do something)."""
    model = {"name": "hmt", "backbone": backbone, "segment_len": L, "sensory_tokens": K, "cache_size": 2} | fields
    graphdef, state = nnx.split(models.build(from_dict({"model": model}), nnx.Rngs(0)))
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: (a + perturb * jax.random.normal(next(keys), a.shape)).astype(dtype), state)
    return nnx.merge(graphdef, state)


def _tokens(count, seed=0, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, count * L), 0, 32)


def paper_recurrence(model, tokens):
    """The recurrence of He et al. (one document) written plainly: a Python loop over segments, the backbone on
    explicit [P ‖ sensory ‖ H ‖ P] sequences (no sensory slots in segment 1), a list as the FIFO cache."""
    cfg, bb = model.cfg, model.backbone
    length, k, j = cfg.segment_len, cfg.sensory_tokens, cfg.summary_len
    x = bb.embed_tokens(tokens, None)

    def run(seq):
        positions = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape[:2])
        return bb.hidden_embedded(seq, positions=positions)[0]

    def summary(window):
        t = jnp.broadcast_to(model.summary_token[...], (x.shape[0], 1, x.shape[2]))
        return bb.final_hidden(run(jnp.concatenate([t, window, t], axis=1))[:, -1])

    cache, outputs, previous = [], [], None
    for n in range(tokens.shape[1] // length):
        segment = x[:, n * length : (n + 1) * length]
        if not cache:
            p = jnp.broadcast_to(model.memory_token[...], segment[:, 0].shape)
        elif cfg.stage == 1:
            p = cache[-1]
        else:
            window = segment[:, :j] if cfg.summary == "paper" else previous[:, length - j :]
            q = summary(window) @ model.w_q[...]
            memory = jnp.stack(cache, axis=1)
            scores = jnp.einsum("bh,bnh->bn", q, memory @ model.w_k[...]) / math.sqrt(q.shape[-1])
            p = jnp.einsum("bn,bnd->bd", jax.nn.softmax(scores, axis=-1), memory)
        sensory = previous[:, length - k :] if n else segment[:, :0]
        h = run(jnp.concatenate([p[:, None], sensory, segment, p[:, None]], axis=1))
        outputs.append(h[:, 1 + sensory.shape[1] : 1 + sensory.shape[1] + length])
        cache = (cache + [bb.final_hidden(h[:, -1])])[-cfg.cache_size :]
        previous = segment
    return bb.head(jnp.concatenate(outputs, axis=1))


@pytest.mark.parametrize(
    "backbone, summary",
    [(TRANSFORMER, "causal"), (TRANSFORMER, "paper"), pytest.param(MAMBA2, "causal", marks=pytest.mark.slow)],
    ids=["transformer", "transformer-paper-summary", "mamba2"],
)
def test_the_unrolled_form_equals_the_papers_recurrence_in_float64(x64, backbone, summary):
    """Five segments, a cache of 2: retrieval over a full cache, FIFO eviction, sensory tokens from segment 2 on."""
    model = _model(backbone, jnp.float64, perturb=0.3 if backbone is MAMBA2 else 0.0, summary=summary)
    tokens = _tokens(5)
    logits = nnx.jit(lambda m, t: m({"inputs": t})[0])(model, tokens)
    expected = nnx.jit(paper_recurrence)(model, tokens)
    assert logits.dtype == jnp.float64 and float(jnp.std(logits)) > 0.1
    # Mamba-2 keeps its decays in float32 (its recurrent state is float32 whatever the dtype)
    atol = 1e-10 if backbone is TRANSFORMER else 5e-6
    np.testing.assert_allclose(logits, expected, atol=atol, rtol=0)

    # the first segment is the backbone on [memory token ‖ H_1 ‖ memory token], nothing else
    @nnx.jit
    def first_segment(model, tokens):
        bb, m0 = model.backbone, jnp.broadcast_to(model.memory_token[...], (2, 1, 16))
        seq = jnp.concatenate([m0, bb.embed_tokens(tokens[:, :L], None), m0], axis=1)
        h, _ = bb.hidden_embedded(seq, positions=jnp.broadcast_to(jnp.arange(L + 2), (2, L + 2)))
        return bb.head(h[:, 1 : L + 1])

    np.testing.assert_allclose(logits[:, :L], first_segment(model, tokens), atol=atol, rtol=0)


def test_retrieval_from_one_entry_is_that_entry_and_always_a_convex_combination(x64):
    model = _model(TRANSFORMER, jnp.float64)
    memory = jax.random.normal(jax.random.key(1), (3, 4, 16), jnp.float64)
    query = 10 * jax.random.normal(jax.random.key(2), (3, 16), jnp.float64)  # sharp weights: still exact
    one = jnp.zeros((3, 4), bool).at[:, 2].set(True)
    np.testing.assert_array_equal(model._retrieve(query, memory, one), memory[:, 2])
    none = jnp.zeros((3, 4), bool)
    np.testing.assert_array_equal(
        model._retrieve(query, memory, none), jnp.broadcast_to(model.memory_token[...], (3, 16))
    )
    # orthonormal entries: P's coordinates are the attention weights, non-negative and summing to 1
    basis = jnp.broadcast_to(jnp.eye(16)[:4], (3, 4, 16))
    weights = model._retrieve(query, basis, jnp.ones((3, 4), bool))[:, :4]
    assert float(jnp.min(weights)) >= 0 and float(jnp.max(weights)) < 1
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-12)


def test_a_one_entry_cache_is_rmt_with_sensory_memory_and_stage_1_is_that(x64):
    """cache_size=1 with the search == stage 1 (no summary pass, P_n = m_{n-1}) == the plain loop of stage 1."""
    tokens = _tokens(4)
    one = _model(TRANSFORMER, jnp.float64, cache_size=1)
    stage_1 = _model(TRANSFORMER, jnp.float64, cache_size=3, stage=1)
    logits_one, _ = one({"inputs": tokens})
    logits_stage_1, _ = stage_1({"inputs": tokens})
    np.testing.assert_allclose(logits_one, logits_stage_1, atol=1e-12, rtol=0)
    np.testing.assert_allclose(logits_stage_1, paper_recurrence(stage_1, tokens), atol=1e-10, rtol=0)
    # and the memory matters: the last segment changes when the first one does
    changed = tokens.at[:, 1].set((tokens[:, 1] + 1) % 32)
    later, _ = stage_1({"inputs": changed})
    assert float(jnp.max(jnp.abs(later[:, 3 * L :] - logits_stage_1[:, 3 * L :]))) > 1e-6


def test_streaming_in_ragged_pieces_equals_the_unrolled_form_past_fifo_eviction_around_mamba2():
    model = _model(MAMBA2, perturb=0.3)
    tokens = _tokens(6, seed=3)  # 6 segments through a cache of 2: three evictions
    logits = nnx.jit(lambda m, t: m({"inputs": t})[0])(model, tokens)
    decode = nnx.jit(lambda m, t, c: m.decode(t, c))
    cache, outputs, start = model.init_cache(2), [], 0
    for n in (7, 1, 9, 7):
        out, cache = decode(model, tokens[:, start : start + n], cache)
        outputs.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), logits, atol=2e-5, rtol=0)
    assert int(cache["index"]) == 24 and int(cache["filled"]) == 2
    assert cache["memory"].shape == (2, 2, 16) and cache["segment"].shape == (2, L, 16)  # O(N + L)


def _gradient_into_segments(model, tokens):
    """|d loss(last segment) / d x| summed per segment, x the embedded inputs."""
    x = model.embed_tokens(tokens, None)

    def loss(x):
        h, _ = model.hidden_embedded(x, positions=None)
        return jnp.sum(model.head(h[:, -L:]) ** 2)

    g = jax.grad(loss)(x)
    return np.asarray(jnp.abs(g).reshape(g.shape[0], -1, L, g.shape[-1]).sum(axis=(0, 2, 3)))


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_bptt_depth_truncates_the_gradient_exactly(depth):
    """Four segments: without truncation the last segment's loss reaches segment 1; with depth 1 it reaches no
    earlier segment (exactly zero); with depth 2 (blocks {1,2}, {3,4}) it reaches segment 3 but not 1 or 2."""
    reach = _gradient_into_segments(_model(TRANSFORMER, bptt_depth=depth, cache_size=3), _tokens(4))
    assert reach[3] > 0
    if depth == 0:
        assert np.all(reach[:3] > 1e-6), reach
    elif depth == 1:
        np.testing.assert_array_equal(reach[:3], 0.0)
    else:
        np.testing.assert_array_equal(reach[:2], 0.0)
        assert reach[2] > 1e-6, reach


def test_the_memory_search_trains_in_stage_2_and_not_in_stage_1():
    """A reimplementation that detaches the cache trains nothing in the search; here the loss on the last of four
    segments moves T, W_q and W_k in stage 2 (and in stage 1 they are unused: exactly zero)."""
    tokens = _tokens(4, seed=5)

    def grads(model):
        loss = lambda m: jnp.sum(m({"inputs": tokens})[0][:, -L:] ** 2)
        return nnx.grad(loss)(model)

    g2 = grads(_model(TRANSFORMER, cache_size=3, perturb=0.3))
    scale = float(jnp.max(jnp.abs(g2.backbone.embed[...])))
    for name in ("w_q", "w_k", "summary_token", "memory_token"):
        assert float(jnp.max(jnp.abs(getattr(g2, name)[...]))) > 1e-4 * scale, name
    g1 = grads(_model(TRANSFORMER, cache_size=3, stage=1, perturb=0.3))
    for name in ("w_q", "w_k", "summary_token"):
        np.testing.assert_array_equal(getattr(g1, name)[...], 0.0)


def test_the_papers_own_summary_is_not_causal_and_decode_refuses_it():
    """Documents why `summary="causal"` is the default: with the paper's query (the segment's own first half) a
    logit of segment 3 changes when a later token of that segment does."""
    model = _model(TRANSFORMER, summary="paper", cache_size=3, perturb=0.3)
    tokens = _tokens(3, seed=6)
    changed = tokens.at[:, 2 * L + 1].set((tokens[:, 2 * L + 1] + 1) % 32)
    before, after = model({"inputs": tokens})[0], model({"inputs": changed})[0]
    assert float(jnp.max(jnp.abs(before[:, 2 * L] - after[:, 2 * L]))) > 1e-7  # position 8 sees token 9
    with pytest.raises(ValueError, match="summary='causal'"):
        model.decode(tokens[:, :1], model.init_cache(2))


def test_loss_on_the_last_segment_only():
    cfg = from_dict({"model": {"name": "hmt", "segment_len": 4, "loss_segments": "last"}}).model
    mask = np.ones((2, 12), np.float32)
    mask[0, 10] = 0
    expected = np.zeros((2, 12), np.float32)
    expected[:, 8:] = 1
    expected[0, 10] = 0
    np.testing.assert_array_equal(cfg.train_loss_mask(mask), expected)
    all_cfg = from_dict({"model": {"name": "hmt", "segment_len": 4}}).model
    np.testing.assert_array_equal(all_cfg.train_loss_mask(mask), mask)


@pytest.mark.parametrize(
    "model, train, field",
    [
        ({"segment_len": 100}, {"seq_len": 256}, "model.segment_len"),
        ({"backbone": {"name": "nope"}}, {}, "model.backbone.name"),
        ({"backbone": {"name": "hmt"}}, {}, "model.backbone.name"),
        ({"cache_size": 0}, {}, "model.cache_size"),
        ({"sum_fraction": 0.0}, {}, "model.sum_fraction"),
        ({"sum_fraction": 1.5}, {}, "model.sum_fraction"),
        ({"backbone": {"name": "transformer", "num_heads": 3, "num_kv_heads": 1}}, {}, "model.backbone.num_heads"),
        ({"d_model": 64}, {}, "model.d_model"),
    ],
)
def test_bad_configs_name_their_field(model, train, field):
    with pytest.raises(ConfigError) as error:
        from_dict({"model": {"name": "hmt", "segment_len": 128, **model}, "train": train}).validate(device_count=8)
    assert error.value.field == field, str(error.value)

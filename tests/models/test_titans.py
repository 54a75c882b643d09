import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.errors import ConfigError
from lcjax.layers.params import logical_axes
from lcjax.models import titans, titans_mac
from tests.conftest import assert_sharded_gradients_equal_one_device, packed_batch, tiny_run_losses

SMALL = {
    "name": "titans",
    "vocab_size": 64,
    "d_model": 32,
    "num_layers": 2,
    "mlp_dim": 64,
    "memory_heads": 2,
    "chunk_size": 4,
    "num_persistent": 2,
}


def _config(model=None, **sections):
    return from_dict({"model": {**SMALL, **(model or {})}, **sections})


def _model(**overrides):
    return models.build(_config(overrides), nnx.Rngs(0))


_forward = nnx.jit(lambda model, tokens: model({"inputs": tokens})[0])


def _tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, 64)


@pytest.mark.parametrize(
    "overrides,pieces",
    [
        ({}, [1] * 11),
        ({}, [3, 8]),
        ({"memory_depth": 2, "num_persistent": 0}, [6, 5]),
        ({"variant": "mag", "window": 4}, [1] * 11),
        ({"variant": "mal", "window": 4}, [3, 8]),
        ({"variant": "mac", "segment": 4}, [1] * 11),  # segments of whole memory chunks
        # chunks straddle segments and pieces; the momentum steps once per chunk in both forms
        (
            {"variant": "mac", "segment": 3, "memory_depth": 2, "memory_gates": "chunk", "memory_momentum": "chunk"},
            [5, 6],
        ),
        ({"variant": "mac", "segment": 3, "mac_store": "residual"}, [1] * 11),
        # pieces straddle chunks: the open chunk's gates are cached; θ (1 − η) steps in both forms
        ({"memory_gates": "chunk", "memory_momentum": "ema"}, [3, 3, 5]),
    ],
)
def test_decode_matches_parallel(overrides, pieces):
    model = _model(**overrides)
    tokens = _tokens((2, 11))
    logits = _forward(model, tokens)
    assert logits.shape == (2, 11, 64)
    decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))  # one compile per piece length
    cache, outputs, start = model.init_cache(2, max_len=11), [], 0
    for n in pieces:
        out, cache = decode(model, tokens[:, start : start + n], cache)
        outputs.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), logits, atol=2e-5, rtol=0)


def test_causal_and_the_memory_carries_context():
    model = _model()
    a = _tokens((1, 12))
    b = a.at[:, 6:].set((a[:, 6:] + 1) % 64)
    la, lb = _forward(model, a), _forward(model, b)
    np.testing.assert_array_equal(la[:, :6], lb[:, :6])
    # A different past changes the prediction at a later identical token (through the memory, not attention).
    c = a.at[:, :3].set((a[:, :3] + 5) % 64)
    assert float(jnp.max(jnp.abs(_forward(model, c)[:, 11] - la[:, 11]))) > 1e-4


def test_long_window_attention_is_linear_in_length():
    """At 8k tokens the blocked path's largest buffer is O(T · window): the dense mask's [B, H, T, T] logits would be
    2 GiB here, the blocked path stays under 64 MiB."""
    model = _model(variant="mag", window=16)
    compiled = nnx.jit(lambda model, tokens: model({"inputs": tokens})[0]).lower(model, _tokens((1, 8192))).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2**20


@pytest.mark.parametrize("variant", ["mag", "mal"])
def test_attention_variants_see_far_tokens_only_through_the_memory(variant):
    """With window 2, token 0 is outside every later token's window: it reaches position 10 only through the
    memory. Freezing the memory (step size θ = 0 and decay α = 0 through their gate biases, so M_t = M_0) must remove
    that influence."""
    model = _model(variant=variant, window=2, num_persistent=0)
    a = _tokens((1, 11))
    b = a.at[:, 0].set((a[:, 0] + 7) % 64)
    assert float(jnp.max(jnp.abs(_forward(model, a)[:, 10] - _forward(model, b)[:, 10]))) > 1e-5
    bias = model.layers.blocks.mixer.b_gates
    bias[...] = bias[...].at[:, 0].set(-1e4).at[:, 2].set(-1e4)  # θ = α = sigmoid(-1e4) = 0
    np.testing.assert_allclose(_forward(model, a)[:, 10], _forward(model, b)[:, 10], atol=1e-6, rtol=0)


def test_segment_mask_sees_the_prefix_and_the_reads_and_tokens_up_to_now():
    size, prefix = 4, 2
    q_index = jnp.arange(size)[None]
    segments = jnp.array([[1, 1, 2, 2]])
    mask = np.asarray(
        titans_mac.segment_mask(q_index, size=size, prefix=prefix, q_segments=segments, k_segments=segments)
    )
    assert mask.shape == (1, size, prefix + 2 * size)
    for i in range(size):
        for key in range(prefix + 2 * size):
            j = (key - prefix) % size  # the token a read (prefix..prefix+size) or a token slot belongs to
            want = key < prefix or (j <= i and segments[0, i] == segments[0, j])
            assert mask[0, i, key] == want, (i, key)


def test_mac_residual_store_is_the_memory_over_the_tokens_when_attention_is_silent():
    """mac_store="residual" stores h + y: with attention's output projection zeroed (y = 0) the memory branch of a
    mac block over all segments is exactly the LMM mixer over h in one pass; the literal store (y alone) is not."""
    cfg = _config({"variant": "mac", "segment": 3, "mac_store": "residual"}).model  # chunks of 4 straddle segments
    block = titans.Block(cfg, rngs=nnx.Rngs(3))
    block.attn.wo[...] = jnp.zeros_like(block.attn.wo[...])
    h = jax.random.normal(jax.random.key(4), (2, 11, cfg.d_model))
    y, m, _ = titans_mac.mac_parallel(block, h, None)
    np.testing.assert_array_equal(y, 0.0)
    np.testing.assert_allclose(m, block.mixer(h, None), atol=1e-6, rtol=0)
    block.store_residual = False
    _, m_literal, _ = titans_mac.mac_parallel(block, h, None)
    assert float(jnp.max(jnp.abs(m_literal - block.mixer(h, None)))) > 1e-3


def test_mac_reaches_earlier_segments_only_through_the_memory():
    """Segments of 4: token 0 is outside the segment of position 10 (and beyond the conv's 3 taps), so it reaches it
    only through the memory (the read at the segment start, and the stored attention outputs). Freezing the memory
    (θ = α = 0: M_t = M_0) must remove that influence; later tokens never change earlier logits."""
    model = _model(variant="mac", segment=4)
    a = _tokens((1, 11))
    b = a.at[:, 0].set((a[:, 0] + 7) % 64)
    la, lb = _forward(model, a), _forward(model, b)
    assert float(jnp.max(jnp.abs(la[:, 10] - lb[:, 10]))) > 1e-5
    c = a.at[:, 6:].set((a[:, 6:] + 3) % 64)
    np.testing.assert_array_equal(_forward(model, c)[:, :6], la[:, :6])
    bias = model.layers.blocks.mixer.b_gates
    bias[...] = bias[...].at[:, 0].set(-1e4).at[:, 2].set(-1e4)  # θ = α = sigmoid(-1e4) = 0
    np.testing.assert_allclose(_forward(model, a)[:, 10], _forward(model, b)[:, 10], atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(_forward(model, a)[:, 2] - _forward(model, b)[:, 2]))) > 1e-5  # same segment


def test_memory_kernel_in_interpret_mode_gives_the_xla_logits():
    """model.memory_impl=interpret runs kernels_pallas/titans_memory.py (mac: once per segment, inside its scan;
    lmm's single call is covered by tests/kernels_pallas/test_titans_memory.py)."""
    tokens = _tokens((2, 10))
    xla = _forward(_model(variant="mac", segment=4), tokens)
    kernel = _forward(_model(variant="mac", segment=4, memory_impl="interpret"), tokens)
    np.testing.assert_allclose(kernel, xla, atol=2e-5, rtol=0)


def test_kernel_runs_batches_with_and_without_document_starts():
    """memory_impl=interpret with segment_ids: a batch of whole documents takes the kernel without its restart terms,
    a batch with a document start the kernel with them (a `lax.cond`); both give the xla logits."""
    tokens = _tokens((2, 12))
    xla, kernel = _model(), _model(memory_impl="interpret")
    for segments in ([[1] * 12, [3] * 12], [[1] * 12, [1] * 5 + [2] * 7]):
        segments = jnp.asarray(segments)
        np.testing.assert_allclose(
            _packed_forward(kernel, tokens, segments), _packed_forward(xla, tokens, segments), atol=2e-5, rtol=0
        )


def test_unrolled_equals_scanned():
    tokens = _tokens((2, 9))
    scanned, unrolled = _model(), _model(scan_layers=False)
    np.testing.assert_allclose(_forward(scanned, tokens), _forward(unrolled, tokens), atol=1e-5, rtol=0)


def test_bfloat16_parameters_keep_the_memory_in_float32():
    """The trainer casts parameters to bf16 for compute (`train.compute_dtype`); the memory state stays f32."""
    model = _model()
    graphdef, state = nnx.split(model)
    bf16 = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    tokens = _tokens((2, 9))
    logits_bf16 = _forward(bf16, tokens)
    assert bool(jnp.all(jnp.isfinite(logits_bf16)))
    np.testing.assert_allclose(logits_bf16.astype(jnp.float32), _forward(model, tokens), atol=0.15, rtol=0)


# mag runs in the protocol test; mac/mal compile two more sharded steps (about 1 min each on the 2-core CI machine):
# `slow`, run with -m slow.
@pytest.mark.parametrize("variant", ["lmm", *(pytest.param(v, marks=pytest.mark.slow) for v in ("mac", "mal"))])
def test_loss_and_gradients_on_data_2_tensor_2_equal_one_device(variant):
    # Loss and gradients, not parameters after an Adam step: Adam's first step is about lr per element wherever the
    # gradient is tiny, which turns reduction-order noise into differences of lr * 1e-3 (mal, lmm and mag each had
    # one element 1.0e-5 to 5.8e-5 off at lr 1e-3 to 1e-2).
    # window 4: mag/mal's 14 slots exceed 2 * window + N_p, so the blocked sliding-window path (the one long
    # sequences take) runs sharded, packed documents included.
    grads = assert_sharded_gradients_equal_one_device(
        _config({"variant": variant, "window": 4}, train={"batch_size": 4, "seq_len": 12}), packed_batch()
    )
    assert grads["layers"]["blocks"]["mixer"]["w_qkv"].sharding.spec[3] == "tensor"  # memory heads split


# `slow` (about a minute on CI's 2 cores): the AOT test compiles the kernel per shard in the sharded step by default.
@pytest.mark.slow
def test_memory_kernel_runs_per_device_shard():
    """memory_impl=interpret under mesh data=2,tensor=2: the kernel runs on each device's batch and head shard
    (`per_shard`; XLA does not partition a Pallas call), and loss and gradients equal one device's."""
    # packed rows: the kernel restarts the memory at every document start, on each shard
    config = _config({"memory_impl": "interpret"}, train={"batch_size": 4, "seq_len": 12})
    assert_sharded_gradients_equal_one_device(config, packed_batch())


def test_deep_memory_parameter_names_and_axes_are_pinned():
    """A depth-2 memory's names (the protocol test pins the default model's): the checkpoint format."""
    model = _model(memory_depth=2, memory_expansion=2)
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(model)))
    assert shapes == {
        "embed": (64, 32),
        "persistent": (2, 32),
        "final_norm": {"scale": (32,)},
        "layers": {
            "blocks": {
                "mixer": {
                    "w_qkv": (2, 32, 3, 2, 16),
                    "conv": (2, 4, 3, 2, 16),
                    "w_gates": (2, 32, 3, 2),
                    "b_gates": (2, 3, 2),
                    "memory": {0: (2, 2, 16, 32), 1: (2, 2, 32, 16)},
                    "out_scale": (2, 16),
                    "w_gate": (2, 32, 2, 16),
                    "w_out": (2, 2, 16, 32),
                },
                "mixer_norm": {"scale": (2, 32)},
                "mlp": {"w_gate": (2, 32, 64), "w_up": (2, 32, 64), "w_down": (2, 64, 32)},
                "mlp_norm": {"scale": (2, 32)},
            }
        },
    }
    axes = logical_axes(model)["layers"]["blocks"]["mixer"]
    assert axes["memory"][0] == ("layers", "heads", None, None)
    assert axes["w_qkv"] == ("layers", "embed", None, "heads", "head_dim")


def test_every_variant_has_tiny_and_small_presets():
    import configs.titans as titans_config

    assert sorted(titans_config.PRESETS) == sorted(f"{v}-{s}" for v in titans.VARIANTS for s in ("tiny", "small"))
    for preset, values in titans_config.PRESETS.items():
        assert values["model"]["variant"] == preset.split("-")[0]


def test_mac_keeps_its_persistent_tokens_per_layer():
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(_model(variant="mac", segment=4))))
    assert "persistent" not in shapes  # no sequence-level prefix
    block = shapes["layers"]["blocks"]
    assert block["persistent"] == (2, 2, 32)  # [layers, N_p, d_model]
    assert set(block) == {
        "mixer_norm",
        "mixer",
        "attn",
        "read_norm",
        "persistent",
        "gate_norm_attn",
        "gate_norm_memory",
        "gate_out",
        "mlp_norm",
        "mlp",
    }


@pytest.mark.parametrize(
    "model,mesh,field",
    [
        ({"variant": "mac-lite"}, {}, "model.variant"),
        ({"chunk_size": 0}, {}, "model.chunk_size"),
        ({"memory_heads": 3}, {}, "model.memory_heads"),
        ({"variant": "mag", "num_kv_heads": 3}, {}, "model.num_kv_heads"),
        ({"variant": "mal", "window": 0}, {}, "model.window"),
        ({"variant": "mac", "segment": 0}, {}, "model.segment"),
        ({"variant": "mac", "mac_store": "input"}, {}, "model.mac_store"),
        ({"memory_impl": "triton"}, {}, "model.memory_impl"),
        ({"memory_gates": "segment"}, {}, "model.memory_gates"),
        ({"memory_momentum": "adam"}, {}, "model.memory_momentum"),
        ({"memory_max_grad_norm": -1.0}, {}, "model.memory_max_grad_norm"),
        ({}, {"sequence": 2, "data": -1}, "mesh.sequence"),
    ],
)
def test_bad_configs_name_the_field(model, mesh, field):
    with pytest.raises(ConfigError) as error:
        _config(model, mesh=mesh).validate(jax.device_count())
    assert error.value.field == field


def test_deep_memory_without_clipping_says_which_flag_keeps_it_stable(caplog):
    with caplog.at_level("WARNING"):
        _config({"memory_depth": 2, "memory_max_grad_norm": 1.0}).validate(jax.device_count())
        assert "memory_max_grad_norm" not in caplog.text
        _config({"memory_depth": 2}).validate(jax.device_count())
    assert "model.memory_depth=2 without model.memory_max_grad_norm" in caplog.text


# lmm-tiny runs by default; mac/mag/mal-tiny (about a minute each on CI's 2 cores) are `slow`: run with -m slow.
@pytest.mark.parametrize(
    "preset", ["lmm-tiny", *(pytest.param(f"{v}-tiny", marks=pytest.mark.slow) for v in ("mac", "mag", "mal"))]
)
def test_tiny_preset_trains_through_main(tmp_path, preset):
    losses = tiny_run_losses(tmp_path, f"configs/titans.py:{preset}")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 2.0, losses


_packed_forward = nnx.jit(lambda model, tokens, segments: model({"inputs": tokens, "segment_ids": segments})[0])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        pytest.param({"variant": "mag", "window": 16}, marks=pytest.mark.slow),
        pytest.param({"variant": "mal", "window": 16, "memory_depth": 2}, marks=pytest.mark.slow),
        {"variant": "mac", "segment": 3, "memory_depth": 2},  # document 2 starts inside a segment and a chunk
    ],
)
def test_packed_documents_do_not_leak_through_the_memory(overrides):
    """Two documents in one row (7 + 5 tokens): changing the first document's tokens leaves the second's logits
    alone (memory, momentum and chunk reference restart at M_0; MAC's reads too). With model.memory_resets=False
    the memory carries the first document into the second, which the same check sees."""
    segments = jnp.asarray([[1] * 7 + [2] * 5])
    a = _tokens((1, 12))
    b = a.at[:, :7].set((a[:, :7] + 9) % 64)
    model = _model(**overrides)
    la, lb = _packed_forward(model, a, segments), _packed_forward(model, b, segments)
    np.testing.assert_allclose(la[:, 7:], lb[:, 7:], atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(la[:, :7] - lb[:, :7]))) > 1e-3
    leaky = _model(**overrides, memory_resets=False)
    leak = _packed_forward(leaky, a, segments)[:, 7:] - _packed_forward(leaky, b, segments)[:, 7:]
    assert float(jnp.max(jnp.abs(leak))) > 1e-4


def test_mac_document_on_a_segment_and_chunk_boundary_equals_it_alone():
    """MAC has no sequence-level prefix, so a document that starts on a segment and memory-chunk boundary gets
    exactly the logits it gets alone."""
    model = _model(variant="mac", segment=4)
    tokens = _tokens((2, 12), seed=3)
    packed = _packed_forward(model, tokens, jnp.asarray([[1] * 8 + [2] * 4] * 2))
    np.testing.assert_allclose(packed[:, 8:], _forward(model, tokens[:, 8:]), atol=2e-5, rtol=0)
    np.testing.assert_allclose(packed[:, :8], _forward(model, tokens[:, :8]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("variant", ["mag", "mal"])
def test_window_attention_runs_the_flash_kernel_when_model_attention_impl_is_pallas(variant):
    """model.attention.impl=pallas reaches the window attention (the flash kernel, interpret mode on CPU): a Pallas
    call in the program, and the xla logits (window 4 < 11 tokens + 2 persistent slots, packed documents)."""
    tokens = _tokens((2, 11))
    batch = {"inputs": tokens, "segment_ids": jnp.array([[1] * 6 + [2] * 5, [1] * 11])}
    forward = lambda model: nnx.jit(lambda model, batch: model(batch)[0])(model, batch)
    xla, pallas = (_model(variant=variant, window=4, attention={"impl": impl}) for impl in ("xla", "pallas"))
    jaxpr = lambda model: str(jax.make_jaxpr(lambda b: model(b)[0])(batch))
    assert "pallas_call" in jaxpr(pallas) and "pallas_call" not in jaxpr(xla)
    np.testing.assert_allclose(forward(pallas), forward(xla), atol=2e-5, rtol=0)

"""Hugging Face export and import: exact lcjax round trips, and logits/generation against `transformers` (the `hf`
extra, installed by the README's test command) for Llama, xLSTM-Large and Mamba-2."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax import models
from lcjax.config import from_dict
from lcjax.errors import ConfigError
from lcjax.export import byte_tokenizer_json, export_hf, load_hf
from tests.conftest import run_main

ARCHS = {
    "llama-tied": {
        "name": "transformer",
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "mlp_dim": 96,
    },
    "llama": {
        "name": "transformer",
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "mlp_dim": 96,
        "tie_embeddings": False,
    },
    "mamba2": {"name": "mamba2", "d_model": 64, "num_layers": 2, "d_state": 16, "head_dim": 16, "chunk_size": 16},
    "xlstm": {"name": "xlstm", "d_model": 128, "num_layers": 2, "num_heads": 4, "chunk_size": 16},
}


def _random_model(arch, seed=0):
    """A tiny lcjax model with every parameter perturbed (so zero-initialized gates and biases matter too)."""
    config = from_dict({"model": ARCHS[arch], "train": {"seq_len": 64}})
    graphdef, state = nnx.split(models.build(config, nnx.Rngs(seed)))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape, a.dtype), state)
    return config, nnx.merge(graphdef, state)


_forward = nnx.jit(lambda model, tokens: model({"inputs": tokens})[0])


def _params(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_then_import_is_exact(tmp_path, arch):
    config, model = _random_model(arch)
    files = export_hf(config, model, str(tmp_path), max_shard_bytes=40_000)  # forces shards and an index
    assert "config.json" in files and "tokenizer.json" in files
    assert os.path.exists(tmp_path / "model.safetensors.index.json") and len([f for f in files if "-of-" in f]) > 1
    loaded_config, loaded = load_hf(str(tmp_path))
    assert loaded_config.model == config.model
    for a, b in zip(_params(model), _params(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_models_without_a_transformers_architecture_are_refused(tmp_path):
    config = from_dict({"model": {**ARCHS["xlstm"], "variant": "neurips", "pattern": "ms", "num_layers": 2}})
    with pytest.raises(ConfigError) as error:
        export_hf(config, models.build(config, nnx.Rngs(0)), str(tmp_path))
    assert error.value.field == "model.variant"


def test_byte_tokenizer_json_maps_utf8_bytes_to_their_values(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(byte_tokenizer_json()))
    tok = tokenizers.Tokenizer.from_file(str(path))
    text = "héllo wörld\n\t€ 42"
    assert tok.encode(text).ids == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert tok.get_vocab_size() == 256


def _greedy_lcjax(model, prompt, steps):
    decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits, cache = decode(model, prompt, cache)
    out = []
    for _ in range(steps):
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        out.append(token)
        logits, cache = decode(model, token, cache)
    return np.asarray(jnp.concatenate(out, axis=1))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_transformers_loads_the_export_with_equal_logits_and_greedy_generation(tmp_path, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, model = _random_model(arch)
    export_hf(config, model, str(tmp_path))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    for length in (1, 15, 16, 50, 64):
        tokens = np.asarray(jax.random.randint(jax.random.key(length), (2, length), 0, 256))
        with torch.no_grad():
            theirs = hf_model(torch.tensor(tokens)).logits.float().numpy()
        np.testing.assert_allclose(np.asarray(_forward(model, jnp.asarray(tokens))), theirs, atol=1e-4, rtol=0)
    prompt = np.asarray(jax.random.randint(jax.random.key(7), (2, 5), 0, 256))
    with torch.no_grad():
        generated = hf_model.generate(
            torch.tensor(prompt), max_new_tokens=8, do_sample=False, attention_mask=torch.ones(2, 5, dtype=torch.long)
        )
    np.testing.assert_array_equal(_greedy_lcjax(model, jnp.asarray(prompt), 8), generated[:, 5:].numpy())


def _hf_model(arch, transformers, torch):
    torch.manual_seed(0)
    if arch.startswith("llama"):
        hf_config = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=arch == "llama-tied",
        )
        model = transformers.LlamaForCausalLM(hf_config)
    elif arch == "mamba2":
        hf_config = transformers.Mamba2Config(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=2,
            state_size=16,
            expand=2,
            head_dim=16,
            num_heads=8,
            n_groups=1,
            chunk_size=16,
            tie_word_embeddings=False,
        )
        model = transformers.Mamba2ForCausalLM(hf_config)
    else:
        hf_config = transformers.xLSTMConfig(
            vocab_size=256, hidden_size=128, num_hidden_layers=2, num_heads=4, chunk_size=16, tie_word_embeddings=False
        )
        model = transformers.xLSTMForCausalLM(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_transformers_model_imports_with_equal_logits(tmp_path, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_model = _hf_model(arch, transformers, torch)
    hf_model.save_pretrained(str(tmp_path))
    config, model = load_hf(str(tmp_path))
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 50), 0, 256))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(np.asarray(_forward(model, jnp.asarray(tokens))), theirs, atol=1e-4, rtol=0)


def test_main_exports_a_trained_run(tmp_path):
    common = ["--config=configs/transformer.py:tiny", f"--workdir={tmp_path / 'run'}"]
    train = [
        "--config.model.d_model=32",
        "--config.model.num_layers=1",
        "--config.model.mlp_dim=64",
        "--config.train.steps=2",
        "--config.train.batch_size=8",
        "--config.train.seq_len=16",
        "--config.train.eval_every=2",
        "--config.eval.num_batches=1",
        "--config.eval.batch_size=8",
    ]
    assert run_main(*common, *train).returncode == 0
    result = run_main(*common, *train, "--mode=export", f"--export_dir={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exported step 2" in result.stdout
    with open(tmp_path / "hf" / "config.json") as f:
        hf_config = json.load(f)
    assert hf_config["model_type"] == "llama" and hf_config["hidden_size"] == 32
    _, model = load_hf(str(tmp_path / "hf"))
    assert np.isfinite(np.asarray(_forward(model, jnp.zeros((1, 4), jnp.int32)))).all()
    missing = run_main(*common, *train, "--mode=export")
    assert missing.returncode == 2 and "--export_dir" in missing.stderr

import pytest

import configs.transformer as transformer_config
from lcjax.config import from_config_dict, from_dict
from lcjax.errors import ConfigError
from tests.conftest import make_config


def test_tiny_preset_fills_the_data_axis():
    tiny = from_config_dict(transformer_config.get_config("tiny"))
    assert (tiny.train.seq_len, tiny.mesh.shape(8)) == (256, {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1})


def test_attention_settings_live_in_the_section_of_the_model_that_attends_and_old_configs_still_read():
    assert make_config(model={"attention": {"impl": "pallas"}}).model.attention.impl == "pallas"
    mag = {"name": "titans", "variant": "mag", "attention": {"impl": "pallas"}}
    assert from_dict({"model": mag}).validate(device_count=8).model.attention.impl == "pallas"
    # a config.json written before the move (top-level `attention`) reads into the model section...
    legacy = from_dict({"model": {"name": "transformer"}, "attention": {"impl": "pallas", "ring_layout": "striped"}})
    assert (legacy.model.attention.impl, legacy.model.attention.ring_layout) == ("pallas", "striped")
    # ...and is dropped for a model that does not attend when it holds the defaults (it was ignored then)
    assert from_dict({"model": {"name": "mamba2"}, "attention": {"impl": "xla"}}).model.name == "mamba2"
    # the implementation switches renamed to `<mixer>_impl` read from an older config.json too
    assert from_dict({"model": {"name": "mamba2", "scan_impl": "interpret"}}).model.ssd_impl == "interpret"
    assert from_dict({"model": {"name": "xlstm", "cell_impl": "interpret"}}).model.mlstm_impl == "interpret"
    refused = [
        ({"model": {"name": "mamba2"}, "attention": {"impl": "pallas"}}, "attention.impl"),
        ({"model": {"name": "xlstm", "attention": {"impl": "xla"}}}, "model.attention"),
        ({"model": {"name": "titans", "variant": "lmm", "attention": {"impl": "pallas"}}}, "model.attention.impl"),
        ({"model": {"name": "titans", "variant": "mac", "attention": {"impl": "pallas"}}}, "model.attention.impl"),
        ({"model": {"name": "titans", "variant": "mag", "attention": {"impl": "cudnn"}}}, "model.attention.impl"),
    ]
    for values, field in refused:
        with pytest.raises(ConfigError) as e:
            from_dict(values).validate(device_count=8)
        assert e.value.field == field, (values, str(e.value))


@pytest.mark.parametrize(
    "values, field",
    [
        ({"model": {"name": "gpt5"}}, "model.name"),
        ({"model": {"name": "transformer", "d_modle": 8}}, "model.d_modle"),
        ({"model": {"name": "transformer"}, "train": {"steps": 1.5}}, "train.steps"),
        ({"model": {"name": "transformer"}, "train": {"seq_len": "long"}}, "train.seq_len"),
        ({"model": {"name": "transformer"}, "optimizer": {}}, "optimizer"),
    ],
)
def test_conversion_errors_name_the_field(values, field):
    with pytest.raises(ConfigError) as e:
        from_dict(values)
    assert e.value.field == field


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"train": {"seq_len": 100}, "mesh": {"sequence": 8, "data": 1}}, "train.seq_len"),
        ({"mesh": {"data": 4, "fsdp": 4}}, "mesh"),
        ({"mesh": {"data": 2, "tensor": 4}, "model": {"num_heads": 6, "d_model": 48}}, "model.num_heads"),
        ({"model": {"num_kv_heads": 3}}, "model.num_kv_heads"),
        ({"train": {"batch_size": 12}}, "train.batch_size"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"compute_dtype": "float16"}}, "train.compute_dtype"),
        ({"data": {"source": "s3"}}, "data.source"),
        ({"data": {"source": "text"}}, "data.path"),
        ({"mesh": {"data": -1, "fsdp": -1}}, "mesh"),
        ({"model": {"attention": {"impl": "magic"}}}, "model.attention.impl"),
        ({"model": {"attention": {"impl": "ring", "ring_layout": "spiral"}}}, "model.attention.ring_layout"),
        (  # zigzag needs 2 * mesh.sequence chunks: 36 is a multiple of 4 but not of 8
            {"model": {"attention": {"impl": "ring"}}, "train": {"seq_len": 36}, "mesh": {"sequence": 4, "data": 2}},
            "train.seq_len",
        ),
        ({"generate": {"top_p": 0.0}}, "generate.top_p"),
        ({"eval": {"stream_tokens": -5}}, "eval.stream_tokens"),
        ({"eval": {"stream_piece": -1}}, "eval.stream_piece"),
        ({"eval": {"stream_tokens": 64}, "data": {"source": "mqar"}}, "eval.stream_tokens"),
    ],
)
def test_validate_errors_name_the_field(sections, field):
    model = sections.pop("model", {})
    with pytest.raises(ConfigError) as e:
        make_config(model=model, **sections).validate(device_count=8)
    assert e.value.field == field, str(e.value)

import json

import pytest
import torch

from functional_gpt import PRESETS, GPTConfig, UserError, forward, load_params, preset, read_hf_config, write_hf_config
from functional_gpt.model.config import hf_config_dict

from conftest import TINY, assert_rel_close, make_trained_like


def test_presets_match_published_gpt2_sizes():
    transformers = pytest.importorskip("transformers")
    # transformers' GPT2Config defaults are the 124M model.
    reference = transformers.GPT2Config()
    for name in GPTConfig.__dataclass_fields__:
        assert getattr(PRESETS["gpt2"], name) == getattr(reference, name), name
    assert (preset("gpt2-xl").n_embd, preset("gpt2-xl").n_layer, preset("gpt2-xl").n_head) == (1600, 48, 25)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(UserError, match=r"unknown preset 'gpt5'.*gpt2-medium"):
        preset("gpt5")


def test_hf_config_round_trip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = GPTConfig(vocab_size=1000, n_positions=64, n_embd=48, n_layer=3, n_head=6, attn_pdrop=0.0)
    write_hf_config(config, tmp_path / "config.json")
    hf = transformers.GPT2Config.from_pretrained(tmp_path)
    assert (hf.n_embd, hf.n_layer, hf.n_head, hf.n_positions, hf.attn_pdrop) == (48, 3, 6, 64, 0.0)
    hf.save_pretrained(tmp_path / "back")
    assert read_hf_config(tmp_path / "back") == config


def test_hf_config_dict_is_json_and_carries_every_field():
    d = json.loads(json.dumps(hf_config_dict(PRESETS["cpu-small"])))
    assert GPTConfig.from_dict(d) == PRESETS["cpu-small"]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=65, n_head=4), "not divisible by n_head"),
        (dict(n_layer=0), r"n_layer: expected an integer in 1\.\.4096, got 0"),
        (dict(attn_pdrop=1.5), r"attn_pdrop must be in \[0, 1\)"),
        (dict(attn_pdrop=float("nan")), r"attn_pdrop: expected a finite number, got nan \(a float\)"),
        (dict(resid_pdrop=-0.1), r"resid_pdrop must be in \[0, 1\)"),
        (dict(n_positions=128.9), r"n_positions: expected an integer >= 1, got 128\.9"),
        (dict(n_embd=64.0), r"n_embd: expected an integer >= 1, got 64\.0"),
        (dict(n_head=True), r"n_head: expected an integer >= 1, got True \(a bool\)"),
        (dict(vocab_size="50257"), r"vocab_size: expected an integer >= 1, got '50257' \(a str\)"),
        (dict(layer_norm_epsilon=0.0), r"layer_norm_epsilon must be in \(0, 1\), got 0.0"),
        (dict(layer_norm_epsilon=-1e-5), "layer_norm_epsilon must be in"),
        (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon: expected a finite number, got nan"),
        (dict(layer_norm_epsilon=float("inf")), "layer_norm_epsilon: expected a finite number, got inf"),
        (dict(embd_pdrop=[0.1]), r"embd_pdrop: expected a finite number, got a list of 1"),
        (dict(n_layer=4097), r"n_layer: expected an integer in 1\.\.4096, got 4097"),
        (dict(vocab_size=10**9, n_embd=2048, n_head=2), r"config: 2,048,606,400,512 parameters, more than 1,099,511,627,776 \(no machine holds them"),
    ],
)
def test_bad_config_values_are_named(fields, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(**fields)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"n_embd": "wide"}', "config.json: config: n_embd: expected an integer >= 1, got 'wide'"),
        ('{"n_positions": 128.9}', "n_positions: expected an integer >= 1, got 128.9"),
        ('{"layer_norm_epsilon": NaN}', "layer_norm_epsilon: expected a finite number, got nan"),
        ('{"layer_norm_epsilon": Infinity}', "layer_norm_epsilon: expected a finite number, got inf"),
        ('{"layer_norm_epsilon": -1e-5}', "layer_norm_epsilon must be in"),
        ('[1, 2]', "expected a JSON object of GPT-2 hyperparameters, got list"),
        ('{"n_layer": null}', "n_layer: expected an integer in 1..4096, got None"),
        ('{"n_emb', "not a JSON config"),
    ],
)
def test_bad_config_json_is_a_user_error_naming_the_file_and_field(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=message) as e:
        read_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_numpy_integers_are_stored_as_ints():
    np = pytest.importorskip("numpy")
    config = GPTConfig(n_layer=np.int64(3), layer_norm_epsilon=np.float32(1e-5))
    assert type(config.n_layer) is int and type(config.layer_norm_epsilon) is float and config.n_layer == 3


def test_integral_floats_are_integers_and_unknown_keys_are_ignored():
    config = GPTConfig.from_dict({"n_positions": 64.0, "n_ctx": 64, "activation_function": "gelu_new"})
    assert config.n_positions == 64 and isinstance(config.n_positions, int)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_hf_config(tmp_path / "missing.json")


# ---------------------------------------- config.json fields that change the computation


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"), ("activation_function", "gelu"), ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True), ("tie_word_embeddings", False),
    ("model_type", "gpt_neo"), ("n_inner", 100), ("scale_attn_weights", 1),
])
def test_a_config_json_asking_for_what_is_not_implemented_is_refused_by_name(tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(preset("cpu-tiny")) | {field: value}))
    with pytest.raises(UserError, match=rf"config\.json: config: {field}={json.dumps(value)} is not implemented"):
        read_hf_config(tmp_path)


@pytest.mark.parametrize("change", [
    {"activation_function": "gelu_pytorch_tanh"}, {"activation_function": "gelu_fast"},
    {"reorder_and_upcast_attn": True}, {"n_inner": 128},
])
def test_the_config_json_variants_taken_compute_what_transformers_computes(tmp_path, change):
    """Each accepted variant, loaded from the directory transformers saved, runs as
    transformers runs that very directory (4 heads of 8, so a guessed n_head would show)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY.to_dict(), **change)).eval()
    make_trained_like([(n, p) for n, p in model.named_parameters() if n != "lm_head.weight"],
                      torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    params, config = load_params(tmp_path)
    tokens = torch.randint(TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_rel_close(forward(params, tokens), model(tokens).logits, 1e-5, str(change))

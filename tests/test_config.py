import json

import pytest

from functional_gpt import PRESETS, GPTConfig, UserError, preset, read_hf_config, write_hf_config
from functional_gpt.config import hf_config_dict


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
        (dict(n_layer=0), "n_layer must be >= 1"),
        (dict(attn_pdrop=1.5), r"attn_pdrop must be in \[0, 1\)"),
    ],
)
def test_bad_config_values_are_named(fields, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(**fields)


def test_bad_config_json_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text('{"n_embd": "wide"}')
    with pytest.raises(UserError, match="n_embd must be a number"):
        read_hf_config(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        read_hf_config(tmp_path / "missing.json")

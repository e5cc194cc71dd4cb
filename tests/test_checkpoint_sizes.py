"""Every released GPT-2 size: our param_spec is transformers' state_dict, key for key and
shape for shape, and real gpt2-sized checkpoints in both published layouts load exactly.
(gpt2-xl from disk, with its peak RSS, is measured by tools/measure_load_rss.py.)"""

import math

import pytest
import torch
from safetensors.torch import save_file

from functional_gpt import count_params, flatten, load_params, param_spec, preset, write_hf_config

from conftest import hf_model, published_layout

SIZES = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]


@pytest.mark.parametrize("name", SIZES)
def test_param_spec_is_transformers_state_dict(name):
    transformers = pytest.importorskip("transformers")
    config = preset(name)
    with torch.device("meta"):  # shapes only, no memory
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_dict()))
    theirs = {k.removeprefix("transformer."): tuple(v.shape) for k, v in model.state_dict().items()}
    assert theirs.pop("lm_head.weight") == theirs["wte.weight"]  # tied: no key of ours
    ours = {k: s.shape for k, s in param_spec(config).items()}
    assert list(ours.items()) == list(theirs.items())
    assert count_params(config) == sum(math.prod(shape) for shape in theirs.values())


@pytest.fixture(scope="module")
def gpt2_model():
    return hf_model(preset("gpt2"), seed=0)


def assert_loads_exactly(path, model):
    params, config = load_params(path)
    assert config == preset("gpt2")
    flat = flatten(params)
    expected = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert list(flat) == list(expected)
    assert all(torch.equal(flat[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_gpt2_written_by_save_pretrained_loads_exactly(tmp_path, gpt2_model):
    gpt2_model.save_pretrained(tmp_path)
    assert_loads_exactly(tmp_path, gpt2_model)


@pytest.mark.slow
def test_gpt2_in_the_published_layout_loads_exactly(tmp_path, gpt2_model):
    """No `transformer.` prefix, h.N.attn.bias / masked_bias buffers, lm_head.weight, and
    the config in a config.json beside the file (as the hub's gpt2 has it)."""
    save_file(published_layout(gpt2_model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    write_hf_config(preset("gpt2"), tmp_path / "config.json")
    assert_loads_exactly(tmp_path / "model.safetensors", gpt2_model)

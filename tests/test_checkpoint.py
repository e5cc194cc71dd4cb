"""Weights I/O: our self-describing files, Hugging Face layouts, and every bad file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, published_layout
from functional_gpt import UserError, flatten, forward, load_params, save_params, write_hf_config
from functional_gpt.checkpoint import CONFIG_METADATA_KEY, weight_files


def _tokens(T=16):
    return torch.randint(TINY.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))


def _hf_logits(model):
    with torch.no_grad():
        return model(_tokens()).logits


def test_save_load_round_trip_is_exact_and_self_describing(tmp_path, tiny_params, tiny_config):
    path = tmp_path / "m.safetensors"
    save_params(path, tiny_params, tiny_config)
    params, config = load_params(path)
    assert config == tiny_config  # from the metadata alone: no config.json here
    assert all(torch.equal(flatten(tiny_params)[k], v) for k, v in flatten(params).items())
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_published_layout_loads(tmp_path, hf_tiny):
    """As on the hub: no `transformer.` prefix, causal-mask buffers, an explicit tied head."""
    model, hf_dir = hf_tiny
    state = published_layout(model)
    published = tmp_path / "published"
    published.mkdir()
    save_file(state, published / "model.safetensors", metadata={"format": "pt"})
    (published / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    for path in (published, published / "model.safetensors"):
        params, config = load_params(path)
        assert config == TINY
        assert (forward(params, _tokens(), config) - _hf_logits(model)).abs().max().item() < 1e-4


def test_untied_head_is_refused(tmp_path, tiny_params, tiny_config):
    state = flatten(tiny_params) | {"lm_head.weight": torch.randn(128, 32)}
    save_file(state, tmp_path / "model.safetensors")
    write_hf_config(tiny_config, tmp_path / "config.json")
    with pytest.raises(UserError, match="lm_head.weight differs from wte.weight"):
        load_params(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load(tmp_path, hf_tiny, dtype):
    model, _ = hf_tiny
    model.to(dtype).save_pretrained(tmp_path / "half")
    params, config = load_params(tmp_path / "half")
    assert params["wte"]["weight"].dtype == torch.float32
    kept, _ = load_params(tmp_path / "half", dtype=None)
    assert kept["h"][0]["mlp"]["c_fc"]["weight"].dtype == dtype
    expected = _hf_logits(model.float())  # the same rounded weights, in fp32
    assert (forward(params, _tokens(), config) - expected).abs().max().item() < 1e-4


def test_saved_params_load_in_transformers_with_the_same_logits(tmp_path, tiny_params, tiny_config):
    transformers = pytest.importorskip("transformers")
    save_params(tmp_path / "model.safetensors", tiny_params, tiny_config)
    write_hf_config(tiny_config, tmp_path / "config.json")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    expected = forward(tiny_params, _tokens(), tiny_config)
    assert (_hf_logits(model) - expected).abs().max().item() < 1e-4


def test_failed_save_leaves_the_old_file_intact(tmp_path, tiny_params, tiny_config, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_params(path, tiny_params, tiny_config)
    before = path.read_bytes()

    def crash_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("functional_gpt.checkpoint.save_file", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_params(path, tiny_params, tiny_config)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


@pytest.fixture
def saved(tmp_path, tiny_params, tiny_config):
    path = tmp_path / "m.safetensors"
    save_params(path, tiny_params, tiny_config)
    return path


def _resave(path, state, config):
    save_file(state, path, metadata={CONFIG_METADATA_KEY: json.dumps(config.to_dict())})


def test_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, I am text")
    with pytest.raises(UserError, match=r"notes.safetensors: not a readable safetensors file"):
        load_params(path)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match=r"m.safetensors: truncated: tensor \S+ ends at byte \d+, the file has \d+"):
        load_params(saved)


def test_missing_unexpected_and_misshapen_keys_are_listed(saved, tiny_config):
    state = load_file(saved)
    _resave(saved, {k: v for k, v in state.items() if not k.startswith("h.1.ln_")}, tiny_config)
    with pytest.raises(UserError, match=r"missing keys: h\.1\.ln_1\.weight, h\.1\.ln_1\.bias, h\.1\.ln_2"):
        load_params(saved)
    _resave(saved, state | {"h.0.attn.rotary": torch.zeros(2)}, tiny_config)
    with pytest.raises(UserError, match=r"unexpected keys: h\.0\.attn\.rotary"):
        load_params(saved)
    _resave(saved, state | {"h.0.mlp.c_fc.weight": torch.zeros(128, 32)}, tiny_config)
    with pytest.raises(UserError, match=r"shape mismatch for h\.0\.mlp\.c_fc\.weight: expected \[32, 128\], got \[128, 32\]"):
        load_params(saved)


def test_paths_without_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_params(tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_params(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="pickled weights, which are never loaded"):
        load_params(tmp_path)


def test_sharded_checkpoint_loads(tmp_path, hf_tiny):
    model, directory = hf_tiny
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = list(tensors)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(tmp_path / name), metadata={"format": "pt"})
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    params, _ = load_params(tmp_path)
    assert torch.equal(params["h"][1]["mlp"]["c_proj"]["weight"], tensors["transformer.h.1.mlp.c_proj.weight"])
    assert [f.name for f in weight_files(tmp_path)] == ["a.safetensors", "b.safetensors"]

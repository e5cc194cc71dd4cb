"""checkpoint.py: our own files, Hugging Face layouts, and a clear error for every bad file."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from functional_gpt import UserError, flatten, forward, load_params, save_params
from functional_gpt.checkpoint import CONFIG_METADATA_KEY, weight_files

from conftest import TINY


def published_layout(model, dtype=torch.float32) -> dict:
    """A transformers model's tensors laid out as the published GPT-2 files are: no
    `transformer.` prefix, the causal-mask buffers attn.bias / attn.masked_bias, and
    (as some conversions do) an explicit lm_head.weight equal to wte.weight."""
    P = model.config.n_positions
    tensors = {k.removeprefix("transformer."): v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.ones(P, P).tril().view(1, 1, P, P)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    return tensors


def test_save_then_load_gives_the_same_params_and_config(tmp_path, tiny_params, tiny_config):
    save_params(tmp_path / "m.safetensors", tiny_params, tiny_config)
    params, config = load_params(tmp_path / "m.safetensors")
    assert config == tiny_config
    ours, theirs = flatten(tiny_params), flatten(params)
    assert list(theirs) == list(ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_save_pretrained_directory_gives_transformers_logits(hf_tiny):
    model, directory = hf_tiny
    params, config = load_params(directory)
    assert config.n_layer == TINY.n_layer and config.n_head == TINY.n_head
    tokens = torch.randint(TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    torch.testing.assert_close(forward(params, tokens, config), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_published_layout_loads_in_every_float_dtype(tmp_path, hf_tiny, dtype):
    model, directory = hf_tiny
    tensors = published_layout(model, dtype)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    params, _ = load_params(tmp_path, dtype=None)
    flat = flatten(params)
    buffers = {k for k in tensors if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", k)}
    assert len(buffers) == 2 * TINY.n_layer
    assert set(flat) == set(tensors) - buffers - {"lm_head.weight"}
    assert all(flat[k].dtype == dtype and torch.equal(flat[k], tensors[k]) for k in flat)
    as_fp32, _ = load_params(tmp_path)
    assert all(t.dtype == torch.float32 for t in flatten(as_fp32).values())


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


def write(tmp_path, tensors, name="m.safetensors"):
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(TINY.to_dict())}
    save_file(tensors, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


def test_untied_lm_head_is_refused(tmp_path, hf_tiny):
    tensors = published_layout(hf_tiny[0])
    tensors["lm_head.weight"][0, 0] += 1.0
    with pytest.raises(UserError, match="lm_head.weight differs from wte.weight"):
        load_params(write(tmp_path, tensors))


def test_missing_key_and_wrong_shape_are_named(tmp_path, tiny_params):
    flat = {k: v.contiguous() for k, v in flatten(tiny_params).items()}
    missing = dict(flat)
    del missing["h.1.ln_2.bias"]
    with pytest.raises(UserError, match=r"missing keys: h\.1\.ln_2\.bias"):
        load_params(write(tmp_path, missing, "missing.safetensors"))
    wrong = dict(flat, **{"h.0.attn.c_attn.weight": flat["h.0.attn.c_attn.weight"].T.contiguous()})
    with pytest.raises(UserError, match=r"shape mismatch for h\.0\.attn\.c_attn\.weight: expected \[32, 96\], got \[96, 32\]"):
        load_params(write(tmp_path, wrong, "wrong.safetensors"))


def test_truncated_and_garbage_files_give_one_line_errors(tmp_path, tiny_params, tiny_config):
    save_params(tmp_path / "m.safetensors", tiny_params, tiny_config)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(UserError, match=r"cut\.safetensors: truncated: tensor \S+ ends at byte"):
        load_params(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_params(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_params(tmp_path / "tiny.safetensors")


def test_directories_without_safetensors_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="only pickled weights"):
        load_params(tmp_path)
    with pytest.raises(UserError, match="no such file or directory"):
        load_params(tmp_path / "nowhere")

"""Weights I/O: our self-describing files, Hugging Face layouts, and every bad file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, assert_rel_close, hf_model, published_layout
from functional_gpt import GPTConfig, UserError, flatten, forward, load_params, save_params, unflatten, write_hf_config
from functional_gpt.interp import run_with_cache
from functional_gpt.model.checkpoint import CONFIG_METADATA_KEY, weight_files


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

    monkeypatch.setattr("functional_gpt.model.checkpoint.save_file", crash_half_way)
    with pytest.raises(UserError, match=r"m.safetensors: cannot write \(disk full\)"):
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
    with pytest.raises(UserError, match=f"^{tmp_path}/nowhere/: no such file or directory$"):  # as given
        load_params(f"{tmp_path}/nowhere/")
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


@pytest.mark.parametrize("index, message", [
    ('{"weight_map": {"wte.weight": 3}}', r"weight_map must map each tensor to a file name in this directory, got "
                                         r"\{'wte\.weight': 3\}"),
    ('{"weight_map": ["a.safetensors"]}', r"weight_map must map each tensor to a file name"),
    ('{"weight_map": {}}', r"weight_map must map each tensor to a file name"),
    ('{"weight_map": {"wte.weight": "../../etc/passwd"}}', r"weight_map must map each tensor to a file name"),
    ('[1, 2]', r"not a safetensors index \(TypeError: "),
    ('{"metadata": {}}', r"not a safetensors index \(KeyError: 'weight_map'\)"),
])
def test_a_sharded_index_that_does_not_name_shard_files_is_refused(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UserError, match=r"model\.safetensors\.index\.json: " + message):
        load_params(tmp_path)


@pytest.mark.parametrize("path", [None, 3, "", ["a"], "m\x00.safetensors"])
def test_load_params_of_what_is_not_a_path_is_named(path):
    with pytest.raises(UserError, match=r"^path: expected the path of a checkpoint file or directory, got "):
        load_params(path)


def test_tensors_that_share_memory_save_as_copies(tmp_path, tiny_params, tiny_config):
    """One tensor under two keys (and a view of another) saves, and loads back equal."""
    flat = flatten(tiny_params)
    flat["h.1.ln_1.weight"] = flat["h.0.ln_1.weight"]
    flat["h.1.ln_2.bias"] = flat["h.0.ln_2.bias"].view(-1)
    save_params(tmp_path / "m.safetensors", unflatten(flat), tiny_config)
    loaded, _ = load_params(tmp_path / "m.safetensors")
    assert all(torch.equal(flatten(loaded)[k], v) for k, v in flat.items())


def _raw_safetensors(path, header: dict, data: bytes = b"") -> None:
    """Write a safetensors file by hand: 8-byte header length, the JSON header, the data."""
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, "bad header entry for tensor x"),
        ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, "bad header entry for tensor x"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, "bad header entry for tensor x"),
        ({"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}, "bad header entry for tensor x"),
        ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "bad header entry for tensor x"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "bad header entry for tensor x"),
        ("F32", "bad header entry for tensor x"),
        ({"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}, "tensor x has dtype F99, not one of"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}, r"data_offsets \[0, 12\] do not hold F32 \[4\]"),
        ({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, "truncated: tensor x ends at byte"),
    ],
)
def test_header_fields_of_the_wrong_type_or_value_are_named(tmp_path, entry, message):
    path = tmp_path / "m.safetensors"
    _raw_safetensors(path, {"x": entry}, bytes(16))
    with pytest.raises(UserError, match=message):
        load_params(path)


@pytest.mark.parametrize("metadata", [7, ["a"], {"format": 1}])
def test_metadata_that_is_not_an_object_of_strings(tmp_path, metadata):
    path = tmp_path / "m.safetensors"
    _raw_safetensors(path, {"__metadata__": metadata, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                     bytes(4))
    with pytest.raises(UserError, match="__metadata__ must be an object of strings"):
        load_params(path)


def test_overlapping_tensors_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    _raw_safetensors(path, header, bytes(24))
    with pytest.raises(UserError, match="tensors a and b overlap"):
        load_params(path)


def test_integer_tensors_are_refused_not_cast(saved, tiny_config):
    state = load_file(saved)
    _resave(saved, state | {"h.0.ln_1.bias": torch.ones(32, dtype=torch.int8)}, tiny_config)
    with pytest.raises(UserError, match="tensor h.0.ln_1.bias has dtype I8; parameters must be floating point"):
        load_params(saved)


def test_a_key_present_with_and_without_the_transformer_prefix_is_refused(saved, tiny_config):
    state = load_file(saved)
    _resave(saved, state | {"transformer.wte.weight": state["wte.weight"] + 1}, tiny_config)
    with pytest.raises(UserError, match=r"holds both (transformer\.)?wte.weight and (transformer\.)?wte.weight"):
        load_params(saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_params_are_refused_on_load_and_on_save(saved, tmp_path, tiny_params, tiny_config, bad):
    state = load_file(saved)
    state["h.1.mlp.c_fc.weight"][3, 5] = bad
    _resave(saved, state, tiny_config)
    with pytest.raises(UserError, match="h.1.mlp.c_fc.weight holds 1 non-finite values"):
        load_params(saved)
    tiny_params["h"][0]["attn"]["c_proj"]["bias"][:2] = bad
    out = tmp_path / "new.safetensors"
    with pytest.raises(UserError, match="refusing to save: h.0.attn.c_proj.bias holds 2 non-finite values"):
        save_params(out, tiny_params, tiny_config)
    assert not out.exists()


def test_save_refuses_params_that_do_not_match_the_config(tmp_path, tiny_params, tiny_config):
    import dataclasses
    with pytest.raises(UserError, match="shape mismatch for wte.weight"):
        save_params(tmp_path / "m.safetensors", tiny_params, dataclasses.replace(tiny_config, vocab_size=100))
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("config_json, message", [
    ('{"n_embd": 32, "n_positions": 128.9}', "n_positions: expected an integer >= 1, got 128.9"),
    ('{"layer_norm_epsilon": NaN}', "layer_norm_epsilon: expected a finite number"),
    ('[1]', "expected a JSON object"),
    ('{"n_embd": ', "bad config in metadata"),
])
def test_bad_config_in_the_metadata_names_the_file(saved, tiny_config, config_json, message):
    save_file(load_file(saved), saved, metadata={CONFIG_METADATA_KEY: config_json})
    with pytest.raises(UserError, match=message) as e:
        load_params(saved)
    assert str(saved) in str(e.value)


def test_write_errors_name_the_path(tmp_path, tiny_params, tiny_config):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file/m.safetensors: cannot write \(\S+/file is a file, not a directory\)"):
        save_params(tmp_path / "file" / "m.safetensors", tiny_params, tiny_config)
    with pytest.raises(UserError, match="is a directory, not a file"):
        save_params(tmp_path, tiny_params, tiny_config)


# ------------------------------------------------------ the head count is never guessed


def test_params_loaded_from_a_transformers_directory_run_with_its_head_count(tmp_path):
    """4 heads of 32 (d_model 128), not GPT-2's 64 per head: `forward(params, tokens)` and
    `run_with_cache` without a config run the loaded params as transformers runs them."""
    config = GPTConfig(vocab_size=300, n_positions=32, n_embd=128, n_layer=2, n_head=4)
    model = hf_model(config)
    model.save_pretrained(tmp_path)
    params, loaded = load_params(tmp_path)
    assert loaded.n_head == 4 and params.config == loaded
    tokens = torch.randint(300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
    assert_rel_close(forward(params, tokens), expected, 1e-5)
    assert_rel_close(run_with_cache(params, tokens, ["h.1"])[0], expected, 1e-5)


def test_weights_without_any_config_are_refused_not_guessed(tmp_path, hf_tiny):
    """A model.safetensors with neither our metadata nor a config.json beside it: the shapes
    give no head count, so loading asks for one (and takes it when given)."""
    _, directory = hf_tiny
    (directory / "config.json").unlink()
    with pytest.raises(UserError, match=r"holds no config .* do not tell n_head or layer_norm_epsilon; write the "
                                        r"model's config.json beside it"):
        load_params(directory)
    params, config = load_params(directory, config=TINY)
    assert config == TINY and params.config == TINY


def test_plain_dict_params_are_refused_without_a_config(tiny_params):
    with pytest.raises(UserError, match="these params do not carry their config"):
        forward(unflatten(flatten(tiny_params)), torch.zeros(1, 3, dtype=torch.long))

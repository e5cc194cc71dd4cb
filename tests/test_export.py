"""export.py: functional_gpt -> export -> transformers gives the same logits; download
fails in one line, telling where to put the files by hand."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from functional_gpt import UserError, flatten, forward, init_params, load_params, save_params
from functional_gpt.cli import main
from functional_gpt.reference.export import download


ROOT = Path(__file__).resolve().parent.parent


def from_pretrained(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


def test_export_round_trip_gives_the_same_logits_in_transformers(tmp_path, tiny_config):
    params = init_params(tiny_config, seed=3)
    for p in flatten(params).values():  # nonzero biases and gains, so a dropped one shows
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    save_params(tmp_path / "trained.safetensors", params, tiny_config)
    assert main(["export", "--weights", str(tmp_path / "trained.safetensors"), "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    model = from_pretrained(tmp_path / "hf")
    assert model.config.n_layer == tiny_config.n_layer and model.config.n_head == tiny_config.n_head
    tokens = torch.randint(tiny_config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, forward(params, tokens, tiny_config), atol=1e-5, rtol=1e-5)


def test_a_gpt2_vocabulary_exports_with_the_tokenizer_transformers_loads(tmp_path):
    """vocab.json and merges.txt beside the weights: AutoTokenizer reads the export and
    tokenizes as we do (tiktoken's GPT-2), <|endoftext|> included."""
    transformers = pytest.importorskip("transformers")
    from functional_gpt import GPTConfig, encode

    config = GPTConfig(vocab_size=50257, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    save_params(tmp_path / "w.safetensors", init_params(config, seed=0), config)
    assert main(["export", "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                                  "vocab.json"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["Hello world", " naïve 🙂\n\n  tabs\tand <|endoftext|> end", "ROMEO:\nBut soft!"]:
        assert tokenizer(text)["input_ids"] == encode(text), text


def test_export_reads_a_hugging_face_directory_and_can_change_dtype(tmp_path, hf_tiny):
    model, directory = hf_tiny
    assert main(["export", "--weights", str(directory), "--out", str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
    params, _ = load_params(tmp_path / "half", dtype=None)
    assert all(t.dtype == torch.bfloat16 for t in flatten(params).values())
    again = from_pretrained(tmp_path / "half")
    assert torch.equal(again.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight.bfloat16())


def test_export_refuses_a_file_as_the_output_directory(tmp_path, tiny_params, tiny_config, capsys):
    save_params(tmp_path / "m.safetensors", tiny_params, tiny_config)
    assert main(["export", "--weights", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "m.safetensors: exists and is not a directory" in capsys.readouterr().err


def test_download_offline_says_where_to_put_the_files_in_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    result = subprocess.run(
        [sys.executable, "-m", "functional_gpt.cli", "download", "gpt2", "--out", str(tmp_path / "gpt2")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fgpt download: error: download failed")
    assert lines[0].endswith(
        f"put config.json and model.safetensors from https://huggingface.co/openai-community/gpt2 into {tmp_path / 'gpt2'}/"
    )
    assert not (tmp_path / "gpt2" / "model.safetensors").exists()


def test_download_without_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'functional-gpt\[download\]'\); or put .* into weights/gpt2-xl/"):
        download("gpt2-xl")
    with pytest.raises(UserError, match="unknown model 'gpt3'"):
        download("gpt3")

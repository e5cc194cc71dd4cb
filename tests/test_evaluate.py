"""Perplexity against transformers' computation (its perplexity guide's windows and
labels, on the same weights), and the data sources `fgpt eval` reads."""

import json
import math

import numpy as np
import pytest
import torch

from functional_gpt import UserError, load_params, save_params
from functional_gpt.evaluate import evaluate, load_eval_data, windows
from functional_gpt.tokenizer import encode, gpt2_encoding



def transformers_nats(model, ids, max_length, stride):
    """The guide's loop: labels -100 on the overlap, the model's own shifted loss; summed
    exactly (mean loss x the number of labels it averaged)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count, prev_end = total + loss.item() * n, count + n, end
        if end == ids.shape[1]:
            break
    return total, count


@pytest.mark.parametrize("max_length, stride", [(32, 16), (32, 7), (20, 19)])
def test_perplexity_equals_transformers(hf_tiny, tiny_config, max_length, stride):
    model, directory = hf_tiny
    params, config = load_params(directory)
    ids = torch.randint(128, (1, 150), generator=torch.Generator().manual_seed(0))
    ours = evaluate(params, [ids[0]], config, max_length=max_length, stride=stride, batch_size=3,
                    show_progress=False)
    nats, count = transformers_nats(model, ids, max_length, stride)
    assert ours.tokens == count == 149
    assert ours.nats_per_token == pytest.approx(nats / count, rel=1e-4)
    assert ours.perplexity == pytest.approx(math.exp(nats / count), rel=1e-4)


def test_windows_score_every_token_but_the_first_once():
    for n, max_length, stride in [(100, 32, 16), (100, 32, 31), (10, 32, 16), (33, 32, 1), (2, 2, 1)]:
        scored = []
        for begin, end, k in windows(n, max_length, stride):
            assert end - begin <= max_length and 1 <= k <= end - begin - 1
            scored += range(end - k, end)
        assert scored == list(range(1, n))


def test_bits_per_byte_counts_the_utf8_bytes_of_the_scored_tokens(tiny_params, tiny_config, tmp_path):
    text = "héllo wörld, ünïcode! " * 3
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    texts, _ = load_eval_data(tmp_path / "a.txt", "unused")
    ids = encode(text)
    assert texts[0].tolist() == ids
    ids = torch.tensor([[i % 128 for i in ids]])  # the tiny model's vocab is 128 ids
    r = evaluate(tiny_params, [ids[0]], tiny_config, show_progress=False)
    n_bytes = len(gpt2_encoding().decode_bytes(ids[0, 1:].tolist()))
    assert r.bytes == n_bytes
    assert r.bits_per_byte == pytest.approx(r.nats / math.log(2) / n_bytes)


def test_run_directory_evaluates_its_validation_split(tiny_params, tiny_config, tmp_path):
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    data_dir.mkdir()
    run_dir.mkdir()
    val = np.random.default_rng(0).integers(0, 128, 90).astype("<u2")
    val.tofile(data_dir / "val.bin")
    save_params(run_dir / "model.safetensors", tiny_params, tiny_config)
    (run_dir / "state.json").write_text(json.dumps({"data_dir": str(data_dir.resolve())}))
    texts, source = load_eval_data(None, run_dir)
    assert source.endswith("val.bin") and texts[0].tolist() == val.tolist()
    assert torch.equal(load_eval_data(None, run_dir / "model.safetensors")[0][0], texts[0])
    texts_again, _ = load_eval_data(data_dir, run_dir)
    assert torch.equal(texts_again[0], texts[0])
    params, config = load_params(run_dir)
    r = evaluate(params, texts, config, show_progress=False)
    assert r.tokens == 89 and abs(r.nats_per_token - math.log(128)) < 0.5  # near uniform, fresh init


def test_directory_of_texts_evaluates_each_file_separately(tiny_params, tiny_config, tmp_path):
    (tmp_path / "b.md").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file here", encoding="utf-8")
    (tmp_path / ".hidden").write_text("skipped", encoding="utf-8")
    texts, _ = load_eval_data(tmp_path, "unused")
    assert [t.tolist() for t in texts] == [encode("first file here"), encode("second file")]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty file"), (b"\xff\xfe bad", "not UTF-8")],
)
def test_bad_text_file_is_a_one_line_error_naming_it(tmp_path, content, message):
    (tmp_path / "x.txt").write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_eval_data(tmp_path / "x.txt", "unused")
    assert "x.txt" in str(e.value) and "\n" not in str(e.value)


def test_missing_inputs_are_user_errors(tiny_params, tiny_config, tmp_path):
    with pytest.raises(UserError, match="--data is required"):
        load_eval_data(None, tmp_path)
    with pytest.raises(UserError, match="no such file"):
        load_eval_data(tmp_path / "nope.txt", tmp_path)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(UserError, match="odd.bin"):
        load_eval_data(tmp_path / "odd.bin", tmp_path)
    with pytest.raises(UserError, match="--stride"):
        evaluate(tiny_params, [torch.arange(10)], tiny_config, stride=32, show_progress=False)
    with pytest.raises(UserError, match="out of range"):
        evaluate(tiny_params, [torch.arange(200)], tiny_config, show_progress=False)


def test_cli_eval_json_on_a_run_directory(tiny_params, tiny_config, tmp_path, capsys):
    from functional_gpt.cli import main

    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    data_dir.mkdir()
    np.random.default_rng(1).integers(0, 128, 70).astype("<u2").tofile(data_dir / "val.bin")
    save_params(run_dir / "model.safetensors", tiny_params, tiny_config)
    (run_dir / "state.json").write_text(json.dumps({"data_dir": str(data_dir)}))
    assert main(["eval", "--weights", str(run_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = evaluate(tiny_params, load_eval_data(data_dir, run_dir)[0], tiny_config, show_progress=False)
    assert got["tokens"] == 69 and got["perplexity"] == pytest.approx(expected.perplexity)
    assert got["bits_per_byte"] == pytest.approx(expected.bits_per_byte)
    (tmp_path / "bad.txt").write_bytes(b"\xc3\x28")
    assert main(["eval", "--weights", str(run_dir), "--data", str(tmp_path / "bad.txt")]) == 2
    err = capsys.readouterr().err
    assert "bad.txt: not UTF-8" in err and err.count("\n") == 1

"""Perplexity against transformers' computation (its perplexity guide's windows and
labels, on the same weights), and the data sources `fgpt eval` reads."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import functional_gpt.reference.perplexity as evaluate_module
from functional_gpt import UserError, forward, load_params, save_params
from functional_gpt.reference.perplexity import EvalResult, evaluate, load_eval_data, windows
from functional_gpt.model.tokenizer import encode, gpt2_encoding


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


def test_result_figures_and_their_dict_in_closed_form():
    """2 tokens, 4 bytes, 2 ln 3 nats: ln 3 nats/token, perplexity 3, 2 ln 3 / ln 2 / 4
    bits per byte, each under its name in to_dict (what `fgpt eval --json` prints)."""
    r = EvalResult(tokens=2, bytes=4, nats=2 * math.log(3), max_length=8, stride=4)
    expected = dict(tokens=2, bytes=4, nats=2 * math.log(3), max_length=8, stride=4, nats_per_token=math.log(3),
                    perplexity=3.0, bits_per_byte=2 * math.log(3) / math.log(2) / 4)
    assert r.to_dict() == pytest.approx(expected, rel=1e-12)
    assert sorted(r.to_dict()) == sorted(expected)


def test_defaults_and_edges_of_the_window_settings(tiny_params, tiny_config):
    """max_length defaults to n_positions and stride to max_length // 2 (1 at the smallest
    window, 2); the extreme settings are accepted; two tokens are one scored token."""
    ids = torch.arange(40) % 128
    r = evaluate(tiny_params, [ids], tiny_config, show_progress=False)
    assert (r.max_length, r.stride, r.tokens) == (32, 16, 39)
    assert evaluate(tiny_params, [ids], tiny_config, max_length=2, show_progress=False).stride == 1
    assert evaluate(tiny_params, [ids], tiny_config, max_length=9, show_progress=False).stride == 4
    assert evaluate(tiny_params, [ids], tiny_config, stride=1, batch_size=1, show_progress=False).tokens == 39
    two = evaluate(tiny_params, [torch.tensor([5, 7])], tiny_config, show_progress=False)
    expected = F.cross_entropy(forward(tiny_params, torch.tensor([[5]]), tiny_config)[0], torch.tensor([7]))
    assert two.tokens == 1 and two.nats == pytest.approx(expected.item(), rel=1e-5)


def test_a_one_token_text_scores_nothing_beside_others(tiny_params, tiny_config):
    """Texts are scored separately: a 1-token text adds no token and no nats."""
    ids = torch.arange(10)
    alone = evaluate(tiny_params, [ids], tiny_config, show_progress=False)
    both = evaluate(tiny_params, [torch.tensor([3]), ids], tiny_config, show_progress=False)
    assert (both.tokens, both.nats) == (alone.tokens, pytest.approx(alone.nats, rel=1e-6))


def test_token_ids_zero_and_vocab_minus_one_are_in_range(tiny_params, tiny_config):
    r = evaluate(tiny_params, [torch.tensor([0, 127, 0, 127])], tiny_config, show_progress=False)
    assert r.tokens == 3
    with pytest.raises(UserError, match=r"token ids 0\.\.128 are out of range for vocab_size=128"):
        evaluate(tiny_params, [torch.tensor([0, 128])], tiny_config, show_progress=False)
    with pytest.raises(UserError, match=r"token ids -1\.\.3 are out of range"):
        evaluate(tiny_params, [torch.tensor([3, -1])], tiny_config, show_progress=False)


@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_windows_of_equal_length_run_batch_size_at_a_time(tiny_params, tiny_config, monkeypatch, batch_size):
    """The forward passes see batches of at most batch_size (default 8) windows, each batch
    of one length, in order, and the total does not depend on the batching."""
    seen = []
    real_forward = evaluate_module.forward

    def recording_forward(params, batch, config):
        seen.append(tuple(batch.shape))
        return real_forward(params, batch, config)

    monkeypatch.setattr(evaluate_module, "forward", recording_forward)
    ids = torch.arange(100) % 128
    kw = {} if batch_size is None else dict(batch_size=batch_size)
    r = evaluate(tiny_params, [ids], tiny_config, max_length=16, stride=8, show_progress=False, **kw)
    batch_size = batch_size or 8
    lengths = [e - b for b, e, _ in windows(100, 16, 8)]  # 11 windows of 16, then one of 12
    assert lengths == [16] * 11 + [12]
    full = [min(batch_size, 11 - i) for i in range(0, 11, batch_size)]
    assert seen == [(n, 16) for n in full] + [(1, 12)]
    monkeypatch.setattr(evaluate_module, "forward", real_forward)
    one_by_one = evaluate(tiny_params, [ids], tiny_config, max_length=16, stride=8, batch_size=1,
                          show_progress=False)
    assert r.nats == pytest.approx(one_by_one.nats, rel=1e-5)


def test_text_nats_reports_progress_in_scored_tokens(tiny_params, tiny_config):
    """progress.update gets the number of tokens each batch scored; None is allowed."""

    class Progress:
        def __init__(self):
            self.updates = []

        def update(self, n):
            self.updates.append(n)

    ids = torch.arange(50) % 128
    progress = Progress()
    total = evaluate_module.text_nats(tiny_params, ids, tiny_config, max_length=16, stride=8, batch_size=2,
                                      progress=progress)
    # windows of 16 tokens score 15, 8, 8, 8, 8; the last, of 10, scores 2
    assert progress.updates == [15 + 8, 8 + 8, 8, 2]
    assert evaluate_module.text_nats(tiny_params, ids, tiny_config, max_length=16, stride=8) == pytest.approx(total)
    progress = Progress()  # by default 8 windows at a time: 100 tokens make 11 windows of 16, then one of 12
    evaluate_module.text_nats(tiny_params, torch.arange(100) % 128, tiny_config, max_length=16, stride=8,
                              progress=progress)
    assert progress.updates == [15 + 7 * 8, 3 * 8, 4]


def test_progress_bar_unless_turned_off(tiny_params, tiny_config, capsys):
    evaluate(tiny_params, [torch.arange(20)], tiny_config, show_progress=False)
    assert capsys.readouterr().err == ""
    evaluate(tiny_params, [torch.arange(20)], tiny_config)  # shown by default, counting scored tokens
    err = capsys.readouterr().err
    assert "eval" in err and "19/19" in err and "tok/s" in err


def test_each_source_is_described_by_the_path_read(tmp_path):
    """The description `fgpt eval` prints names the file or directory actually read."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    np.arange(6, dtype="<u2").tofile(data_dir / "val.bin")
    np.arange(4, dtype="<u2").tofile(tmp_path / "other.bin")
    (tmp_path / "t.txt").write_text("some text", encoding="utf-8")
    assert load_eval_data(data_dir, "unused")[1] == str(data_dir / "val.bin")
    texts, source = load_eval_data(tmp_path / "other.bin", "unused")
    assert source == str(tmp_path / "other.bin") and texts[0].tolist() == [0, 1, 2, 3]
    assert load_eval_data(tmp_path / "t.txt", "unused")[1] == str(tmp_path / "t.txt")
    texts_dir = tmp_path / "texts"
    texts_dir.mkdir()
    (texts_dir / "a.txt").write_text("a", encoding="utf-8")
    assert load_eval_data(texts_dir, "unused")[1] == str(texts_dir)


def test_bad_sources_are_one_line_errors_naming_the_path(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"data_dir": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=r"gone/val\.bin: no such file"):
        load_eval_data(None, run)
    (run / "state.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(UserError, match=r"state\.json: no data_dir \(KeyError"):
        load_eval_data(None, run)
    for bad in (5, "", ["data"]):
        (run / "state.json").write_text(json.dumps({"data_dir": bad}))
        with pytest.raises(UserError, match=r"state\.json: data_dir must be a path, got " + re.escape(repr(bad))):
            load_eval_data(None, run)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.bin: 0 bytes, not a non-empty file of uint16 token ids"):
        load_eval_data(tmp_path / "empty.bin", "unused")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".only").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"hidden: no \.txt or \.md files to evaluate$"):
        load_eval_data(hidden, "unused")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_length=1), r"--max_length: expected an integer in 2\.\.32, got 1 \(an int\)$"),
        (dict(max_length=33), r"--max_length: expected an integer in 2\.\.32, got 33 \(an int\)$"),
        (dict(max_length=8.0), r"--max_length: expected an integer .* got 8\.0 \(a float\)$"),
        (dict(max_length=True), r"--max_length: expected an integer .* got True \(a bool\)$"),
        (dict(max_length=8, stride=8), r"--stride: expected an integer in 1\.\.7, got 8 \(an int\)$"),
        (dict(stride=0), r"--stride: expected an integer in 1\.\.31, got 0 \(an int\)$"),
        (dict(stride=4.0), r"--stride: expected an integer .* got 4\.0 \(a float\)$"),
        (dict(batch_size=0), r"--batch_size: expected an integer >= 1, got 0 \(an int\)$"),
        (dict(batch_size=2.0), r"--batch_size: expected an integer >= 1, got 2\.0 \(a float\)$"),
    ],
)
def test_bad_window_settings_name_the_flag(tiny_params, tiny_config, kwargs, message):
    with pytest.raises(UserError, match=message):
        evaluate(tiny_params, [torch.arange(40)], tiny_config, show_progress=False, **kwargs)


@pytest.mark.parametrize(
    "texts, message",
    [
        ([torch.zeros(2, 3, dtype=torch.long)], "texts: expected a list of 1-D integer token tensors"),
        ([torch.arange(5.0)], "texts: expected a list of 1-D integer token tensors"),
        ([[1, 2, 3]], "texts: expected a list of 1-D integer token tensors"),
        ([torch.tensor([5])], "nothing to evaluate: need at least 2 tokens"),
    ],
)
def test_bad_texts_are_user_errors(tiny_params, tiny_config, texts, message):
    with pytest.raises(UserError, match=message):
        evaluate(tiny_params, texts, tiny_config, show_progress=False)


def test_a_text_of_one_repeated_token_is_in_range(tiny_params, tiny_config):
    assert evaluate(tiny_params, [torch.tensor([5, 5, 5])], tiny_config, show_progress=False).tokens == 2


@pytest.mark.parametrize("name, content", [("t.txt", "To be, or not to be."), ("t.bin", b"\x01\x00\x02\x00")])
def test_an_unreadable_data_file_is_one_line_naming_it(tmp_path, monkeypatch, name, content):
    """Root reads any file, so the refusal is simulated where the bytes are read."""
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(evaluate_module.Path, "read_bytes", denied)
    monkeypatch.setattr(evaluate_module.np, "fromfile", denied)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: cannot read \(Permission denied\)$"):
        load_eval_data(path, "unused")


def test_evaluate_names_texts_that_are_not_a_list(tiny_params, tiny_config):
    with pytest.raises(UserError, match=r"^texts: expected a list of 1-D integer token tensors \[N\], got an int64 "
                                        r"tensor \[5\]$"):
        evaluate(tiny_params, torch.arange(5), tiny_config, show_progress=False)

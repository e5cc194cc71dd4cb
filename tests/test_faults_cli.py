"""Bad input and faults for every command but training: each is one line naming the
flag, file or value (exit 2), and a failed command leaves the files it found as they
were (hashed before and after). In-process `main(argv)` on a tiny model with GPT-2's
vocabulary (so any prompt encodes)."""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from functional_gpt import GPTConfig, UserError, flatten, init_params, load_params, save_params, unflatten
from functional_gpt.cli import main, stop_text
from functional_gpt.training.data import Position, load_tokens, next_batch, prepare
from functional_gpt.reference.perplexity import evaluate
from functional_gpt.generation.decoding import generate
from functional_gpt.generation.sampling import Sampling

TINY = GPTConfig(vocab_size=50257, n_positions=32, n_embd=8, n_layer=1, n_head=2,
                 embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 4
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EACCES = PermissionError(errno.EACCES, "Permission denied")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Read-only inputs: a tiny checkpoint, one whose greedy output is always "\\n", texts,
    a prepared data directory and a dump."""
    root = tmp_path_factory.mktemp("fixtures")
    params = init_params(TINY, seed=0)
    save_params(root / "tiny.safetensors", params, TINY)
    flat = {k: v.clone() for k, v in flatten(params).items()}
    flat["ln_f.weight"].zero_()  # ln_f then outputs its bias, and wte[198] ("\n") lies along it
    flat["ln_f.bias"].fill_(1.0)
    flat["wte.weight"][198] = 10.0
    save_params(root / "newline.safetensors", unflatten(flat), TINY)
    for i, name in enumerate(("a.txt", "b.txt", "c.txt")):
        (root / "texts" / name).parent.mkdir(exist_ok=True)
        (root / "texts" / name).write_text(f"File {i}. {TEXT}", encoding="utf-8")
    prepare([root / "texts"], root / "data", progress=False)
    assert main(["dump", "--weights", str(root / "tiny.safetensors"), "--prompt", "Hi there", "--out",
                 str(root / "dump.safetensors")]) == 0
    return root


def hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fails_cleanly(argv, capsys, culprit: str) -> str:
    """Run `fgpt argv`: exit 2 and one error line (the last on stderr, after any progress
    bar) naming `culprit`; -> that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.strip()]
    assert code == 2, err
    assert [line for line in lines if ": error:" in line] == lines[-1:], err
    assert culprit in lines[-1], lines[-1]
    return lines[-1]


def succeeds(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@contextlib.contextmanager
def no_hang(seconds: float = 5):
    """Turn a loop that never ends into a test failure."""
    def alarm(signum, frame):
        raise AssertionError(f"no answer in {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fail_on_call(n: int, real, exc: OSError):
    """A stand-in for `real` that raises `exc` on its n-th call (1-based), else calls it."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise exc
        return real(*args, **kwargs)
    return fake


# ------------------------------------------------------------------ prepare never destroys


def _inputs(root: Path, contents: dict) -> Path:
    for name, content in contents.items():
        path = root / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root / "in"


THREE = {"a.txt": "A. " + TEXT, "b.txt": "B. " + TEXT, "c.txt": "C. " + TEXT}  # three texts, none a copy


@pytest.mark.parametrize("contents, patch, culprit", [
    ({"a.txt": TEXT, "b.txt": TEXT, "zz_bad.txt": b"\xff\xfe" * 5}, None, "zz_bad.txt: not UTF-8"),  # val, last
    ({"a.txt": TEXT, "b.txt": b"caf\xe9", "c.txt": TEXT}, None, "b.txt: not UTF-8"),
    ({"a.txt": TEXT, "b.txt": TEXT, "empty.txt": ""}, None, "empty.txt: file is empty"),
    ({"one.txt": "a"}, None, "the val split would be empty"),
    (THREE, ("os.fsync", ENOSPC), "data/train.bin: cannot write (No space left on device)"),
    (THREE, ("os.replace", EACCES), "data: cannot replace the data directory (Permission denied)"),
    (THREE, ("os.replace", 2), "data: cannot replace the data directory (Permission denied)"),
])
def test_failed_prepare_leaves_the_old_data_dir_byte_identical(fixtures, tmp_path, capsys, contents, patch, culprit):
    shutil.copytree(fixtures / "data", tmp_path / "data")
    inputs = _inputs(tmp_path, contents)
    before = hashes(tmp_path / "data")
    argv = ["prepare", inputs, "--out", tmp_path / "data"]
    if patch is None:
        context = contextlib.nullcontext()
    elif patch[1] == 2:  # the second rename (new set into place) fails after the old one moved aside
        context = mock.patch("os.replace", side_effect=fail_on_call(2, os.replace, EACCES))
    else:
        context = mock.patch(patch[0], side_effect=patch[1])
    with context:
        fails_cleanly(argv, capsys, culprit)
    assert hashes(tmp_path / "data") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]  # no temp directory left behind


def test_prepare_swaps_a_complete_set_in(fixtures, tmp_path, capsys):
    shutil.copytree(fixtures / "data", tmp_path / "data")
    inputs = _inputs(tmp_path, {"a.txt": TEXT, "b.txt": TEXT, "c.txt": "Another text, held out. " * 5})
    succeeds(["prepare", inputs, "--out", tmp_path / "data"], capsys)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert [Path(e["path"]).name for e in meta["val"]] == ["c.txt"]
    assert meta["val_tokens"] == len(load_tokens(tmp_path / "data", "val"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]


def test_prepare_refuses_a_directory_holding_other_files(fixtures, tmp_path, capsys):
    inputs = _inputs(tmp_path, {"a.txt": TEXT, "b.txt": TEXT})
    before = hashes(inputs)
    fails_cleanly(["prepare", inputs, "--out", inputs], capsys, "holds other files than a data set (a.txt, b.txt)")
    assert hashes(inputs) == before


@pytest.mark.parametrize("out, culprit", [
    ("in/a.txt", "in/a.txt: exists and is not a directory"),
    ("in/a.txt/sub", "in/a.txt/sub: cannot write ("),
    ("/sys/fgpt_faults_data", "/sys/fgpt_faults_data: cannot write"),
    ("", "--out: empty path"),
])
def test_prepare_bad_out(tmp_path, capsys, monkeypatch, out, culprit):
    monkeypatch.chdir(tmp_path)
    inputs = _inputs(tmp_path, {"a.txt": TEXT, "b.txt": TEXT})
    line = fails_cleanly(["prepare", inputs, "--out", out], capsys, culprit)
    assert "/sub" not in out or line.endswith("in/a.txt is a file, not a directory)")


@pytest.mark.parametrize("flags, culprit", [
    (["--val_files", "0"], "--val_files 0"),
    (["--val_files", "-1"], "--val_files -1"),
    (["--val_files", "2"], "--val_files 2"),
])
def test_prepare_bad_val_files(tmp_path, capsys, flags, culprit):
    inputs = _inputs(tmp_path, {"a.txt": TEXT, "b.txt": TEXT})
    fails_cleanly(["prepare", inputs, "--out", tmp_path / "d", *flags], capsys, culprit)


def test_prepare_one_file_takes_no_val_files(tmp_path, capsys):
    inputs = _inputs(tmp_path, {"a.txt": TEXT})
    fails_cleanly(["prepare", inputs / "a.txt", "--out", tmp_path / "d", "--val_files", "1"], capsys, "--val_files 1")


def test_prepare_api_refuses_one_path_for_the_list(tmp_path):
    with pytest.raises(UserError, match="expected a list of files and directories"):
        prepare(str(tmp_path), tmp_path / "d", progress=False)  # would iterate the characters, from "/"


# ------------------------------------------------------------------ export never destroys


def _run_dir(root: Path, fixtures: Path) -> Path:
    run = root / "run"
    (run / "best").mkdir(parents=True)
    for d in (run, run / "best"):
        shutil.copy(fixtures / "newline.safetensors", d / "model.safetensors")
        (d / "optimizer.safetensors").write_bytes(b"moments")
        (d / "state.json").write_text('{"step": 2}')
    return run


@pytest.mark.parametrize("target, keep, culprit", [
    ("run", ["state.json"], "holds a training run (state.json)"),
    ("run/best", ["state.json"], "best: holds a training run"),
    ("opt", ["optimizer.safetensors"], "holds a training run (optimizer.safetensors)"),
])
def test_export_refuses_a_training_run(fixtures, tmp_path, capsys, target, keep, culprit):
    _run_dir(tmp_path, fixtures)
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "optimizer.safetensors").write_bytes(b"moments")
    before = hashes(tmp_path)
    fails_cleanly(["export", "--weights", fixtures / "tiny.safetensors", "--out", tmp_path / target], capsys, culprit)
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("patch, culprit", [
    (("os.fsync", ENOSPC), "hf/model.safetensors: cannot write (No space left on device)"),
    (("os.replace", EACCES), "hf/model.safetensors: cannot write (Permission denied)"),
    (("os.replace", 3), "hf/config.json: cannot write (Permission denied)"),  # after the other three moved in
])
def test_failed_export_leaves_an_earlier_export_byte_identical(fixtures, tmp_path, capsys, patch, culprit):
    succeeds(["export", "--weights", fixtures / "newline.safetensors", "--out", tmp_path / "hf"], capsys)
    before = hashes(tmp_path / "hf")
    # os.replace calls: 1 and 2 the atomic saves into the temp dir, 3 model.safetensors' move, 4 and 5
    # vocab.json's and merges.txt's (a GPT-2 vocabulary), 6 config.json's.
    side_effect = fail_on_call(6, os.replace, EACCES) if patch[1] == 3 else patch[1]
    with mock.patch(patch[0], side_effect=side_effect):
        fails_cleanly(["export", "--weights", fixtures / "tiny.safetensors", "--out", tmp_path / "hf"], capsys, culprit)
    assert hashes(tmp_path / "hf") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_over_an_earlier_export_replaces_both_files(fixtures, tmp_path, capsys):
    succeeds(["export", "--weights", fixtures / "newline.safetensors", "--out", tmp_path / "hf"], capsys)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # not ours: kept
    succeeds(["export", "--weights", fixtures / "tiny.safetensors", "--out", tmp_path / "hf"], capsys)
    got, config = load_params(tmp_path / "hf")
    want, _ = load_params(fixtures / "tiny.safetensors")
    assert config == TINY and all(torch.equal(v, flatten(want)[k]) for k, v in flatten(got).items())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_embd"] == 8
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                                  "tokenizer.json", "vocab.json"]


@pytest.mark.parametrize("out, culprit", [
    ("f", "f: exists and is not a directory"),
    ("f/sub", "f/sub: cannot write ("),
    ("/sys/fgpt_faults_export", "/sys/fgpt_faults_export: cannot write"),
    ("", "--out: empty path"),
])
def test_export_bad_out(fixtures, tmp_path, capsys, monkeypatch, out, culprit):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    line = fails_cleanly(["export", "--weights", fixtures / "tiny.safetensors", "--out", out], capsys, culprit)
    assert "/sub" not in out or line.endswith("f is a file, not a directory)")
    assert (tmp_path / "f").read_text() == "x"


# ------------------------------------------------------------------ flags that were unchecked


@pytest.mark.parametrize("flags, culprit", [
    (["--max_length", "0"], "--max_length: expected an integer in 2..32, got 0"),
    (["--max_length", "33"], "--max_length"),
    (["--stride", "0"], "--stride: expected an integer in 1..31, got 0"),
    (["--max_length", "8", "--stride", "8"], "--stride"),
    (["--batch_size", "0"], "--batch_size: expected an integer >= 1, got 0"),
    (["--batch_size", "-1"], "--batch_size: expected an integer >= 1, got -1"),
    (["--device", "meta"], "--device meta"),
])
def test_eval_flags(fixtures, capsys, flags, culprit):
    fails_cleanly(["eval", "--weights", fixtures / "tiny.safetensors", "--data", fixtures / "texts" / "a.txt", *flags],
                  capsys, culprit)


def test_eval_data_dir_from_a_damaged_state(fixtures, tmp_path, capsys):
    shutil.copy(fixtures / "tiny.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "state.json").write_text('{"data_dir": 7}')
    fails_cleanly(["eval", "--weights", tmp_path], capsys, "state.json: data_dir must be a path, got 7")


def test_evaluate_api_checks_sizes_and_texts(fixtures):
    params, _ = load_params(fixtures / "tiny.safetensors")
    text = torch.arange(40)
    for kwargs, culprit in [(dict(max_length=0), "--max_length"), (dict(stride=0), "--stride"),
                            (dict(batch_size=0), "--batch_size"), (dict(max_length=2.5), "--max_length")]:
        with pytest.raises(UserError, match=culprit):
            evaluate(params, [text], TINY, show_progress=False, **kwargs)
    with pytest.raises(UserError, match="1-D integer token tensors"):
        evaluate(params, [text.tolist()], TINY, show_progress=False)
    # max_length 2, stride 1 is the smallest window: every token still scored once
    assert evaluate(params, [text], TINY, max_length=2, stride=1, show_progress=False).tokens == 39


@pytest.mark.parametrize("command", ["diff", "compare"])
@pytest.mark.parametrize("flag, value", [("--atol", "-1"), ("--atol", "nan"), ("--atol", "inf"),
                                         ("--rtol", "-1e-9"), ("--rtol", "nan"), ("--rtol", "inf")])
def test_tolerances_must_be_finite_and_not_negative(fixtures, capsys, command, flag, value):
    dump = fixtures / "dump.safetensors"
    args = ["diff", dump, dump] if command == "diff" else ["compare", "--weights", fixtures / "tiny.safetensors"]
    fails_cleanly([*args, f"{flag}={value}"], capsys, f"{flag}: expected a finite number >= 0, got {float(value)} (a float)")


GEN = ["--max_new_tokens", "3", "--prompt", "Hi", "--seed", "0"]


@pytest.mark.parametrize("flags, culprit", [
    (["--temperature", "1e-40"], "--temperature: expected 0 (greedy) or a finite number >= 1e-06, got 1e-40 (a float)"),
    (["--temperature", "inf"], "--temperature: expected 0 (greedy) or a finite number >= 1e-06, got inf"),
    (["--temperature", "nan"], "--temperature: expected 0 (greedy) or a finite number >= 1e-06, got nan"),
    (["--repetition_penalty", "inf"], "--repetition_penalty: expected a finite number in [1e-06, 1e+06], got inf"),
    (["--top_p", "nan"], "--top_p: expected a finite number in (0, 1], got nan"),
    (["--seed", "99999999999999999999999"], "--seed must be an integer in 0..18446744073709551615"),
    (["--seed", "-1"], "--seed must be an integer in 0..18446744073709551615 ("),
    (["--seed", str(2**64 - 1), "--num_samples", "2"], "--seed must be an integer in 0..18446744073709551614"),
    (["--num_samples", "0"], "--num_samples must be an integer >= 1, got 0"),
    (["--num_samples", "-1"], "--num_samples"),
    (["--device", "xpu"], "--device xpu: not supported"),
    (["--device", "meta"], "--device meta: not supported"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "cpu:1"], "--device cpu:1: there is one cpu device"),
    (["--device", ""], "--device '': unknown device"),
    (["--stop", ""], "--stop: empty stop string"),
    (["--stop", "\\q"], "unknown escape \\q"),
    (["--stop", "ends in \\"], "unknown escape"),
    (["--prompt", "caf\udce9"], "--prompt: not valid UTF-8 text (byte 0xe9 at character 3)"),
])
def test_generate_flags(fixtures, capsys, flags, culprit):
    fails_cleanly(["generate", "--weights", fixtures / "tiny.safetensors", *GEN, *flags], capsys, culprit)


def test_generate_stdin_not_utf8(fixtures, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9")))
    fails_cleanly(["generate", "--weights", fixtures / "tiny.safetensors", *GEN, "--prompt", "-"], capsys,
                  "--prompt -: standard input is not UTF-8")


@pytest.mark.parametrize("flags", [["--seed", str(2**64 - 1)], ["--temperature", "1e-6"], ["--temperature", "0"]])
def test_generate_edges_that_are_fine(fixtures, capsys, flags):
    out = succeeds(["generate", "--weights", fixtures / "tiny.safetensors", *GEN, *flags], capsys)
    assert out.endswith("\n")


def test_temperature_floor_keeps_the_draw_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0]])
    from functional_gpt.generation.sampling import MIN_TEMPERATURE, sample

    draws = sample(logits.expand(50, 3), Sampling(temperature=MIN_TEMPERATURE), generator=torch.Generator().manual_seed(0))
    assert draws.tolist() == [0] * 50
    for bad in (1e-40, 5e-7, float("inf"), "hot", True):
        with pytest.raises(UserError, match="^temperature: expected"):
            Sampling(temperature=bad)
    for kwargs in (dict(top_k=2.5), dict(top_k=True)):
        with pytest.raises(UserError, match="^top_k: expected an integer"):
            Sampling(**kwargs)


def test_generate_api_checks(fixtures):
    params, _ = load_params(fixtures / "tiny.safetensors")
    for prompts, kwargs, culprit in [
        ([[1]], dict(window=0), "window must be an integer in 1..n_positions=32, got 0"),
        (["hello"], {}, "prompts: expected a list of token-id lists"),
        ([[1.5]], {}, "token id 1.5"),
        ([[1]], dict(sampling={"temperature": 1.0}), "sampling: expected a Sampling"),
        ([[1]], dict(max_new_tokens=2.0), "--max_new_tokens must be an integer"),
    ]:
        with pytest.raises(UserError, match=culprit):
            next(generate(params, prompts, TINY, **({"max_new_tokens": 2} | kwargs)))


# ------------------------------------------------------------------ --stop escapes (the README's example)


def test_stop_text_reads_backslash_escapes():
    assert stop_text("\\n\\n") == "\n\n"
    assert stop_text("a\\tb") == "a\tb"
    assert stop_text("\\\\n") == "\\n"  # an escaped backslash, then a plain n
    assert stop_text("\n") == "\n"  # a real newline (e.g. bash $'\n') passes as it is
    assert stop_text("THE END") == "THE END"


@pytest.mark.parametrize("stop, expected", [
    ("\\n\\n", "\n"),  # stops at the blank line: nothing before it, then the sample's closing newline
    ("\\n", "\n"),
    ("\\\\n", "\n" * 9),  # a backslash and an n, never produced: all 8 tokens
])
def test_readme_stop_example_stops_at_a_blank_line(fixtures, capsys, stop, expected):
    out = succeeds(["generate", "--weights", fixtures / "newline.safetensors", "--prompt", "Hi", "--greedy",
                    "--max_new_tokens", "8", "--stop", stop], capsys)
    assert out == expected


def test_readme_documents_stop_escapes():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    generate_section = readme[readme.index("### Generate text"):readme.index("### Evaluate")]
    assert '--stop "\\n\\n"' in generate_section and "\\n" in generate_section and "escape" in generate_section


# ------------------------------------------------------------------ attention, dump, info: paths and weights


@pytest.mark.parametrize("out, culprit", [
    (".", "--out .: must be a .png file"),
    ("dir.png", "dir.png: is a directory"),
    ("a.jpg", "--out a.jpg: must be a .png file"),
    ("f/a.png", "f/a.png: cannot write"),
    ("/sys/fgpt_faults.png", "/sys/fgpt_faults.png"),
])
def test_attention_bad_out(fixtures, tmp_path, capsys, monkeypatch, out, culprit):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "f").write_text("x")
    fails_cleanly(["attention", "--weights", fixtures / "tiny.safetensors", "--prompt", "To be", "--out", out],
                  capsys, culprit)


@pytest.mark.parametrize("command, name", [("attention", "a.png"), ("dump", "d.safetensors")])
@pytest.mark.parametrize("patch", [("os.fsync", ENOSPC), ("os.replace", EACCES)])
def test_disk_full_or_denied_keeps_the_old_file(fixtures, tmp_path, capsys, command, name, patch):
    (tmp_path / name).write_bytes(b"the old file")
    with mock.patch(patch[0], side_effect=patch[1]):
        fails_cleanly([command, "--weights", fixtures / "tiny.safetensors", "--prompt", "To be", "--out",
                       tmp_path / name], capsys, f"{name}: cannot write ({patch[1].strerror})")
    assert (tmp_path / name).read_bytes() == b"the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("out, culprit", [
    (".", ": is a directory"),
    ("f/d.safetensors", "f/d.safetensors: cannot write"),
    ("/sys/fgpt_faults.safetensors", "/sys/fgpt_faults.safetensors: cannot write"),
])
def test_dump_bad_out(fixtures, tmp_path, capsys, monkeypatch, out, culprit):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    fails_cleanly(["dump", "--weights", fixtures / "tiny.safetensors", "--out", out], capsys, culprit)


@pytest.mark.parametrize("command", ["dump", "compare", "attention"])
def test_prompt_must_be_utf8(fixtures, tmp_path, capsys, command):
    out = ["--out", tmp_path / ("a.png" if command == "attention" else "d.safetensors")] if command != "compare" else []
    fails_cleanly([command, "--weights", fixtures / "tiny.safetensors", "--prompt", "\udcff!", *out], capsys,
                  "--prompt: not valid UTF-8 text (byte 0xff at character 0)")


def test_dump_grads_on_one_token_names_the_prompt(fixtures, tmp_path, capsys):
    fails_cleanly(["dump", "--weights", fixtures / "tiny.safetensors", "--prompt", "Hi", "--grads", "--out",
                   tmp_path / "d.safetensors"], capsys, "--prompt: gradients need a prompt of at least 2 tokens")


@pytest.mark.parametrize("flags, culprit", [
    (["--preset", ""], "unknown preset ''"),  # was: the 124M gpt2 preset, silently
    (["--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["--weights", "{tmp}/none"], "none: no such file or directory"),
    (["--weights", "{tmp}/notes.txt"], "notes.txt: not a readable safetensors file"),
    (["--weights", "{fixtures}/texts"], "holds no checkpoint"),
    (["--preset", "cpu-tiny", "--device", "xpu"], "--device xpu: not supported"),
])
def test_info_bad_preset_weights_device(fixtures, tmp_path, capsys, flags, culprit):
    (tmp_path / "notes.txt").write_text("not weights")
    fails_cleanly(["info", *[f.format(tmp=tmp_path, fixtures=fixtures) for f in flags]], capsys, culprit)


# ------------------------------------------------------------------ the data stream


@pytest.mark.parametrize("position, culprit", [
    (Position(0, 10**6), r"data position \(epoch 0, index 1000000\) is outside an epoch of 12 windows"),
    (Position(0, 12), "outside an epoch"),
    (Position(0, -1), "outside an epoch"),
    (Position(-1, 0), "outside an epoch"),
    (Position(0, 1.5), "outside an epoch"),
])
def test_next_batch_refuses_a_position_outside_the_epoch(position, culprit):
    tokens = np.arange(100, dtype="<u2")  # 12 windows of 8 tokens (+1 target)
    with no_hang(), pytest.raises(UserError, match=culprit):
        next_batch(tokens, position, batch_size=2, context_length=8, stride=8, seed=0)


@pytest.mark.parametrize("n_tokens, kwargs, culprit", [
    (5, {}, r"5 tokens hold no window of context_length=8 \(need at least 9\)"),
    (100, dict(batch_size=0), "batch_size: expected an integer >= 1"),
    (100, dict(stride=0), "stride: expected an integer >= 1"),
    (100, dict(context_length=0), "context_length: expected an integer >= 1"),
])
def test_next_batch_refuses_sizes_that_never_fill_a_batch(n_tokens, kwargs, culprit):
    with no_hang(), pytest.raises(UserError, match=culprit):
        next_batch(np.arange(n_tokens, dtype="<u2"), Position(), **(dict(batch_size=2, context_length=8, stride=8,
                                                                         seed=0) | kwargs))


def test_next_batch_still_crosses_the_epoch_boundary():
    x, _, after = next_batch(np.arange(100, dtype="<u2"), Position(0, 11), batch_size=2, context_length=8, stride=8, seed=0)
    assert x.shape == (2, 8) and after == Position(1, 1)


def test_load_tokens_checks_size_and_ids(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\0" * 9)
    with pytest.raises(UserError, match="train.bin: 9 bytes, not a whole number of uint16 token ids"):
        load_tokens(tmp_path, "train")
    np.asarray([1, 50256, 60000], dtype="<u2").tofile(tmp_path / "val.bin")
    with pytest.raises(UserError, match="val.bin: holds token id 60000, out of range for vocab_size=50257"):
        load_tokens(tmp_path, "val", vocab_size=50257)
    assert load_tokens(tmp_path, "val").tolist() == [1, 50256, 60000]  # without a vocabulary: as stored


def test_generate_help_documents_stop_escapes(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert 'escapes: \\n newline, \\t tab, \\\\ backslash, so "\\n\\n" is a blank line' in text

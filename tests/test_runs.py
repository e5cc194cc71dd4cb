"""A run directory's readers (training/runs.py), in process: every way a checkpoint, its
state.json, optimizer file or metrics.jsonl can be wrong, named word for word."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from functional_gpt import UserError, flatten
from functional_gpt.training import runs
from functional_gpt.training.data import Position
from functional_gpt.training.runs import load_checkpoint, read_metrics, read_optimizer, read_state, save_checkpoint
from functional_gpt.training.step import LossScale, new_state

ROOT = Path(__file__).resolve().parents[1]
RECORD = {"data_dir": "data", "train_tokens": 123, "lr": 0.01, "val_loss": None, "best_val_loss": 4.5,
          "config": {"batch_size": 2}}


@pytest.fixture
def run(tmp_path, tiny_params, tiny_config) -> Path:
    """A saved checkpoint at step 3 with non-zero moments and a float16 run's loss scale."""
    state = new_state(tiny_params, seed=5, device="cpu")
    opt = state.opt._replace(exp_avg={k: torch.full_like(t, 0.5) for k, t in state.opt.exp_avg.items()},
                             exp_avg_sq={k: torch.full_like(t, 0.25) for k, t in state.opt.exp_avg_sq.items()},
                             step=3)
    state = dataclasses.replace(state, opt=opt, step=3, position=Position(epoch=1, index=7),
                                loss_scale=LossScale(1024.0, 2))
    save_checkpoint(tmp_path / "run", state, tiny_config, RECORD)
    return tmp_path / "run"


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        call(*args, **kwargs)
    return str(e.value)


def _edit_state(run: Path, **fields) -> Path:
    state = json.loads((run / "state.json").read_text())
    for name, value in fields.items():
        if value is ...:
            del state[name]
        else:
            state[name] = value
    (run / "state.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    return run / "state.json"


def test_a_saved_checkpoint_loads_as_it_was_written(run, tiny_params, tiny_config):
    state, config, fields = load_checkpoint(run)
    assert config == tiny_config and state.step == 3 and tuple(state.position) == (1, 7)
    assert state.loss_scale == LossScale(1024.0, 2)
    assert {k: fields[k] for k in RECORD} == RECORD
    assert torch.equal(state.rng["torch"], new_state(tiny_params, seed=5, device="cpu").rng["torch"])
    assert state.opt.step == 3 and set(state.opt.exp_avg) == set(flatten(tiny_params))
    assert all(torch.equal(t, torch.full_like(t, 0.5)) for t in state.opt.exp_avg.values())
    assert all(torch.equal(t, torch.full_like(t, 0.25)) for t in state.opt.exp_avg_sq.values())
    some = sorted(flatten(tiny_params))[:2]
    kept = load_checkpoint(run, moments_of=lambda flat: sorted(flat)[:2])[0].opt
    assert sorted(kept.exp_avg) == sorted(kept.exp_avg_sq) == some


@pytest.mark.parametrize("field, value, message", [
    ("step", -1, "field 'step' must be an integer >= 0, got -1"),
    ("step", True, "field 'step' must be an integer >= 0, got True"),
    ("data_dir", "", "field 'data_dir' must be a string, got ''"),
    ("data_dir", 3, "field 'data_dir' must be a string, got 3"),
    ("data_position", {"epoch": 0}, "field 'data_position' must be an object {epoch, index} of integers >= 0, got "
                                    "{'epoch': 0}"),
    ("data_position", {"epoch": 0, "index": -1}, "field 'data_position' must be an object {epoch, index} of "
                                                 "integers >= 0, got {'epoch': 0, 'index': -1}"),
    ("data_position", [0, 0], "field 'data_position' must be an object {epoch, index} of integers >= 0, got [0, 0]"),
    ("train_tokens", 1.5, "field 'train_tokens' must be an integer >= 0, got 1.5"),
    ("lr", "0.1", "field 'lr' must be a finite number, got '0.1'"),
    ("lr", False, "field 'lr' must be a finite number, got False"),
    ("val_loss", "x", "field 'val_loss' must be a finite number or null, got 'x'"),
    ("best_val_loss", [], "field 'best_val_loss' must be a finite number or null, got []"),
    ("rng", {"cuda": "00"}, "field 'rng' must be an object of hex strings with a 'torch' entry, got {'cuda': '00'}"),
    ("rng", {"torch": "abc"}, "field 'rng' must be an object of hex strings with a 'torch' entry, got {'torch': 'abc'}"),
    ("rng", {"torch": "AB"}, "field 'rng' must be an object of hex strings with a 'torch' entry, got {'torch': 'AB'}"),
    ("rng", {"torch": "zz"}, "field 'rng' must be an object of hex strings with a 'torch' entry, got {'torch': 'zz'}"),
    ("rng", {"torch": "XX"}, "field 'rng' must be an object of hex strings with a 'torch' entry, got {'torch': 'XX'}"),
    ("rng", {"torch": 12}, "field 'rng' must be an object of hex strings with a 'torch' entry, got {'torch': 12}"),
    ("config", [], "field 'config' must be an object, got []"),
    ("model_config", "gpt2", "field 'model_config' must be an object, got 'gpt2'"),
    ("loss_scale", {"scale": 0, "good_steps": 1}, "field 'loss_scale' must be an object {scale: a number > 0, "
                                                  "good_steps: an integer >= 0}, got {'scale': 0, 'good_steps': 1}"),
    ("loss_scale", {"scale": 2.0, "good_steps": -1}, "field 'loss_scale' must be an object {scale: a number > 0, "
                                                     "good_steps: an integer >= 0}, got {'scale': 2.0, 'good_steps': -1}"),
    ("loss_scale", {"scale": 2.0}, "field 'loss_scale' must be an object {scale: a number > 0, good_steps: an "
                                   "integer >= 0}, got {'scale': 2.0}"),
    ("step", ..., "field 'step' is missing"),
    ("model_config", ..., "field 'model_config' is missing"),
])
def test_each_bad_state_field_is_named(run, field, value, message):
    path = _edit_state(run, **{field: value})
    assert _message(read_state, run) == f"{path}: {message}"


def test_a_long_bad_value_is_cut_to_80_characters(run):
    path = _edit_state(run, data_dir=["x" * 200])
    assert _message(read_state, run) == f"{path}: field 'data_dir' must be a string, got {str(['x' * 200])[:80]}"


def test_state_files_that_are_not_a_state(run, tmp_path):
    path = run / "state.json"
    path.write_text("[1]")
    assert _message(read_state, run) == f"{path}: expected a JSON object, got list"
    path.write_text('{"step": NaN}')
    assert _message(read_state, run) == f"{path}: not valid JSON (NaN is not a JSON number)"
    path.write_bytes(b'{"step": "\xff"}')
    assert _message(read_state, run).startswith(f"{path}: not valid JSON ('utf-8' codec can't decode byte 0xff")
    path.unlink()
    assert _message(read_state, run) == f"{run}: holds no checkpoint to resume (state.json is missing)"
    assert _message(read_state, tmp_path / "none") == f"{tmp_path / 'none'}: no such run directory"
    assert _message(read_state, None) == "run_dir: expected the path of a run directory, got None"


def test_an_unreadable_file_is_named_with_the_reason(run, monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setattr(Path, "read_text", fail)
    assert _message(read_state, run) == f"{run / 'state.json'}: cannot read (Input/output error)"
    assert _message(read_metrics, run) == f"{run / 'metrics.jsonl'}: cannot read (Input/output error)"


def test_metrics_lines_are_read_and_each_bad_one_named(tmp_path):
    assert read_metrics(tmp_path) == []  # no file: no entries
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.5}\n\n  \n{"step": 2, "val_loss": 2.0, "name": "\u00e9"}\n', encoding="utf-8")
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1.5}, {"step": 2, "val_loss": 2.0, "name": "\u00e9"}]
    bad = {
        '{"step": 1}\n{"step": 2, "loss": Infinity}\n': "line 2 is not valid JSON (Infinity is not a JSON number)",
        '{"step": 1}\n\n{nope\n': "line 3 is not valid JSON (Expecting property name enclosed in double quotes: "
                                  "line 1 column 2 (char 1))",
        '[1, 2]\n': "line 1 is not an object with an integer step: [1, 2]",
        '{"loss": 1.0}\n': 'line 1 is not an object with an integer step: {"loss": 1.0}',
        '{"step": true}\n': 'line 1 is not an object with an integer step: {"step": true}',
        '{"step": -1}\n': 'line 1 is not an object with an integer step: {"step": -1}',
        '{"step": 1.0}\n': 'line 1 is not an object with an integer step: {"step": 1.0}',
        '{"step": "%s"}\n' % ("9" * 100): 'line 1 is not an object with an integer step: {"step": "%s' % ("9" * 70),
    }
    for text, message in bad.items():
        path.write_text(text)
        assert _message(read_metrics, tmp_path) == f"{path}: {message}"
    path.write_bytes(b'{"step": 1}\n\xff\n')
    assert _message(read_metrics, tmp_path) == f"{path}: not UTF-8 text (invalid start byte at byte 12)"


def _rewrite_optimizer(run: Path, change=lambda tensors: None, metadata=...):
    path = run / "optimizer.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"adam_step": "3"} if metadata is ... else metadata)
    return path


def test_optimizer_files_that_do_not_fit_the_model_are_named(run, tiny_params):
    flat = flatten(tiny_params)
    first, second = sorted(f"exp_avg.{k}" for k in flat)[:2]
    path = _rewrite_optimizer(run, lambda t: t.pop(first))
    assert _message(read_optimizer, path, flat) == f"{path}: keys do not match the model's parameters (missing " \
                                                   f"[{first!r}], unexpected [])"
    four = sorted(f"exp_avg_sq.{k}" for k in flat)[:4]

    def swap_four(t):  # four more missing, four unexpected: three of each are named
        for i, key in enumerate(four):
            t[f"x{i}"] = t.pop(key)

    def restore_four(t):
        for i, key in enumerate(four):
            t[key] = torch.zeros(flat[key.split(".", 1)[1]].shape)
            del t[f"x{i}"]

    path = _rewrite_optimizer(run, swap_four)
    assert _message(read_optimizer, path, flat) == f"{path}: keys do not match the model's parameters (missing " \
                                                   f"{sorted([first, *four])[:3]}, unexpected ['x0', 'x1', 'x2'])"
    path = _rewrite_optimizer(run, restore_four)
    path = _rewrite_optimizer(run, lambda t: t.update({"exp_avg.extra": torch.zeros(1)}))
    assert _message(read_optimizer, path, flat) == f"{path}: keys do not match the model's parameters (missing " \
                                                   f"[{first!r}], unexpected ['exp_avg.extra'])"
    path = _rewrite_optimizer(run, lambda t: (t.pop("exp_avg.extra"), t.update({first: torch.zeros(2, 3)})))
    assert _message(read_optimizer, path, flat) == f"{path}: {first} is torch.float32 [2, 3], expected floating " \
                                                   f"point {list(flat[first.split('.', 1)[1]].shape)}"
    shape = list(flat[second.split(".", 1)[1]].shape)
    path = _rewrite_optimizer(run, lambda t: t.update({first: torch.zeros(flat[first.split(".", 1)[1]].shape),
                                                       second: torch.zeros(shape, dtype=torch.int32)}))
    assert _message(read_optimizer, path, flat) == f"{path}: {second} is torch.int32 {shape}, expected floating " \
                                                   f"point {shape}"
    assert read_optimizer(path, flat, keep=[first.split(".", 1)[1]]).step == 3  # the bad one is not read
    last = list(flat)[-1]  # kept alone: every key before it is skipped, and it is still checked
    path = _rewrite_optimizer(run, lambda t: t.update({f"exp_avg_sq.{last}": torch.zeros(1, dtype=torch.float64)}))
    assert _message(read_optimizer, path, flat, keep=[last]) == f"{path}: exp_avg_sq.{last} is torch.float64 [1], " \
                                                                f"expected floating point {list(flat[last].shape)}"
    path = _rewrite_optimizer(run, lambda t: t.update({f"exp_avg_sq.{last}": torch.zeros(flat[last].shape)}))
    path = _rewrite_optimizer(run, lambda t: t.update({second: torch.full(shape, float("nan"))}))
    assert _message(read_optimizer, path, flat).startswith(f"{path}: {second} holds")
    path = _rewrite_optimizer(run, lambda t: t.update({second: torch.zeros(shape)}), metadata={"adam_step": "-1"})
    assert _message(read_optimizer, path, flat) == f"{path}: metadata adam_step must be an integer >= 0, got '-1'"
    path = _rewrite_optimizer(run, metadata=None)
    assert _message(read_optimizer, path, flat) == f"{path}: metadata adam_step must be an integer >= 0, got ''"
    path.write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    assert _message(read_optimizer, path, flat).startswith(f"{path}: not a readable optimizer state (")
    path.unlink()
    assert _message(read_optimizer, path, flat).startswith(f"{path}: not a readable optimizer state (")


def test_files_of_a_checkpoint_that_disagree_are_named(run, tiny_config):
    good = (run / "state.json").read_text()
    _edit_state(run, step=4)
    assert _message(load_checkpoint, run) == f"{run}: optimizer.safetensors is at step 3, state.json at step 4"
    (run / "state.json").write_text(good)
    _edit_state(run, model_config={**tiny_config.to_dict(), "n_layer": tiny_config.n_layer + 1})
    assert _message(load_checkpoint, run) == f"{run / 'model.safetensors'}: its config differs from the run's " \
                                             "(state.json model_config); the file was replaced"
    (run / "state.json").write_text(good)
    path = _edit_state(run, rng={"torch": "00ff"})
    assert _message(load_checkpoint, run) == f"{path}: field 'rng' does not hold a torch generator state"
    (run / "state.json").write_text(good)
    _edit_state(run, loss_scale=...)
    assert load_checkpoint(run)[0].loss_scale is None  # a run without float16


def test_a_save_killed_after_its_state_was_written_is_rolled_forward(run, tiny_params, tiny_config):
    pending = run / ".next"
    pending.mkdir()
    for name in (runs.MODEL, runs.OPTIMIZER, runs.STATE):
        (pending / name).write_bytes((run / name).read_bytes())
    _edit_state(pending, train_tokens=999)
    assert read_state(run)["train_tokens"] == 999 and not pending.exists()
    pending.mkdir()
    (pending / runs.MODEL).write_bytes(b"partial")
    assert read_state(run)["train_tokens"] == 999 and not pending.exists()  # no state.json: discarded


def test_the_files_are_read_as_utf8_whatever_the_locale(run, tmp_path):
    """Under LC_ALL=C, Python's default text encoding is ASCII: a reader that leaves the
    encoding to the locale fails on a run whose data directory is named in French."""
    _edit_state(run, data_dir="donn\u00e9es")
    (run / "metrics.jsonl").write_text('{"step": 1, "name": "\u00e9"}\n', encoding="utf-8")
    (tmp_path / "run.toml").write_text('name = "\u00e9"\n', encoding="utf-8")
    (tmp_path / "run.json").write_text('{"name": "\u00e9"}', encoding="utf-8")
    code = ("import sys; from functional_gpt.training.runs import read_state, read_metrics; "
            "from functional_gpt.training.settings import read_config_file; r, t, j = sys.argv[1:]; "
            "print(ascii([read_state(r)['data_dir'], read_metrics(r)[0]['name'], read_config_file(t)['name'], "
            "read_config_file(j)['name']]))")
    env = os.environ | {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(run), str(tmp_path / "run.toml"), str(tmp_path / "run.json")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ascii(["donn\u00e9es", "\u00e9", "\u00e9", "\u00e9"])

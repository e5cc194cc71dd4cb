"""The training step against transformers' GPT2LMHeadModel, exact resume, saves that
survive a kill, interrupts, non-finite losses and bad input."""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import functional_gpt.training.runs as runs_module
import functional_gpt.training.step as step_module
import functional_gpt.training.loop as train_module
from functional_gpt import UserError, flatten, init_params, load_params, save_params
from functional_gpt.cli import main
from functional_gpt.training.runs import load_checkpoint
from functional_gpt.training.step import loss_and_grads
from functional_gpt.training.loop import train
from functional_gpt.training.settings import make_config, read_config_file, resume_config

from conftest import hf_model, random_token_data


@pytest.fixture
def setup(tmp_path, tiny_config):
    """(data_dir, init_file): random tokens below the tiny vocab, and tiny weights."""
    data = random_token_data(tmp_path / "data", tiny_config.vocab_size, 3000, 300)
    init = tmp_path / "init.safetensors"
    save_params(init, init_params(tiny_config, seed=0), tiny_config)
    return data, init


def run_config(setup, out, **overrides):
    data, init = setup
    values = dict(data=str(data), out=str(out), init=str(init), batch_size=4, context_length=16, lr=1e-2,
                  warmup_steps=2, eval_interval=2, eval_windows=4, sample_tokens=4, max_steps=4, device="cpu",
                  dtype="float32", optimizer="adamw", schedule="cosine")  # AdamW's cosine run unless changed
    return make_config(values | overrides)


def quiet_train(cfg, **kw):
    return train(cfg, progress=False, log=lambda *a: None, **kw)


def loaded(run):
    """-> (flat params, AdamWState, state.json's fields) of the checkpoint in `run`."""
    state, _, fields = load_checkpoint(run)
    return flatten(state.params), state.opt, fields


# ------------------------------------------------------------ against transformers


def test_step_gradients_match_transformers(tiny_config):
    model = hf_model(tiny_config, seed=1)  # eval mode: dropout off on both sides
    flat = {k.removeprefix("transformer."): p.detach().clone() for k, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(tiny_config.vocab_size, (3, 17), generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]

    loss, grads = loss_and_grads(flat, x, y, tiny_config)

    hf_loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    hf_loss.backward()
    torch.testing.assert_close(loss, hf_loss.detach(), rtol=1e-5, atol=1e-6)
    hf_grads = {k.removeprefix("transformer."): p.grad for k, p in model.named_parameters()}
    assert set(grads) == set(hf_grads)
    for key, g in grads.items():
        rel = float((g - hf_grads[key]).norm() / hf_grads[key].norm())
        assert rel < 1e-4, f"{key}: relative gradient error {rel:.2e}"


# ----------------------------------------------------------- runs and checkpoints


def test_run_writes_checkpoints_metrics_and_plot(setup, tmp_path):
    summary = quiet_train(run_config(setup, tmp_path / "run"))
    run = tmp_path / "run"
    params, config = load_params(run)  # what `fgpt generate` / `fgpt eval` read
    assert config.n_embd == 32 and params["h"][1]["mlp"]["c_fc"]["weight"].shape == (32, 128)
    assert (run / "best" / "model.safetensors").is_file() and (run / "best" / "state.json").is_file()
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 4 and state["data_dir"] == str(setup[0].resolve())
    assert state["config"]["lr"] == 0.01 and state["config"]["decay_steps"] == 4
    moments = load_file(run / "optimizer.safetensors")
    assert set(moments) == {f"{kind}.{k}" for kind in ("exp_avg", "exp_avg_sq") for k in flatten(params)}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4]
    assert all(isinstance(m["sample"], str) for m in metrics if "val_loss" in m)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The final figure: every val token predicted once, in windows of n_positions = 32.
    val = np.fromfile(setup[0] / "val.bin", dtype="<u2").astype(np.int64)
    n = (len(val) - 1) // 32
    x = torch.from_numpy(val[: n * 32].reshape(n, 32))
    y = torch.from_numpy(val[1 : n * 32 + 1].reshape(n, 32))
    from functional_gpt import forward
    with torch.no_grad():
        expected = F.cross_entropy(forward(params, x, config).flatten(0, 1), y.flatten())
    assert summary["val_loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("optimizer, schedule", [("adamw", "cosine"), ("muon", "wsd")])
def test_resume_is_bit_identical(setup, tmp_path, optimizer, schedule):
    """Six steps straight, or three then a resume for three more: the same params and
    moments bit for bit (Muon's momentum buffers are its exp_avg)."""
    kw = dict(dropout=0.1, optimizer=optimizer, schedule=schedule)
    quiet_train(run_config(setup, tmp_path / "straight", max_steps=6, **kw))
    quiet_train(run_config(setup, tmp_path / "split", max_steps=3, decay_steps=6, **kw))
    quiet_train(resume_config(tmp_path / "split", {"max_steps": 6}), resume=True)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], split[key]), key
    a = load_file(tmp_path / "straight" / "optimizer.safetensors")
    b = load_file(tmp_path / "split" / "optimizer.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_equals_one_big_batch(setup, tmp_path):
    quiet_train(run_config(setup, tmp_path / "big", max_steps=1, batch_size=4, dropout=0.0))
    quiet_train(run_config(setup, tmp_path / "accum", max_steps=1, batch_size=2, grad_accum=2, dropout=0.0))
    big = load_file(tmp_path / "big" / "model.safetensors")
    accum = load_file(tmp_path / "accum" / "model.safetensors")
    start = flatten(init_params(load_params(tmp_path / "big")[1], seed=0))
    assert not torch.equal(big["h.0.mlp.c_fc.weight"], start["h.0.mlp.c_fc.weight"])
    for key in big:
        torch.testing.assert_close(accum[key], big[key], rtol=1e-5, atol=1e-6, msg=key)


def test_kill_during_save_keeps_previous_checkpoint(setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    quiet_train(run_config(setup, run, max_steps=2))
    before = load_file(run / "model.safetensors")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the optimizer state")

    monkeypatch.setattr(runs_module, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        quiet_train(resume_config(run, {"max_steps": 4}), resume=True)
    monkeypatch.undo()
    flat, opt, state = loaded(run)
    assert state["step"] == 2 and opt.step == 2 and not (run / ".next").exists()
    assert all(torch.equal(before[k], flat[k]) for k in before)
    params, _ = load_params(run)
    assert torch.equal(flatten(params)["wte.weight"], before["wte.weight"])


def test_kill_between_renames_rolls_forward(setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    quiet_train(run_config(setup, run, max_steps=2))
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        if str(src).endswith("/.next/model.safetensors") and str(dst).endswith("run/model.safetensors"):
            raise KeyboardInterrupt("killed between renames")
        calls.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(runs_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        quiet_train(resume_config(run, {"max_steps": 4}), resume=True)
    monkeypatch.undo()
    assert (run / ".next" / "state.json").is_file()  # new optimizer in place, model and state pending
    flat, opt, state = loaded(run)
    assert state["step"] == 4 and opt.step == 4  # rolled forward, consistent
    assert not (run / ".next").exists()


def test_sigterm_finishes_the_step_saves_and_resumes(setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, count = step_module.loss_and_grads, []

    def signal_at_step_3(*args, **kwargs):
        count.append(1)
        if len(count) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "loss_and_grads", signal_at_step_3)
    summary = quiet_train(run_config(setup, run, max_steps=6, eval_interval=5))
    assert summary == {"step": 3, "interrupted": True}
    assert json.loads((run / "state.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _spoil_at_step(monkeypatch, name, at, spoil):
    """Wrap <name> (of the step module, or else of the loop's) so that its result is passed
    through `spoil` on call `at`."""
    module = step_module if hasattr(step_module, name) else train_module
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return spoil(out, args) if len(calls) == at else out

    monkeypatch.setattr(module, name, wrapped)


def _blow_up(opt, args):
    args[0]["h.1.mlp.c_proj.weight"][0, 0] = 1e30  # flat params, updated in place
    return opt


def _nan_weight(opt, args):
    args[0]["wpe.weight"][2, 2] = float("nan")
    return opt


@pytest.mark.parametrize("name, at, spoil, message", [
    ("loss_and_grads", 3, lambda out, a: (out[0] * float("nan"), out[1]), "step 3: loss is nan"),
    ("loss_and_grads", 3, lambda out, a: (out[0], {k: g + float("inf") for k, g in out[1].items()}),
     "step 3: gradient norm is inf"),
    ("adamw_step", 3, _blow_up, r"step 3: the update made h.1.mlp.c_proj.weight diverge \(max \|w\| 1e\+30\)"),
    ("adamw_step", 4, _nan_weight, "step 4: the update made wpe.weight non-finite"),
    ("val_loss", 2, lambda out, a: float("nan"), "step 4: validation loss is nan"),
])
def test_a_blow_up_stops_before_anything_of_it_is_saved(setup, tmp_path, monkeypatch, name, at, spoil, message):
    """Loss, gradient, updated params and validation loss are all checked; the checkpoint
    of step 2 (the last good one) survives byte for byte and nothing non-finite is saved."""
    run = tmp_path / "run"
    _spoil_at_step(monkeypatch, name, at, spoil)
    cfg = run_config(setup, run, max_steps=6)
    with pytest.raises(UserError, match=message + ".*stopped, the last good checkpoint in .* is kept"):
        quiet_train(cfg)
    flat, opt, state = loaded(run)
    assert state["step"] == opt.step == 2
    assert json.loads((run / "best" / "state.json").read_text())["step"] == 2
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in flat.values())
    assert all("val_loss" not in m or m["step"] <= 2 for m in runs_module.read_metrics(run))


def test_non_finite_loss_at_the_first_step_saves_nothing(setup, tmp_path, monkeypatch):
    _spoil_at_step(monkeypatch, "loss_and_grads", 1, lambda out, a: (out[0] * float("inf"), out[1]))
    with pytest.raises(UserError, match="step 1: loss is inf; stopped, nothing was saved"):
        quiet_train(run_config(setup, tmp_path / "run"))
    assert not (tmp_path / "run" / "state.json").exists()


def test_sigterm_at_the_last_step_says_the_run_is_complete(setup, tmp_path, monkeypatch):
    run, logs = tmp_path / "run", []
    _spoil_at_step(monkeypatch, "loss_and_grads", 4,
                   lambda out, a: (os.kill(os.getpid(), signal.SIGTERM), out)[1])
    summary = train(run_config(setup, run, max_steps=4), progress=False, log=logs.append)
    assert summary == {"step": 4, "interrupted": True}
    assert "the run is complete and saved" in logs[-1] and "--resume" not in logs[-1]
    assert json.loads((run / "state.json").read_text())["step"] == 4


def test_sigterm_during_the_final_evaluation_skips_it_with_a_message(setup, tmp_path, monkeypatch):
    run, logs = tmp_path / "run", []
    # Calls of val_loss: step 2, step 4 (periodic), then the final one, signalled on entry.
    real = train_module.val_loss
    calls = []

    def val_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "val_loss", val_loss)
    summary = train(run_config(setup, run, max_steps=4), progress=False, log=logs.append)
    assert summary == {"step": 4, "interrupted": True} and len(calls) == 3
    assert "final evaluation over all of val.bin was skipped" in logs[-1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_kill_between_best_and_the_root_never_leaves_best_behind(setup, tmp_path, monkeypatch):
    """best/ is written first; killed before the root, resume replays to the same best/."""
    run = tmp_path / "run"
    quiet_train(run_config(setup, run, max_steps=2))
    real, calls = runs_module.save_checkpoint, []

    def die_after_best(run_dir, *args):
        calls.append(run_dir)
        if len(calls) == 2:  # best/ of step 4 written, now the root
            raise KeyboardInterrupt("killed between best/ and the root")
        return real(run_dir, *args)

    monkeypatch.setattr(runs_module, "save_checkpoint", die_after_best)
    with pytest.raises(KeyboardInterrupt):
        quiet_train(resume_config(run, {"max_steps": 4}), resume=True)
    monkeypatch.undo()
    best_step = json.loads((run / "best" / "state.json").read_text())["step"]
    assert json.loads((run / "state.json").read_text())["step"] == 2 and best_step in (2, 4)
    quiet_train(resume_config(run, {"max_steps": 4}), resume=True)
    best = json.loads((run / "best" / "state.json").read_text())
    vals = [m["val_loss"] for m in runs_module.read_metrics(run) if "val_loss" in m]
    assert best["best_val_loss"] == min(vals) and best["val_loss"] == min(vals)


# --------------------------------------------------------------------- bad input


def test_resume_bad_input(setup, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        resume_config(tmp_path / "empty", {})
    run = tmp_path / "run"
    quiet_train(run_config(setup, run, max_steps=2))
    with pytest.raises(UserError, match=r"--lr 0.5 differs from the checkpoint's lr=0.01"):
        resume_config(run, {"lr": 0.5})
    with pytest.raises(UserError, match="already holds a run"):
        quiet_train(run_config(setup, run, max_steps=2))
    with pytest.raises(UserError, match="already at step 2"):
        quiet_train(resume_config(run, {}), resume=True)


@pytest.mark.parametrize("override, message", [
    ({"lr": 0.0}, r"--lr: expected a finite number > 0, got 0\.0 \(a float\)"),
    ({"lr": -1e-3}, "--lr: expected a finite number > 0"),
    ({"max_steps": 0}, "--max_steps must be > 0"),
    ({"batch_size": -2}, "--batch_size must be > 0"),
    ({"bogus": 1}, "unknown training setting 'bogus'"),
    ({"batch_size": 2.5}, "batch_size: expected an integer"),
    ({"batch_size": 0}, "--batch_size must be > 0, got 0"),
    ({"lr": float("nan")}, "--lr: expected a finite number, got nan"),
    ({"lr": float("inf")}, "--lr: expected a finite number, got inf"),
    ({"grad_clip": float("nan")}, "--grad_clip: expected a finite number, got nan"),
    ({"grad_clip": -1.0}, "--grad_clip: expected a finite number >= 0"),
    ({"beta1": 2.0}, r"--beta1: expected a finite number in \[0, 1\), got 2.0"),
    ({"beta1": -1.0}, r"--beta1: expected a finite number in \[0, 1\), got -1.0"),
    ({"beta2": 1.0}, r"--beta2: expected a finite number in \[0, 1\), got 1.0"),
    ({"dropout": 1.0}, r"--dropout must be in \[0, 1\)"),
    ({"weight_decay": float("-inf")}, "--weight_decay: expected a finite number"),
    ({"min_lr": 0.5}, "--min_lr 0.5 is above --lr 0.01"),
    ({"seed": -1}, r"--seed must be in 0..2\*\*63-1, got -1"),
    ({"seed": 2**70}, r"--seed must be in 0..2\*\*63-1"),
    ({"eval_interval": 0}, "--eval_interval must be > 0"),
    ({"warmup_steps": -3}, "--warmup_steps: expected an integer >= 0"),
    ({"decay_steps": 0}, "--decay_steps: expected an integer >= 1, got 0"),
    ({"context_length": 0}, "--context_length must be >= 1"),
    ({"data": ""}, "--data: expected a non-empty string"),
    ({"init": 3}, "--init: expected a non-empty string, got 3"),
    ({"init": None, "preset": "gpt5"}, "unknown preset 'gpt5'"),
    ({"max_steps": True}, "--max_steps: expected an integer, got True"),
    ({"lr": "fast"}, "--lr: expected a finite number, got 'fast'"),
])
def test_bad_settings(setup, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        run_config(setup, tmp_path / "run", **override)


@pytest.mark.parametrize("override, message", [
    ({"eval_windows": -1}, "--eval_windows must be >= 0, got -1"),
    ({"sample_tokens": -4}, "--sample_tokens must be >= 0, got -4"),
    ({"stride": 0}, "--stride must be >= 1, got 0"),
    ({"seed": 2**63}, f"--seed must be in 0..2**63-1, got {2**63}"),
    ({"dtype": "int8"}, "--dtype 'int8': expected one of float32, bfloat16, float16"),
    ({"lr": None}, "--lr: a value is required"),
    ({"compile": "yes"}, "--compile: expected true or false, got 'yes' (a str)"),
])
def test_bad_settings_are_named_word_for_word(setup, tmp_path, override, message):
    with pytest.raises(UserError) as raised:
        run_config(setup, tmp_path / "run", **override)
    assert str(raised.value) == message


@pytest.mark.parametrize("override", [{"eval_windows": 0, "sample_tokens": 0}, {"context_length": 1, "stride": 1},
                                      {"seed": 0}, {"seed": 2**63 - 1}, {"dropout": 0.0}])
def test_settings_at_the_ends_of_their_ranges_are_taken(setup, tmp_path, override):
    cfg = run_config(setup, tmp_path / "run", **override)
    assert {k: getattr(cfg, k) for k in override} == override


def test_a_config_file_that_is_not_a_table(tmp_path):
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="run.json: expected a table of settings"):
        read_config_file(tmp_path / "run.json")


def test_config_file_answers_word_for_word(tmp_path, monkeypatch):
    """Each way a settings file can be wrong, named with the file and the reason."""
    (tmp_path / "run.json").write_text('{"lr": 0.5, "name": "\u00e9"}', encoding="utf-8")
    (tmp_path / "run.toml").write_text('lr = 0.5\nname = "\u00e9"\n', encoding="utf-8")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "bad.toml").write_text("lr = = 1")
    (tmp_path / "empty.toml").write_text("")  # an empty TOML file is an empty table
    (tmp_path / "null.json").write_text("null")
    (tmp_path / "dir.json").mkdir()
    assert read_config_file(tmp_path / "run.json") == read_config_file(str(tmp_path / "run.toml")) == \
        {"lr": 0.5, "name": "\u00e9"}
    assert read_config_file(tmp_path / "empty.toml") == {}
    answers = {
        None: "--config: expected the path of a TOML or JSON file of settings, got None",
        "": "--config: expected the path of a TOML or JSON file of settings, got '' (a str)",
        tmp_path / "latin1.json": f"{tmp_path / 'latin1.json'}: not UTF-8 text (invalid continuation byte at byte 7)",
        tmp_path / "bad.json": f"{tmp_path / 'bad.json'}: not valid JSON (Expecting property name enclosed in double "
                               "quotes: line 1 column 2 (char 1))",
        tmp_path / "bad.toml": f"{tmp_path / 'bad.toml'}: not valid TOML (Invalid value (at line 1, column 6))",
        tmp_path / "null.json": f"{tmp_path / 'null.json'}: expected a table of settings",
        tmp_path / "dir.json": f"{tmp_path / 'dir.json'}: cannot read (Is a directory)",
        tmp_path / "none.json": f"{tmp_path / 'none.json'}: cannot read (No such file or directory)",
    }
    for path, message in answers.items():
        with pytest.raises(UserError) as e:
            read_config_file(path)
        assert str(e.value) == message
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10: no tomllib
    with pytest.raises(UserError) as e:
        read_config_file(tmp_path / "run.toml")
    assert str(e.value) == f"{tmp_path / 'run.toml'}: TOML needs Python 3.11 or later; use a JSON file"


def _stored_run(tmp_path, **config) -> Path:
    """A run directory whose state.json holds `config` (and valid other fields)."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    stored = {"data": str(tmp_path / "data"), "out": str(run), "init": None, **config}
    (run / "state.json").write_text(json.dumps({
        "step": 2, "data_dir": "d", "data_position": {"epoch": 0, "index": 0}, "train_tokens": 0, "lr": 0.1,
        "val_loss": None, "best_val_loss": None, "rng": {"torch": "00"}, "model_config": {}, "config": stored}))
    return run


def test_resume_takes_the_stored_settings_and_refuses_a_flag_that_differs(tmp_path):
    run = _stored_run(tmp_path, init=str(tmp_path / "init.safetensors"), batch_size=4, seed=3, dtype="bfloat16")
    cfg = resume_config(run, {"max_steps": 9, "dtype": "float32", "compile": True, "batch_size": 4,
                              "data": str(tmp_path / "x" / ".." / "data"), "out": str(run) + "/",
                              "init": str(tmp_path / "x" / ".." / "init.safetensors")})
    assert (cfg.max_steps, cfg.dtype, cfg.compile, cfg.batch_size, cfg.seed, cfg.out) == (9, "float32", True, 4, 3, str(run))
    assert resume_config(run, {}).dtype == "bfloat16"  # the stored default, not the fallback for old runs
    state = run / "state.json"
    refusals = {
        "batch_size": (8, f"--batch_size 8 differs from the checkpoint's batch_size=4 ({state}); drop the flag, or "
                          "train into a new --out"),
        "seed": (None, f"--seed None differs from the checkpoint's seed=3 ({state})"),
        "lr": (0.5, f"--lr 0.5 differs from the checkpoint's lr=None ({state})"),
        "data": (str(tmp_path / "other"), f"--data {tmp_path / 'other'} differs from the checkpoint's data="
                                          f"{tmp_path / 'data'} ({state})"),
        "init": (str(tmp_path / "other"), f"--init {tmp_path / 'other'} differs from the checkpoint's init="),
        "out": (str(tmp_path / "other"), f"--out {tmp_path / 'other'} differs from the checkpoint's out={run}"),
    }
    for key, (given, words) in refusals.items():
        with pytest.raises(UserError) as e:
            resume_config(run, {key: given})
        assert str(e.value).startswith(words), (key, str(e.value))
    old = _stored_run(tmp_path / "old", batch_size=4)
    config = json.loads((old / "state.json").read_text())
    config["config"].pop("dtype", None)
    (old / "state.json").write_text(json.dumps(config))
    assert resume_config(old, {}).dtype == "float32"  # a run from before --dtype
    with pytest.raises(UserError) as e:
        resume_config(_stored_run(tmp_path / "bad", batch_size=0), {})
    assert str(e.value) == f"{tmp_path / 'bad' / 'run' / 'state.json'}: config: --batch_size must be > 0, got 0"


def test_out_that_cannot_be_a_directory_fails_before_training(setup, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file: exists and is not a directory"):
        quiet_train(run_config(setup, tmp_path / "file"))
    with pytest.raises(UserError, match=r"file/run: cannot write into this directory"):
        quiet_train(run_config(setup, tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_text() == "x"


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous(setup, tmp_path, monkeypatch):
    import errno
    run = tmp_path / "run"
    quiet_train(run_config(setup, run, max_steps=2))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs_module, "write_safetensors", full)
    with pytest.raises(UserError, match=r"optimizer.safetensors: cannot write \(No space left on device\)"):
        quiet_train(resume_config(run, {"max_steps": 4}), resume=True)
    monkeypatch.undo()
    assert load_checkpoint(run)[2]["step"] == 2
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        assert (run / name).read_bytes() == before[name]


def _garble(path, text):
    path.write_text(text)


@pytest.mark.parametrize("file, damage, message", [
    ("state.json", lambda p: _garble(p, p.read_text()[:40]), "state.json: not valid JSON"),
    ("state.json", lambda p: _garble(p, "[]"), "state.json: expected a JSON object, got list"),
    ("state.json", lambda p: _garble(p, p.read_text().replace('"step": 2', '"step": "2"')),
     "state.json: field 'step' must be an integer >= 0, got '2'"),
    ("state.json", lambda p: _garble(p, p.read_text().replace('"index": ', '"index": -')),
     "field 'data_position' must be an object"),
    ("state.json", lambda p: _garble(p, json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "rng"})),
     "state.json: field 'rng' is missing"),
    ("state.json", lambda p: _garble(p, json.dumps(json.loads(p.read_text()) | {"rng": {"torch": "abcd"}})),
     "state.json: field 'rng' does not hold a torch generator state"),
    ("state.json", lambda p: _garble(p, json.dumps(json.loads(p.read_text()) | {"best_val_loss": "low"})),
     "field 'best_val_loss' must be a finite number or null"),
    ("state.json", lambda p: _garble(p, p.read_text().replace('"best_val_loss": ', '"best_val_loss": NaN, "x": ')),
     "state.json: not valid JSON \\(NaN is not a JSON number"),
    ("state.json", lambda p: _garble(p, json.dumps(json.loads(p.read_text()) | {"data_position": {"epoch": 0, "index": 10**6}})),
     "data_position index 1000000 is past the 187 windows of an epoch"),
    ("state.json", lambda p: _garble(p, json.dumps(json.loads(p.read_text()) | {"config": {"lr": "x"}})),
     "state.json: config: --lr: expected a finite number"),
    ("metrics.jsonl", lambda p: _garble(p, p.read_text()[:-30]), "metrics.jsonl: line \\d+ is not valid JSON"),
    ("metrics.jsonl", lambda p: _garble(p, p.read_text() + "[1]\n"), "metrics.jsonl: line 6 is not an object with an integer step"),
    ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]), "optimizer.safetensors: not a readable optimizer state"),
    ("optimizer.safetensors", lambda p: p.write_bytes(b"garbage"), "optimizer.safetensors: not a readable optimizer state"),
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100]), "model.safetensors: truncated"),
])
def test_damaged_run_files_are_one_line_errors_naming_the_file(setup, tmp_path, file, damage, message):
    run = tmp_path / "run"
    quiet_train(run_config(setup, run, max_steps=2, eval_interval=1))
    damage(run / file)
    with pytest.raises(UserError, match=message):
        quiet_train(resume_config(run, {"max_steps": 4}), resume=True)


def test_optimizer_state_of_another_shape_or_step(setup, tmp_path):
    from safetensors.torch import save_file
    run = tmp_path / "run"
    quiet_train(run_config(setup, run, max_steps=2))
    moments = load_file(run / "optimizer.safetensors")
    save_file(moments, run / "optimizer.safetensors", metadata={"adam_step": "7"})
    with pytest.raises(UserError, match="optimizer.safetensors is at step 7, state.json at step 2"):
        load_checkpoint(run)
    moments["exp_avg.wte.weight"] = moments["exp_avg.wte.weight"][:10]
    save_file(moments, run / "optimizer.safetensors", metadata={"adam_step": "2"})
    with pytest.raises(UserError, match=r"exp_avg.wte.weight is torch.float32 \[10, 32\], expected floating point"):
        load_checkpoint(run)
    del moments["exp_avg.wte.weight"]
    save_file(moments, run / "optimizer.safetensors", metadata={"adam_step": "x"})
    with pytest.raises(UserError, match="keys do not match the model's parameters"):
        load_checkpoint(run)


def test_foreign_weights_in_a_run_directory_are_refused_on_resume(setup, tmp_path):
    import dataclasses
    run = tmp_path / "run"
    quiet_train(run_config(setup, run, max_steps=2))
    params, config = load_params(run)
    save_params(run / "model.safetensors", params, dataclasses.replace(config, layer_norm_epsilon=1e-3))
    with pytest.raises(UserError, match="its config differs from the run's"):
        quiet_train(resume_config(run, {"max_steps": 4}), resume=True)


def test_context_must_fit_the_model_and_data(setup, tmp_path):
    with pytest.raises(UserError, match="--context_length 64 does not fit the model's n_positions=32"):
        quiet_train(run_config(setup, tmp_path / "a", context_length=64))
    np.zeros(10, dtype="<u2").tofile(setup[0] / "val.bin")
    with pytest.raises(UserError, match="val.bin holds 10 tokens; one window of context_length=16 needs at least 17"):
        quiet_train(run_config(setup, tmp_path / "b"))


def test_config_file_and_cli(setup, tmp_path, capsys):
    data, init = setup
    (tmp_path / "run.toml").write_text(f'data = "{data}"\ninit = "{init}"\nbatch_size = 4\nlr = 0.02\n')
    assert read_config_file(tmp_path / "run.toml") == {"data": str(data), "init": str(init), "batch_size": 4, "lr": 0.02}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        read_config_file(tmp_path / "bad.json")
    code = main(["train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run"),
                 "--max_steps", "2", "--context_length", "16", "--eval_interval", "2", "--lr", "-1"])
    assert code == 2 and "fgpt train: error: --lr: expected a finite number > 0, got -1.0 (a float)" in capsys.readouterr().err
    code = main(["train", "--resume", str(tmp_path / "nowhere")])
    assert code == 2 and "nowhere: no such run directory" in capsys.readouterr().err


# ------------------------------------------------------------------- --dtype


def test_a_bfloat16_run_logs_tokens_per_second_and_resumes_in_float32(setup, tmp_path):
    run, logs = tmp_path / "run", []
    train(run_config(setup, run, max_steps=2, dtype="bfloat16"), progress=False, log=logs.append)
    assert "bfloat16" in logs[0]
    metrics = runs_module.read_metrics(run)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(m["tokens_per_s"] > 0 for m in steps)
    params, _ = load_params(run)
    assert all(t.dtype == torch.float32 for t in flatten(params).values())  # the float32 masters
    logs.clear()
    train(resume_config(run, {"max_steps": 4, "dtype": "float32"}), resume=True, progress=False, log=logs.append)
    assert any("resuming a bfloat16 run in float32" in line for line in logs)
    assert json.loads((run / "state.json").read_text())["config"]["dtype"] == "float32"


@pytest.mark.parametrize("dtype, message", [
    ("float64", "--dtype 'float64': expected one of float32, bfloat16, float16"),
    ("float16", "--dtype float16: float16 training needs a CUDA GPU"),
])
def test_a_dtype_that_cannot_train_here_is_refused(setup, tmp_path, dtype, message):
    with pytest.raises(UserError, match=message):
        quiet_train(run_config(setup, tmp_path / "run", dtype=dtype, device="cpu"))
    assert not (tmp_path / "run" / "state.json").exists()


def test_bfloat16_on_a_cpu_without_it_falls_back_to_float32_in_one_line(setup, tmp_path, monkeypatch):
    import functional_gpt.device as device_module
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    logs = []
    train(run_config(setup, tmp_path / "run", max_steps=2, dtype="bfloat16"), progress=False, log=logs.append)
    assert "this CPU has no bfloat16 arithmetic" in logs[0] and "training in float32" in logs[0]
    assert "float32" in logs[1]


def test_the_streamed_optimizer_file_is_what_safetensors_writes(tmp_path):
    """runs.write_safetensors, fed one tensor at a time, makes a file safetensors reads
    back (header validated) to the same names, shapes, dtypes, values and metadata as its
    own save_file; a tensor unlike the header's spec is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {"a.w": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c.z": torch.randn(2, 2, 2).half()}
    specs = [(k, t.shape, t.dtype) for k, t in tensors.items()]
    runs_module.write_safetensors(tmp_path / "ours.safetensors", specs, iter(tensors.values()), {"adam_step": "4"})
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"adam_step": "4"})
    for name in ("ours", "theirs"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            assert f.metadata() == {"adam_step": "4"} and sorted(f.keys()) == sorted(tensors)
            for key, t in tensors.items():
                assert f.get_tensor(key).dtype == t.dtype and torch.equal(f.get_tensor(key), t)
    with pytest.raises(ValueError, match=r"^b: got torch.float32 \[7\], the header says torch.bfloat16 \[7\]$"):
        runs_module.write_safetensors(tmp_path / "bad", specs, [tensors["a.w"], torch.randn(7), tensors["c.z"]], {})


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux's /proc")
def test_peak_memory_is_the_kernels_high_water_mark_in_mib():
    """The summary's peak_rss_mib is the process's peak resident set, as /proc reports it
    (VmHWM, in KiB) read just before and after. The kernel's counters are batched per CPU
    (off by up to ~1 MiB), so the peak is first raised past 2 GiB, where a unit off by a
    thousandth shows."""
    def high_water_kib():
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1])

    big = np.ones(2**28)  # 2 GiB, written
    del big
    before = high_water_kib()
    peak = train_module._peak_rss_mb()
    after = high_water_kib()
    assert before / 1024 - 1 <= peak <= after / 1024 + 1


def test_peak_memory_on_macos_converts_bytes(monkeypatch):
    """macOS reports ru_maxrss in bytes, not KiB: 1 GiB there is 1024 MiB."""
    usage = type("Usage", (), {"ru_maxrss": 2**30})()
    monkeypatch.setattr(train_module.resource, "getrusage", lambda who: usage)
    monkeypatch.setattr(train_module.sys, "platform", "darwin")
    assert train_module._peak_rss_mb() == 1024.0

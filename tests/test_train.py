"""The training step against transformers' GPT2LMHeadModel, exact resume, saves that
survive a kill, interrupts, non-finite losses and bad input."""

import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import functional_gpt.runs as runs_module
import functional_gpt.train as train_module
from functional_gpt import UserError, flatten, init_params, load_params, save_params
from functional_gpt.cli import main
from functional_gpt.train import (
    cross_entropy, loss_and_grads, make_config, read_config_file, resume_config, train,
)
from functional_gpt.runs import load_checkpoint

from conftest import hf_model


@pytest.fixture
def setup(tmp_path, tiny_config):
    """(data_dir, init_file): random tokens below the tiny vocab, and tiny weights."""
    generator = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    generator.integers(0, tiny_config.vocab_size, 3000).astype("<u2").tofile(data / "train.bin")
    generator.integers(0, tiny_config.vocab_size, 300).astype("<u2").tofile(data / "val.bin")
    init = tmp_path / "init.safetensors"
    save_params(init, init_params(tiny_config, seed=0), tiny_config)
    return data, init


def run_config(setup, out, **overrides):
    data, init = setup
    values = dict(data=str(data), out=str(out), init=str(init), batch_size=4, context_length=16, lr=1e-2,
                  warmup_steps=2, eval_interval=2, eval_windows=4, sample_tokens=4, max_steps=4, device="cpu")
    return make_config(values | overrides)


def quiet_train(cfg, **kw):
    return train(cfg, progress=False, log=lambda *a: None, **kw)


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


def test_cross_entropy_matches_torch():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 11, generator=generator) * 3).requires_grad_(True)
    targets = torch.randint(11, (2, 5), generator=generator)
    ours = cross_entropy(logits, targets)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


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


def test_resume_is_bit_identical(setup, tmp_path):
    quiet_train(run_config(setup, tmp_path / "straight", max_steps=6, dropout=0.1))
    quiet_train(run_config(setup, tmp_path / "split", max_steps=3, decay_steps=6, dropout=0.1))
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

    monkeypatch.setattr(runs_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        quiet_train(resume_config(run, {"max_steps": 4}), resume=True)
    monkeypatch.undo()
    flat, _, opt, state = load_checkpoint(run)
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
    flat, _, opt, state = load_checkpoint(run)
    assert state["step"] == 4 and opt.step == 4  # rolled forward, consistent
    assert not (run / ".next").exists()


def test_sigterm_finishes_the_step_saves_and_resumes(setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, count = train_module.loss_and_grads, []

    def signal_at_step_3(*args, **kwargs):
        count.append(1)
        if len(count) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "loss_and_grads", signal_at_step_3)
    summary = quiet_train(run_config(setup, run, max_steps=6, eval_interval=5))
    assert summary == {"step": 3, "interrupted": True}
    assert json.loads((run / "state.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_non_finite_loss_stops_and_keeps_checkpoint(setup, tmp_path, tiny_config):
    params = init_params(tiny_config)
    params["h"][0]["mlp"]["c_fc"]["bias"][3] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_params(bad, params, tiny_config)
    with pytest.raises(UserError, match="step 1: loss is nan; stopped, nothing was saved"):
        quiet_train(run_config(setup, tmp_path / "run", init=str(bad)))
    assert not (tmp_path / "run" / "state.json").exists()


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
    ({"lr": 0.0}, "--lr must be > 0, got 0.0"),
    ({"lr": -1e-3}, "--lr must be > 0"),
    ({"max_steps": 0}, "--max_steps must be > 0"),
    ({"batch_size": -2}, "--batch_size must be > 0"),
    ({"bogus": 1}, "unknown training setting 'bogus'"),
    ({"batch_size": 2.5}, "batch_size: expected an integer"),
])
def test_bad_settings(setup, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        run_config(setup, tmp_path / "run", **override)


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
    assert code == 2 and "fgpt train: error: --lr must be > 0, got -1.0" in capsys.readouterr().err
    code = main(["train", "--resume", str(tmp_path / "nowhere")])
    assert code == 2 and "holds no checkpoint" in capsys.readouterr().err

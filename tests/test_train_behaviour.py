"""Training does what it claims, judged by its effects: the loss falls on a learnable
task; the logged learning rate and gradient norm are the schedule's and the pre-clip
norm; five steps equal an independent transformers + torch.optim.AdamW loop; best/ holds
the lowest validation loss; a run killed with SIGKILL resumes in a fresh process
bit-exactly (RNG included), with gradient accumulation too; a preset run checkpoints
its preset.

Only the public surface is used: `train`, `make_config`, `resume_config`, the `fgpt
train` command and the files a run writes.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import functional_gpt.training.loop as train_module
from functional_gpt import flatten, init_params, load_params, preset, save_params
from functional_gpt.cli import main
from functional_gpt.training.data import Position, next_batch
from functional_gpt.training.optim import lr_at
from functional_gpt.training.loop import train
from functional_gpt.training.settings import make_config, resume_config

from conftest import TINY, hf_from, hf_model, params_of, reference_training, without_key_bias

ROOT = Path(__file__).resolve().parents[1]  # the package a subprocess must import
PERIOD = 13  # the learnable pattern's length: coprime with the 16-token windows, so every
# phase of it starts a window and position alone cannot predict the next token


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread here and in the subprocesses (OMP_NUM_THREADS=1): the models are
    tiny, and on a busy 2-core machine the hand-offs between two threads cost ten times
    the arithmetic (measured: 0.6 s instead of 11 s for a 40-step run)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def no_loss_plot(monkeypatch):
    """loss.png is drawn at every evaluation and costs more than a tiny model's whole
    step; none of these tests looks at it (tests/test_train.py does)."""
    monkeypatch.setattr(train_module, "plot_losses", lambda metrics, path: None, raising=False)


def write_data(data: Path, train_tokens, val_tokens) -> Path:
    data.mkdir()
    np.asarray(train_tokens).astype("<u2").tofile(data / "train.bin")
    np.asarray(val_tokens).astype("<u2").tofile(data / "val.bin")
    return data


@pytest.fixture
def random_data(tmp_path):
    """(data_dir, init_file): random tokens below the tiny vocab, and GPT-2-init weights."""
    generator = np.random.default_rng(0)
    data = write_data(tmp_path / "data", generator.integers(0, TINY.vocab_size, 3000),
                      generator.integers(0, TINY.vocab_size, 300))
    init = tmp_path / "init.safetensors"
    save_params(init, init_params(TINY, seed=0), TINY)
    return data, init


@pytest.fixture
def pattern(tmp_path):
    """(pattern [PERIOD], init_file): PERIOD distinct tokens of the tiny vocab, whose
    repetition is learnable (each token determines the next), and GPT-2-init weights
    (near-uniform predictions: a first loss of about ln(V))."""
    init = tmp_path / "init.safetensors"
    save_params(init, init_params(TINY, seed=0), TINY)
    return np.random.default_rng(0).permutation(TINY.vocab_size)[:PERIOD], init


def run_config(data, init, out, **overrides):
    values = dict(data=str(data), out=str(out), init=str(init), batch_size=4, context_length=16, lr=1e-2,
                  warmup_steps=2, eval_interval=2, eval_windows=0, sample_tokens=0, max_steps=4, device="cpu",
                  dtype="float32", optimizer="adamw", schedule="cosine")  # float32, AdamW, cosine: the references
    return make_config(values | overrides)


def quiet_train(cfg, **kw):
    return train(cfg, progress=False, log=lambda *a: None, **kw)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def read_state(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())


@torch.no_grad()
def hf_val_loss(flat: dict, config, data: Path, T: int) -> float:
    """Mean next-token cross-entropy (nats/token) of transformers' model on every
    non-overlapping window of T tokens of data/val.bin (the first token is never a target)."""
    val = np.fromfile(data / "val.bin", dtype="<u2").astype(np.int64)
    n = (len(val) - 1) // T
    x = torch.from_numpy(val[: n * T].reshape(n, T))
    y = torch.from_numpy(val[1 : n * T + 1].reshape(n, T))
    return float(F.cross_entropy(hf_from(flat, config)(x).logits.flatten(0, 1), y.flatten()))


def assert_same_files(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert set(ta) == set(tb), name
        different = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]


# ------------------------------------------------------------------- it learns


def test_loss_falls_on_a_learnable_task(tmp_path, pattern):
    """A repeated 13-token pattern, 40 steps at lr 1e-2 (batch 4 x 16 tokens): the first
    train loss is ln(128) = 4.85 +- 0.1, and at step 40 both the train loss and the
    validation loss (the same pattern at another phase) are below 0.5 nats/token.
    Measured: 4.841 at step 1; 0.19 (train) and 0.18 (val) at step 40."""
    tokens, init = pattern
    data = write_data(tmp_path / "data", np.tile(tokens, 150), np.tile(np.roll(tokens, 5), 25))
    run = tmp_path / "run"
    summary = quiet_train(run_config(data, init, run, max_steps=40, eval_interval=20, dropout=0.0))
    metrics = read_metrics(run)
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert abs(train_losses[0] - math.log(TINY.vocab_size)) < 0.1
    assert train_losses[-1] < 0.5 and val_losses[-1] < 0.5 and summary["val_loss"] < 0.5, (
        f"train {train_losses[-1]:.3f}, val {val_losses}, final {summary['val_loss']:.3f}")
    assert val_losses[0] > val_losses[-1]


# ------------------------------------------------ against an independent loop


def test_five_steps_equal_transformers_and_torch_adamw(tmp_path):
    """5 steps of 2 micro-batches of 2 windows (grad_accum 2), warm-up 2 then cosine to
    min_lr at step 5, weight decay 0.1, clipping to 0.05 (active at every step: the norms
    are ~1.2-1.8), dropout 0, on trained-like weights, equal transformers'
    GPT2LMHeadModel trained by torch.optim.AdamW with the decay / no-decay groups of
    `decays`, clip_grad_norm_, the closed-form schedule and F.cross_entropy over each
    step's 4 windows at once: every parameter within 1e-4 of its tensor's largest
    magnitude (measured: 7e-6 at most), and every parameter's change within 1e-3 of the
    largest change (measured: 8e-5). The logged lr is the closed form and the logged
    grad_norm the pre-clip norm of the mean gradient (measured: 1e-6 relative)."""
    lr, min_lr, warmup, steps, clip, wd = 1e-2, 1e-3, 2, 5, 0.05, 0.1
    generator = np.random.default_rng(0)
    data = write_data(tmp_path / "data", generator.integers(0, TINY.vocab_size, 3000),
                      generator.integers(0, TINY.vocab_size, 300))
    init = tmp_path / "init.safetensors"
    save_params(init, params_of(hf_model(TINY, seed=1)), TINY)
    run = tmp_path / "run"
    quiet_train(run_config(data, init, run, max_steps=steps, batch_size=2, grad_accum=2, warmup_steps=warmup,
                           lr=lr, min_lr=min_lr, weight_decay=wd, grad_clip=clip, beta1=0.9, beta2=0.95,
                           dropout=0.0, eval_interval=steps, eval_windows=1))
    ours = flatten(load_params(run)[0])

    def closed_form_lr(step: int) -> float:  # 0-based update index
        if step < warmup:
            return lr * (step + 1) / warmup
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    start, config = load_params(init)
    start = flatten(start)
    train_tokens, position, batches = np.fromfile(data / "train.bin", dtype="<u2"), Position(), []
    for step in range(steps):
        x1, y1, position = next_batch(train_tokens, position, batch_size=2, context_length=16, stride=16, seed=0)
        x2, y2, position = next_batch(train_tokens, position, batch_size=2, context_length=16, stride=16, seed=0)
        batches.append((torch.cat([x1, x2]), torch.cat([y1, y2])))
    expected_params, ref_losses, norms = reference_training(
        start, config, batches, lrs=[closed_form_lr(step) for step in range(steps)], weight_decay=wd, clip=clip)

    logged = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, steps + 1))
    for step, m in enumerate(logged):
        expected_lr = closed_form_lr(step)
        assert m["lr"] == pytest.approx(expected_lr, rel=1e-12), f"step {step + 1}: lr"
        assert m["lr"] == pytest.approx(lr_at(step, lr=lr, warmup_steps=warmup, decay_steps=steps, min_lr=min_lr))
        assert m["grad_norm"] == pytest.approx(norms[step], rel=1e-5), f"step {step + 1}: grad_norm"
        assert m["loss"] == pytest.approx(ref_losses[step], rel=1e-5), f"step {step + 1}: loss"
    assert min(norms) > 10 * clip  # clipping was active at every step
    for key, expected in expected_params.items():
        got, expected, began = (without_key_bias(key, t, TINY.n_embd) for t in (ours[key], expected, start[key]))
        moved_got, moved = got - began, expected - began
        scale, change = float(expected.abs().max()), float(moved.abs().max())
        assert float((got - expected).abs().max()) <= 1e-4 * scale, f"{key}: params differ"
        assert change > 0 and float((moved_got - moved).abs().max()) <= 1e-3 * change, f"{key}: updates differ"


# ------------------------------------------------------------------------ best/


def test_best_holds_the_lowest_validation_loss_when_it_rises_later(tmp_path, pattern):
    """Train on the repeated pattern, validate on random draws from its 13 tokens: the
    validation loss first falls (the model learns which tokens occur; ln 13 = 2.56 is the
    floor) and then rises as the model grows sure of successors that validation does not
    follow (measured at steps 8, 16, .. 40: 3.16, 3.47, 4.26, 4.86, 5.11). best/ must hold
    the lowest one's model and figure, the root the last one's."""
    tokens, init = pattern
    val = np.random.default_rng(1).choice(tokens, 320)
    data = write_data(tmp_path / "data", np.tile(tokens, 150), val)
    run = tmp_path / "run"
    quiet_train(run_config(data, init, run, max_steps=40, eval_interval=8, dropout=0.0))
    evals = [(m["step"], m["val_loss"]) for m in read_metrics(run) if "val_loss" in m]
    assert [s for s, _ in evals] == [8, 16, 24, 32, 40]
    best_step, best_val = min(evals, key=lambda e: e[1])
    last_step, last_val = evals[-1]
    assert best_step < last_step and last_val > best_val + 0.5, f"the run did not overfit: {evals}"

    best = read_state(run / "best")
    assert best["step"] == best_step and best["val_loss"] == best_val
    assert read_state(run)["best_val_loss"] == best_val and read_state(run)["val_loss"] == last_val
    best_flat, config = load_params(run / "best" / "model.safetensors")
    assert hf_val_loss(flatten(best_flat), config, data, 16) == pytest.approx(best_val, rel=1e-5)
    last_flat, config = load_params(run / "model.safetensors")
    assert hf_val_loss(flatten(last_flat), config, data, 16) == pytest.approx(last_val, rel=1e-5)


# ---------------------------------------------------------------------- resume


def fgpt_train(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m functional_gpt.cli train ARGS` in a fresh process importing this
    checkout's package, its output to `log`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "functional_gpt.cli", "train", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def test_resume_after_sigkill_in_a_fresh_process_is_bit_exact(tmp_path, random_data):
    """`fgpt train` with dropout 0.1 is killed with SIGKILL once a checkpoint at step >= 2
    exists; `fgpt train --resume RUN --max_steps 8` in another process ends with the
    same params, Adam moments and per-step losses as an uninterrupted run. A fresh process
    starts torch's RNG from its default seed, so equal dropout masks need the saved RNG."""
    data, init = random_data
    flags = dict(data=data, init=init, batch_size=4, context_length=16, lr=1e-2, warmup_steps=2, max_steps=8,
                 eval_interval=2, eval_windows=2, sample_tokens=0, dropout=0.1, device="cpu")
    run = tmp_path / "killed"
    proc = fgpt_train([f"--{k}={v}" for k, v in flags.items()] + [f"--out={run}"], tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "state.json").is_file() and read_state(run)["step"] >= 2:
                break
            time.sleep(0.005)
    finally:
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
    first_log = (tmp_path / "first.log").read_text()[-2000:]
    assert proc.returncode == -signal.SIGKILL and (run / "state.json").is_file(), first_log
    killed_at = read_state(run)["step"]
    assert 2 <= killed_at < 8, f"killed at step {killed_at}"

    proc = fgpt_train([f"--resume={run}", "--max_steps=8"], tmp_path / "resume.log")
    try:  # the uninterrupted run, in this process while the other one starts
        quiet_train(make_config({k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}
                                | {"out": str(tmp_path / "straight")}))
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 0, (tmp_path / "resume.log").read_text()[-2000:]
    assert read_state(run)["step"] == 8
    assert losses(run) == losses(tmp_path / "straight")
    assert_same_files(run, tmp_path / "straight")


def test_resume_with_gradient_accumulation_is_bit_exact(tmp_path, random_data):
    """grad_accum 2, dropout 0.1: 3 steps, then resumed to 6 after the global RNG was
    reseeded (as a fresh process would find it), equals 6 straight steps bit for bit."""
    data, init = random_data
    settings = dict(max_steps=6, batch_size=2, grad_accum=2, dropout=0.1, eval_interval=3)
    quiet_train(run_config(data, init, tmp_path / "straight", **settings))
    quiet_train(run_config(data, init, tmp_path / "split", **settings | {"max_steps": 3, "decay_steps": 6}))
    torch.manual_seed(12345)
    quiet_train(resume_config(tmp_path / "split", {"max_steps": 6}), resume=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    assert_same_files(tmp_path / "split", tmp_path / "straight")


# ---------------------------------------------------------------------- presets


def test_preset_run_checkpoints_the_preset(tmp_path, capsys):
    """`fgpt train --preset cpu-tiny` with no --init: the checkpoint's config is the
    preset's, its tensors have the preset's shapes, and the saved model evaluates to the
    validation loss its state.json records (on val.bin's 3 windows of 16 tokens)."""
    generator = np.random.default_rng(0)
    data = write_data(tmp_path / "data", generator.integers(0, 50257, 400), generator.integers(0, 50257, 50))
    run = tmp_path / "run"
    code = main(["train", "--preset", "cpu-tiny", "--data", str(data), "--out", str(run), "--max_steps", "2",
                 "--batch_size", "2", "--context_length", "16", "--eval_interval", "2", "--eval_windows", "0",
                 "--sample_tokens", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    params, config = load_params(run)
    assert config == preset("cpu-tiny")
    shapes = {k: tuple(t.shape) for k, t in flatten(params).items()}
    assert shapes == {k: tuple(t.shape) for k, t in flatten(init_params(preset("cpu-tiny"), seed=0)).items()}
    state = read_state(run)
    assert state["config"]["preset"] == "cpu-tiny" and state["config"]["init"] is None
    assert state["model_config"] == preset("cpu-tiny").to_dict() and state["step"] == 2
    assert load_params(run / "best" / "model.safetensors")[1] == preset("cpu-tiny")
    assert hf_val_loss(flatten(params), config, data, 16) == pytest.approx(state["val_loss"], rel=1e-5)

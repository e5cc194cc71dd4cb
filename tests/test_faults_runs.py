"""Real kills of a training process: `kill -9` at nine moments, most of them inside
checkpoint writes, always leaves a checkpoint that loads, and a resume in a fresh process
ends bit-identical to a run that was never killed (dropout on, so the RNG state matters),
with best/ holding the lowest validation loss.

The child process is `fgpt train` with os.replace (every rename of every file a run
writes) or safetensors' save_file (the bytes of a checkpoint) wrapped to SIGKILL the
process at a chosen call (checkpoint.save_file writes the models only): the kill is
real, only its moment is chosen.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, hf_model, params_of
import dataclasses

from functional_gpt import load_params, save_params
from functional_gpt.training.runs import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_DROPOUT = dataclasses.replace(TINY, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)

DRIVER = """
import os, signal, sys
mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def killed_at_call(real):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            if mode == "save_file":  # half of the bytes on disk, then the kill
                with open(args[1], "wb") as f:
                    f.write(b"partial")
                    f.flush()
                    os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper

if mode == "replace":
    os.replace = killed_at_call(os.replace)
else:
    import functional_gpt.model.checkpoint as checkpoint
    checkpoint.save_file = killed_at_call(checkpoint.save_file)
from functional_gpt.cli import main
sys.exit(main(sys.argv[3:]))
"""

# (mode, call): os.replace calls per evaluation checkpoint are metrics.jsonl (1), best/
# (3 files in .next, 3 renames), the root (the same 6), loss.png (1): 14 in all.
MOMENTS = [
    ("save_file", 1),  # writing best/.next/model.safetensors
    ("replace", 2),  # best/.next holds the model only
    ("replace", 4),  # best/.next complete (state.json written), nothing renamed
    ("replace", 6),  # best/: two of three files renamed
    ("replace", 9),  # root .next: model and optimizer written
    ("replace", 12),  # root: optimizer renamed, model and state pending
    ("replace", 13),  # root committed, loss.png not yet
    ("save_file", 3),  # writing the model of the second checkpoint
    ("replace", 20),  # second checkpoint: a commit half done
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, TINY.vocab_size, 3000).astype("<u2").tofile(data / "train.bin")
    rng.integers(0, TINY.vocab_size, 300).astype("<u2").tofile(data / "val.bin")
    init = tmp / "init.safetensors"
    save_params(init, params_of(hf_model(TINY)), TINY)
    straight = tmp / "straight"
    assert _fgpt(_train_args(data, init, straight)).returncode == 0
    return tmp, data, init, straight


def _train_args(data, init, out):
    return ["train", "--data", str(data), "--init", str(init), "--out", str(out), "--batch_size", "4",
            "--context_length", "16", "--lr", "1e-2", "--warmup_steps", "2", "--eval_interval", "2",
            "--eval_windows", "4", "--sample_tokens", "4", "--max_steps", "4", "--dropout", "0.1",
            "--device", "cpu", "--dtype", "float32"]


def _fgpt(args, driver=None):
    command = [sys.executable, "-c", DRIVER, *driver, *args] if driver else \
        [sys.executable, "-m", "functional_gpt.cli", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("mode, call", MOMENTS)
def test_a_kill_at_any_moment_resumes_bit_identically(setup, mode, call):
    tmp, data, init, straight = setup
    run = tmp / f"killed-{mode}-{call}"
    killed = _fgpt(_train_args(data, init, run), driver=[mode, str(call)])
    assert killed.returncode == -9, killed.stderr[-500:]
    if (run / "state.json").exists() or (run / ".next" / "state.json").exists():
        loaded, _, state = load_checkpoint(run)  # rolls a half-done commit forward, then loads
        assert state["step"] == loaded.opt.step in (2, 4) and load_params(run)[1] == TINY_DROPOUT
        resumed = _fgpt(["train", "--resume", str(run)])
        if state["step"] == 4:  # the last checkpoint was complete: nothing left to train
            assert resumed.returncode == 2 and "is already at step 4" in resumed.stderr
        else:
            assert resumed.returncode == 0, resumed.stderr[-800:]
    else:  # killed before the first checkpoint committed: start again, same command
        assert _fgpt(_train_args(data, init, run)).returncode == 0
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(straight / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    vals = [json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in json.loads(line)]
    assert vals == [json.loads(line)["val_loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()
                    if "val_loss" in json.loads(line)]
    best = json.loads((run / "best" / "state.json").read_text())
    assert best["val_loss"] == min(vals) == best["best_val_loss"]
    assert not (run / ".next").exists() and not (run / "best" / ".next").exists()

"""`fgpt train --lora_rank`: a run that trains a LoRA adapter of frozen --init weights,
against Hugging Face peft on transformers' GPT-2 trained by torch.optim.AdamW; its run
directory (peft's format), exact resume, bfloat16, and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import functional_gpt.device as device_module
import functional_gpt.training.loop as train_module
from functional_gpt import UserError, flatten, load_params, save_params
from functional_gpt.cli import main
from functional_gpt.model.lora import attach, init_adapter
from functional_gpt.model.lora_files import load_adapter, save_adapter
from functional_gpt.model.transformer import forward
from functional_gpt.training.data import Position, next_batch
from functional_gpt.training.loop import train
from functional_gpt.training.settings import make_config, resume_config
from functional_gpt.training.optim import lr_at
from functional_gpt.training.runs import load_checkpoint

from conftest import TINY, assert_rel_close, hf_from, hf_model, params_of, random_token_data, reference_lora_training

peft = pytest.importorskip("peft")

STEPS, LR, MIN_LR, WARMUP, WD, CLIP = 5, 2e-2, 2e-3, 2, 0.1, 0.02
TARGETS = "attn.c_attn,mlp.c_proj"


@pytest.fixture(autouse=True)
def no_loss_plot(monkeypatch):
    monkeypatch.setattr(train_module, "plot_losses", lambda metrics, path: path.write_bytes(b"png"))


@pytest.fixture
def setup(tmp_path):
    """(data_dir, init_file): random tokens of the tiny vocabulary, trained-like weights."""
    data = random_token_data(tmp_path / "data", TINY.vocab_size, 3000, 300)
    init = tmp_path / "init.safetensors"
    save_params(init, params_of(hf_model(TINY, seed=1)), TINY)
    return data, init


def lora_config(setup, out, **overrides):
    data, init = setup
    values = dict(data=str(data), out=str(out), init=str(init), batch_size=4, context_length=16, lr=LR,
                  min_lr=MIN_LR, warmup_steps=WARMUP, decay_steps=STEPS, max_steps=STEPS, weight_decay=WD,
                  grad_clip=CLIP, dropout=0.0, eval_interval=2, eval_windows=4, sample_tokens=4, device="cpu",
                  dtype="float32", lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS, schedule="cosine")
    return make_config(values | overrides)


def quiet(cfg, resume=False, log=None):
    return train(cfg, resume=resume, progress=False, log=log or (lambda *a: None))


def adapter_tensors(run) -> dict:
    stored = load_file(str(run / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.transformer.").removesuffix(".weight"): t.t() for k, t in stored.items()}


def logged(run) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_a_lora_run_is_peft_s_lora_trained_by_torch_s_adamw(setup, tmp_path):
    """Five steps (warm-up, cosine decay, weight decay, clipping active at each) of a LoRA
    run on two targets of block 1: the adapter it saves is where torch.optim.AdamW takes
    peft's LoRA weights on transformers' GPT-2, from the same initial adapter and the same
    windows (1e-5 of each tensor's scale); the logged losses and norms are the reference's.
    The base weights file is untouched; the run directory holds the adapter in peft's format
    (peft loads it and computes our adapted logits), moments for its tensors only, and no
    model."""
    data, init = setup
    run, logs = tmp_path / "run", []
    before = (init.read_bytes(), flatten(load_params(init)[0]))
    quiet(lora_config(setup, run, lora_layers="1"), log=logs.append)

    start = before[1]
    first = init_adapter(load_params(init)[0], 4, 8.0, TARGETS.split(","), layers=[1], seed=0)
    save_adapter(tmp_path / "first", first)
    tokens, position, batches = np.fromfile(data / "train.bin", dtype="<u2"), Position(), []
    for _ in range(STEPS):
        x, y, position = next_batch(tokens, position, batch_size=4, context_length=16, stride=16, seed=0)
        batches.append((x, y))
    lrs = [lr_at(s, lr=LR, warmup_steps=WARMUP, decay_steps=STEPS, min_lr=MIN_LR) for s in range(STEPS)]
    expected, losses, norms = reference_lora_training(start, TINY, tmp_path / "first", batches, lrs=lrs,
                                                      weight_decay=WD, clip=CLIP)
    got = adapter_tensors(run)
    assert set(got) == set(expected) == set(first.tensors) and all(k.startswith("h.1.") for k in got)
    for key, t in expected.items():
        assert_rel_close(got[key], t, 1e-5, key)
    for m, loss, norm in zip(logged(run), losses, norms, strict=True):
        assert m["loss"] == pytest.approx(loss, rel=1e-5) and m["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert min(norms) > CLIP
    final_T = TINY.n_positions  # the run's final evaluation: every window of val.bin at the full context
    val = torch.as_tensor(np.fromfile(data / "val.bin", dtype="<u2").astype(np.int64))
    windows = torch.stack([val[i : i + final_T + 1] for i in range(0, len(val) - final_T, final_T)])
    tuned = peft.PeftModel.from_pretrained(hf_from(start, TINY), run).eval()
    with torch.no_grad():
        reference_val = F.cross_entropy(tuned(windows[:, :-1]).logits.flatten(0, 1), windows[:, 1:].flatten())
    final = next(m["final_val_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if "final_val_loss" in m)
    assert final == pytest.approx(float(reference_val), rel=1e-5)

    assert init.read_bytes() == before[0]
    assert not (run / "model.safetensors").exists() and (run / "loss.png").exists()
    assert set(load_file(str(run / "optimizer.safetensors"))) == {f"{m}.{k}" for m in ("exp_avg", "exp_avg_sq")
                                                                 for k in first.tensors}
    n_train = sum(t.numel() for t in first.tensors.values())
    assert f"({n_train:,} train: LoRA r=4, alpha 8 on {TARGETS} of blocks 1)" in logs[0]
    base = load_params(init)[0]
    tokens = torch.randint(TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(hf_from(flatten(base), TINY), run).eval()
    with torch.no_grad():
        assert_rel_close(forward(attach(base, load_adapter(run, base)), tokens), theirs(tokens).logits, 1e-5)


def test_a_lora_run_resumes_bit_exactly_with_dropout(setup, tmp_path):
    """Two steps, then a resume to five, with dropout on: the adapter and its moments are
    bit for bit those of five steps in one go, and best/ holds a loadable adapter."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    quiet(lora_config(setup, whole, dropout=0.2))
    quiet(lora_config(setup, halves, dropout=0.2, max_steps=2))
    quiet(resume_config(halves, {"max_steps": STEPS}), resume=True)
    a, _, fields_a = load_checkpoint(whole)
    b, _, fields_b = load_checkpoint(halves)
    assert fields_a["step"] == fields_b["step"] == STEPS
    for key in a.adapter.tensors:
        assert torch.equal(a.adapter.tensors[key], b.adapter.tensors[key]), key
        assert torch.equal(a.opt.exp_avg[key], b.opt.exp_avg[key]) and torch.equal(a.opt.exp_avg_sq[key],
                                                                                   b.opt.exp_avg_sq[key])
    assert not torch.equal(a.adapter.tensors["h.0.attn.c_attn.lora_B"], torch.zeros(4, 96))
    best, _, _ = load_checkpoint(whole / "best")
    assert best.adapter.rank == 4


def test_a_bfloat16_lora_run_tracks_float32_and_resumes_exactly(setup, tmp_path, monkeypatch):
    """bfloat16 compute (forced on, emulated where the CPU lacks it): each step's loss and
    the final validation loss stay within bfloat16's rounding of the float32 run's (2e-3;
    measured 1e-4), the adapter is float32 and computed otherwise than in float32, and a
    resume in bfloat16 is bit-exact. (The tensors themselves are no measure: Adam moves each
    by about lr per step whatever the gradient's size, so A, whose first gradients are
    nearly zero while B is, differs in sign-noise.)"""
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    f32, bf16, halves = tmp_path / "f32", tmp_path / "bf16", tmp_path / "halves"
    expected = quiet(lora_config(setup, f32, lora_targets=None))
    logs = []
    got = quiet(lora_config(setup, bf16, dtype="bfloat16", lora_targets=None), log=logs.append)
    assert "bfloat16" in logs[0]
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=2e-3)
    for a, b in zip(*(logged(r) for r in (f32, bf16)), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    quiet(lora_config(setup, halves, dtype="bfloat16", lora_targets=None, max_steps=3))
    quiet(resume_config(halves, {"max_steps": STEPS}), resume=True)
    float32, bfloat16, again = (adapter_tensors(r) for r in (f32, bf16, halves))
    assert set(bfloat16) == {f"h.{i}.attn.c_attn.lora_{s}" for i in (0, 1) for s in "AB"}  # the default target
    for key in float32:
        assert bfloat16[key].dtype == torch.float32 and torch.equal(bfloat16[key], again[key])
        assert not torch.equal(bfloat16[key], float32[key])


def test_the_base_changed_or_the_adapter_edited_is_refused_on_resume(setup, tmp_path):
    data, init = setup
    run = tmp_path / "run"
    quiet(lora_config(setup, run, max_steps=2))
    saved = init.read_bytes()
    params, _ = load_params(init)
    params["h"][0]["ln_1"]["weight"] += 1e-3
    save_params(init, params, TINY)
    with pytest.raises(UserError, match=rf"{init}: the base weights of the LoRA run {run} changed since it started"):
        quiet(resume_config(run, {"max_steps": 3}), resume=True)
    init.write_bytes(saved)
    settings = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(settings | {"lora_alpha": 2}))
    with pytest.raises(UserError, match=r"adapter_config.json: lora_alpha is 2.0, the run's lora_alpha 8.0"):
        quiet(resume_config(run, {"max_steps": 3}), resume=True)


def test_lora_rank_on_the_resume_of_a_full_run_is_one_line(setup, tmp_path, capsys):
    full = tmp_path / "full"
    quiet(lora_config(setup, full, max_steps=2, lora_rank=None, lora_alpha=None, lora_targets=None))
    assert main(["train", "--resume", str(full), "--lora_rank", "8", "--max_steps", "3"]) == 2
    assert (f"fgpt train: error: --lora_rank: {full} is a full training run, which LoRA cannot continue; train an "
            f"adapter of its weights into a new run: --init {full} --lora_rank 8 --out DIR") in capsys.readouterr().err


def test_a_lora_run_directory_given_as_weights_names_its_base(setup, tmp_path, capsys):
    data, init = setup
    run = tmp_path / "run"
    quiet(lora_config(setup, run, max_steps=2, lora_alpha=None))
    assert json.loads((run / "adapter_config.json").read_text())["lora_alpha"] == 4  # alpha = rank by default
    assert main(["eval", "--weights", str(run), "--data", str(data)]) == 2
    assert (f"{run}: holds a LoRA adapter, not a model; give its base ({init}) as --weights and this directory as "
            f"--adapter") in capsys.readouterr().err
    assert main(["eval", "--weights", str(init), "--adapter", str(run), "--data", str(data)]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "4"], "--lora_rank trains an adapter of existing weights: give them with --init"),
    (["--init", "INIT", "--lora_rank", "0"], "--lora_rank must be >= 1, got 0"),
    (["--init", "INIT", "--lora_rank", "33"], "--lora_rank: 33 is larger than the smallest targeted dimension (32)"),
    (["--init", "INIT", "--lora_rank", "4", "--lora_targets", "attn.c_attn,lm_head"],
     "--lora_targets: unknown target 'lm_head'; the targets are attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"),
    (["--init", "INIT", "--lora_rank", "4", "--lora_layers", "1-2"],
     "--lora_layers: block 2 is not in the model, whose blocks are 0..1"),
    (["--init", "INIT", "--lora_rank", "4", "--lora_layers", "1-0"],
     "--lora_layers: '1-0' is not a block index or a range like 6-11"),
    (["--init", "INIT", "--lora_rank", "4", "--lora_layers", "x"],
     "--lora_layers: 'x' is not a block index or a range like 6-11"),
    (["--init", "INIT", "--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha must be > 0, got 0.0"),
    (["--init", "INIT", "--lora_alpha", "4"], "--lora_alpha sets up a LoRA adapter: give its rank with --lora_rank"),
    (["--init", "INIT", "--lora_targets", "mlp.c_fc"],
     "--lora_targets sets up a LoRA adapter: give its rank with --lora_rank"),
])
def test_bad_lora_flags_are_one_line_naming_the_flag(setup, tmp_path, capsys, flags, message):
    data, init = setup
    flags = [str(init) if f == "INIT" else f for f in flags]
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--context_length", "16", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"fgpt train: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_fgpt_export_writes_a_run_s_adapter_that_peft_loads_on_its_own(setup, tmp_path, capsys):
    """`fgpt export --weights BASE --adapter RUN --out DIR`: peft's
    AutoPeftModelForCausalLM, given DIR/adapter alone, finds the base and computes our
    adapted logits (1e-5); the base in DIR is the base, unmerged."""
    data, init = setup
    run, out = tmp_path / "run", tmp_path / "export"
    quiet(lora_config(setup, run, max_steps=3))
    assert main(["export", "--weights", str(init), "--adapter", str(run), "--out", str(out)]) == 0
    assert f"{out}/adapter" in capsys.readouterr().out
    peft_model = peft.AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    base = load_params(init)[0]
    tokens = torch.randint(TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_rel_close(forward(attach(base, load_adapter(run, base)), tokens), peft_model(tokens).logits, 1e-5)
    exported = flatten(load_params(out)[0])
    assert all(torch.equal(t, exported[k]) for k, t in flatten(base).items())

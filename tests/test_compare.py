"""reference/diff.py and reference/hf_model.py: functional_gpt against transformers' GPT2LMHeadModel,
activation by activation and gradient by gradient, and the diff that reports it."""

import json
import sys

import pytest
import torch
from safetensors import safe_open

from functional_gpt import GPTConfig, UserError, decode, encode, flatten, init_params, preset, save_params, unflatten
from functional_gpt.cli import main
from functional_gpt.reference.diff import capture, diff_tensors, format_diff, read_dump, write_dump
from functional_gpt.reference.hf_model import capture_reference, reference_model

from conftest import hf_model

# GPT-2's vocabulary (so that any prompt encodes), everything else tiny.
SMALL = GPTConfig(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
PROMPT = "The quick brown fox jumps over the lazy dog"


def params_of(model):
    """A transformers model's weights as functional_gpt params (its own tensors)."""
    return unflatten({k.removeprefix("transformer."): v.detach() for k, v in model.state_dict().items()
                      if k != "lm_head.weight"})


def tap_names(config):
    blocks = [f"h.{i}{part}" for i in range(config.n_layer) for part in (".ln_1", ".attn", ".ln_2", ".mlp", "")]
    return ["wte", "wpe", "embed", *blocks, "ln_f", "logits"]


@pytest.mark.slow
def test_full_gpt2_on_1024_tokens_agrees_with_transformers_forward_and_backward():
    """The acceptance bar: gpt2's full config, a 1024-token input, fp32."""
    config = preset("gpt2")
    model = hf_model(config, seed=0)
    tokens = torch.randint(config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
    ours = capture(params_of(model), tokens, config, grads=True)
    theirs = capture_reference(model, tokens, grads=True)
    grads = [f"grad.{k}" for k in flatten(params_of(model))]
    assert list(ours) == list(theirs) == tap_names(config) + ["loss"] + grads

    activations = {k: ours[k] for k in tap_names(config)}
    rows = diff_tensors(activations, {k: theirs[k] for k in activations}, atol=1e-4, rtol=0.0)
    assert [r.status for r in rows] == ["OK"] * len(rows), format_diff(rows, atol=1e-4, rtol=0.0)[0]
    assert max(r.max_abs for r in rows) > 0  # two implementations, not one tensor compared with itself
    assert abs(ours["loss"].item() - theirs["loss"].item()) <= 1e-5
    for name in grads:
        error = (ours[name] - theirs[name]).norm() / theirs[name].norm()
        assert error <= 1e-4, f"{name}: relative error {error:.2e}"


def test_reference_model_built_from_params_is_transformers_with_those_weights():
    model = hf_model(SMALL, seed=1)
    tokens = torch.randint(SMALL.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    reference = reference_model(params_of(model), SMALL)
    assert reference.lm_head.weight is reference.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(reference(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    captured = capture_reference(reference, tokens, grads=True)
    assert captured["wpe"].shape == (2, 11, SMALL.n_embd)  # broadcast over the batch, as our tap records it
    assert torch.equal(captured["wpe"][1], model.transformer.wpe.weight[:11])
    assert "grad.lm_head.weight" not in captured


@pytest.fixture
def small_weights(tmp_path):
    params = params_of(hf_model(SMALL, seed=2))
    save_params(tmp_path / "m.safetensors", params, SMALL)
    return tmp_path / "m.safetensors"


def fgpt(capsys, *argv) -> tuple[int, str]:
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().out


def test_dumps_of_both_sides_agree_and_diff_exits_0(tmp_path, small_weights, capsys):
    a, b = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    assert fgpt(capsys, "dump", "--weights", small_weights, "--prompt", PROMPT, "--out", a, "--grads")[0] == 0
    assert fgpt(capsys, "dump", "--weights", small_weights, "--prompt", PROMPT, "--out", b, "--grads",
                "--reference", "transformers")[0] == 0
    with safe_open(str(b), "pt") as f:
        meta = f.metadata()
    assert meta["side"] == "transformers" and meta["prompt"] == PROMPT
    assert json.loads(meta["tokens"]) == [encode(PROMPT)]
    assert json.loads(meta["order"])[: len(tap_names(SMALL))] == tap_names(SMALL)
    assert list(read_dump(a).tensors) == json.loads(meta["order"])  # forward order, not the file's
    status, out = fgpt(capsys, "diff", a, b)
    assert status == 0, out
    assert out.strip().endswith("overall okay")
    assert "44 entries: 44 OK, 0 DIFF, 0 SHAPE, 0 MISSING" in out


def test_a_perturbed_weight_is_caught_at_the_first_layer_it_reaches(tmp_path, small_weights, capsys):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    fgpt(capsys, "dump", "--weights", small_weights, "--out", ours)
    params, config = __import__("functional_gpt").load_params(small_weights)
    params["h"][1]["mlp"]["c_fc"]["weight"][3, 5] += 0.5
    save_params(tmp_path / "perturbed.safetensors", params, config)
    fgpt(capsys, "dump", "--weights", tmp_path / "perturbed.safetensors", "--out", theirs, "--reference", "transformers")
    status, out = fgpt(capsys, "diff", ours, theirs)
    assert status == 1
    rows = {line.split()[0]: line for line in out.splitlines() if "[" in line and line.split()[0] in tap_names(SMALL)}
    assert all("[OK]" in rows[n] for n in tap_names(SMALL)[: tap_names(SMALL).index("h.1.mlp")])
    assert "[DIFF]" in rows["h.1.mlp"] and "first past tolerance" in rows["h.1.mlp"]
    assert out.count("first past tolerance") == 1
    assert out.strip().endswith("overall DIFFERENT: first at h.1.mlp [DIFF]")


def test_missing_names_and_shape_mismatches_are_reported_not_raised(tmp_path, capsys):
    tokens = torch.tensor([[1, 2, 3]])
    a = {"wte": torch.zeros(1, 3, 4), "h.0": torch.ones(1, 3, 4), "extra": torch.ones(2)}
    b = {"wte": torch.zeros(1, 3, 4), "h.0": torch.ones(1, 2, 4), "logits": torch.ones(5)}
    write_dump(tmp_path / "a.safetensors", a, side="functional_gpt", prompt="x", tokens=tokens)
    write_dump(tmp_path / "b.safetensors", b, side="transformers", prompt="y", tokens=tokens + 1)
    status, out = fgpt(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert status == 1
    assert "[SHAPE]" in next(line for line in out.splitlines() if line.startswith("h.0 "))
    assert "[1, 3, 4] vs [1, 2, 4]" in out
    assert "[MISSING]  (only in A)" in next(line for line in out.splitlines() if line.startswith("extra "))
    assert "[MISSING]  (only in B)" in next(line for line in out.splitlines() if line.startswith("logits "))
    assert "not run on the same token ids" in out
    assert "4 entries: 1 OK, 0 DIFF, 1 SHAPE, 2 MISSING" in out


def test_diff_statistics_match_their_definitions():
    a = {"x": torch.tensor([1.0, 2.0, 3.0]), "nan": torch.tensor([float("nan")])}
    b = {"x": torch.tensor([1.0, 2.5, 2.0]), "nan": torch.tensor([1.0])}
    x, nan = diff_tensors(a, b, atol=0.5, rtol=0.2)
    assert x.max_abs == 1.0 and x.max_rel == pytest.approx(1.0 / 2.5)
    assert x.cosine == pytest.approx((1 + 5 + 6) / (14**0.5 * (1 + 6.25 + 4) ** 0.5))
    assert x.status == "OK"  # 1.0 <= 0.5 + 0.2 * 2.5
    assert diff_tensors(a, b, atol=0.49, rtol=0.2)[0].status == "DIFF"
    assert nan.status == "DIFF"


def test_compare_prints_the_diff_and_both_sides_top_5(small_weights, capsys):
    status, out = fgpt(capsys, "compare", "--weights", small_weights, "--prompt", PROMPT, "--grads")
    assert status == 0, out
    assert "overall okay" in out
    model = hf_model(SMALL, seed=2)
    with torch.no_grad():
        logits = model(torch.tensor([encode(PROMPT)])).logits[0, -1]
    expected = [repr(decode([i])) for i in logits.topk(5).indices.tolist()]
    rows = out.splitlines()[-5:]
    for rank, (row, text) in enumerate(zip(rows, expected), 1):
        assert row.split()[0] == str(rank) and row.count(text) == 2, row


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_compare_passes_with_its_own_tolerances(small_weights, capsys, dtype):
    status, out = fgpt(capsys, "compare", "--weights", small_weights, "--dtype", dtype, "--grads")
    assert status == 0, out
    assert fgpt(capsys, "compare", "--weights", small_weights, "--dtype", dtype, "--atol", "0", "--rtol", "0")[0] == 1


def test_bad_inputs_are_one_line_errors(tmp_path, small_weights, capsys, monkeypatch):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert main(["diff", str(tmp_path / "junk.safetensors"), str(small_weights)]) == 2
    assert "junk.safetensors: not a readable safetensors file" in capsys.readouterr().err
    assert main(["dump", "--weights", str(small_weights), "--prompt", "", "--out", str(tmp_path / "d")]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["dump", "--weights", str(small_weights), "--prompt", "Hi", "--grads", "--out", str(tmp_path / "d")]) == 2
    assert "at least 2 tokens" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs transformers: pip install"):
        reference_model(init_params(SMALL), SMALL)

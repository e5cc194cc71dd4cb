"""Weight-only int8 (model/quantize.py) against closed forms and transformers.

The reference for the int8 model is transformers' GPT2LMHeadModel holding the float
weights the int8 values stand for (q * scale): the two differ only by the kernel's bf16
activations (about 3e-3 relative), while the quantization itself moves the logits by
far more. The weights are trained-like (random biases and layer-norm gains)."""

import json
import struct

import pytest
import torch

from functional_gpt import (GPTConfig, UserError, encode, forward, forward_cached, load_params, new_cache, quantize,
                            save_params)
from functional_gpt.cli import main
from functional_gpt.generation.decoding import generate
from functional_gpt.interp import run_with_cache
from functional_gpt.model.params import flatten, quantizable_keys, unflatten
from functional_gpt.training.step import new_state

from conftest import assert_rel_close, hf_from, hf_model, params_of

CONFIG = GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def model():
    hf = hf_model(CONFIG, seed=5)
    return hf, params_of(hf)


def dequantized(q) -> dict:
    """The float32 weights int8 params stand for: each matrix q * scale, under GPT-2's keys."""
    flat = flatten(q)
    out = {}
    for key, t in flat.items():
        if key.endswith("_scale"):
            continue
        if t.dtype == torch.int8:
            scale = flat[f"{key}_scale"].float()
            t = t.float() * (scale[:, None] if key == "wte.weight" else scale)
        out[key] = t.float()
    return out


def test_each_channel_is_symmetric_int8_with_a_bf16_scale_that_covers_its_largest_weight(model):
    _, params = model
    q = quantize(params)
    flat, qflat = flatten(params), flatten(q)
    assert set(qflat) == set(flat) | {f"{k}_scale" for k in quantizable_keys(CONFIG)}
    for key in quantizable_keys(CONFIG):
        w, values, scale = flat[key], qflat[key], qflat[f"{key}_scale"]
        assert values.dtype == torch.int8 and values.shape == w.shape and scale.dtype == torch.bfloat16
        rows = w if key == "wte.weight" else w.t()  # [outputs, inputs]
        values = values if key == "wte.weight" else values.t()
        amax = rows.abs().amax(1)
        assert (scale.float() >= amax / 127).all() and (scale.float() < amax / 127 * (1 + 2 ** -7)).all(), key
        assert int(values.abs().max()) <= 127 and int(values.abs().amax(1).min()) >= 126, key
        error = (rows - values.float() * scale.float()[:, None]).abs()
        assert (error <= scale.float()[:, None] / 2 * (1 + 1e-6)).all(), key  # rounding to the nearest step
    assert torch.equal(qflat["wpe.weight"], flat["wpe.weight"]) and torch.equal(qflat["h.0.ln_1.bias"],
                                                                                 flat["h.0.ln_1.bias"])
    assert all(torch.equal(a, b) for a, b in zip(flatten(params).values(), flat.values()))  # params unchanged


def test_the_int8_model_is_transformers_on_the_weights_it_stands_for(model):
    hf, params = model
    q = quantize(params)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_from(dequantized(q), CONFIG)(tokens).logits
        float_logits = hf(tokens).logits
    ours = forward(q, tokens)
    assert ours.dtype == torch.float32
    assert_rel_close(ours, reference, 1.5e-2, "int8 vs transformers on q * scale")
    drift = (float_logits - reference).abs().max() / reference.abs().max()
    assert drift > 2 * (ours - reference).abs().max() / reference.abs().max()  # the tolerance tells them apart


def test_cached_decoding_and_generate_run_the_int8_model(model):
    _, params = model
    q = quantize(params)
    prompt = [7, 300, 12, 99, 5]
    steps = list(generate(q, [prompt], CONFIG, max_new_tokens=12))
    tokens = prompt + [int(s[0]) for s in steps]
    full = forward(q, torch.tensor([tokens]))[0, len(prompt) - 1:-1]
    cached, cache = forward_cached(q, torch.tensor([tokens[:-1]]), new_cache(CONFIG, 1), CONFIG)
    assert_rel_close(cached[0, len(prompt) - 1:], full, 1e-2, "cached vs full forward")
    margin = full.topk(2).values
    sure = (margin[:, 0] - margin[:, 1]) > 0.05 * full.abs().max()
    assert torch.equal(full.argmax(-1)[sure], torch.tensor(tokens[len(prompt):])[sure])


def test_hooks_see_the_int8_model(model):
    """The points on the model's path record what it computes; the per-head points (q_in
    ...) take the matrices apart in float32, so they run the same model to rounding."""
    _, params = model
    q = quantize(params)
    tokens = torch.tensor([[3, 4, 5, 6]])
    logits, cache = run_with_cache(q, tokens, ["h.1.mlp.post", "h.0.attn.z"])
    assert torch.equal(logits, forward(q, tokens)) and cache["h.1.mlp.post"].dtype == torch.float32
    logits, cache = run_with_cache(q, tokens)
    assert_rel_close(logits, forward(q, tokens), 1.5e-2, "every point recorded")
    assert "h.0.attn.q_in" in cache and "h.1.attn.result" in cache


def test_quantized_params_save_and_load_as_they_are_and_name_their_scheme(model, tmp_path):
    _, params = model
    q = quantize(params)
    path = tmp_path / "int8.safetensors"
    save_params(path, q, CONFIG)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8:8 + n])
    assert header["__metadata__"]["functional_gpt.quantization"] == "int8"
    assert header["h.0.mlp.c_fc.weight"]["dtype"] == "I8" and header["h.0.mlp.c_fc.weight"]["shape"] == [64, 256]
    loaded, _ = load_params(path)
    assert all(torch.equal(a, b) for a, b in zip(flatten(loaded).values(), flatten(q).values()))
    kernel_ready = [t.t().is_contiguous() for k, t in flatten(loaded).items() if k != "wte.weight" and t.dtype == torch.int8]
    assert len(kernel_ready) == 4 * CONFIG.n_layer and all(kernel_ready)  # no copy per call
    assert flatten(loaded)["wte.weight"].is_contiguous()
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(forward(loaded, tokens), forward(q, tokens))


def _rewrite_metadata(path, change):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.mark.parametrize("change, words", [
    (lambda h: h["__metadata__"].update({"functional_gpt.quantization": "int4_awq"}),
     "metadata functional_gpt.quantization: unknown quantization scheme 'int4_awq'; known: int8"),
    (lambda h: h["__metadata__"].pop("functional_gpt.quantization"),
     "has dtype I8; parameters must be floating point (F32, F16, BF16, F64; I8 in a file whose "
     "functional_gpt.quantization metadata names its scheme)"),
    (lambda h: h.pop("h.1.attn.c_proj.weight_scale"),
     "h.1.attn.c_proj.weight holds int8 values without the weight_scale beside it"),
])
def test_a_reader_that_cannot_run_a_quantized_file_says_why_in_one_line(model, tmp_path, change, words):
    _, params = model
    path = tmp_path / "int8.safetensors"
    save_params(path, quantize(params), CONFIG)
    _rewrite_metadata(path, change)
    with pytest.raises(UserError) as e:
        load_params(path)
    assert words in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_bad_quantize_calls_and_bad_int8_params_are_one_line(model):
    _, params = model
    q = quantize(params)
    with pytest.raises(UserError, match="scheme: unknown quantization scheme 'int4'; known: int8"):
        quantize(params, "int4")
    with pytest.raises(UserError, match="quantized .*for inference only"):
        quantize(q)
    narrow = hf_model(GPTConfig(vocab_size=64, n_positions=16, n_embd=24, n_layer=1, n_head=2))
    with pytest.raises(UserError, match="n_embd=24: the int8 kernel reads 16 inputs at a time, so n_embd must be a multiple of 16"):
        quantize(params_of(narrow))
    flat = flatten(q)
    flat["h.0.attn.c_attn.weight_scale"] = flat["h.0.attn.c_attn.weight_scale"].float()
    with pytest.raises(UserError, match=r"h.0.attn.c_attn.weight_scale must be bfloat16 \[192\]"):
        forward(unflatten(flat), torch.tensor([[1]]), CONFIG)
    flat = flatten(params) | {"wpe.weight_scale": torch.ones(64, dtype=torch.bfloat16)}
    with pytest.raises(UserError, match="unexpected key wpe.weight_scale"):
        forward(unflatten(flat), torch.tensor([[1]]), CONFIG)
    flat = flatten(params) | {"h.0.mlp.c_fc.weight_scale": torch.ones(256, dtype=torch.bfloat16)}
    with pytest.raises(UserError, match="h.0.mlp.c_fc.weight_scale is beside h.0.mlp.c_fc.weight of dtype float32"):
        forward(unflatten(flat), torch.tensor([[1]]), CONFIG)


def test_training_refuses_quantized_params(model):
    _, params = model
    with pytest.raises(UserError, match="quantized .*for inference only"):
        new_state(quantize(params), 0, torch.device("cpu"))


def test_generate_and_eval_take_quantize_int8_and_it_is_the_python_quantize(tmp_path, capsys):
    """--quantize int8 runs the model `quantize` makes (the same greedy text, the same
    log-likelihood as its forward), from a float file and from an int8 one alike."""
    config = GPTConfig(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4)  # GPT-2's tokens
    params = params_of(hf_model(config, seed=6))
    floats, ints = tmp_path / "f.safetensors", tmp_path / "q.safetensors"
    save_params(floats, params, config)
    save_params(ints, quantize(params), config)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4)
    outputs = []
    for weights in (floats, ints):
        for command in (["generate", "--prompt", "the fox", "--greedy", "--max_new_tokens", "8"],
                        ["eval", "--data", str(text), "--json"]):
            assert main([command[0], "--weights", str(weights), "--quantize", "int8", *command[1:]]) == 0
            outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[2] and json.loads(outputs[1])["nats_per_token"] == json.loads(outputs[3])[
        "nats_per_token"]
    ids = encode("the quick brown fox jumps over the lazy dog " * 4)
    logits = forward(quantize(params), torch.tensor([ids]))[0, :-1].double()
    nats = float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])))
    assert abs(json.loads(outputs[1])["nats_per_token"] - nats) <= 1e-3 * nats
    assert main(["eval", "--weights", str(floats), "--data", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nats_per_token"] != json.loads(outputs[1])["nats_per_token"]


def test_what_reads_matrices_whole_reads_the_weights_the_int8_values_stand_for(model, tmp_path):
    """dequantize is q * scale; the weights by role, the lens, logit attribution, the cache's
    unembedding directions and transformers as the reference all take int8 params; export
    refuses them (transformers' GPT-2 has no int8 layout)."""
    from functional_gpt import dequantize
    from functional_gpt.interp import logit_attribution, logit_lens, weights_by_role
    from functional_gpt.reference.export import export_hf
    from functional_gpt.reference.hf_model import reference_model

    _, params = model
    q = quantize(params)
    floats = dequantize(q)
    assert all(torch.equal(floats_t, want) for floats_t, want in zip(flatten(floats).values(), dequantized(q).values()))
    assert dequantize(params) is params
    assert torch.equal(weights_by_role(q).W_Q, weights_by_role(floats).W_Q)
    assert torch.equal(weights_by_role(q).W_U, floats["wte"]["weight"].T)
    tokens = torch.tensor([3, 50, 7, 9, 11])
    assert_rel_close(logit_lens(q, tokens), logit_lens(floats, tokens), 2e-2, "logit lens")
    ours, theirs = logit_attribution(q, tokens, target=5, other=6), logit_attribution(floats, tokens, target=5, other=6)
    assert_rel_close(ours.heads, theirs.heads, 5e-2, "attribution by head")
    _, cache = run_with_cache(q, tokens[None])
    assert torch.equal(cache._directions(torch.tensor([4, 5]), "tokens"), floats["wte"]["weight"][[4, 5]])
    with torch.no_grad():
        assert_rel_close(reference_model(q)(tokens[None]).logits, forward(floats, tokens[None]), 1e-5, "reference")
    path = tmp_path / "q.safetensors"
    save_params(path, q, CONFIG)
    with pytest.raises(UserError, match="holds int8 params, which transformers' GPT-2 does not load"):
        export_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()

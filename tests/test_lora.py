"""LoRA as a pure transform (model/lora.py) and peft's format (model/lora_files.py),
against Hugging Face peft on transformers' GPT2LMHeadModel with the same weights: peft
loads our adapter and computes our logits; an adapter peft made loads into ours with the
same result; our merge equals peft's merge_and_unload. A fresh adapter changes nothing;
gradients reach A and B as autograd on the merged weights says."""

import copy
import json

import pytest
import torch

from conftest import TINY, assert_rel_close, hf_model, params_of
from functional_gpt import UserError, forward
from functional_gpt.model.lora import TARGETS, Adapter, init_adapter, merge, trainable_count, unmerge
from functional_gpt.model.lora_files import load_adapter, save_adapter

peft = pytest.importorskip("peft")

HF = hf_model(TINY, seed=7)
PARAMS = params_of(HF)
TOKENS = torch.randint(TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def trained(adapter: Adapter, seed: int = 1) -> Adapter:
    """The adapter with B drawn too (as after training), large enough to move the logits."""
    gen = torch.Generator().manual_seed(seed)
    return adapter.with_tensors({k: torch.randn(t.shape, generator=gen) * 0.3 if k.endswith("lora_B") else t
                                 for k, t in adapter.tensors.items()})


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def test_peft_loads_our_adapter_and_computes_our_logits(tmp_path):
    adapter = trained(init_adapter(PARAMS, 4, alpha=8, targets=TARGETS, layers=[1], seed=3))
    ours = forward(merge(PARAMS, adapter), TOKENS)
    save_adapter(tmp_path / "adapter", adapter)
    theirs = logits_of(peft.PeftModel.from_pretrained(copy.deepcopy(HF), tmp_path / "adapter"))
    assert_rel_close(ours, theirs, 1e-5)
    assert (ours - forward(PARAMS, TOKENS)).abs().max() > 0.1 * ours.abs().max()  # the adapter matters


@pytest.mark.parametrize("rslora", [False, True])
def test_an_adapter_peft_made_loads_into_ours_with_peft_s_result(tmp_path, rslora):
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["attn.c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                             init_lora_weights=False, use_rslora=rslora)  # B random: as if trained
    torch.manual_seed(5)
    model = peft.get_peft_model(copy.deepcopy(HF), config)
    model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft", PARAMS)
    assert sorted(adapter.weights) == sorted(f"h.{i}.{t}.weight" for i in range(TINY.n_layer)
                                             for t in ("attn.c_attn", "mlp.c_proj"))
    assert adapter.scale == (12 / 2 if rslora else 12 / 4)
    assert_rel_close(forward(merge(PARAMS, adapter), TOKENS), logits_of(model.eval()), 1e-5)


def test_our_merge_is_peft_s_merge_and_unload_and_unmerge_gives_the_base_back(tmp_path):
    adapter = trained(init_adapter(PARAMS, 8, alpha=16, targets=["attn.c_proj", "mlp.c_fc"], seed=4))
    save_adapter(tmp_path / "a", adapter)
    merged_hf = peft.PeftModel.from_pretrained(copy.deepcopy(HF), tmp_path / "a").merge_and_unload()
    merged = merge(PARAMS, adapter)
    for key, theirs in _flat(params_of(merged_hf)).items():
        assert_rel_close(_flat(merged)[key], theirs, 1e-5, key)
    assert not torch.equal(_flat(merged)["h.0.mlp.c_fc.weight"], _flat(PARAMS)["h.0.mlp.c_fc.weight"])
    for key, base in _flat(PARAMS).items():
        assert_rel_close(_flat(unmerge(merged, adapter))[key], base, 1e-6, key)


def _flat(params):
    from functional_gpt import flatten

    return flatten(params)


def test_a_fresh_adapter_leaves_the_logits_exactly_as_they_were():
    adapter = init_adapter(PARAMS, 4, targets=TARGETS, seed=0)
    assert torch.equal(forward(merge(PARAMS, adapter), TOKENS), forward(PARAMS, TOKENS))
    assert all(bool(t.abs().max() > 0) == k.endswith("lora_A") for k, t in adapter.tensors.items())
    for key, t in adapter.tensors.items():  # A as peft draws it: uniform in +-1/sqrt(n_in)
        if key.endswith("lora_A"):
            assert 0.9 < float(t.abs().max()) * t.shape[0] ** 0.5 <= 1.0, key
    n = TINY.n_embd
    per_layer = (n + 3 * n) + (n + n) + (n + 4 * n) + (4 * n + n)  # r x (n_in + n_out) for each matrix, r = 4
    assert trainable_count(adapter) == 4 * per_layer * TINY.n_layer


def test_gradients_reach_a_and_b_only_as_autograd_on_the_merged_weights_says():
    """dL/dA = scale * dL/dW @ B^T and dL/dB = scale * A^T @ dL/dW, dL/dW from autograd with
    the merged weight as a leaf; the base params get no gradient."""
    adapter = trained(init_adapter(PARAMS, 3, alpha=5, targets=["attn.c_attn"], layers=[0]))
    tensors = {k: t.clone().requires_grad_() for k, t in adapter.tensors.items()}
    loss = forward(merge(PARAMS, adapter.with_tensors(tensors)), TOKENS).logsumexp(-1).mean()
    loss.backward()
    merged = _flat(merge(PARAMS, adapter))
    W = merged["h.0.attn.c_attn.weight"].clone().requires_grad_()
    merged["h.0.attn.c_attn.weight"] = W
    from functional_gpt import unflatten, with_config

    forward(with_config(unflatten(merged), TINY), TOKENS).logsumexp(-1).mean().backward()
    A, B, s = adapter.tensors["h.0.attn.c_attn.lora_A"], adapter.tensors["h.0.attn.c_attn.lora_B"], adapter.scale
    assert_rel_close(tensors["h.0.attn.c_attn.lora_A"].grad, s * W.grad @ B.T, 1e-5)
    assert_rel_close(tensors["h.0.attn.c_attn.lora_B"].grad, s * A.T @ W.grad, 1e-5)
    assert all(t.grad is None for t in _flat(PARAMS).values())


@pytest.mark.parametrize("kwargs, words", [
    (dict(rank=0), "rank: expected an integer >= 1, got 0 (an int)"),
    (dict(rank=33), "rank: 33 is larger than the smallest targeted dimension (32)"),
    (dict(rank=2, targets=["attn.c_q"]), "targets: unknown target 'attn.c_q'; the targets are attn.c_attn, "
                                         "attn.c_proj, mlp.c_fc, mlp.c_proj"),
    (dict(rank=2, layers=[2]), "layers: expected an integer in 0..1, got 2 (an int)"),
    (dict(rank=2, alpha=0), "alpha: expected a finite number > 0, got 0 (an int)"),
])
def test_bad_adapter_settings_are_one_line_naming_them(kwargs, words):
    with pytest.raises(UserError) as e:
        init_adapter(PARAMS, **kwargs)
    assert str(e.value) == words


def test_an_adapter_for_other_shapes_is_refused_naming_the_key_and_both_shapes(tmp_path):
    other = hf_model(type(TINY)(**(TINY.to_dict() | {"n_embd": 64})), seed=1)
    peft.get_peft_model(other, peft.LoraConfig(r=2, target_modules=["attn.c_attn"], fan_in_fan_out=True)) \
        .save_pretrained(tmp_path / "wide")
    with pytest.raises(UserError) as e:
        load_adapter(tmp_path / "wide", PARAMS)
    assert str(e.value) == (f"{tmp_path / 'wide' / 'adapter_model.safetensors'}: base_model.model.transformer.h.0."
                            "attn.c_attn.lora_A.weight has shape [2, 64], but h.0.attn.c_attn.weight is [32, 96]: "
                            "expected [2, 32] at rank 2")
    settings = json.loads((tmp_path / "wide" / "adapter_config.json").read_text())
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps(settings | {"use_dora": True}))
    with pytest.raises(UserError, match="adapter_config.json: use_dora is True; only False is supported$"):
        load_adapter(tmp_path / "wide", PARAMS)


# --- on the command line: --adapter and fgpt merge, against peft on transformers' GPT-2 ---------

WIDE = type(TINY)(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)  # GPT-2's tokenizer: text I/O


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """(base weights file, adapter directory, transformers + peft with that adapter)."""
    from functional_gpt import save_params

    root = tmp_path_factory.mktemp("lora")
    hf = hf_model(WIDE, seed=8)
    params = params_of(hf)
    save_params(root / "base.safetensors", params, WIDE)
    adapter = trained(init_adapter(params, 4, alpha=8, targets=TARGETS, seed=2), seed=3)
    save_adapter(root / "adapter", adapter, base=root / "base.safetensors")
    return root / "base.safetensors", root / "adapter", peft.PeftModel.from_pretrained(hf, root / "adapter").eval()


def test_generate_with_an_adapter_writes_peft_s_greedy_text(on_disk, capsys):
    from functional_gpt.cli import main
    from functional_gpt.model.tokenizer import decode, encode

    base, adapter, model = on_disk
    prompt = encode("ROMEO: But soft")
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                dtype=torch.long), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(prompt):]
    assert main(["generate", "--weights", str(base), "--adapter", str(adapter), "--prompt", "ROMEO: But soft",
                 "--greedy", "--max_new_tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert decode(theirs.tolist()) in out
    assert main(["generate", "--weights", str(base), "--prompt", "ROMEO: But soft", "--greedy",
                 "--max_new_tokens", "12"]) == 0
    assert decode(theirs.tolist()) not in capsys.readouterr().out  # without it, other text


def test_fgpt_merge_writes_weights_transformers_loads_as_peft_s_merge(on_disk, tmp_path, capsys):
    import transformers

    from functional_gpt.cli import main

    base, adapter, model = on_disk
    assert main(["merge", "--weights", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    tokens = torch.randint(WIDE.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_rel_close(merged(tokens).logits, model(tokens).logits, 1e-5)


@pytest.mark.parametrize("base, flags, words", [
    ("base", ["generate", "--prompt", "a", "--adapter", "NOWHERE"],
     "NOWHERE/adapter_config.json: not found (an adapter directory holds adapter_config.json and "
     "adapter_model.safetensors)"),
    ("wide", ["eval", "--adapter", "OTHER"],
     "other/adapter_model.safetensors: base_model.model.transformer.h.0.attn.c_attn.lora_A.weight has shape [2, 32], "
     "but h.0.attn.c_attn.weight is [64, 192]: expected [2, 64] at rank 2"),
    ("base", ["merge", "--out", "OUT"], "the following arguments are required: --adapter"),
])
def test_a_bad_adapter_is_one_line_naming_the_file_key_and_shapes(on_disk, tmp_path, capsys, base, flags, words):
    """A missing adapter; one made for a base of n_embd 32 given to one of 64; no --adapter."""
    from functional_gpt import save_params
    from functional_gpt.cli import main

    wide = type(WIDE)(**(WIDE.to_dict() | {"n_embd": 64}))
    save_params(tmp_path / "wide.safetensors", params_of(hf_model(wide, seed=1)), wide)
    save_adapter(tmp_path / "other", init_adapter(params_of(hf_model(WIDE, seed=1)), 2))
    names = {"NOWHERE": str(tmp_path / "nowhere"), "OTHER": str(tmp_path / "other"), "OUT": str(tmp_path / "out")}
    weights = {"base": str(on_disk[0]), "wide": str(tmp_path / "wide.safetensors")}[base]
    assert main([flags[0], "--weights", weights, *[names.get(f, f) for f in flags[1:]]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words.replace("NOWHERE", names["NOWHERE"]) in err[0], err


def test_serve_with_an_adapter_answers_peft_s_greedy_tokens(on_disk):
    from test_serve import post, start_server, stop_server

    base, adapter, model = on_disk
    prompt = [464, 3290, 318, 257, 922]
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                                max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    proc, url = start_server(base, "--adapter", str(adapter), "--max_batch", "2")
    try:
        status, body = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                      "logprobs": 0})
    finally:
        log = stop_server(proc)
    from functional_gpt.model.tokenizer import decode

    assert status == 200 and body["choices"][0]["logprobs"]["tokens"] == [decode([t]) for t in theirs], (body, log)

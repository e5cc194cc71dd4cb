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
    ("adapter", ["generate", "--prompt", "a"], "adapter: holds a LoRA adapter, not a model; give its base "
                                               "(BASE) as --weights and this directory as --adapter"),
])
def test_a_bad_adapter_is_one_line_naming_the_file_key_and_shapes(on_disk, tmp_path, capsys, base, flags, words):
    """A missing adapter; one made for a base of n_embd 32 given to one of 64; no --adapter;
    an adapter given as the weights."""
    from functional_gpt import save_params
    from functional_gpt.cli import main

    wide = type(WIDE)(**(WIDE.to_dict() | {"n_embd": 64}))
    save_params(tmp_path / "wide.safetensors", params_of(hf_model(wide, seed=1)), wide)
    save_adapter(tmp_path / "other", init_adapter(params_of(hf_model(WIDE, seed=1)), 2))
    names = {"NOWHERE": str(tmp_path / "nowhere"), "OTHER": str(tmp_path / "other"), "OUT": str(tmp_path / "out")}
    weights = {"base": str(on_disk[0]), "wide": str(tmp_path / "wide.safetensors"), "adapter": str(on_disk[1])}[base]
    assert main([flags[0], "--weights", weights, *[names.get(f, f) for f in flags[1:]]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    words = words.replace("NOWHERE", names["NOWHERE"]).replace("BASE", str(on_disk[0]))
    assert len(err) == 1 and words in err[0], err


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


# --- attached, not merged: the low-rank product per call (training's path) ----------------------


def test_an_attached_adapter_computes_peft_s_logits_everywhere_the_model_runs(tmp_path):
    """forward, the KV cache's greedy decoding, hook points by head and the weights by role
    on `attach(params, adapter)` equal them on the merged weights (and forward equals peft);
    saving attached params is refused by name."""
    from functional_gpt import save_params
    from functional_gpt.generation.decoding import generate
    from functional_gpt.interp import run_with_cache, weights_by_role
    from functional_gpt.model.lora import attach

    adapter = trained(init_adapter(PARAMS, 4, alpha=8, targets=TARGETS, seed=6), seed=2)
    attached, merged = attach(PARAMS, adapter), merge(PARAMS, adapter)
    save_adapter(tmp_path / "a", adapter)
    theirs = logits_of(peft.PeftModel.from_pretrained(copy.deepcopy(HF), tmp_path / "a"))
    assert_rel_close(forward(attached, TOKENS), theirs, 1e-5)
    assert_rel_close(forward(attached, TOKENS), forward(merged, TOKENS), 1e-5)
    prompt = TOKENS[0, :5].tolist()
    assert [int(t[0]) for t in generate(attached, [prompt], TINY, max_new_tokens=10)] == \
        [int(t[0]) for t in generate(merged, [prompt], TINY, max_new_tokens=10)]
    names = ["h.1.attn.q", "h.1.attn.result", "h.0.mlp.post"]
    ours, want = run_with_cache(attached, TOKENS, names=names)[1], run_with_cache(merged, TOKENS, names=names)[1]
    for name in names:
        assert_rel_close(ours[name], want[name], 1e-5, name)
    ours, want = weights_by_role(attached), weights_by_role(merged)
    for role in ("W_Q", "W_O", "W_in", "W_out"):
        assert_rel_close(getattr(ours, role), getattr(want, role), 1e-6, role)
    with pytest.raises(UserError, match=r"^params: an attached LoRA adapter \(h.0.attn.c_attn.lora_A\); save the "
                                        r"adapter \(save_adapter\) or the merged weights \(merge\)$"):
        save_params(tmp_path / "m.safetensors", attached, TINY)


def test_attached_gradients_equal_merged_ones_and_no_weight_is_copied(monkeypatch):
    """The gradients of A and B through the per-call product equal those through the merged
    weights (1e-5); the attached forward never forms a matrix of a weight's shape."""
    from functional_gpt.model.lora import attach

    adapter = trained(init_adapter(PARAMS, 4, alpha=8, targets=TARGETS, seed=6), seed=2)
    grads = []
    for transform in (merge, attach):
        tensors = {k: t.clone().requires_grad_() for k, t in adapter.tensors.items()}
        forward(transform(PARAMS, adapter.with_tensors(tensors)), TOKENS).logsumexp(-1).mean().backward()
        grads.append({k: t.grad for k, t in tensors.items()})
    for key in grads[0]:
        assert_rel_close(grads[1][key], grads[0][key], 1e-5, key)
    shapes = set()
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: shapes.add(tuple(real(a, b).shape)) or real(a, b))
    forward(attach(PARAMS, adapter), TOKENS)
    weights = {tuple(t.shape) for t in _flat(PARAMS).values() if t.dim() == 2}
    assert shapes and not shapes & weights, shapes & weights


@pytest.mark.parametrize("extra, words", [
    ({"h.0.attn.c_attn.lora_A": torch.zeros(32, 2)}, "h.0.attn.c_attn.lora_A has no lora_B beside it"),
    ({"wte.lora_A": torch.zeros(128, 2), "wte.lora_B": torch.zeros(2, 32)},
     "unexpected key wte.lora_A: only a block's matrices (h.N.attn.c_attn, ...) carry LoRA factors"),
    ({"h.1.mlp.c_fc.lora_A": torch.zeros(32, 2), "h.1.mlp.c_fc.lora_B": torch.zeros(3, 128)},
     "h.1.mlp.c_fc.lora_B has shape [3, 128], but h.1.mlp.c_fc.weight is [32, 128]: expected [2, 128]"),
])
def test_attached_factors_that_do_not_fit_are_named(extra, words):
    from functional_gpt import unflatten, with_config

    with pytest.raises(UserError) as e:
        forward(with_config(unflatten(_flat(PARAMS) | extra), TINY), TOKENS)
    assert words in str(e.value)


# --- training an adapter: train_step on a state that carries one -------------------------------


def test_train_step_on_an_adapter_is_torch_s_adamw_on_peft_s_lora_weights(tmp_path):
    """Three steps (clipping, weight decay, the schedule's warm-up) on a state carrying an
    adapter: the adapter is where torch.optim.AdamW takes peft's LoRA weights on
    transformers' GPT-2 with the same batches (1e-5); the params are untouched and have
    no moments."""
    import torch.nn.functional as F

    from functional_gpt.training.data import Position
    from functional_gpt.training.optim import lr_at
    from functional_gpt.training.step import Batch, StepSettings, new_state, train_step

    adapter = trained(init_adapter(PARAMS, 4, alpha=8, targets=["attn.c_attn", "mlp.c_proj"], seed=6), seed=2)
    save_adapter(tmp_path / "a", adapter)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(HF), tmp_path / "a", is_trainable=True).eval()  # no dropout
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = torch.optim.AdamW(lora.values(), lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    settings = StepSettings(config=TINY, lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=10, weight_decay=0.1,
                            grad_clip=0.5, dropout=False)
    base = {k: t.clone() for k, t in _flat(PARAMS).items()}
    state = new_state(PARAMS, seed=0, device=torch.device("cpu"),
                      adapter=adapter.with_tensors({k: t.clone() for k, t in adapter.tensors.items()}))
    assert set(state.opt.exp_avg) == set(adapter.tensors)
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        t = torch.randint(TINY.vocab_size, (1, 3, 13), generator=gen)
        state, metrics = train_step(state, Batch(t[..., :-1], t[..., 1:], Position(0, 3)), settings)
        reference.zero_grad()
        loss = F.cross_entropy(model(t[0, :, :-1]).logits.flatten(0, 1), t[0, :, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.values(), 0.5)
        for group in reference.param_groups:
            group["lr"] = lr_at(step, lr=1e-2, warmup_steps=2, decay_steps=10, min_lr=1e-3)
        reference.step()
        assert abs(metrics["loss"] - loss.item()) < 1e-5 * loss.item()
    for name, p in lora.items():
        key = name.removeprefix("base_model.model.transformer.").replace(".default", "").removesuffix(".weight")
        assert_rel_close(state.adapter.tensors[key], p.detach().t(), 1e-5, key)
    assert all(torch.equal(t, base[k]) for k, t in _flat(state.params).items())


def test_compare_with_an_adapter_diffs_the_adapted_model_and_transformers_sees_peft_s_numbers(on_disk, capsys):
    """`fgpt compare --adapter`: both sides run the merged weights; transformers' top next
    token and its probability are peft's on the prompt."""
    from functional_gpt.cli import main
    from functional_gpt.model.tokenizer import decode, encode

    base, adapter, model = on_disk
    assert main(["compare", "--weights", str(base), "--adapter", str(adapter), "--prompt", "To be, or not"]) == 0
    out = capsys.readouterr().out
    assert f"weights {base} + adapter {adapter}, float32" in out
    with torch.no_grad():
        probs = model(torch.tensor([encode("To be, or not")])).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    first = next(line for line in out.splitlines() if line.startswith("   1"))
    assert repr(decode([top]))[1:-1] in first and f"{float(probs[top]):.3g}" in first.split()[-1], first

"""Every hook point against transformers' GPT2LMHeadModel on the same trained-like weights
(random biases and layer-norm gains): residual streams via output_hidden_states, patterns
via output_attentions (eager attention), the rest via forward hooks on its submodules;
patches against the same patch through transformers' hooks; taps during generation
against a full forward; and the bad-input messages."""

import math
import re

import pytest
import torch

from conftest import TINY, assert_rel_close, hf_model, params_of
from functional_gpt import UserError, forward
from functional_gpt.generation.decoding import generate
from functional_gpt.interp import hooks
from functional_gpt.interp.names import check_hook_names, from_transformer_lens, hook_names, tl_name, to_transformer_lens
from functional_gpt.interp.weights import weights_by_role

transformers = pytest.importorskip("transformers")
H, D = TINY.n_head, TINY.head_dim


def run_with_cache(params, tokens, *args, config=TINY, **kwargs):
    return hooks.run_with_cache(params, tokens, *args, config=config, **kwargs)


def run_with_hooks(params, tokens, hooks_, config=TINY):
    return hooks.run_with_hooks(params, tokens, hooks_, config)


@pytest.fixture(scope="module")
def pair():
    model = hf_model(TINY, seed=3)
    model.config._attn_implementation = "eager"  # output_attentions needs the explicit weights
    return model, params_of(model)


def _tokens(B=2, T=12, seed=0):
    return torch.randint(TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _theirs(model, tokens):
    """transformers' intermediates under our names, from hooks and its own outputs."""
    seen = {}

    def keep(name, pre=False):
        def hook(module, args, output=None):
            seen[name] = (args[0] if pre else (output[0] if isinstance(output, tuple) else output)).detach()
        return hook

    handles = [model.transformer.wte.register_forward_hook(keep("wte")),
               model.transformer.wpe.register_forward_hook(keep("wpe"))]
    for i, block in enumerate(model.transformer.h):
        handles += [
            block.ln_1.register_forward_hook(keep(f"h.{i}.ln_1")),
            block.attn.c_attn.register_forward_hook(keep(f"h.{i}.qkv")),
            block.attn.c_proj.register_forward_pre_hook(keep(f"h.{i}.attn.z", pre=True)),
            block.attn.register_forward_hook(keep(f"h.{i}.attn")),
            block.ln_2.register_forward_pre_hook(keep(f"h.{i}.resid_mid", pre=True)),
            block.ln_2.register_forward_hook(keep(f"h.{i}.ln_2")),
            block.mlp.c_fc.register_forward_hook(keep(f"h.{i}.mlp.pre")),
            block.mlp.act.register_forward_hook(keep(f"h.{i}.mlp.post")),
            block.mlp.register_forward_hook(keep(f"h.{i}.mlp")),
            block.register_forward_hook(keep(f"h.{i}")),
        ]
    try:
        with torch.no_grad():
            out = model(tokens, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    B, T = tokens.shape
    for i in range(TINY.n_layer):
        seen[f"h.{i}.resid_pre"] = out.hidden_states[i]
        seen[f"h.{i}.attn.pattern"] = out.attentions[i]
        for name, t in zip("qkv", seen.pop(f"h.{i}.qkv").split(TINY.n_embd, dim=-1)):
            seen[f"h.{i}.attn.{name}"] = t.reshape(B, T, H, D)
        seen[f"h.{i}.attn.z"] = seen[f"h.{i}.attn.z"].reshape(B, T, H, D)
    seen["wpe"] = seen["wpe"].expand(B, T, -1)
    seen["embed"], seen["ln_f"], seen["logits"] = out.hidden_states[0], out.hidden_states[-1], out.logits
    return seen


def test_every_hook_point_equals_transformers_intermediate(pair):
    model, params = pair
    tokens = _tokens()
    logits, cache = run_with_cache(params, tokens)
    theirs = _theirs(model, tokens)
    assert list(cache) == hook_names(TINY.n_layer)
    compared = [n for n in cache if n in theirs]
    assert len(compared) == 5 + 14 * TINY.n_layer, sorted(set(cache) - set(theirs))
    for name in compared:
        assert_rel_close(cache[name], theirs[name], 1e-5, name)
    assert_rel_close(logits, theirs["logits"], 1e-5, "logits")
    for i in range(TINY.n_layer):  # scores: transformers' q k^T / sqrt(D) where allowed, -inf elsewhere
        q, k = theirs[f"h.{i}.attn.q"].transpose(1, 2), theirs[f"h.{i}.attn.k"].transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        assert_rel_close(cache[f"h.{i}.attn.scores"][..., causal], scores[..., causal], 1e-5, "scores")
        assert torch.isneginf(cache[f"h.{i}.attn.scores"][..., ~causal]).all()
        # each head's contribution, summed with the projection bias, is the attention output
        total = cache[f"h.{i}.attn.result"].sum(2) + params["h"][i]["attn"]["c_proj"]["bias"]
        assert_rel_close(total, theirs[f"h.{i}.attn"], 1e-5, "sum of per-head results + bias")
    assert cache["h.0.attn"].abs().max() > 1 and cache["h.1.mlp.pre"].abs().max() > 3  # big enough to show a GELU slip


def test_untapped_and_tapped_forward_agree(pair):
    _, params = pair
    tokens = _tokens()
    logits, _ = run_with_cache(params, tokens)  # the explicit attention and per-head sums
    assert_rel_close(logits, forward(params, tokens, TINY), 1e-5)


def test_translation_to_transformer_lens_and_back_covers_every_point():
    names = hook_names(TINY.n_layer)
    translated = {n: to_transformer_lens(n) for n in names if n != "embed"}
    assert translated["h.1.attn.pattern"] == "blocks.1.attn.hook_pattern"
    assert translated["h.0"] == "blocks.0.hook_resid_post"
    assert translated["wte"] == "hook_embed" and translated["ln_f"] == "ln_final.hook_out"
    assert translated["h.1.ln_2.normalized"] == "blocks.1.ln2.hook_normalized" and \
        translated["h.0.ln_1.scale"] == "blocks.0.ln1.hook_scale" and translated["logits"] == "hook_unembed"
    assert translated["h.1.attn.q_in"] == "blocks.1.hook_q_input" and translated["h.0.mlp.in"] == "blocks.0.hook_mlp_in"
    assert len(set(translated.values())) == len(translated)
    assert all(from_transformer_lens(tl) == n for n, tl in translated.items())


def test_transformer_lens_3_names_its_layer_norms_outputs_hook_normalized():
    """TransformerLens 3's hook_normalized came after the gain and bias: our ln_1 output."""
    assert to_transformer_lens("h.2.ln_1", version=3) == "blocks.2.ln1.hook_normalized"
    assert to_transformer_lens("ln_f", version=3) == "ln_final.hook_normalized"
    assert to_transformer_lens("h.0.ln_2.scale", version=3) == "blocks.0.ln2.hook_scale"
    assert from_transformer_lens("blocks.2.ln2.hook_normalized", version=3) == "h.2.ln_2"
    assert from_transformer_lens("ln_final.hook_normalized", version=3) == "ln_f"
    assert from_transformer_lens("blocks.2.ln2.hook_normalized") == "h.2.ln_2.normalized"
    assert from_transformer_lens("blocks.1.hook_attn_out", version=3) == "h.1.attn"
    with pytest.raises(UserError, match=r"^hook 'h\.0\.ln_1\.normalized' has no TransformerLens 3 name: its "
                                        r"hook_normalized came after the gain and bias \('h\.0\.ln_1'\)$"):
        to_transformer_lens("h.0.ln_1.normalized", version=3)
    with pytest.raises(UserError, match=r"^version: expected TransformerLens's major version, 3 or 4, got 5"):
        to_transformer_lens("h.0", version=5)


@pytest.mark.parametrize("tl, ours", [
    ("blocks.0.hook_in", "h.0.resid_pre"), ("blocks.1.ln1.hook_in", "h.1.resid_pre"),
    ("blocks.1.attn.hook_in", "h.1.ln_1"), ("blocks.0.attn.k.hook_in", "h.0.ln_1"),
    ("blocks.0.attn.v.hook_out", "h.0.attn.v"), ("blocks.1.attn.o.hook_in", "h.1.attn.z"),
    ("blocks.1.attn.hook_hidden_states", "h.1.attn"), ("blocks.0.attn.o.hook_out", "h.0.attn"),
    ("blocks.0.ln2.hook_in", "h.0.resid_mid"), ("blocks.1.mlp.in.hook_in", "h.1.ln_2"),
    ("blocks.1.mlp.in.hook_out", "h.1.mlp.pre"), ("blocks.0.mlp.out.hook_in", "h.0.mlp.post"),
    ("blocks.0.mlp.hook_out", "h.0.mlp"), ("blocks.1.hook_out", "h.1"), ("blocks.1.attn.hook_q_input", "h.1.attn.q_in"),
    ("blocks.0.attn.hook_attn_in", "h.0.attn.in"), ("embed.hook_out", "wte"), ("pos_embed.hook_out", "wpe"),
    ("unembed.hook_in", "ln_f"), ("unembed.hook_out", "logits"),
])
def test_transformer_lens_4s_other_names_for_a_value_translate_to_ours(tl, ours):
    assert from_transformer_lens(tl) == ours


def test_the_final_layer_norms_input_needs_the_layer_count():
    assert from_transformer_lens("ln_final.hook_in", n_layer=3) == "h.2"
    with pytest.raises(UserError, match=r"^'ln_final\.hook_in' is the last block's output: pass n_layer= to name it$"):
        from_transformer_lens("ln_final.hook_in")


def test_patching_z_of_one_head_equals_transformers_with_the_same_patch(pair):
    model, params = pair
    tokens = _tokens()
    patch = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(5)) * 3

    def ours(z):  # z [B, T, H, D]
        z = z.clone()
        z[:, :, 2] = patch
        return z

    def theirs(module, args):  # c_proj's input [B, T, C], heads merged
        z = args[0].clone()
        z[..., 2 * D : 3 * D] = patch
        return (z,)

    handle = model.transformer.h[1].attn.c_proj.register_forward_pre_hook(theirs)
    try:
        with torch.no_grad():
            expected = model(tokens).logits
    finally:
        handle.remove()
    got = run_with_hooks(params, tokens, {"h.1.attn.z": ours})
    assert_rel_close(got, expected, 1e-5)
    assert (got - forward(params, tokens, TINY)).abs().max() > 1e-2  # the patch matters


def test_patching_resid_and_mlp_post_with_values_equals_transformers(pair):
    model, params = pair
    tokens = _tokens()
    g = torch.Generator().manual_seed(6)
    resid, post = torch.randn(2, 12, TINY.n_embd, generator=g), torch.randn(2, 12, 4 * TINY.n_embd, generator=g)
    handles = [
        model.transformer.h[1].register_forward_pre_hook(lambda m, args: (resid,) + args[1:]),
        model.transformer.h[1].mlp.act.register_forward_hook(lambda m, args, out: post),
    ]
    try:
        with torch.no_grad():
            expected = model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    got = run_with_hooks(params, tokens, [("h.1.resid_pre", resid), ("h.1.mlp.post", post)])
    assert_rel_close(got, expected, 1e-5)


def transformers_logits(model, tokens, module, hook, pre=False):
    """transformers' logits with one forward (or pre-forward) hook on `module`."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        handle.remove()


def test_several_hooks_on_one_point_run_in_the_order_given(pair):
    """x*2 then x+0.5 on h.1.mlp.post is transformers' 2x+0.5 on the same activation;
    the other order is a different model (2x+1)."""
    model, params = pair
    tokens = _tokens()
    expected = transformers_logits(model, tokens, model.transformer.h[1].mlp.act, lambda m, a, out: out * 2 + 0.5)
    double, shift = (lambda x: x * 2), (lambda x: x + 0.5)
    got = run_with_hooks(params, tokens, [("h.1.mlp.post", double), ("h.1.mlp.post", shift)])
    assert_rel_close(got, expected, 1e-5)
    other = run_with_hooks(params, tokens, [("h.1.mlp.post", shift), ("h.1.mlp.post", double)])
    assert (other - expected).abs().max() > 1e-2


def test_a_hook_on_a_point_formed_only_when_named_runs_without_recording_it(pair):
    """The pattern is formed only for the points a tap names: a hook alone names it. A
    zero pattern leaves block 0's attention its c_proj bias (transformers: c_proj of zeros)."""
    model, params = pair
    tokens = _tokens()
    expected = transformers_logits(model, tokens, model.transformer.h[0].attn.c_proj,
                                   lambda m, args: (torch.zeros_like(args[0]),), pre=True)
    got = run_with_hooks(params, tokens, {"h.0.attn.pattern": torch.zeros_like})
    assert_rel_close(got, expected, 1e-5)
    assert (got - forward(params, tokens, TINY)).abs().max() > 1e-2


def test_a_patch_of_another_dtype_takes_the_activations_dtype(pair):
    _, params = pair
    tokens = _tokens()
    resid = torch.randn(2, 12, TINY.n_embd, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = run_with_hooks(params, tokens, {"h.1.resid_pre": resid})
    assert got.dtype == torch.float32
    assert torch.equal(got, run_with_hooks(params, tokens, {"h.1.resid_pre": resid.float()}))


def test_the_gradient_at_an_activation_the_metric_does_not_reach_is_zero(pair):
    """With the last block's output patched by a constant, nothing before it reaches the
    logits: its gradient is zeros (not missing), the patched point's is not."""
    _, params = pair
    tokens = _tokens()
    constant = torch.randn(2, 12, TINY.n_embd, generator=torch.Generator().manual_seed(8))
    _, cache = run_with_cache(params, tokens, ["h.0.mlp", "h.1"], hooks={"h.1": constant},
                              grad_of=lambda logits: logits.sum())
    assert torch.equal(cache.grads["h.0.mlp"], torch.zeros(2, 12, TINY.n_embd))
    assert cache.grads["h.1"].abs().min() > 0


def test_gradients_of_cached_activations_equal_autograd(pair):
    _, params = pair
    tokens = _tokens()
    metric = lambda logits: logits[:, -1, 3].sum() - logits[:, -1, 5].sum()
    _, cache = run_with_cache(params, tokens, ["h.1.resid_pre", "h.1.attn.pattern"], grad_of=metric)
    # the reference: patch h.1.resid_pre with a leaf and differentiate the metric
    x = cache["h.1.resid_pre"].clone().requires_grad_()
    (grad,) = torch.autograd.grad(metric(run_with_hooks(params, tokens, {"h.1.resid_pre": x})), [x])
    assert_rel_close(cache.grads["h.1.resid_pre"], grad, 1e-5)
    assert cache.grads["h.1.attn.pattern"].shape == (2, H, 12, 12) and cache.grads["h.1.attn.pattern"].abs().max() > 0


def test_taps_during_cached_generation_equal_a_full_forward_across_the_context_boundary():
    """50 new tokens with n_positions 16: the window restarts (re-prefill) several times;
    every call's recorded activations equal forward over the same window at those positions."""
    config = TINY.__class__(**{**TINY.__dict__, "n_positions": 16})
    params = params_of(hf_model(config, seed=4))
    calls = []
    names = ["h.0.attn.pattern", "h.1.attn.z", "h.1.mlp.post", "h.1", "ln_f"]

    def tap(name, x):
        if name in names:
            calls[-1][name] = x.clone()
        if name == "wte":
            calls.append({"n": x.shape[1]})
        return x

    tap.names = frozenset(names)
    prompt = [1, 2, 3, 4, 5]
    out = list(generate(params, [prompt], config, max_new_tokens=50, tap=tap))
    seq = prompt + [int(t[0]) for t in out]
    assert len(seq) == 55
    end = ctx = restarts = 0  # replay the window rule: tokens of seq fed so far, tokens in the cache
    for i, call in enumerate(calls):
        if i == 0:  # the prompt's prefill
            end = ctx = call["n"]
        elif call["n"] > 1:  # the window restarts: its tokens so far are prefilled afresh
            ctx, restarts = call["n"], restarts + 1
        else:  # a decode step feeds the next token
            end, ctx = end + 1, ctx + 1
        _, full = run_with_cache(params, torch.tensor([seq[end - ctx : end]]), names, config=config)
        for name in names:
            got = call[name]
            want = full[name][:, :, -got.shape[2]:] if name.endswith("pattern") else full[name][:, -got.shape[1]:]
            assert_rel_close(got, want, 1e-5, f"{name}, call {i}")
    assert end == 54 and restarts >= 4


def test_bad_hook_names_and_patch_shapes_are_one_line_errors(pair):
    _, params = pair
    with pytest.raises(UserError, match=r"unknown hook name 'h.0.attn.patern'; nearest valid names: h.0.attn.pattern"):
        check_hook_names(["h.0.attn.patern"], TINY.n_layer)
    with pytest.raises(UserError, match=r"unknown hook name 'h.9.mlp'"):
        run_with_hooks(params, _tokens(), {"h.9.mlp": torch.zeros(1)})
    with pytest.raises(UserError, match=r"hook h.1.attn.z: the patch has shape \[2, 12, 32\], the activation "
                                        r"\[2, 12, 4, 8\]"):
        run_with_hooks(params, _tokens(), {"h.1.attn.z": torch.zeros(2, 12, 32)})


@pytest.mark.parametrize("call, message", [
    (lambda: to_transformer_lens("embed"), r"^hook 'embed' has no TransformerLens name; blocks\.0\.hook_resid_pre "
                                           r"holds the same value$"),
    (lambda: to_transformer_lens("h.0.bogus"), r"^unknown hook name 'h\.0\.bogus'$"),
    (lambda: to_transformer_lens(3), r"^name: expected a non-empty string, got 3 \(an int\)$"),
    (lambda: from_transformer_lens("blocks.0.bogus"), r"^'blocks\.0\.bogus' is not a TransformerLens hook point of "
                                                      r"GPT-2 that functional_gpt has$"),
    (lambda: from_transformer_lens(None), r"^name: expected a non-empty string, got None$"),
])
def test_names_without_a_translation_are_named(call, message):
    with pytest.raises(UserError, match=message):
        call()


def test_the_documented_names_table_is_the_code_table():
    """docs/09's table lists every block point with its TransformerLens name and shape."""
    from pathlib import Path

    from functional_gpt.interp.names import BLOCK_POINTS

    page = (Path(__file__).parents[1] / "docs" / "09-looking-inside.md").read_text()
    rows = [line.split("|")[1:4] for line in page.splitlines() if line.startswith("| `h.i")]
    documented = {}
    for ours, tl, shape in rows:
        names = [n.strip("` ") for n in ours.split(",")]
        tls = [n.strip("` ") for n in tl.split(",")]
        for n, t in zip(names, tls):
            full = n if n.startswith("h.i") else names[0].rsplit(".", 1)[0] + n
            prefix = tls[0].rsplit(".", 1)[0] + "." if "." in tls[0] and "." not in t else ""
            documented[full.removeprefix("h.i").removeprefix(".")] = (prefix + t, shape.strip())
    assert documented == {ours: (tl, shape) for ours, tl, shape in BLOCK_POINTS}


@pytest.mark.parametrize("call, message", [
    (lambda p: hooks.run_with_hooks(p, _tokens(), {"h.0.mlp": 3}),
     r"^hook h\.0\.mlp: expected a tensor or a function of the activation, got 3 \(an int\)$"),
    (lambda p: hooks.run_with_hooks(p, _tokens(), "h.0.mlp"),
     r"^hooks: expected \{name: hook\} or a list of \(name, hook\) pairs, got 'h\.0\.mlp' \(a str\)$"),
    (lambda p: hooks.run_with_cache(p, _tokens(), 5), r"^names: expected a hook name, a list of them or a function of a name, got 5"),
    (lambda p: hooks.run_with_cache(p, _tokens(), ["h.0"], grad_of="loss"),
     r"^grad_of: expected a function of the logits returning a scalar, got 'loss' \(a str\)$"),
])
def test_hooks_and_names_of_the_wrong_kind_are_named(call, message):
    params = params_of(hf_model(TINY))
    with pytest.raises(UserError, match=message):
        call(params)


def test_a_name_missing_from_a_cache_says_how_many_it_holds_and_the_nearest(pair):
    _, params = pair
    cache = run_with_cache(params, _tokens(), ["h.0.attn.pattern", "h.0.attn.scores", "h.1.attn.pattern"])[1]
    assert list(cache) == ["h.0.attn.scores", "h.0.attn.pattern", "h.1.attn.pattern"] and len(cache) == 3
    assert "h.0.attn.pattern" in cache and "h.0.mlp" not in cache and cache["h.1.attn.pattern"].shape == (2, H, 12, 12)
    with pytest.raises(UserError, match=r"^'h\.0\.attn\.patern' is not in this cache \(it holds 3 names; nearest: "
                                        r"h\.0\.attn\.pattern, h\.1\.attn\.pattern, h\.0\.attn\.scores\)$"):
        cache["h.0.attn.patern"]
    with pytest.raises(UserError, match=r"^'embed' is not in this cache \(it holds 3 names\)$"):
        cache["embed"]
    with pytest.raises(UserError, match=r"^cache key 7 \(an int\): expected a hook name or \(name, layer\[, "
                                        r"layer_type\]\)$"):
        cache[7]


@pytest.mark.parametrize("names, message", [
    (["h.0.mlp", "h.0.attn.patern"], "unknown hook name 'h.0.attn.patern'; nearest valid names: h.0.attn.pattern, "
                                     "h.1.attn.pattern, h.0.attn.in (57 points: functional_gpt.interp.hook_names(2))"),
    (["zzzz"], "unknown hook name 'zzzz'; nearest valid names: wte, wpe, embed (57 points: "
               "functional_gpt.interp.hook_names(2))"),
    (["blocks.1.attn.hook_patern"], "unknown hook name 'blocks.1.attn.hook_patern'; nearest valid names: "
                                    "blocks.1.attn.hook_pattern, blocks.0.attn.hook_pattern, blocks.1.attn.hook_z "
                                    "(57 points: functional_gpt.interp.hook_names(2))"),
    (["blocks.5.attn.hook_pattern"], "unknown hook name 'blocks.5.attn.hook_pattern'; nearest valid names: "
                                     "blocks.1.attn.hook_pattern, blocks.0.attn.hook_pattern, blocks.1.attn.hook_attn_scores "
                                     "(57 points: functional_gpt.interp.hook_names(2))"),
    (["h.0", 3], "hook name 3 (an int): expected a string such as 'h.0.attn.pattern'"),
])
def test_an_unknown_hook_name_is_named_with_the_nearest_three_and_the_count(names, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        check_hook_names(names, 2)


@pytest.mark.parametrize("names, want", [
    ("h.0.mlp", ["h.0.mlp"]), (("h.1", "wte"), ["h.1", "wte"]), ({"ln_f"}, ["ln_f"]), ([], []),
])
def test_hook_names_come_back_as_a_list(names, want):
    assert check_hook_names(names, 2) == want


@pytest.mark.parametrize("call, message", [
    (lambda p: hook_names(0), "n_layer: expected an integer in 1..4096, got 0 (an int)"),
    (lambda p: hook_names(4097), "n_layer: expected an integer in 1..4096, got 4097 (an int)"),
    (lambda p: run_with_cache(p, _tokens(), ["h.0"], grad_of=lambda logits: 3.0),
     "grad_of must return a scalar tensor, got 3.0 (a float)"),
    (lambda p: run_with_cache(p, _tokens(), ["h.0"], grad_of=lambda logits: logits[0, 0]),
     "grad_of must return a scalar tensor, got a float32 tensor [128]"),
    (lambda p: run_with_hooks(p, _tokens(), {"h.0.mlp": lambda x: 3}),
     "hook h.0.mlp: expected a tensor [2, 12, 32] or a function returning one, got 3 (an int)"),
    (lambda p: run_with_hooks(p, _tokens(), [("h.0.mlp",)]), "hooks: expected {name: hook} or a list of (name, hook) pairs"),
    (lambda p: run_with_hooks(p, _tokens(), [["h.0.mlp", lambda x: x]]),
     "hooks: expected {name: hook} or a list of (name, hook) pairs"),
])
def test_bad_layer_counts_metrics_hook_results_and_pairs_are_named(pair, call, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        call(pair[1])


def test_every_layer_count_up_to_the_limit_has_its_names():
    assert hook_names(1)[-5:] == ["h.0", "ln_f.scale", "ln_f.normalized", "ln_f", "logits"] and \
        hook_names(4096)[-5] == "h.4095"


def test_a_hook_returning_none_only_looks_and_the_cache_is_detached(pair):
    """A hook that returns None (TransformerLens's looking hooks do) leaves the activation
    as it was; what the cache holds never carries a graph, even from a patch that does."""
    _, params = pair
    seen = []
    logits = run_with_hooks(params, _tokens(), {"h.0.mlp": lambda x: seen.append(x.shape)})
    assert seen == [(2, 12, 32)] and torch.equal(logits, forward(params, _tokens(), TINY))
    patch = torch.randn(2, 12, 32, requires_grad=True)
    _, cache = run_with_cache(params, _tokens(), ["h.0.mlp"], hooks={"h.0.mlp": patch})
    assert torch.equal(cache["h.0.mlp"], patch.detach()) and not cache["h.0.mlp"].requires_grad


def test_a_cache_offers_at_most_three_near_names_and_grads_only_when_asked(pair):
    _, params = pair
    names = ["h.0.attn.pattern", "h.1.attn.pattern", "h.0.attn.scores", "h.1.attn.scores", "h.0.attn.z"]
    _, cache = run_with_cache(params, _tokens(), names)
    assert cache.grads == {}
    with pytest.raises(UserError, match=r"^'h\.0\.pat' is not in this cache \(it holds 5 names; nearest: "
                                        r"h\.0\.attn\.z, h\.0\.attn\.pattern, h\.0\.attn\.scores\)$"):
        cache["h.0.pat"]
    with pytest.raises(UserError, match=r"^'attn\.pattern' is not in this cache \(it holds 5 names; nearest: "
                                        r"h\.1\.attn\.pattern, h\.0\.attn\.pattern\)$"):
        cache["attn.pattern"]


def test_ln_1_hooks_still_count_when_the_heads_inputs_are_tapped(pair):
    """Recording the per-head inputs changes nothing: ln_1's patch reaches every head as
    before, and a patch of one head's query input reaches that head alone."""
    _, params = pair
    tokens = _tokens()
    shift = lambda x: x + torch.linspace(-1, 1, x.shape[-1])
    alone = run_with_cache(params, tokens, ["h.1.attn.q"], hooks={"h.1.ln_1": shift})
    both = run_with_cache(params, tokens, ["h.1.attn.q", "h.1.attn.q_in", "h.1.attn.in"], hooks={"h.1.ln_1": shift})
    assert_rel_close(both[0], alone[0], 1e-5, "logits")
    assert_rel_close(both[1]["h.1.attn.q"], alone[1]["h.1.attn.q"], 1e-5, "queries")

    def edit_head(x):
        x = x.clone()
        x[:, :, 2] += torch.linspace(-1, 1, x.shape[-1])
        return x

    plain = run_with_cache(params, tokens, ["h.1.attn.q", "h.1.attn.k"])[1]
    patched = run_with_cache(params, tokens, ["h.1.attn.q", "h.1.attn.k"], hooks={"h.1.attn.q_in": edit_head})[1]
    changed = (patched["h.1.attn.q"] - plain["h.1.attn.q"]).abs().amax(dim=(0, 1, 3))
    assert changed[2] > 1e-2 and changed[[0, 1, 3]].max() < 1e-5, changed
    assert_rel_close(patched["h.1.attn.k"], plain["h.1.attn.k"], 1e-6, "keys")


def test_bad_cache_method_arguments_are_one_line_naming_them(pair):
    """The cache methods' refusals (their values are checked against TransformerLens in
    test_transformer_lens.py); `in` answers False for what is no key, never raises."""
    _, params = pair
    tokens = _tokens(B=1)
    cache = run_with_cache(params, tokens)[1]
    cases = [
        (lambda: cache.stack_activation(3), "activation_name: expected a non-empty string, got 3 (an int)"),
        (lambda: cache.stack_activation("pattern", 0), "stack_activation: layer 0 has no block before it to stack"),
        (lambda: cache.stack_activation("nope"), "activation_name 'nope': "),
        (lambda: cache.stack_head_results(0, incl_remainder=True),
         "stack_head_results: layer 0 has no block before it to take a remainder of"),
        (lambda: cache.stack_head_results(incl_remainder="yes"), "incl_remainder: expected True or False"),
        (lambda: cache.stack_head_results(apply_ln=1), "apply_ln: expected True or False"),
        (lambda: cache.remove_batch_dim().remove_batch_dim(), "this cache has no batch axis left to remove"),
        (lambda: tl_name(3), "name: expected a non-empty string, got 3 (an int)"),
        (lambda: tl_name("scale", 1, 5), "layer_type: expected a non-empty string, got 5 (an int)"),
        (lambda: run_with_cache(params, tokens, lambda name: "yes"),
         "names: a names filter must return True or False, got 'yes' (a str) for 'wte'"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value).startswith(words), (words, str(e.value))
    assert "h.0.attn.pattern" in cache and ("pattern", 1) in cache and "blocks.0.hook_resid_pre" in cache
    assert 3 not in cache and ("pattern", 99) not in cache and "h.9.attn" not in cache and ("pattern", "x") not in cache


def test_removing_the_batch_axis_takes_it_off_the_gradients_too(pair):
    _, params = pair
    tokens = _tokens(B=1)
    cache = run_with_cache(params, tokens, ["h.0.attn.z", "h.1.mlp.post"], grad_of=lambda logits: logits[0, -1, 3])[1]
    single = cache.remove_batch_dim()
    assert single.has_batch_dim is False and set(single.grads) == set(cache.grads) == {"h.0.attn.z", "h.1.mlp.post"}
    for name, g in cache.grads.items():
        assert g.shape[0] == 1 and torch.equal(single.grads[name], g[0]) and single.grads[name].abs().max() > 0
        assert torch.equal(single[name], cache[name][0])


def test_each_block_point_stacks_by_our_name_and_by_transformer_lens_s(pair):
    _, params = pair
    cache = run_with_cache(params, _tokens())[1]
    for ours, theirs in (("attn.pattern", ("pattern",)), ("ln_1.scale", ("scale", -1, "ln1")), ("mlp.post", ("post",)),
                         ("resid_pre", ("resid_pre",))):
        stacked = cache.stack_activation(ours)
        assert torch.equal(stacked, torch.stack([cache[f"h.{i}.{ours}"] for i in range(TINY.n_layer)]))
        assert torch.equal(stacked, cache.stack_activation(theirs[0], *theirs[1:]))


def test_head_results_stack_empty_before_block_0_in_the_shape_of_the_positions_asked(pair):
    _, params = pair
    cache = run_with_cache(params, _tokens(B=2, T=12))[1]
    assert cache.stack_head_results(0).shape == (0, 2, 12, TINY.n_embd)
    assert cache.stack_head_results(0, pos_slice=(1, 4)).shape == (0, 2, 3, TINY.n_embd)
    assert cache.stack_head_results(0, pos_slice=-1).shape == (0, 2, TINY.n_embd)
    stack = cache.stack_head_results(1)
    assert isinstance(stack, torch.Tensor) and stack.shape == (H, 2, 12, TINY.n_embd)


def test_weights_by_role_take_a_config_for_params_that_carry_none(pair):
    _, params = pair
    plain = {k: v for k, v in params.items()}  # a nested dict without its config
    with pytest.raises(UserError, match="do not carry their config"):
        weights_by_role(plain)
    assert torch.equal(weights_by_role(plain, TINY).W_Q, weights_by_role(params).W_Q)


def test_transformer_lens_3_names_read_back_and_the_last_block_s_alias_checks_n_layer():
    for ours in ("h.1.ln_1", "h.0.ln_2", "ln_f", "h.1.attn.pattern", "h.0"):
        assert from_transformer_lens(to_transformer_lens(ours, version=3), version=3) == ours
    assert from_transformer_lens("ln_final.hook_normalized", version=3) == "ln_f"
    assert from_transformer_lens("ln_final.hook_normalized") == "ln_f.normalized"  # TransformerLens 4's
    assert from_transformer_lens("ln_final.hook_in", n_layer=1) == "h.0"
    for bad in (0, 4097, "2"):
        with pytest.raises(UserError) as e:
            from_transformer_lens("ln_final.hook_in", n_layer=bad)
        assert str(e.value).startswith("n_layer: expected an integer in 1..4096"), str(e.value)


def test_head_results_from_z_without_the_batch_axis_are_the_batched_ones(pair):
    _, params = pair
    tokens = _tokens(B=1)
    cache = run_with_cache(params, tokens, lambda name: "result" not in name)[1]
    assert "h.0.attn.result" not in cache
    batched, single = cache.stack_head_results(), cache.remove_batch_dim().stack_head_results()
    assert single.shape == (TINY.n_layer * H, 12, TINY.n_embd)
    assert_rel_close(single, batched[:, 0], 1e-6, "batchless head results")

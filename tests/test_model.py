"""The model against transformers' GPT2LMHeadModel with the same weights, plus properties
that hold by construction: causality, purity, cache equivalence."""

import pytest
import torch

from conftest import TINY, assert_rel_close, hf_model, params_of
from functional_gpt.interp.names import hook_names
from functional_gpt import (
    PRESETS,
    UserError,
    config_of,
    decode_step,
    flatten,
    forward,
    forward_cached,
    init_params,
    load_params,
    new_cache,
    recorder,
)


def _tokens(config, B, T, seed=0):
    return torch.randint(config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained():
    """Tiny params with trained-like weights (random biases and layer-norm gains, conftest):
    a cache path that swaps ln_1 for ln_2 or drops a bias differs from forward on these,
    not on GPT-2's init (biases 0, gains 1). Nothing here modifies them."""
    return params_of(hf_model(TINY, seed=3))


def test_tiny_logits_match_transformers(hf_tiny):
    model, path = hf_tiny
    params, config = load_params(path)
    tokens = _tokens(config, 3, config.n_positions)
    with torch.no_grad():
        expected = model(tokens).logits
    assert_rel_close(forward(params, tokens, config), expected, 1e-5)


@pytest.mark.slow
def test_gpt2_124m_logits_match_transformers_on_1024_tokens(tmp_path):
    model = hf_model(PRESETS["gpt2"], seed=1)
    model.save_pretrained(tmp_path)
    del model  # load what is on disk, then rebuild the reference from the same file
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    params, config = load_params(tmp_path)
    assert config == PRESETS["gpt2"]
    tokens = _tokens(config, 1, 1024)
    with torch.inference_mode():
        expected = reference(tokens).logits
        got = forward(params, tokens)  # the config the loaded params carry
    assert got.shape == (1, 1024, 50257)
    assert (got - expected).abs().max().item() < 1e-4


def test_captured_activations_match_hidden_states(hf_tiny):
    model, path = hf_tiny
    params, config = load_params(path)
    tokens = _tokens(config, 2, 20)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    store = {}
    forward(params, tokens, config, tap=recorder(store))
    # hidden_states[i] is the input to block i; the last one comes after ln_f.
    names = ["embed"] + [f"h.{i}" for i in range(config.n_layer - 1)] + ["ln_f"]
    assert len(hidden) == len(names)
    for name, expected in zip(names, hidden):
        assert_rel_close(store[name], expected, 1e-5, name)
    assert list(store) == hook_names(config.n_layer)  # a tap without `names` sees every point, in order


def test_patching_tap_equals_ablating_the_reference(hf_tiny):
    """A tap that returns zeros for h.1.mlp equals transformers with that MLP's output zeroed."""
    model, path = hf_tiny
    params, config = load_params(path)
    tokens = _tokens(config, 2, 16)
    hook = model.transformer.h[1].mlp.register_forward_hook(lambda m, i, out: torch.zeros_like(out))
    with torch.no_grad():
        expected = model(tokens).logits
    hook.remove()
    zero_mlp = lambda name, x: torch.zeros_like(x) if name == "h.1.mlp" else x
    got = forward(params, tokens, config, tap=zero_mlp)
    assert_rel_close(got, expected, 1e-5)
    assert (forward(params, tokens, config) - expected).abs().max().item() > 1e-3


def test_causal_gradient_of_early_loss_ignores_later_tokens(trained, tiny_config):
    tokens = _tokens(tiny_config, 1, 12)
    store = {}

    def keep_grad(name, x):  # swap the embeddings for a leaf whose gradient we can read
        if name == "embed":
            x = store[name] = x.detach().requires_grad_()
        return x

    logits = forward(trained, tokens, tiny_config, tap=keep_grad)
    logits[0, 5].logsumexp(-1).backward()
    grad = store["embed"].grad[0].abs().sum(-1)
    assert (grad[:6] > 0).all()
    assert (grad[6:] == 0).all()


def test_forward_does_not_modify_params(tiny_params, tiny_config):
    before = {k: v.clone() for k, v in flatten(tiny_params).items()}
    forward(tiny_params, _tokens(tiny_config, 2, 8), tiny_config, dropout=True)
    assert all(torch.equal(before[k], v) for k, v in flatten(tiny_params).items())


def test_dropout_only_when_asked(tiny_params, tiny_config):
    tokens = _tokens(tiny_config, 2, 8)
    plain = forward(tiny_params, tokens, tiny_config)
    assert torch.equal(plain, forward(tiny_params, tokens, tiny_config))
    torch.manual_seed(3)
    dropped = forward(tiny_params, tokens, tiny_config, dropout=True)
    torch.manual_seed(3)
    assert torch.equal(dropped, forward(tiny_params, tokens, tiny_config, dropout=True))
    assert not torch.allclose(dropped, plain)


def test_config_read_off_shapes_uses_head_size_64():
    config = PRESETS["cpu-small"]
    params = init_params(config)
    inferred = config_of(params)
    assert inferred.n_head == inferred.n_embd // 64 == config.n_head
    assert (inferred.n_embd, inferred.n_layer, inferred.n_positions) == (config.n_embd, config.n_layer, config.n_positions)
    tokens = _tokens(config, 1, 10)
    assert torch.equal(forward(params, tokens), forward(params, tokens, config))


def test_cached_chunks_equal_one_forward(trained, tiny_config):
    tokens = _tokens(tiny_config, 2, 30)
    full = forward(trained, tokens, tiny_config)
    cache = new_cache(tiny_config, 2)
    pieces = []
    for a, b in [(0, 11), (11, 17), (17, 18), (18, 30)]:  # prefill, a multi-token chunk, single steps
        logits, cache = forward_cached(trained, tokens[:, a:b], cache, tiny_config)
        pieces.append(logits)
    assert cache.lengths == (30, 30)
    assert_rel_close(torch.cat(pieces, 1), full, 1e-5)


def test_decode_steps_equal_one_forward(trained, tiny_config):
    tokens = _tokens(tiny_config, 2, tiny_config.n_positions)
    full = forward(trained, tokens, tiny_config)
    logits, cache = forward_cached(trained, tokens[:, :12], new_cache(tiny_config, 2), tiny_config)
    steps = [logits[:, -1]]
    for t in range(12, tokens.shape[1]):
        step, cache = decode_step(trained, tokens[:, t], cache, tiny_config)
        steps.append(step)
    assert cache.lengths == (tokens.shape[1],) * 2
    assert_rel_close(torch.stack(steps, 1), full[:, 11:], 1e-5)
    with pytest.raises(UserError, match="33 tokens is longer than the context of 32 positions"):
        decode_step(trained, tokens[:, 0], cache, tiny_config)


def test_rows_of_different_lengths_decode_what_each_computes_alone(trained, tiny_config):
    """Prompts of 5 and 9 tokens share a prefill (the short one right-padded, counts) and
    then 7 decode steps, each row at its own position."""
    short, long = _tokens(tiny_config, 1, 12, seed=1), _tokens(tiny_config, 1, 16, seed=2)
    batch = torch.cat([torch.cat([short[:, :5], torch.zeros(1, 4, dtype=torch.long)], 1), long[:, :9]])
    logits, cache = forward_cached(trained, batch, new_cache(tiny_config, 2), tiny_config, counts=(5, 9))
    assert cache.lengths == (5, 9)
    assert_rel_close(logits[0, :5], forward(trained, short[:, :5], tiny_config)[0], 1e-5, "short prefill")
    assert_rel_close(logits[1], forward(trained, long[:, :9], tiny_config)[0], 1e-5, "long prefill")
    for t in range(7):
        step, cache = decode_step(trained, torch.stack([short[0, 5 + t], long[0, 9 + t]]), cache, tiny_config)
        for row, seq in enumerate((short[:, : 6 + t], long[:, : 10 + t])):
            assert_rel_close(step[row], forward(trained, seq, tiny_config)[0, -1], 1e-5, f"row {row}, step {t}")
    assert cache.lengths == (12, 16)


def test_last_only_takes_each_rows_last_real_token(trained, tiny_config):
    tokens = _tokens(tiny_config, 2, 9)
    full = forward(trained, tokens, tiny_config)
    last, cache = forward_cached(trained, tokens, new_cache(tiny_config, 2), tiny_config, counts=(4, 9),
                                 last_only=True)
    assert last.shape == (2, 1, tiny_config.vocab_size) and cache.lengths == (4, 9)
    assert_rel_close(last[:, 0], full[[0, 1], [3, 8]], 1e-5)


def test_one_row_of_a_cache_prefills_alone_into_the_shared_buffers(trained, tiny_config):
    """cache.row(b) is a one-row cache over row b's buffers: what it computes lands in the
    batch's cache, and the others' rows are untouched."""
    tokens = _tokens(tiny_config, 2, 10)
    _, cache = forward_cached(trained, tokens[:, :6], new_cache(tiny_config, 2), tiny_config)
    before = cache.k[:, 0].clone()
    _, row = forward_cached(trained, tokens[1:, 6:10], cache.row(1), tiny_config)
    cache = cache.with_length(1, row.lengths[0])
    assert cache.lengths == (6, 10) and torch.equal(cache.k[:, 0], before)
    step, _ = decode_step(trained, tokens[:, 0], cache, tiny_config)
    expected = forward(trained, torch.cat([tokens[1:], tokens[1:, :1]], 1), tiny_config)[0, -1]
    assert_rel_close(step[1], expected, 1e-5)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.tensor([[1, 2, 128]]), "token id 128 is out of range for vocab_size=128"),
        (torch.tensor([[-1, 2]]), "token id -1 is out of range"),
        (torch.zeros(1, 33, dtype=torch.long), "33 tokens is longer than the context of 32 positions"),
        (torch.zeros(1, 4), r"tokens: expected an integer tensor \[B, T\], got a float32 tensor \[1, 4\]"),
        (torch.zeros(4, dtype=torch.long), r"tokens: expected an integer tensor \[B, T\], got an int64 tensor \[4\]"),
        (torch.zeros(1, 4, dtype=torch.int16), r"tokens: expected an int64 tensor \[B, T\], got an int16 tensor"),
    ],
)
def test_bad_tokens_are_named(tiny_params, tiny_config, tokens, message):
    with pytest.raises(UserError, match=message):
        forward(tiny_params, tokens, tiny_config)


def test_cache_overflow_is_named(tiny_params, tiny_config):
    cache = new_cache(tiny_config, 1, max_len=8)
    _, cache = forward_cached(tiny_params, torch.zeros(1, 6, dtype=torch.long), cache, tiny_config)
    with pytest.raises(UserError, match="9 tokens is longer than the context of 8 positions"):
        forward_cached(tiny_params, torch.zeros(1, 3, dtype=torch.long), cache, tiny_config)

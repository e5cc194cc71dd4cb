"""Each layer of layers.py against an independent reference: the closed form (layer norm,
linear, GELU, dropout at p = 1) or transformers' own GPT-2 sub-modules, captured with hooks
inside a full GPT2LMHeadModel forward on trained-like weights (so the causal mask is
transformers' own), and the KV-cache write and read against the uncached computation.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, assert_rel_close, hf_model, params_of
from functional_gpt.interp.names import BLOCK_POINTS
from functional_gpt.model.layers import (
    CacheRows,
    attention_probs,
    dropout,
    feed_forward,
    gelu,
    layer_norm,
    linear,
    qkv_heads,
    self_attention,
    transformer_block,
)

pytest.importorskip("transformers")

C, H = TINY.n_embd, TINY.n_head
D = C // H


@pytest.fixture(scope="module")
def reference():
    """(block 0's params, what transformers computed in and around block 0 for 2 x 12
    tokens): the block's input and output, ln_1's and ln_2's outputs, the attention and
    MLP outputs, and the attention weights (eager attention, output_attentions)."""
    model = hf_model(TINY, seed=4)
    model.set_attn_implementation("eager")
    block = model.transformer.h[0]
    seen = {}
    hooks = [
        block.ln_1.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_1", o)),
        block.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o[0])),
        block.ln_2.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_2", o)),
        block.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o)),
    ]
    tokens = torch.randint(TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True, output_attentions=True)
    for h in hooks:
        h.remove()
    seen.update(x=out.hidden_states[0], block=out.hidden_states[1], probs=out.attentions[0])
    return params_of(model)["h"][0], seen


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- elementwise and linear layers, in closed form ----------------------------------------


def test_layer_norm_is_the_closed_form_with_gpt2s_epsilon():
    """(x - mean) / sqrt(var + 1e-5) * weight + bias over the last dim, with the biased
    variance; inputs of std 0.01 make the default epsilon 1e-5 a tenth of the variance."""
    x = 0.01 * _randn(3, 4, C)
    w, b = 1 + _randn(C, seed=1), _randn(C, seed=2)

    def expected(eps):
        mean = x.double().mean(-1, keepdim=True)
        var = ((x.double() - mean) ** 2).mean(-1, keepdim=True)
        return ((x.double() - mean) / torch.sqrt(var + eps) * w.double() + b.double()).float()

    assert_rel_close(layer_norm(x, w, b), expected(1e-5), 1e-5, "default eps")
    assert_rel_close(layer_norm(x, w, b, eps=1e-3), expected(1e-3), 1e-5, "eps=1e-3")


@pytest.mark.parametrize("shape", [(C,), (5, C), (2, 3, C), (2, 2, 3, C)])
def test_linear_is_x_at_weight_plus_bias_over_any_leading_shape(shape):
    """weight is [n_in, n_out] as GPT-2 stores it (never transposed); leading dims kept."""
    x, w, b = _randn(*shape), _randn(C, 3 * C, seed=1), _randn(3 * C, seed=2)
    y = linear(x, w, b)
    assert y.shape == (*shape[:-1], 3 * C)
    expected = (x.double().reshape(-1, C) @ w.double() + b.double()).reshape(*shape[:-1], 3 * C)
    assert_rel_close(y, expected.float(), 1e-6)


def test_gelu_is_gpt2s_tanh_approximation():
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), not the exact erf form, which
    differs by up to ~5e-4 over [-4, 4]."""
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    got = gelu(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got - F.gelu(x)).abs().max() > 1e-4


def test_dropout_zero_is_the_input_itself_and_one_zeroes_everything():
    x = _randn(4, 8)
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_dropout_keeps_each_value_with_probability_1_minus_p_scaled_up():
    """Survivors are x / (1 - p); about a fraction p is zeroed (20 000 draws, 5 sigma)."""
    x = torch.ones(20_000)
    torch.manual_seed(0)
    y = dropout(x, 0.25)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 5 * math.sqrt(0.25 * 0.75 / 20_000)


# --- attention and MLP against transformers' sub-modules ----------------------------------


def test_feed_forward_matches_transformers_mlp(reference):
    p, seen = reference
    assert_rel_close(feed_forward(seen["ln_2"], **p["mlp"]), seen["mlp"], 1e-5)


def test_qkv_heads_split_q_k_v_then_heads(reference):
    """q, k, v are the thirds of c_attn's output in that order, each split into heads of
    C / n_head consecutive features: [B, n_head, T, head_dim]."""
    p, seen = reference
    x = seen["ln_1"]
    q, k, v = qkv_heads(x, p["attn"]["c_attn"], H)
    full = x @ p["attn"]["c_attn"]["weight"] + p["attn"]["c_attn"]["bias"]  # [B, T, 3C]
    B, T, _ = x.shape
    for i, got in enumerate((q, k, v)):
        expected = full[..., i * C : (i + 1) * C].reshape(B, T, H, D).transpose(1, 2)
        assert got.shape == (B, H, T, D)
        assert_rel_close(got, expected, 1e-6, "qkv"[i])


def test_self_attention_matches_transformers_attention(reference):
    p, seen = reference
    assert_rel_close(self_attention(seen["ln_1"], **p["attn"], n_head=H), seen["attn"], 1e-5)


def test_attention_probs_match_transformers_attention_weights(reference):
    p, seen = reference
    probs = attention_probs(seen["ln_1"], p["attn"]["c_attn"], n_head=H)
    assert_rel_close(probs, seen["probs"], 1e-5)
    later = torch.ones(probs.shape[-1], probs.shape[-1], dtype=torch.bool).triu(1)
    assert (probs[..., later] == 0).all()  # exactly: no weight on a later token
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_transformer_block_matches_transformers_block_and_taps_each_stage(reference):
    """Output equals GPT2Block's; a plain tap sees every point in order (hooks.BLOCK_POINTS),
    ln_1, attn, ln_2, mlp each equal to transformers' own intermediate."""
    p, seen = reference
    taps = []

    def tap(name, x):
        taps.append((name, x))
        return x

    y = transformer_block(seen["x"], **p, n_head=H, eps=TINY.layer_norm_epsilon, name="h.0", tap=tap)
    assert_rel_close(y, seen["block"], 1e-5, "block")
    assert [n for n, _ in taps] == [f"h.0.{n}" if n else "h.0" for n, _, _ in BLOCK_POINTS]
    for name, x in taps:
        if name.removeprefix("h.0.") in ("ln_1", "attn", "ln_2", "mlp"):
            assert_rel_close(x, seen[name.removeprefix("h.0.")], 1e-5, name)


def test_transformer_block_uses_the_epsilon_it_is_given(reference):
    """eps reaches both layer norms: eps 1e-5 vs 1e-1 on trained-like weights differ."""
    p, seen = reference
    kw = dict(n_head=H, name="h.0", tap=lambda n, x: x)
    assert not torch.allclose(transformer_block(seen["x"], **p, eps=1e-1, **kw), seen["block"], rtol=1e-3, atol=0)


def test_block_dropout_rates_reach_the_attention_and_the_residual_branches(reference):
    """At rate 1 dropout zeroes what it is applied to, so the outputs have closed forms:
    resid_pdrop 1 zeroes both branches (the block returns its input), attn_pdrop 1 zeroes
    the attention weights (the attention returns c_proj's bias at every position)."""
    p, seen = reference
    x, kw = seen["x"], dict(n_head=H, eps=TINY.layer_norm_epsilon, name="h.0", tap=lambda n, x: x)
    assert torch.equal(transformer_block(x, **p, **kw, resid_pdrop=1.0), x)
    a = self_attention(seen["ln_1"], **p["attn"], n_head=H, attn_pdrop=1.0)
    assert_rel_close(a, p["attn"]["c_proj"]["bias"].expand_as(a), 1e-6, "attn_pdrop=1")
    assert torch.equal(self_attention(seen["ln_1"], **p["attn"], n_head=H, resid_pdrop=1.0), torch.zeros_like(x))
    assert torch.equal(feed_forward(seen["ln_2"], **p["mlp"], resid_pdrop=1.0), torch.zeros_like(x))
    torch.manual_seed(0)
    dropped = transformer_block(x, **p, **kw, attn_pdrop=1.0)
    expected = x + p["attn"]["c_proj"]["bias"]
    expected = expected + feed_forward(layer_norm(expected, **p["ln_2"], eps=TINY.layer_norm_epsilon), **p["mlp"])
    assert_rel_close(dropped, expected, 1e-5, "block with attn_pdrop=1")


# --- the KV cache: written in place, read back as the uncached attention -----------------


def test_cached_attention_in_chunks_equals_the_uncached_attention(reference):
    """Chunks of 5, 1, 2 and 4 queries after what the buffers hold give the uncached rows,
    and leave this call's keys and values at positions start .. start + T - 1."""
    p, seen = reference
    x = seen["ln_1"]
    B, T, _ = x.shape
    S = T + 3  # room beyond the sequence: untouched
    k_buf, v_buf = torch.full((B, H, S, D), 7.0), torch.full((B, H, S, D), 7.0)
    pieces, start = [], 0
    for n in (5, 1, 2, 4):
        rows = CacheRows(k_buf, v_buf, (start,) * B, (n,) * B)
        pieces.append(self_attention(x[:, start : start + n], **p["attn"], n_head=H, cache=rows))
        start += n
    assert_rel_close(torch.cat(pieces, 1), seen["attn"], 1e-5, "chunks")
    _, k, v = qkv_heads(x, p["attn"]["c_attn"], H)
    assert_rel_close(k_buf[:, :, :T], k, 1e-6, "keys")
    assert_rel_close(v_buf[:, :, :T], v, 1e-6, "values")
    assert torch.equal(k_buf[:, :, T:], torch.full_like(k_buf[:, :, T:], 7.0))


def test_rows_at_different_points_attend_each_on_its_own(reference):
    """Row 0 holds 3 positions and gets 4 new tokens, row 1 holds 6 and gets 2 real ones
    (and 2 of right padding): each row's real outputs are its uncached attention at
    those positions and what the row computes alone; padding's attention output is zero
    and padding is never written to the buffers."""
    p, seen = reference
    x = seen["ln_1"]
    B, T, _ = x.shape
    k_buf, v_buf = torch.full((B, H, T, D), 7.0), torch.full((B, H, T, D), 7.0)
    self_attention(x[:, :6], **p["attn"], n_head=H, cache=CacheRows(k_buf, v_buf, (0,) * B, (6,) * B))
    chunk = torch.stack([x[0, 3:7], torch.cat([x[1, 6:8], torch.zeros(2, x.shape[-1])])])
    got = self_attention(chunk, **p["attn"], n_head=H, cache=CacheRows(k_buf, v_buf, (3, 6), (4, 2)))
    # self_attention projects through c_proj, so a zero attention output at padding shows as its bias
    assert_rel_close(got[0], seen["attn"][0, 3:7], 1e-5, "row 0")
    assert_rel_close(got[1, :2], seen["attn"][1, 6:8], 1e-5, "row 1")
    assert torch.equal(got[1, 2:], p["attn"]["c_proj"]["bias"].expand(2, -1))
    assert torch.equal(k_buf[1, :, 8:], torch.full_like(k_buf[1, :, 8:], 7.0))
    alone_k, alone_v = k_buf[1:].clone(), v_buf[1:].clone()
    alone_k[:, :, 6:], alone_v[:, :, 6:] = 7.0, 7.0
    alone = self_attention(chunk[1:, :2], **p["attn"], n_head=H, cache=CacheRows(alone_k, alone_v, (6,), (2,)))
    assert_rel_close(alone[0], got[1, :2], 1e-6, "row 1 alone")


def test_two_queries_from_the_start_are_causal_without_a_mask(reference):
    p, seen = reference
    got = self_attention(seen["ln_1"][:, :2], **p["attn"], n_head=H)
    assert_rel_close(got, seen["attn"][:, :2], 1e-5)


def test_the_block_one_token_at_a_time_equals_the_block_at_each_position(reference):
    """One token at a time against the buffers (a decode step's shape), the block gives
    transformers' block output at that position."""
    p, seen = reference
    x, eps = seen["x"], TINY.layer_norm_epsilon
    B, T, _ = x.shape
    k_buf, v_buf = torch.zeros(B, H, T, D), torch.zeros(B, H, T, D)
    rows = [transformer_block(x[:, t : t + 1], **p, n_head=H, eps=eps, name="h.0", tap=lambda n, y: y,
                              cache=CacheRows(k_buf, v_buf, (t,) * B, (1,) * B)) for t in range(T)]
    assert_rel_close(torch.cat(rows, 1), seen["block"], 1e-5, "one token at a time")


def test_attention_probs_build_their_mask_on_the_inputs_device():
    """On the meta device (a stand-in for a GPU: shapes only, and no mixing with CPU
    tensors) the causal mask must come from x's device, or masked_fill refuses it."""
    x = torch.empty(2, 5, C, device="meta")
    c_attn = {"weight": torch.empty(C, 3 * C, device="meta"), "bias": torch.empty(3 * C, device="meta")}
    probs = attention_probs(x, c_attn, n_head=H)
    assert probs.device.type == "meta" and probs.shape == (2, H, 5, 5)

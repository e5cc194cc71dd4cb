"""GPT-2's layers as pure functions. Parameters arrive under their checkpoint names, so a
params subtree unpacks straight in: `linear(x, **p["attn"]["c_attn"])`.

Nothing here mutates its inputs, except the KV-cache buffers that `self_attention`
is explicitly handed to fill.
"""

import math

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps: float = 1e-5):  # [..., C] -> [..., C]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x, weight, bias):  # [..., n_in] -> [..., n_out]; weight [n_in, n_out] as GPT-2 stores it
    y = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
    return y.view(*x.shape[:-1], weight.shape[-1])


def gelu(x):  # GPT-2's tanh approximation ("gelu_new")
    return F.gelu(x, approximate="tanh")


def dropout(x, p: float):
    """Dropout at rate p drawing from torch's global RNG; p == 0 returns x itself."""
    return F.dropout(x, p, training=True) if p > 0 else x


def feed_forward(x, c_fc, c_proj, *, resid_pdrop: float = 0.0):  # [B, T, C] -> [B, T, C]
    return dropout(linear(gelu(linear(x, **c_fc)), **c_proj), resid_pdrop)


def qkv_heads(x, c_attn, n_head: int):
    """x: [B, T, C] -> q, k, v, each [B, n_head, T, C // n_head] (views of one projection)."""
    B, T, C = x.shape
    return linear(x, **c_attn).view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4).unbind(0)


def self_attention(
    x,
    c_attn,
    c_proj,
    *,
    n_head: int,
    mask=None,
    kv_buffers=None,
    start: int = 0,
    attn_pdrop: float = 0.0,
    resid_pdrop: float = 0.0,
):
    """Causal multi-head self-attention with GPT-2's fused q, k, v projection.

    x: [B, T, C] -> [B, T, C].
    mask: bool [B, 1, T, start + T] (True = may attend), or None for plain causal
      attention, which is only right when the queries and keys start together
      (start == 0) or there is one query (T == 1).
    kv_buffers: (k, v), each [B, n_head, S_max, head_dim], or None. Given, this call's
      keys and values are written into them in place at positions start .. start+T-1,
      and the queries attend to positions 0 .. start+T-1 of the buffers.
    """
    q, k, v = qkv_heads(x, c_attn, n_head)
    T = q.shape[2]
    if kv_buffers is not None:
        k_buf, v_buf = kv_buffers
        k_buf[:, :, start : start + T] = k
        v_buf[:, :, start : start + T] = v
        k, v = k_buf[:, :, : start + T], v_buf[:, :, : start + T]
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=attn_pdrop, is_causal=mask is None and T > 1
    )
    y = y.transpose(1, 2).reshape(x.shape)
    return dropout(linear(y, **c_proj), resid_pdrop)


def attention_probs(x, c_attn, *, n_head: int):
    """The attention weights self_attention applies (no cache, causal, no dropout).

    x: the block's ln_1 output [B, T, C] -> probabilities [B, n_head, T, T], rows sum to 1.
    Computed explicitly since the fused kernel never materialises them.
    """
    q, k, _ = qkv_heads(x, c_attn, n_head)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def transformer_block(
    x,
    ln_1,
    attn,
    ln_2,
    mlp,
    *,
    n_head: int,
    eps: float,
    name: str,
    tap,
    mask=None,
    kv_buffers=None,
    start: int = 0,
    attn_pdrop: float = 0.0,
    resid_pdrop: float = 0.0,
):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)). x: [B, T, C] -> [B, T, C].

    `tap(f"{name}.ln_1", ...)` and so on see each intermediate; see model.forward.
    """
    a = self_attention(
        tap(f"{name}.ln_1", layer_norm(x, **ln_1, eps=eps)),
        **attn,
        n_head=n_head,
        mask=mask,
        kv_buffers=kv_buffers,
        start=start,
        attn_pdrop=attn_pdrop,
        resid_pdrop=resid_pdrop,
    )
    x = x + tap(f"{name}.attn", a)
    m = feed_forward(tap(f"{name}.ln_2", layer_norm(x, **ln_2, eps=eps)), **mlp, resid_pdrop=resid_pdrop)
    return tap(name, x + tap(f"{name}.mlp", m))


def decode_block(x, ln_1, attn, ln_2, mlp, *, k_buf, v_buf, pos: int, mask=None, n_head: int, eps: float):
    """`transformer_block` for one new token per row, against a KV cache (no taps, no
    dropout): the lean form generation runs once per token.

    x: [B, C] -> [B, C]. k_buf, v_buf: [B, n_head, S_max, head_dim]; this token's key and
    value are written in place at `pos`, and it attends to positions 0 .. pos.
    mask: bool [B, 1, 1, pos + 1] (True = may attend), or None for all of them.
    """
    B, C = x.shape
    q, k, v = linear(layer_norm(x, **ln_1, eps=eps), **attn["c_attn"]).view(B, 3, n_head, C // n_head).unbind(1)
    k_buf[:, :, pos] = k
    v_buf[:, :, pos] = v
    y = F.scaled_dot_product_attention(q[:, :, None], k_buf[:, :, : pos + 1], v_buf[:, :, : pos + 1], attn_mask=mask)
    x = linear(y.view(B, C), **attn["c_proj"]).add_(x)
    return linear(gelu(linear(layer_norm(x, **ln_2, eps=eps), **mlp["c_fc"])), **mlp["c_proj"]).add_(x)

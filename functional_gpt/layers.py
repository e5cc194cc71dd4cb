"""GPT-2's layers as pure functions. Parameters arrive under their checkpoint names, so a
params subtree unpacks straight in: `linear(x, **p["attn"]["c_attn"])`.

Nothing here mutates its inputs, except the KV-cache buffers that `self_attention`
is explicitly handed to fill.
"""

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CacheRows:
    """Where a cached attention call reads and writes, row by row.

    k, v: one layer's buffers [B, n_head, S_max, head_dim]. starts: per row, the positions
    already filled (this call's first token sits at position starts[b]). counts: per row,
    how many of this call's T tokens are real (0: the row takes no part); the rest are
    right padding, which is never written to the buffers and gets a zero attention output.
    """

    k: torch.Tensor
    v: torch.Tensor
    starts: tuple[int, ...]
    counts: tuple[int, ...]


def self_attention(
    x,
    c_attn,
    c_proj,
    *,
    n_head: int,
    cache: CacheRows | None = None,
    attn_pdrop: float = 0.0,
    resid_pdrop: float = 0.0,
):
    """Causal multi-head self-attention with GPT-2's fused q, k, v projection.

    x: [B, T, C] -> [B, T, C]. Without a cache, position t attends to 0 .. t. With one,
    row b's real tokens are written into the buffers at starts[b] .. starts[b]+counts[b]-1
    and attend to positions 0 .. their own of that row. Each row attends on its own, with
    exactly the shapes it would have alone, so a row's result never depends on the other
    rows of the batch (a batched kernel splits its work by batch size).
    """
    q, k, v = qkv_heads(x, c_attn, n_head)
    if cache is None:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_pdrop, is_causal=q.shape[2] > 1)
    else:
        y = _cached_attention(q, k, v, cache)
    y = y.transpose(1, 2).reshape(x.shape)
    return dropout(linear(y, **c_proj), resid_pdrop)


def _cached_attention(q, k, v, cache: CacheRows):  # [B, H, T, D] each -> [B, H, T, D]
    T = q.shape[2]
    rows = []
    for b, (start, n) in enumerate(zip(cache.starts, cache.counts)):
        if n == 0:  # a row not taking part (an idle row of a server's batch)
            rows.append(q.new_zeros((1,) + q.shape[1:]))
            continue
        end = start + n
        cache.k[b, :, start:end] = k[b, :, :n]
        cache.v[b, :, start:end] = v[b, :, :n]
        mask = None
        if start > 0 and n > 1:  # causal, aligned to the end of the keys
            mask = torch.arange(end, device=q.device) <= torch.arange(start, end, device=q.device)[:, None]
        y = F.scaled_dot_product_attention(q[b : b + 1, :, :n], cache.k[b : b + 1, :, :end],
                                           cache.v[b : b + 1, :, :end], attn_mask=mask,
                                           is_causal=start == 0 and n > 1)
        rows.append(y if n == T else F.pad(y, (0, 0, 0, T - n)))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


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
    cache: CacheRows | None = None,
    attn_pdrop: float = 0.0,
    resid_pdrop: float = 0.0,
):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)). x: [B, T, C] -> [B, T, C].

    The one block of every path: training and `forward` (no cache), a prefill and a decode
    step (a cache, see self_attention). `tap(f"{name}.ln_1", ...)` and so on see each
    intermediate; see model.forward.
    """
    a = self_attention(
        tap(f"{name}.ln_1", layer_norm(x, **ln_1, eps=eps)),
        **attn,
        n_head=n_head,
        cache=cache,
        attn_pdrop=attn_pdrop,
        resid_pdrop=resid_pdrop,
    )
    x = x + tap(f"{name}.attn", a)
    m = feed_forward(tap(f"{name}.ln_2", layer_norm(x, **ln_2, eps=eps)), **mlp, resid_pdrop=resid_pdrop)
    return tap(name, x + tap(f"{name}.mlp", m))

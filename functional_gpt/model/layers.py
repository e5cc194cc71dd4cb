"""GPT-2's layers as pure functions. Parameters arrive under their checkpoint names, so a
params subtree unpacks straight in: `linear(x, **p["attn"]["c_attn"])`.

Nothing here mutates its inputs, except the KV-cache buffers that `self_attention`
is explicitly handed to fill.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .taps import no_tap, wants


def layer_norm(x, weight, bias, eps: float = 1e-5):  # [..., C] -> [..., C]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def tapped_layer_norm(x, weight, bias, *, eps: float, name: str, tap):
    """layer_norm with its output tapped as `name` [..., C]; when the tap asks for them
    (taps.wants), also f"{name}.scale" [..., 1], sqrt(var + eps), and f"{name}.normalized"
    [..., C], (x - mean) / scale before the gain and bias (TransformerLens 4's points),
    formed explicitly: equal to the fused kernel to rounding."""
    if wants(tap, f"{name}.scale") or wants(tap, f"{name}.normalized"):
        centred = x - x.mean(-1, keepdim=True)
        scale = tap(f"{name}.scale", (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt())
        return tap(name, tap(f"{name}.normalized", centred / scale) * weight + bias)
    return tap(name, layer_norm(x, weight, bias, eps))


def linear(x, weight, bias, weight_scale=None, lora_A=None, lora_B=None):
    """x [..., n_in] -> x @ weight + bias [..., n_out]; weight [n_in, n_out] as GPT-2 stores
    it, or int8 with its scale [n_out] beside it (quantize.py); plus (x @ lora_A) @ lora_B
    when an adapter is attached (lora.attach: A [n_in, r], B [r, n_out] already scaled),
    the low-rank product per call instead of a merged copy of the weight."""
    if weight_scale is not None:
        y = torch.add(bias, int8_matmul(x, weight, weight_scale))  # the bias's dtype: one op, no cast
    else:
        y = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])
    if lora_A is not None:
        y = y + (x @ lora_A) @ lora_B
    return y


def int8_matmul(x, weight, scale):
    """x [..., K] float, weight int8 [K, N] (the transpose of a contiguous [N, K]: the
    layout the kernel reads), scale bf16 [N] -> x @ (weight * scale) [..., N] in bf16.

    aten._weight_int8pack_mm reads one byte per weight and accumulates in float32; its
    vectorized x86 paths (AVX2, AVX-512) take bf16 activations only (float32 ones run a
    scalar loop ten times slower), so x goes in as bf16 and the result comes out in bf16.
    They read 16 inputs at a time from 32-byte aligned rows: K % 16 == 0 (quantize checks)."""
    K, N = weight.shape
    a = x.reshape(-1, K).to(torch.bfloat16)
    if a.data_ptr() % 32 or not a.is_contiguous():  # a view of bf16 x: copy to a fresh (aligned) buffer
        a = a.clone(memory_format=torch.contiguous_format)
    y = torch.ops.aten._weight_int8pack_mm(a, weight.t().contiguous(), scale)
    return y.view(*x.shape[:-1], N)


def float_weight(p: dict, dtype: torch.dtype) -> torch.Tensor:
    """A linear's weight as a `dtype` matrix [n_in, n_out]: int8 values times their scales
    when quantized. For the taps that take a matrix apart by head (off the hot path)."""
    weight = p["weight"].to(dtype) * p["weight_scale"].to(dtype) if "weight_scale" in p else p["weight"]
    return weight + p["lora_A"] @ p["lora_B"] if "lora_A" in p else weight


def gelu(x):  # GPT-2's tanh approximation ("gelu_new")
    return F.gelu(x, approximate="tanh")


def dropout(x, p: float):
    """Dropout at rate p drawing from torch's global RNG; p == 0 returns x itself."""
    return F.dropout(x, p, training=True) if p > 0 else x


def feed_forward(x, c_fc, c_proj, *, resid_pdrop: float = 0.0, name: str = "mlp", tap=no_tap):
    """GPT-2's MLP: x [B, T, C] -> [B, T, C], through 4C hidden units; `tap` sees
    f"{name}.pre" (before the GELU) and f"{name}.post" (after), each [B, T, 4C]."""
    pre = tap(f"{name}.pre", linear(x, **c_fc))
    return dropout(linear(tap(f"{name}.post", gelu(pre)), **c_proj), resid_pdrop)


def qkv_heads(x, c_attn, n_head: int):
    """x: [B, T, C] -> q, k, v, each [B, n_head, T, C // n_head] (views of one projection)."""
    B, T, C = x.shape
    return linear(x, **c_attn).view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4).unbind(0)


def qkv_per_head(inputs, c_attn, n_head: int):
    """Each head's own inputs -> its q, k, v: inputs (q_in, k_in, v_in), each [B, T, H, C]
    (normalized) -> q, k, v, each [B, H, T, D], through head h's columns of c_attn."""
    C = inputs[0].shape[-1]
    weight = float_weight(c_attn, inputs[0].dtype).view(C, 3, n_head, C // n_head)
    bias = c_attn["bias"].view(3, n_head, 1, C // n_head)
    return tuple(torch.einsum("bthc,chd->bhtd", t, weight[:, j]) + bias[j] for j, t in enumerate(inputs))


@dataclass(frozen=True)
class CacheRows:
    """Where a cached attention call reads and writes, row by row.

    k, v: one layer's buffers [B, n_head, S_max, head_dim]. starts: per row, the positions
    already filled (this call's first token sits at position starts[b]). counts: per row,
    how many of this call's T tokens are real (0: the row takes no part); the rest are
    right padding, which is never written to the buffers and gets a zero attention output.
    index: per row of this call, the buffer row it reads and writes (None: row b is buffer
    row b), so a call can run only some of the buffers' rows.
    """

    k: torch.Tensor
    v: torch.Tensor
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    index: tuple[int, ...] | None = None

    def buffer_row(self, b: int) -> int:
        return b if self.index is None else self.index[b]


def self_attention(
    x,
    c_attn,
    c_proj,
    *,
    n_head: int,
    cache: CacheRows | None = None,
    attn_pdrop: float = 0.0,
    resid_pdrop: float = 0.0,
    name: str = "attn",
    tap=no_tap,
    head_inputs=None,
):
    """Causal multi-head self-attention with GPT-2's fused q, k, v projection.

    x: [B, T, C] -> [B, T, C]. head_inputs: None, or each head's own normalized query, key
    and value inputs (three [B, T, H, C]) to project instead of x (see
    transformer_block). Without a cache, position t attends to 0 .. t. With one,
    row b's real tokens are written into the buffers at starts[b] .. starts[b]+counts[b]-1
    and attend to positions 0 .. their own of that row. Each row attends on its own, with
    exactly the shapes it would have alone, so a row's result never depends on the other
    rows of the batch (a batched kernel splits its work by batch size).

    `tap` sees f"{name}.q", ".k", ".v" [B, T, H, D] (this call's tokens), ".z" (each
    head's output, [B, T, H, D]); and when it asks for them (taps.wants), ".scores" and
    ".pattern" [B, H, T, S] (S: the keys attended, masked scores -inf, masked weights 0)
    and ".result" [B, T, H, C] (each head's z through its rows of c_proj: the output is
    their sum over heads plus c_proj's bias). Asking for scores or pattern switches the
    fused kernel for explicit matrix products, equal to rounding.
    """
    q, k, v = (tap(f"{name}.{n}", t.transpose(1, 2)).transpose(1, 2)  # tapped as [B, T, H, D]
               for n, t in zip("qkv", qkv_heads(x, c_attn, n_head) if head_inputs is None else
                               qkv_per_head(head_inputs, c_attn, n_head)))
    if wants(tap, f"{name}.scores") or wants(tap, f"{name}.pattern"):
        keys, values, allowed = (k, v, _causal(q.shape[2], q.device)) if cache is None else _cached_keys(k, v, cache)
        y = _explicit_attention(q, keys, values, allowed, attn_pdrop, name, tap)
    elif cache is None:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_pdrop, is_causal=q.shape[2] > 1)
    else:
        y = _cached_attention(q, k, v, cache)
    z = tap(f"{name}.z", y.transpose(1, 2))
    if wants(tap, f"{name}.result"):
        B, T, H, D = z.shape
        result = tap(f"{name}.result", torch.einsum("bthd,hdc->bthc", z, float_weight(c_proj, z.dtype).view(H, D, -1)))
        out = result.sum(2) + c_proj["bias"]
    else:
        out = linear(z.reshape(x.shape), **c_proj)
    return dropout(out, resid_pdrop)


def _cached_attention(q, k, v, cache: CacheRows):  # [B, H, T, D] each -> [B, H, T, D]
    T = q.shape[2]
    _write_rows(k, v, cache)
    rows = []
    for b, (start, n) in enumerate(zip(cache.starts, cache.counts)):
        if n == 0:  # a row not taking part (an idle row of a server's batch)
            rows.append(q.new_zeros((1,) + q.shape[1:]))
            continue
        end, r = start + n, cache.buffer_row(b)
        mask = None
        if start > 0 and n > 1:  # causal, aligned to the end of the keys
            mask = torch.arange(end, device=q.device) <= torch.arange(start, end, device=q.device)[:, None]
        y = F.scaled_dot_product_attention(q[b : b + 1, :, :n], cache.k[r : r + 1, :, :end],
                                           cache.v[r : r + 1, :, :end], attn_mask=mask,
                                           is_causal=start == 0 and n > 1)
        rows.append(y if n == T else F.pad(y, (0, 0, 0, T - n)))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _write_rows(k, v, cache: CacheRows) -> None:  # row b's real keys and values into its buffers
    for b, (start, n) in enumerate(zip(cache.starts, cache.counts)):
        cache.k[cache.buffer_row(b), :, start : start + n] = k[b, :, :n]
        cache.v[cache.buffer_row(b), :, start : start + n] = v[b, :, :n]


def _causal(T: int, device) -> torch.Tensor:  # bool [1, 1, T, T]: query t may see keys 0 .. t
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]


def _cached_keys(k, v, cache: CacheRows):
    """Write each row's real keys and values into the cache -> (keys, values [B, H, S, D]
    with S the longest row's end, allowed bool [B, 1, T, S]: row b's query i sees keys
    0 .. starts[b]+i, and a padding query (i >= counts[b]) sees none)."""
    _write_rows(k, v, cache)
    S = max(s + n for s, n in zip(cache.starts, cache.counts))
    device = k.device
    starts = torch.tensor(cache.starts, device=device)[:, None, None]
    counts = torch.tensor(cache.counts, device=device)[:, None, None]
    i = torch.arange(k.shape[2], device=device)[:, None]
    allowed = (torch.arange(S, device=device) <= starts + i) & (i < counts)
    keys, values = cache.k[:, :, :S], cache.v[:, :, :S]
    if cache.index is not None:
        keys, values = keys[list(cache.index)], values[list(cache.index)]
    return keys, values, allowed[:, None]


def _explicit_attention(q, k, v, allowed, attn_pdrop: float, name: str, tap):
    """softmax(q k^T / sqrt(D)) v with the scores and weights formed and tapped.
    q [B, H, T, D], k, v [B, H, S, D], allowed bool [B or 1, 1, T, S] -> [B, H, T, D]."""
    scores = tap(f"{name}.scores", _scores(q, k, allowed))
    pattern = tap(f"{name}.pattern", _pattern(scores, allowed))
    return dropout(pattern, attn_pdrop) @ v


def _scores(q, k, allowed):  # [B, H, T, S], -inf where not allowed
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))


def _pattern(scores, allowed):  # softmax over keys; a query that sees no key gets weights 0
    return scores.softmax(dim=-1).masked_fill(~allowed, 0.0)


def attention_probs(x, c_attn, *, n_head: int):
    """The attention weights self_attention applies (no cache, causal, no dropout).

    x: the block's ln_1 output [B, T, C] -> probabilities [B, n_head, T, T], rows sum to 1.
    The same as the tap point "attn.pattern".
    """
    q, k, _ = qkv_heads(x, c_attn, n_head)
    allowed = _causal(x.shape[1], x.device)
    return _pattern(_scores(q, k, allowed), allowed)


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
    intermediate (f"{name}.resid_pre", ".ln_1", ".attn.*", ".attn", ".resid_mid",
    ".mlp.in", ".ln_2", ".mlp.pre", ".mlp.post", ".mlp", and the output as `name`; the
    layer norms' ".scale" and ".normalized" and the heads' inputs when asked for); see
    interp/hooks.py.
    """
    x = tap(f"{name}.resid_pre", x)
    normed = tapped_layer_norm(x, **ln_1, eps=eps, name=f"{name}.ln_1", tap=tap)
    a = self_attention(
        normed,
        **attn,
        n_head=n_head,
        cache=cache,
        attn_pdrop=attn_pdrop,
        resid_pdrop=resid_pdrop,
        name=f"{name}.attn",
        tap=tap,
        head_inputs=_head_inputs(x, normed, ln_1, eps=eps, n_head=n_head, name=f"{name}.attn", tap=tap),
    )
    x = tap(f"{name}.resid_mid", x + tap(f"{name}.attn", a))
    m = feed_forward(tapped_layer_norm(tap(f"{name}.mlp.in", x), **ln_2, eps=eps, name=f"{name}.ln_2", tap=tap),
                     **mlp, resid_pdrop=resid_pdrop, name=f"{name}.mlp", tap=tap)
    return tap(name, x + tap(f"{name}.mlp", m))


HEAD_INPUTS = ("in", "q_in", "k_in", "v_in")


def _head_inputs(x, normed, ln_1, *, eps: float, n_head: int, name: str, tap):
    """None (attention projects `normed`, ln_1's output), unless the tap asks for
    f"{name}.in" (the block's input, one copy per head, [B, T, H, C]) or f"{name}.q_in",
    ".k_in", ".v_in" (each head's query, key and value input, copies of ".in"), as
    TransformerLens's split inputs: then each head's q, k and v inputs normalized on their
    own, three [B, T, H, C]. ln_1's hooks still count: an input is ln_1's output plus
    what its own hooks changed, ln_1(input) - ln_1(x)."""
    if not any(wants(tap, f"{name}.{p}") for p in HEAD_INPUTS):
        return None
    shared = tap(f"{name}.in", x[:, :, None].repeat(1, 1, n_head, 1))
    own = [tap(f"{name}.{p}_in", shared.clone()) for p in "qkv"]  # copies: a hook may edit its input in place
    plain = layer_norm(x, **ln_1, eps=eps)[:, :, None]
    return tuple(normed[:, :, None] + (layer_norm(t, **ln_1, eps=eps) - plain) for t in own)

"""The logit lens and direct logit attribution: reading the residual stream in the
vocabulary's terms.

Logit lens: each block's input residual (and the last block's output) put through ln_f
and the tied unembedding, as if the model ended there. Direct logit attribution: the
final residual at one position is a sum of pieces (the embeddings, each head's result,
each attention bias, each MLP output); with ln_f's scale taken from the real final
residual, ln_f is linear in them, so a logit difference splits exactly into one share per
piece plus ln_f's bias term.
"""

import os
from dataclasses import dataclass

import torch

from .attention_map import prompt_ids, token_label
from ..model.config import GPTConfig
from ..checks import check_int, describe
from ..errors import UserError
from ..files import save_png
from .hooks import run_with_cache
from ..model.layers import layer_norm
from ..model.transformer import checked_config, embed_tokens, unembed
from ..model.params import Params
from ..model.tokenizer import decode


def logit_lens(params: Params, tokens: torch.Tensor, config: GPTConfig | None = None) -> torch.Tensor:
    """tokens int64 [T] -> log-probabilities [n_layer + 1, T, V]; a batch [B, T] ->
    [n_layer + 1, B, T, V]. Row l reads block l's input residual (row n_layer: the last
    block's output, whose reading is the model's)."""
    config = checked_config(params, config)
    batch = _as_batch(tokens)
    names = [f"h.{i}.resid_pre" for i in range(config.n_layer)] + [f"h.{config.n_layer - 1}"]
    _, cache = run_with_cache(params, batch, names, config=config)
    resid = torch.stack([cache[n] for n in names])
    hidden = layer_norm(resid, **params["ln_f"], eps=config.layer_norm_epsilon)
    logprobs = unembed(params, hidden).log_softmax(-1)
    return logprobs if tokens.dim() == 2 else logprobs[:, 0]


def _as_batch(tokens) -> torch.Tensor:
    """tokens, one sequence int64 [T] or a batch [B, T] (T >= 1), as a batch."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (1, 2) or tokens.is_floating_point() \
            or tokens.dtype == torch.bool or tokens.is_complex():
        raise UserError(f"tokens: expected an integer tensor [T] or [B, T], got {describe(tokens)}")
    if not tokens.numel():
        raise UserError(f"tokens: empty ({describe(tokens)})")
    return tokens if tokens.dim() == 2 else tokens[None]


@dataclass(frozen=True)
class Attribution:
    """Shares of a logit difference at one position (direct logit attribution).

    embed: of wte + wpe; heads [n_layer, n_head]: of each head's result; attn_bias and
    mlp [n_layer]: of each attention's c_proj bias and each MLP's output; ln_f_bias: of
    ln_f's bias. Their sum is `total`, the model's own logit difference there. For a
    batch, each has a leading [B] axis (embed, ln_f_bias and total are then [B] tensors).
    """

    embed: float | torch.Tensor
    heads: torch.Tensor
    attn_bias: torch.Tensor
    mlp: torch.Tensor
    ln_f_bias: float | torch.Tensor
    total: float | torch.Tensor

    def layers(self) -> torch.Tensor:
        """[n_layer, 2] ([B, n_layer, 2] for a batch): each block's attention (heads and
        bias) and MLP shares."""
        return torch.stack([self.heads.sum(-1) + self.attn_bias, self.mlp], dim=-1)


def logit_attribution(params: Params, tokens: torch.Tensor, target, other, *, position: int = -1,
                      config: GPTConfig | None = None) -> Attribution:
    """Split logit[target] - logit[other] at `position` of tokens int64 [T] into the shares
    of the residual stream's pieces (see Attribution). A batch [B, T] splits each row's,
    with target and other one id for all rows or one per row ([B])."""
    config = checked_config(params, config)
    batch = _as_batch(tokens)
    B, T = batch.shape
    device = params["wte"]["weight"].device
    targets, others = (_per_row(name, ids, B, config.vocab_size, device) for name, ids in (("target", target),
                                                                                           ("other", other)))
    position = check_int(f"position (in tokens of length {T})", position, -T, T - 1)
    L = config.n_layer
    names = ["embed"] + [f"h.{i}.{p}" for i in range(L) for p in ("attn.result", "mlp")] + [f"h.{L - 1}"]
    logits, cache = run_with_cache(params, batch, names, config=config)
    final = cache[f"h.{L - 1}"][:, position]  # [B, C]
    scale = (final - final.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(config.layer_norm_epsilon).sqrt()
    difference = embed_tokens(params, targets) - embed_tokens(params, others)  # [B, C]
    direction = params["ln_f"]["weight"] * difference / scale  # ln_f's divisor, frozen

    def share(piece):  # piece [B, ..., C] -> its share of the difference [B, ...] (centred as ln_f centres)
        centred = piece - piece.mean(-1, keepdim=True)
        return (centred * direction.view(B, *[1] * (piece.dim() - 2), -1)).sum(-1)

    bias = torch.stack([params["h"][i]["attn"]["c_proj"]["bias"] for i in range(L)])
    rows = torch.arange(B, device=logits.device)
    shares = Attribution(
        embed=share(cache["embed"][:, position]),
        heads=torch.stack([share(cache[f"h.{i}.attn.result"][:, position]) for i in range(L)], dim=1),
        attn_bias=share(bias.expand(B, L, -1)),
        mlp=torch.stack([share(cache[f"h.{i}.mlp"][:, position]) for i in range(L)], dim=1),
        ln_f_bias=difference @ params["ln_f"]["bias"],
        total=logits[rows, position, targets] - logits[rows, position, others],
    )
    if tokens.dim() == 2:
        return shares
    return Attribution(embed=float(shares.embed[0]), heads=shares.heads[0], attn_bias=shares.attn_bias[0],
                       mlp=shares.mlp[0], ln_f_bias=float(shares.ln_f_bias[0]), total=float(shares.total[0]))


def _per_row(name: str, ids, B: int, vocab_size: int, device) -> torch.Tensor:
    """A token id for every row ([B] int64): one id, or one per row (a list or 1-D tensor)."""
    if isinstance(ids, torch.Tensor) and ids.dim() == 1 or isinstance(ids, (list, tuple)):
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if len(values) != B:
            raise UserError(f"{name}: {len(values)} ids for a batch of {B} rows")
        return torch.tensor([check_int(f"{name}[{b}]", t, 0, vocab_size - 1) for b, t in enumerate(values)],
                            device=device)
    return torch.full((B,), check_int(name, ids, 0, vocab_size - 1), device=device)


def draw_lens(params: Params, prompt_text: str, config: GPTConfig, path: str | os.PathLike, *, top: int = 3) -> str:
    """`fgpt lens`: the logit lens of a prompt as a PNG grid (layers down, positions
    across; each cell the top token and its probability) -> the same as a text table."""
    ids = prompt_ids(prompt_text, config, path)
    device = params["wte"]["weight"].device
    with torch.no_grad():
        logprobs = logit_lens(params, torch.tensor(ids, device=device), config).float().cpu()
    probs, best = logprobs.exp().topk(top, dim=-1)  # [L + 1, T, top]
    rows = [f"h.{i} in" for i in range(config.n_layer)] + ["output"]
    _plot_lens(probs[..., 0], best[..., 0], rows, [token_label(decode([t])) for t in ids], path)
    lines = [f"{'':10}" + " | ".join(f"{token_label(decode([t])):>14}" for t in ids)]
    for r, name in enumerate(rows):
        cells = [" ".join(f"{token_label(decode([int(best[r, t, k])]))}" for k in range(top))[:14] for t in range(len(ids))]
        lines.append(f"{name:10}" + " | ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def _plot_lens(prob, best, rows, columns, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, T = prob.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * T, 1.0 + 0.45 * L))
    image = ax.imshow(prob.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for r in range(L):
        for t in range(T):
            ax.text(t, r, token_label(decode([int(best[r, t])]))[:8], ha="center", va="center", fontsize=7,
                    color="white" if prob[r, t] > 0.6 else "black")
    ax.set_xticks(range(T), columns, rotation=90, fontsize=8)
    ax.set_yticks(range(L), rows, fontsize=8)
    ax.set_title("logit lens: top next token (colour: its probability)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_png(fig, path)

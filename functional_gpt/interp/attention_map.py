"""Attention maps: the attention probabilities of every layer and head for a short
prompt, from the activations captured during one forward pass, drawn as a grid."""

import os
from pathlib import Path

import torch

from ..model.config import GPTConfig
from ..checks import check_tensor
from ..errors import UserError
from ..files import save_png
from ..model.transformer import checked_config, forward
from ..model.taps import recorder
from ..model.params import Params
from ..model.tokenizer import decode, encode


def attention_maps(params: Params, tokens: torch.Tensor, config: GPTConfig | None = None) -> torch.Tensor:
    """tokens: int64 [T] -> probabilities [n_layer, n_head, T, T] (row = query, column =
    key; each row sums to 1): the tap points "h.i.attn.pattern". config: None takes the
    one the params carry."""
    config = checked_config(params, config)
    check_tensor("tokens", tokens, dims="T", kind="integer")
    store = {}
    names = [f"h.{i}.attn.pattern" for i in range(config.n_layer)]
    with torch.inference_mode():
        forward(params, tokens[None], config, tap=recorder(store, names))
    return torch.stack([store[name][0] for name in names])


def token_label(text: str) -> str:
    """A token's text made visible on an axis: spaces as '·', newlines as '\\n'."""
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "∅"


def plot_attention(probs: torch.Tensor, labels: list[str], path: str | os.PathLike, *, title: str = "") -> None:
    """Draw probs [L, H, T, T] as an L x H grid of heatmaps (queries down, keys across),
    tokens as tick labels on the left column and bottom row; write a PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H, T, _ = probs.shape
    cell = max(1.6, 0.16 * T)
    fig, axes = plt.subplots(L, H, figsize=(cell * H + 1, cell * L + 1), squeeze=False, layout="constrained")
    show_ticks = T <= 48
    for i in range(L):
        for j in range(H):
            ax = axes[i][j]
            ax.imshow(probs[i, j].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"layer {i}", fontsize=9)
                if show_ticks:
                    ax.set_yticks(range(T), labels, fontsize=6)
            if i == 0:
                ax.set_title(f"head {j}", fontsize=9)
            if i == L - 1 and show_ticks:
                ax.set_xticks(range(T), labels, fontsize=6, rotation=90)
    if title:
        fig.suptitle(title)
    save_png(fig, path)


def prompt_ids(prompt_text: str, config: GPTConfig, path: str | os.PathLike) -> list[int]:
    """The token ids of a picture's --prompt, after checking it fits the context and that
    --out names a PNG."""
    ids = encode(prompt_text)
    if not ids:
        raise UserError("--prompt: empty")
    if len(ids) > config.n_positions:
        raise UserError(f"--prompt: {len(ids)} tokens, more than the context of {config.n_positions}")
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"--out {path}: must be a .png file")
    return ids


def draw_attention(params: Params, prompt_text: str, config: GPTConfig, path: str | os.PathLike) -> int:
    """`fgpt attention`: the attention maps of the prompt's tokens, written to `path`
    (PNG). Returns the number of tokens drawn."""
    ids = prompt_ids(prompt_text, config, path)
    device = params["wte"]["weight"].device
    probs = attention_maps(params, torch.tensor(ids, device=device), config)
    labels = [token_label(decode([t])) for t in ids]
    plot_attention(probs, labels, path, title=f"attention: {config.n_layer} layers x {config.n_head} heads")
    return len(ids)

"""Interventions built on hooks.py: head ablation, and activation-patching sweeps that
copy one piece of a clean run into a corrupted one and measure what it restores.

A metric is a function of the logits [B, T, V] returning a scalar tensor (for example
the logit difference between the right and a wrong answer at the last position).
"""

import os

import torch

from ..model.config import GPTConfig
from ..checks import check_callable, check_choice, check_int, check_tensor, describe
from ..errors import UserError
from ..files import save_png
from .hooks import run_with_cache, run_with_hooks
from ..model.transformer import checked_config
from ..model.params import Params


def ablate_heads(layer: int, heads, how: str = "zero"):
    """A (name, hook) pair for run_with_hooks that ablates `heads` of block `layer`: their
    z set to zero, or ("mean") to their mean over the batch and positions."""
    layer = check_int("layer", layer, 0)
    if isinstance(heads, (list, tuple, range)):
        heads = [check_int(f"heads[{i}]", h, 0) for i, h in enumerate(heads)]
    else:
        heads = [check_int("heads", heads, 0)]
    check_choice("how", how, ("zero", "mean"))

    def hook(z):  # [B, T, H, D]
        if not all(h < z.shape[2] for h in heads):
            raise UserError(f"ablate_heads: heads {heads} must be in 0..{z.shape[2] - 1}")
        z = z.clone()
        z[:, :, heads] = 0.0 if how == "zero" else z[:, :, heads].mean(dim=(0, 1), keepdim=True)
        return z

    return (f"h.{layer}.attn.z", hook)


def patch_sweep(params: Params, clean: torch.Tensor, corrupted: torch.Tensor, metric, *, over: str = "positions",
                config: GPTConfig | None = None) -> torch.Tensor:
    """The metric of the corrupted run with one piece of the clean run patched in, piece by piece.

    clean, corrupted: int64 [B, T] of the same shape. over="positions": block l's
    residual input (h.l.resid_pre) at position t -> a tensor [n_layer, T]; over="heads":
    head h's z in block l at every position -> [n_layer, n_head].
    """
    config = checked_config(params, config)
    check_tensor("clean", clean, dims="B T", kind="integer")
    if not clean.numel():
        raise UserError(f"clean: empty ({describe(clean)})")
    check_tensor("corrupted", corrupted, kind="integer")
    if corrupted.shape != clean.shape:
        raise UserError(f"corrupted: {describe(corrupted)}, but clean is {describe(clean)}; they must have one shape")
    check_callable("metric", metric, "a function of the logits returning a scalar")
    check_choice("over", over, ("positions", "heads"))
    point, width = {"positions": ("resid_pre", clean.shape[-1]), "heads": ("attn.z", config.n_head)}[over]
    names = [f"h.{layer}.{point}" for layer in range(config.n_layer)]
    _, cache = run_with_cache(params, clean, names, config=config)
    result = torch.empty(config.n_layer, width)
    with torch.no_grad():
        for layer, name in enumerate(names):
            for j in range(width):
                logits = run_with_hooks(params, corrupted, {name: _copy(cache[name], j, over)}, config)
                result[layer, j] = _scalar(metric(logits))
    return result


def _scalar(value) -> float:
    """A metric's value as a float: a number or a one-element tensor, else a UserError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise UserError(f"metric: expected a function of the logits returning a scalar, it returned {describe(value)}")


def _copy(clean: torch.Tensor, j: int, over: str):  # a hook putting clean's slice j (a position or a head) in
    def hook(x):
        x = x.clone()
        if over == "positions":
            x[:, j] = clean[:, j]
        else:
            x[:, :, j] = clean[:, :, j]
        return x

    return hook


def plot_sweep(result: torch.Tensor, path: str | os.PathLike, *, columns: list[str], title: str = "") -> None:
    """Draw a sweep [n_layer, N] as a heatmap PNG (layers down, `columns` across), atomically."""
    check_tensor("result", result, dims="L N", kind="float")
    if not result.numel():
        raise UserError(f"result: empty ({describe(result)})")
    if not isinstance(columns, (list, tuple)) or len(columns) != result.shape[1]:
        raise UserError(f"columns: expected {result.shape[1]} labels, one per column of the result, got "
                        f"{describe(columns)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = result.float().numpy()
    limit = max(abs(values).max(), 1e-9)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * values.shape[1], 1.0 + 0.5 * values.shape[0]))
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=90)
    ax.set_yticks(range(values.shape[0]), [f"h.{i}" for i in range(values.shape[0])])
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_png(fig, path)

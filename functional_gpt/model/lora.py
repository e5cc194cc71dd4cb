"""LoRA (Hu et al. 2021) as a pure transform: an adapter is a small dict of tensors beside
the params, and `merge(params, adapter)` returns params whose targeted weights are
W + (alpha / r) * A @ B, differentiable in A and B, so the model's forward is untouched.

A targeted weight is a block's matrix under its GPT-2 key (`h.3.attn.c_attn.weight`,
[n_in, n_out] as GPT-2's Conv1D stores it); its adapter holds `h.3.attn.c_attn.lora_A`
[n_in, r] and `h.3.attn.c_attn.lora_B` [r, n_out]. A starts random (peft's init: uniform
in +-1/sqrt(n_in)) and B at zero, so a fresh adapter leaves the model exactly as it was.
lora_files.py reads and writes peft's format.
"""

import math
import re
from dataclasses import dataclass

import torch

from ..checks import check_bool, check_int, check_number, describe
from ..errors import UserError
from .params import Params, flatten, unflatten
from .transformer import checked_config

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the block matrices LoRA may target
_KEY = re.compile(rf"h\.(\d+)\.({'|'.join(map(re.escape, TARGETS))})\.lora_([AB])")


@dataclass(frozen=True)
class Adapter:
    """tensors: {"h.N.<target>.lora_A": [n_in, r], "h.N.<target>.lora_B": [r, n_out]} for
    each adapted weight; rank r; alpha: the update is scale * A @ B, scale = alpha / r
    (alpha / sqrt(r) with rslora, as peft's use_rslora)."""

    tensors: dict
    rank: int
    alpha: float
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def weights(self) -> list[str]:
        """The GPT-2 keys of the adapted weights, in layer order."""
        return [k.removesuffix(".lora_A") + ".weight" for k in self.tensors if k.endswith(".lora_A")]

    def with_tensors(self, tensors: dict) -> "Adapter":
        """The same adapter with new tensors (an optimizer's update, a trained copy)."""
        return Adapter(tensors, self.rank, self.alpha, self.rslora)


def check_targets(targets) -> tuple[str, ...]:
    """targets: a non-empty list of TARGETS names (or one name)."""
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (list, tuple)) or not targets:
        raise UserError(f"targets: expected a list of {', '.join(TARGETS)}, got {describe(targets)}")
    for t in targets:
        if t not in TARGETS:
            raise UserError(f"targets: unknown target {t!r}; the targets are {', '.join(TARGETS)}")
    return tuple(dict.fromkeys(targets))


def init_adapter(params: Params, rank: int, alpha: float | None = None, targets=("attn.c_attn",), *,
                 layers=None, seed: int = 0, config=None) -> Adapter:
    """A fresh adapter of rank r (1 .. the smallest dimension of a targeted weight) on the
    `targets` weights of `layers` (block indices; None: all), alpha (default r), A drawn
    from `seed` in float32 on the params' device, B zero."""
    config = checked_config(params, config)
    targets = check_targets(targets)
    layers = _layers(layers, config.n_layer)
    rank = check_int("rank", rank, 1)
    alpha = float(rank) if alpha is None else check_number("alpha", alpha, 0.0, low_open=True)
    flat = flatten(params)
    keys = [f"h.{i}.{t}" for i in layers for t in targets]
    smallest = min(min(flat[f"{k}.weight"].shape) for k in keys)
    if rank > smallest:
        raise UserError(f"rank: {rank} is larger than the smallest targeted dimension ({smallest})")
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0, 2**64 - 1))
    device = flat["wte.weight"].device
    tensors = {}
    for k in keys:
        n_in, n_out = flat[f"{k}.weight"].shape
        bound = 1 / math.sqrt(n_in)
        tensors[f"{k}.lora_A"] = ((torch.rand(n_in, rank, generator=gen) * 2 - 1) * bound).to(device)
        tensors[f"{k}.lora_B"] = torch.zeros(rank, n_out, device=device)
    return Adapter(tensors, rank, alpha)


def merge(params: Params, adapter: Adapter, *, config=None) -> Params:
    """params with each adapted weight W replaced by W + scale * A @ B (in W's dtype;
    differentiable in A and B), the rest shared as they are."""
    return _add(params, adapter, config, 1.0)


def attach(params: Params, adapter: Adapter, *, config=None) -> Params:
    """params whose adapted matrices carry the adapter beside them (`lora_A`: A, `lora_B`:
    scale * B, in the weight's dtype), so that `linear` adds (x @ A) @ (scale B) per call:
    the model computes what it computes on `merge(params, adapter)` (to rounding), with
    gradients to A and B, and no merged copy of a weight is ever made (training's path).
    The weights themselves are shared, unchanged."""
    config, flat = _checked(params, adapter, config)
    for key in adapter.weights:
        stem, dtype = key.removesuffix(".weight"), flat[key].dtype
        flat[f"{stem}.lora_A"] = adapter.tensors[f"{stem}.lora_A"].to(dtype)
        flat[f"{stem}.lora_B"] = (adapter.scale * adapter.tensors[f"{stem}.lora_B"]).to(dtype)
    return Params(unflatten(flat), config)


def unmerge(params: Params, adapter: Adapter, *, config=None) -> Params:
    """The base params back from merged ones: W - scale * A @ B (to rounding)."""
    return _add(params, adapter, config, -1.0)


def _add(params, adapter: Adapter, config, sign: float) -> Params:
    config, flat = _checked(params, adapter, config)
    for key in adapter.weights:
        stem = key.removesuffix(".weight")
        W = flat[key]
        delta = adapter.tensors[f"{stem}.lora_A"].to(W.dtype) @ adapter.tensors[f"{stem}.lora_B"].to(W.dtype)
        flat[key] = W + (sign * adapter.scale) * delta
    return Params(unflatten(flat), config)


def _checked(params, adapter: Adapter, config) -> tuple:
    """-> (the params' config, the params flattened) after checking both and the adapter."""
    config = checked_config(params, config)
    flat = flatten(params)
    check_adapter(adapter, flat)
    return config, flat


def trainable_count(adapter: Adapter) -> int:
    """The adapter's number of parameters (all of them train)."""
    check_adapter(adapter)
    return sum(t.numel() for t in adapter.tensors.values())


def check_adapter(adapter: Adapter, flat: dict | None = None) -> None:
    """The adapter's keys name block matrices, in pairs, each A [n_in, r] and B [r, n_out] a
    float tensor of its rank; with `flat` (params flattened), of each weight's shape and on
    its device."""
    if not isinstance(adapter, Adapter):
        raise UserError(f"adapter: expected an Adapter (init_adapter, load_adapter), got {describe(adapter)}")
    check_int("adapter.rank", adapter.rank, 1)
    check_number("adapter.alpha", adapter.alpha, 0.0, low_open=True)
    check_bool("adapter.rslora", adapter.rslora)
    if not isinstance(adapter.tensors, dict) or not adapter.tensors:
        raise UserError(f"adapter: expected a non-empty dict of LoRA tensors, got {describe(adapter.tensors)}")
    for key, t in adapter.tensors.items():
        m = _KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise UserError(f"adapter: unexpected key {key!r}; keys are h.N.<target>.lora_A / lora_B with targets "
                            f"{', '.join(TARGETS)}")
        other = "lora_B" if m[3] == "A" else "lora_A"
        if f"h.{m[1]}.{m[2]}.{other}" not in adapter.tensors:
            raise UserError(f"adapter: {key} has no {other} beside it")
        side = 1 if m[3] == "A" else 0
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 or t.shape[side] != adapter.rank:
            raise UserError(f"adapter: {key} must be a float matrix with {adapter.rank} (the rank) "
                            f"{'columns' if side else 'rows'}; got {describe(t)}")
        weight = f"h.{m[1]}.{m[2]}.weight"
        if flat is None:
            continue
        if weight not in flat:
            raise UserError(f"adapter: {key} is for {weight}, which these params do not have")
        n_in, n_out = flat[weight].shape
        want = (n_in, adapter.rank) if m[3] == "A" else (adapter.rank, n_out)
        if tuple(t.shape) != want:
            raise UserError(f"adapter: {key} has shape {list(t.shape)}, but {weight} is {[n_in, n_out]}: expected "
                            f"{list(want)}")
        if t.device != flat[weight].device:
            raise UserError(f"adapter: {key} is on {t.device}, the params on {flat[weight].device}")


def _layers(layers, n_layer: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_layer))
    if isinstance(layers, range):
        layers = list(layers)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise UserError(f"layers: expected a non-empty list of block indices, got {describe(layers)}")
    return tuple(sorted({check_int("layers", i, 0, n_layer - 1) for i in layers}))

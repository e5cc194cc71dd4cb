"""torch.func over the whole model: per-example gradients and ensembles of models.

Nothing is hidden in a module, so `torch.func.vmap` and `grad` transform the model as it
is: `per_example_grads` is `vmap(grad(loss of one window))` over a batch, and
`ensemble_logits` is `vmap(forward)` over params stacked along a new leading dim. Inputs
are checked once, outside the transforms (a vmapped function cannot branch on values).
torch has no batching rule for the CPU's fused attention kernel, so under vmap it runs
once per example (torch's warning about it is silenced here: the cost is measured in
tools/bench_func.py).
"""

import warnings

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ..model.config import GPTConfig
from ..checks import check_tensor, describe
from ..errors import UserError
from ..model.transformer import _check_tokens, _head, _length, _transformer, checked_config, config_of, no_tap
from ..model.params import Params, check_params, flatten, unflatten

# the start of torch's warning about the missing batching rule (silenced below)
_NO_SDPA_RULE = "There is a performance drop because we have not yet implemented the batching rule"


def _logits(params: Params, tokens: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """`forward` without its checks: tokens [B, T] -> logits [B, T, V]."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
    return _head(params, _transformer(params, tokens, positions, config, tap=no_tap), no_tap)


def per_example_grads(params: Params, tokens: torch.Tensor, targets: torch.Tensor,
                      config: GPTConfig | None = None) -> dict[str, torch.Tensor]:
    """The gradient of each window's own mean cross-entropy, all windows at once.

    tokens, targets: int64 [B, T]. Returns {flat param key: [B, *that param's shape]}:
    entry b is what `torch.autograd.grad` of window b's loss alone gives. No dropout.
    """
    config = checked_config(params, config)
    _check_tokens(tokens, config, params, end=_length(tokens))
    check_tensor("targets", targets, kind="integer")
    if targets.shape != tokens.shape:
        raise UserError(f"targets: {describe(targets)}, but tokens is {describe(tokens)}; they must have one shape")
    _check_tokens(targets, config, params, end=targets.shape[-1], name="targets")

    def window_loss(p, x, y):  # x, y: [T]
        return F.cross_entropy(_logits(p, x[None], config)[0].float(), y.long())

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_SDPA_RULE)
        return flatten(vmap(grad(window_loss), in_dims=(None, 0, 0))(params, tokens, targets))


def stack_params(members: list[Params], config: GPTConfig | None = None) -> Params:
    """Params of models of one config (the one they carry when None) -> one params tree
    whose every tensor has a new leading dim [M, ...], member m at index m, carrying that
    config (for `ensemble_logits`)."""
    if not isinstance(members, (list, tuple)) or not members:
        raise UserError(f"members: expected a non-empty list of params, got {describe(members)}")
    config = config_of(members[0]) if config is None else config
    for i, member in enumerate(members):
        check_params(member, config, f"members[{i}]")
    flats = [flatten(m) for m in members]
    first = flats[0]
    for i, f in enumerate(flats[1:], 1):
        key = next((k for k in first if (f[k].dtype, f[k].device) != (first[k].dtype, first[k].device)), None)
        if key is not None:
            raise UserError(f"members[{i}]: {key} is {describe(f[key])}, members[0]'s {describe(first[key])}; "
                            f"an ensemble is of one dtype on one device")
    return Params(unflatten({k: torch.stack([f[k] for f in flats]) for k in first}), config)


def ensemble_logits(stacked: Params, tokens: torch.Tensor, config: GPTConfig | None = None) -> torch.Tensor:
    """Every member of a `stack_params` ensemble on the same tokens in one vmapped pass:
    tokens int64 [B, T] -> logits [M, B, T, V], entry m equal to `forward(member m, tokens)`."""
    if not isinstance(stacked, dict):
        raise UserError(f"stacked: expected the params stack_params returns, got {describe(stacked)}")
    config = getattr(stacked, "config", None) if config is None else config
    flat = flatten(stacked)
    if not all(isinstance(t, torch.Tensor) and t.dim() for t in flat.values()):
        raise UserError("stacked: expected the params stack_params returns (tensors with a leading [M])")
    first = unflatten({k: t[0] for k, t in flat.items()})
    if config is None:
        raise UserError("config: these stacked params do not carry their config; pass config= or stack them with "
                        "stack_params(members, config)")
    config = checked_config(first, config)
    _check_tokens(tokens, config, first, end=_length(tokens))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_SDPA_RULE)
        return vmap(lambda p: _logits(p, tokens, config))(stacked)

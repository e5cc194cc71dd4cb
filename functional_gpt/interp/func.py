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
from ..errors import UserError
from ..model.transformer import _check_tokens, _head, _transformer, checked_config, no_tap
from ..model.params import Params, flatten, unflatten

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
    _check_tokens(tokens, config, params, end=tokens.shape[-1] if tokens.dim() else 0)
    if not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape:
        raise UserError(f"targets: expected a tensor of the tokens' shape {list(tokens.shape)}")
    _check_tokens(targets, config, params, end=targets.shape[-1])

    def window_loss(p, x, y):  # x, y: [T]
        return F.cross_entropy(_logits(p, x[None], config)[0].float(), y)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_SDPA_RULE)
        return flatten(vmap(grad(window_loss), in_dims=(None, 0, 0))(params, tokens, targets))


def stack_params(members: list[Params]) -> Params:
    """Params of models of one config -> one params tree whose every tensor has a new
    leading dim [M, ...], member m at index m (for `ensemble_logits`)."""
    if not members:
        raise UserError("stack_params: no models given")
    flats = [flatten(m) for m in members]
    keys = set(flats[0])
    for i, f in enumerate(flats[1:], 1):
        bad = next((k for k in flats[0] if k not in f or f[k].shape != flats[0][k].shape), None)
        if set(f) != keys or bad is not None:
            raise UserError(f"stack_params: model {i} does not have model 0's keys and shapes "
                            f"({bad or sorted(keys ^ set(f))[0]})")
    return unflatten({k: torch.stack([f[k] for f in flats]) for k in flats[0]})


def ensemble_logits(stacked: Params, tokens: torch.Tensor, config: GPTConfig | None = None) -> torch.Tensor:
    """Every member of a `stack_params` ensemble on the same tokens in one vmapped pass:
    tokens int64 [B, T] -> logits [M, B, T, V], entry m equal to `forward(member m, tokens)`."""
    first = unflatten({k: t[0] for k, t in flatten(stacked).items()})
    config = checked_config(first, config)
    _check_tokens(tokens, config, first, end=tokens.shape[-1] if tokens.dim() else 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_SDPA_RULE)
        return vmap(lambda p: _logits(p, tokens, config))(stacked)

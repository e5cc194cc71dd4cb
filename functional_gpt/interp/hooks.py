"""Running the model with hooks: `run_with_cache` records activations (and on request
their gradients), `run_with_hooks` changes them. Hook points are named as names.py says,
ours or TransformerLens's.

A hook is a tensor (the activation is replaced by it) or a function returning a tensor of
the activation's shape (or None: unchanged): `fn(activation)`, or TransformerLens's
`fn(activation, hook)`, which gets a `HookPoint` (its `.name` as given, `.layer()`, a
`.ctx` dict) and may edit the activation in place. Hooks run where the model reaches
their point, several on one point in the order given; a cache records the value the rest
of the model sees, after the hooks at that point.
"""

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..checks import check_callable, describe
from ..errors import UserError
from ..model.config import GPTConfig
from ..model.params import Params
from ..model.transformer import checked_config, forward
from .cache import ActivationCache
from .names import check_hook_names, hook_names


@dataclass
class HookPoint:
    """What a TransformerLens-style hook `fn(activation, hook)` gets as `hook`."""

    name: str
    ctx: dict = field(default_factory=dict)

    def layer(self) -> int:
        """The block the point is in ("h.3.attn.z" and "blocks.3.attn.hook_z": 3)."""
        m = re.match(r"(?:h|blocks)\.(\d+)(?:\.|$)", self.name)
        if not m:
            raise UserError(f"hook {self.name!r} is not in a block: it has no layer")
        return int(m[1])


def run_with_hooks(params: Params, tokens: torch.Tensor, hooks, config: GPTConfig | None = None) -> torch.Tensor:
    """forward with hooks: tokens int64 [B, T] -> logits [B, T, V].

    hooks: {name: hook} or a list of (name, hook) pairs (several on one name run in
    order; TransformerLens's `fwd_hooks` list as it is); a hook is a tensor of the
    activation's shape or a function of it (see the module doc)."""
    config = checked_config(params, config)
    tap = _HookTap(_hook_pairs(hooks, config.n_layer), record=())
    return forward(params, tokens, config, tap=tap)


def run_with_cache(
    params: Params,
    tokens: torch.Tensor,
    names=None,
    *,
    hooks=(),
    grad_of=None,
    config: GPTConfig | None = None,
) -> tuple[torch.Tensor, ActivationCache]:
    """forward recording activations: tokens int64 [B, T] -> (logits [B, T, V], cache).

    names: the hook points to record (default every one): a name, a list of names (ours
      or TransformerLens's), or TransformerLens's `names_filter`, a function of a name
      (names.check_hook_names). The attention scores, pattern and per-head results, the
      heads' inputs and the layer norms' scale and normalized points cost work of their
      own, so name what you need.
    hooks: applied as in `run_with_hooks`; the cache holds the values after them.
    grad_of: a function of the logits returning a scalar (a metric such as a logit
      difference); cache.grads then holds its gradient with respect to each recorded
      activation (zeros where it does not depend on it).
    """
    config = checked_config(params, config)
    names = hook_names(config.n_layer) if names is None else check_hook_names(names, config.n_layer)
    if grad_of is not None:
        check_callable("grad_of", grad_of, "a function of the logits returning a scalar")
    tap = _HookTap(_hook_pairs(hooks, config.n_layer), record=names, keep_graph=grad_of is not None)
    if grad_of is None:
        with torch.no_grad():
            logits = forward(params, tokens, config, tap=tap)
        return logits, ActivationCache(tap.store, {}, params, config)
    with torch.enable_grad():
        logits = forward(params, tokens, config, tap=tap)
        metric = grad_of(logits)
        if not isinstance(metric, torch.Tensor) or metric.numel() != 1:
            raise UserError(f"grad_of must return a scalar tensor, got {describe(metric)}")
        recorded = list(tap.store.values())
        grads = torch.autograd.grad(metric.reshape(()), recorded, allow_unused=True)
    grads = {n: torch.zeros_like(a) if g is None else g for (n, a), g in zip(tap.store.items(), grads)}
    return logits.detach(), ActivationCache({n: a.detach() for n, a in tap.store.items()}, grads, params, config)


class _HookTap:
    """The tap behind run_with_hooks and run_with_cache: applies the hooks of each point,
    then records it if asked. `names` tells the model which costly points to compute."""

    def __init__(self, hooks: list[tuple[str, str, object]], record, keep_graph: bool = False):
        self.hooks = {}
        for name, given, hook in hooks:
            self.hooks.setdefault(name, []).append((hook, HookPoint(given), _takes_hook_point(hook)))
        self.record = frozenset(record)
        self.names = self.record | set(self.hooks)
        self.keep_graph = keep_graph
        self.store = {}

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for hook, point, with_point in self.hooks.get(name, ()):
            x = _apply(hook, point, with_point, x)
        if name in self.record:
            if self.keep_graph and not x.requires_grad:  # a leaf to take the gradient at
                x = x.detach().requires_grad_()
            self.store[name] = x if self.keep_graph else x.detach()
        return x


def _takes_hook_point(hook) -> bool:
    """Whether a hook function is TransformerLens's fn(activation, hook): it takes two
    positional arguments, or one named `hook`."""
    if isinstance(hook, torch.Tensor):
        return False
    try:
        parameters = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: fn(activation)
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return len(required) >= 2 or any(p.name == "hook" for p in parameters)


def _apply(hook, point: HookPoint, with_point: bool, x: torch.Tensor) -> torch.Tensor:
    if not callable(hook):
        value = hook
    else:
        value = hook(x, point) if with_point else hook(x)
        if value is None:
            return x
    if not isinstance(value, torch.Tensor):
        raise UserError(f"hook {point.name}: expected a tensor {list(x.shape)} or a function returning one, "
                        f"got {describe(value)}")
    if value.shape != x.shape:
        raise UserError(f"hook {point.name}: the patch has shape {list(value.shape)}, the activation "
                        f"{list(x.shape)}")
    return value.to(dtype=x.dtype, device=x.device)


def _hook_pairs(hooks, n_layer: int) -> list[tuple[str, str, object]]:
    """hooks ({name: hook} or (name, hook) pairs) as a list of (our name, the name given,
    hook), each name a hook point and each hook a tensor or a function."""
    if not isinstance(hooks, (Mapping, list, tuple)):
        raise UserError(f"hooks: expected {{name: hook}} or a list of (name, hook) pairs, got {describe(hooks)}")
    pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
        raise UserError("hooks: expected {name: hook} or a list of (name, hook) pairs")
    ours = check_hook_names([n for n, _ in pairs], n_layer)
    for name, hook in pairs:
        if not (isinstance(hook, torch.Tensor) or callable(hook)):
            raise UserError(f"hook {name}: expected a tensor or a function of the activation, got {describe(hook)}")
    return [(our, given, hook) for our, (given, hook) in zip(ours, pairs)]

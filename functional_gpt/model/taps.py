"""Taps: how the model's intermediates are seen and changed.

A tap is any callable `tap(name, x) -> tensor`. The model calls it on every intermediate
(names in interp/hooks.py) and goes on with what it returns: `x` itself to only look, another
tensor of the same shape to patch. A tap may carry an attribute `names` (a set of
names): the points that cost work of their own (the attention scores and pattern, which
the fused kernel never forms, and each head's contribution to the residual stream) are
then computed only when named there. A tap without `names` sees every point.
"""

import torch


def no_tap(name: str, x: torch.Tensor) -> torch.Tensor:
    """The default tap: changes nothing and asks for nothing extra."""
    return x


def wants(tap, name: str) -> bool:
    """Whether `tap` asks for the point `name` (for points computed only when asked)."""
    if tap is no_tap:
        return False
    names = getattr(tap, "names", None)
    return names is None or name in names


def recorder(store: dict, names=None):
    """A tap that records each activation (detached) into `store` under its name: every
    point, or only those in `names`."""
    wanted = None if names is None else frozenset(names)

    def tap(name: str, x: torch.Tensor) -> torch.Tensor:
        if wanted is None or name in wanted:
            store[name] = x.detach()
        return x

    tap.names = wanted
    return tap

"""Choosing where tensors live: a GPU when present, never required."""

import torch

from .errors import UserError

KINDS = ("cpu", "cuda", "mps")


def pick_device(name: str | None = None) -> torch.device:
    """The named device ("cpu", "cuda", "cuda:1", "mps"), or the best available when None:
    CUDA, then Apple's MPS, then the CPU. A name torch does not know, a kind this project
    does not run on (xpu, meta, ...), an absent GPU or a GPU index past the last one is a
    one-line UserError naming the flag's value."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {name!r}: unknown device (try {', '.join(KINDS)} or cuda:0)") from None
    if device.type not in KINDS:
        raise UserError(f"--device {name}: not supported; use one of {', '.join(KINDS)} (or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine")
    if device.type in ("cpu", "mps") and device.index not in (None, 0):
        raise UserError(f"--device {name}: there is one {device.type} device ({device.type} or {device.type}:0)")
    return device

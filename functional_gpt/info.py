"""`fgpt info`: what this machine and a model look like, checked with one forward pass."""

import math

import torch
import torch.nn.functional as F

from .model.checkpoint import load_params
from .model.config import preset
from .device import cpu_summary, pick_device
from .model.params import count_params, init_params
from .model.transformer import forward


def info_report(*, preset_name: str | None = None, weights: str | None = None,
                device: str | None = None, seq_len: int = 64, seed: int = 0) -> str:
    """A readable report: torch version, device, threads, the CPU and its speed flags,
    config, parameter count, and
    the loss of one forward pass on random tokens (about ln(vocab_size) for a fresh model)."""
    dev = pick_device(device)
    if weights is not None:
        params, config = load_params(weights, device=dev)
        source = weights
    else:
        name = "gpt2" if preset_name is None else preset_name
        config = preset(name)
        params = init_params(config, seed=seed, device=dev)
        source = f"preset {name} (fresh init, seed {seed})"
    T = min(seq_len, config.n_positions)
    tokens = torch.randint(config.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.inference_mode():
        logits = forward(params, tokens[:, :-1], config)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    lines = [
        f"torch       {torch.__version__}",
        f"device      {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        f"threads     {torch.get_num_threads()}",
        f"cpu         {cpu_summary()}",
        f"model       {source}",
        "config      " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()),
        f"parameters  {count_params(config):,}",
        f"forward     {T} random tokens: loss {loss.item():.4f} nats/token "
        f"(ln(vocab_size) = {math.log(config.vocab_size):.4f})",
    ]
    return "\n".join(lines)

"""Moving weights in and out: export to a directory transformers loads, and download of
the published GPT-2 checkpoints."""

import os
from pathlib import Path

import torch

from .checkpoint import load_params, save_params
from .config import write_hf_config
from .errors import UserError

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_FILES = ("config.json", "model.safetensors")


def export_hf(weights: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `out`/config.json and `out`/model.safetensors from any checkpoint load_params
    reads, so that `transformers.GPT2LMHeadModel.from_pretrained(out)` loads it. Tensors
    keep the checkpoint's dtype unless `dtype` is given. Each file is written atomically."""
    params, config = load_params(weights, dtype=dtype)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    save_params(out / "model.safetensors", params, config)
    write_hf_config(config, out / "config.json")
    return out


def hub_url(name: str) -> str:
    return f"https://huggingface.co/openai-community/{name}"


def download(name: str, out: str | os.PathLike | None = None) -> Path:
    """Fetch config.json and model.safetensors of a published GPT-2 into `out` (default
    weights/NAME) with huggingface_hub. Without it or without network: a one-line
    UserError saying where to put the files by hand."""
    if name not in HUB_NAMES:
        raise UserError(f"unknown model {name!r}; published GPT-2 sizes: {', '.join(HUB_NAMES)}")
    out = Path(out or Path("weights") / name)
    by_hand = f"put {' and '.join(HUB_FILES)} from {hub_url(name)} into {out}/"
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        raise UserError(f"huggingface_hub is not installed (pip install 'functional-gpt[download]'); or {by_hand}") from None
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one line below
    try:
        for filename in HUB_FILES:
            hf_hub_download(f"openai-community/{name}", filename, local_dir=out)
    except Exception as e:  # network, proxy, offline mode, hub errors: all end the same way
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"download failed ({type(e).__name__}: {reason}); {by_hand}") from None
    return out

"""Weights on disk: safetensors files that carry their config, and Hugging Face GPT-2
checkpoints as published (never pickle).

A file written by `save_params` holds the flattened params under GPT-2's own keys and
the config as JSON in the safetensors metadata, so it describes itself and transformers
loads it too. `load_params` also reads Hugging Face layouts: a directory with
`model.safetensors` (or a sharded index) and `config.json`, keys with or without the
`transformer.` prefix, `lm_head.weight` tied to `wte.weight`, the causal-mask buffers
`h.N.attn.bias` / `h.N.attn.masked_bias`, and fp32, fp16 or bf16 tensors.
"""

import json
import os
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import GPTConfig, read_hf_config
from .errors import UserError
from .files import atomic_path
from .params import Params, check_shapes, config_from_shapes, flatten, unflatten

CONFIG_METADATA_KEY = "functional_gpt.config"
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def save_params(path: str | os.PathLike, params: Params, config: GPTConfig) -> None:
    """Write params (GPT-2 keys) + config (metadata) to one safetensors file, atomically."""
    tensors = {k: t.detach().contiguous() for k, t in flatten(params).items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors file(s) behind `path`: a file, or a directory (a run directory or a
    Hugging Face checkpoint) holding `model.safetensors` or a sharded index."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        return [path / name for name in dict.fromkeys(weight_map.values())]
    if any((path / n).exists() for n in ("pytorch_model.bin", "model.pt", "model.ckpt")):
        raise UserError(f"{path}: holds only pickled weights, which are never loaded; convert them to model.safetensors")
    raise UserError(f"{path}: holds no checkpoint (model.safetensors)")


def load_params(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Params, GPTConfig]:
    """Load a checkpoint (see the module doc) -> (nested params, config).

    Keys and shapes are checked against the config before any tensor is read; each
    tensor is then read once from disk and converted to `dtype` (None keeps the file's).
    The config comes from the file's metadata, else `config.json` beside it, else the
    shapes. Any problem is a one-line UserError naming the file and the key.
    """
    files = weight_files(path)
    with ExitStack() as stack:
        handles = [stack.enter_context(_open_safetensors(f)) for f in files]
        located = {}  # GPT-2 key -> (handle, key in file)
        tied_head = None
        for handle in handles:
            for key in handle.keys():
                name = key.removeprefix("transformer.")
                if _MASK_BUFFER.match(name):
                    continue
                if name == "lm_head.weight":
                    tied_head = (handle, key)
                else:
                    located[name] = (handle, key)
        shapes = {name: tuple(h.get_slice(k).get_shape()) for name, (h, k) in located.items()}
        source = str(files[0] if len(files) == 1 else path)
        config = _config_for(files[0], handles[0].metadata() or {}, shapes)
        check_shapes(shapes, config, source)
        flat = {}
        for name, (handle, key) in located.items():
            flat[name] = _read(handle, key, source).to(device=device, dtype=dtype)
        if tied_head is not None:
            head = _read(*tied_head, source).to(device=device, dtype=flat["wte.weight"].dtype)
            if not torch.equal(head, flat["wte.weight"]):
                raise UserError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    return unflatten(flat), config


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None


def _read(handle, key: str, source: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{source}: cannot read tensor {key} ({e})") from None


def _config_for(file: Path, metadata: dict, shapes: dict) -> GPTConfig:
    if CONFIG_METADATA_KEY in metadata:
        try:
            return GPTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except ValueError as e:
            raise UserError(f"{file}: bad config in metadata ({e})") from None
    if (file.parent / "config.json").is_file():
        return read_hf_config(file.parent / "config.json")
    return config_from_shapes(shapes)

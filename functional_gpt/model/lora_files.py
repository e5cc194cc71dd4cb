"""An adapter in Hugging Face peft's format: a directory of `adapter_config.json` and
`adapter_model.safetensors`, which peft's `PeftModel.from_pretrained` loads onto
transformers' GPT2LMHeadModel and which ours reads back from peft.

peft keys each matrix by its module (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`)
in torch.nn.Linear's layout: lora_A [r, n_in], lora_B [n_out, r]. For GPT-2's Conv1D
weights ([n_in, n_out]) it sets `fan_in_fan_out`, so its update (B A)^T is our A @ B with
our A its lora_A transposed and our B its lora_B transposed. Targets are written as
`attn.c_attn`, ...: peft matches a name to the end of a module's, so `attn.c_proj` is not
`mlp.c_proj`.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checks import check_path, describe
from ..errors import UserError
from ..files import atomic_path, make_dir, write_json
from .params import Params, flatten
from .transformer import checked_config
from .lora import TARGETS, Adapter, check_adapter, merge

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.transformer."


def save_adapter(directory: str | os.PathLike, adapter: Adapter, *, base: str | os.PathLike | None = None) -> Path:
    """Write `adapter` into `directory` in peft's format (each file atomically); base: the
    base model's path, recorded as peft's base_model_name_or_path. -> the directory."""
    check_adapter(adapter)
    if base is not None and not isinstance(base, (str, os.PathLike)):
        raise UserError(f"base: expected the base model's path or None, got {describe(base)}")
    base = None if base is None else os.fspath(base)
    directory = make_dir(directory)
    layers = sorted({int(k.split(".")[1]) for k in adapter.tensors})
    targets = sorted({k.split(".", 2)[2].rsplit(".", 1)[0] for k in adapter.tensors}, key=TARGETS.index)
    tensors = {f"{PREFIX}{k}.weight": t.detach().t().contiguous() for k, t in adapter.tensors.items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
              "target_modules": targets, "layers_to_transform": layers, "layers_pattern": "h",
              "fan_in_fan_out": True, "lora_dropout": 0.0, "bias": "none", "use_rslora": adapter.rslora,
              "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
              "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, config)
    return directory


def load_adapter(directory: str | os.PathLike, params: Params, *, config=None) -> Adapter:
    """The LoRA adapter in `directory` (peft's format, written by peft or by save_adapter)
    for `params`, on their device in float32; a one-line UserError names what does not
    fit (a file, a field, a key and both shapes)."""
    checked_config(params, config)
    directory = check_path("directory", directory, "an adapter directory")
    settings = _read_config(directory / CONFIG_FILE)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    flat = flatten(params)
    device = flat["wte.weight"].device
    tensors = {}
    for key, t in stored.items():
        stem = key.removeprefix("base_model.model.").removeprefix("transformer.")
        for side in ("A", "B"):
            if stem.endswith(f".lora_{side}.weight"):
                name = f"{stem.removesuffix(f'.lora_{side}.weight')}.lora_{side}"
                break
        else:
            raise UserError(f"{path}: unexpected key {key}; a LoRA adapter holds lora_A and lora_B weights only")
        weight = name.rsplit(".", 1)[0] + ".weight"
        if weight in flat and t.dim() == 2 and (t.shape[1], t.shape[0]) != _expected(name, flat[weight], settings):
            raise UserError(f"{path}: {key} has shape {list(t.shape)}, but {weight} is {list(flat[weight].shape)}: "
                            f"expected {list(_expected(name, flat[weight], settings))[::-1]} at rank {settings['r']}")
        tensors[name] = t.t().float().contiguous().to(device)
    adapter = Adapter(tensors, settings["r"], settings["lora_alpha"], settings["use_rslora"])
    try:
        check_adapter(adapter, flat)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return adapter


def _expected(name: str, weight: torch.Tensor, settings: dict) -> tuple[int, int]:
    n_in, n_out = weight.shape
    return (n_in, settings["r"]) if name.endswith("A") else (settings["r"], n_out)


def _read_config(path: Path) -> dict:
    """peft's adapter_config.json, checked for what ours runs: LoRA, no bias, DoRA or
    per-module ranks -> {r, lora_alpha, use_rslora}."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: expected a JSON object")
    if settings.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {settings.get('peft_type')!r}; only LORA adapters load")
    r, alpha = settings.get("r"), settings.get("lora_alpha", settings.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise UserError(f"{path}: r must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise UserError(f"{path}: lora_alpha must be a number > 0, got {alpha!r}")
    for field, plain in (("bias", "none"), ("use_dora", False), ("rank_pattern", {}), ("alpha_pattern", {}),
                         ("modules_to_save", None)):
        if settings.get(field, plain) not in (plain, None, [], {}):
            raise UserError(f"{path}: {field} is {settings[field]!r}; only {plain!r} is supported")
    return {"r": r, "lora_alpha": float(alpha), "use_rslora": bool(settings.get("use_rslora", False))}


def with_adapter(params: Params, directory: str | os.PathLike | None, *, config=None) -> Params:
    """params with the adapter in `directory` merged in (`--adapter DIR`); None: params."""
    if directory is None:
        return params
    return merge(params, load_adapter(directory, params, config=config), config=config)

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
import math
import os
import re
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .config import GPTConfig, read_hf_config
from ..checks import check_float_dtype, check_path, describe
from ..device import check_device, check_memory
from ..errors import UserError
from ..files import atomic_path
from .params import SCALE, Params, check_finite, check_params, check_shapes, flatten, param_spec, unflatten
from .quantize import METADATA_KEY as QUANTIZATION_KEY, check_scheme, scheme_of, to_kernel_layout

CONFIG_METADATA_KEY = "functional_gpt.config"
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def save_params(path: str | os.PathLike, params: Params, config: GPTConfig) -> None:
    """Write params (GPT-2 keys) + config (metadata) to one safetensors file, atomically.
    Params that do not match the config, or hold NaN or infinity, are refused (UserError
    naming the key) and nothing is written. Tensors that share memory (one tensor under two
    keys, views of one buffer) are written as copies each."""
    if not isinstance(config, GPTConfig):
        raise UserError(f"config: expected a GPTConfig, got {type(config).__name__}")
    check_params(params, config)
    attached = next((k for k in flatten(params) if k.endswith(".lora_A")), None)
    if attached is not None:
        raise UserError(f"params: an attached LoRA adapter ({attached}); save the adapter (save_adapter) or the "
                        f"merged weights (merge)")
    tensors = _unshared({k: t.detach().contiguous() for k, t in flatten(params).items()})
    check_finite(tensors, f"{path}: refusing to save")
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    if scheme_of(params):
        metadata[QUANTIZATION_KEY] = scheme_of(params)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # its I/O errors are not OSErrors
            raise UserError(f"{path}: cannot write ({e})") from None


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, those whose memory another one already uses cloned (safetensors refuses
    to write shared memory)."""
    seen, out = set(), {}
    for key, t in tensors.items():
        storage = (t.device, t.untyped_storage().data_ptr())
        out[key] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors file(s) behind `path`: a file, or a directory (a run directory or a
    Hugging Face checkpoint) holding `model.safetensors` or a sharded index."""
    given, path = path, check_path("path", path, "a checkpoint file or directory")
    if not path.exists():
        raise UserError(f"{os.fspath(given)}: no such file or directory")  # as given: Path drops a final "/"
    if path.is_file():
        return [path]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in _shard_names(index)]
    if any((path / n).exists() for n in ("pytorch_model.bin", "model.pt", "model.ckpt")):
        raise UserError(f"{path}: holds only pickled weights, which are never loaded; convert them to model.safetensors")
    if (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: holds a LoRA adapter, not a model; give its base{_base_of(path)} as --weights and "
                        f"this directory as --adapter")
    raise UserError(f"{path}: holds no checkpoint (model.safetensors)")


def _base_of(adapter_dir: Path) -> str:
    """ " (PATH)": the base model the adapter's config names, if it names one ("" if not)."""
    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" ({base})" if isinstance(base, str) and base else ""


def _shard_names(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names, in order of first mention:
    {"weight_map": {tensor key: file name in this directory}}."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except OSError as e:
        raise UserError(f"{index}: cannot read ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    names = list(weight_map.values()) if isinstance(weight_map, dict) else None
    if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise UserError(f"{index}: weight_map must map each tensor to a file name in this directory, got "
                        f"{weight_map!r:.80}")
    return list(dict.fromkeys(names))


def load_params(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    config: GPTConfig | None = None,
) -> tuple[Params, GPTConfig]:
    """Load a checkpoint (see the module doc) -> (nested params, config).

    Keys, shapes and dtypes (floating point only) are checked against the config before
    any tensor is read, and each tensor is checked to be finite (NaN or infinity: a
    UserError naming the key); each
    tensor's bytes are then read from disk straight into a freshly allocated tensor
    (no memory map, no intermediate copy), so loading needs about one copy of the
    weights in memory. Tensors are converted to `dtype` (None keeps the file's) one at
    a time. A file `save_params` wrote of quantized params names its scheme in its
    metadata (one this version does not know is refused by name); its int8 matrices and
    their scales load as they are, the rest in `dtype`. The config comes from the file's metadata, else `config.json` beside it (a
    field that changes the computation and is not implemented is refused by name), else
    `config`; the shapes alone never tell the head count, so with none of them it is a
    UserError, never a guess. `config`, when given, overrides what the file says. Any
    problem is a one-line UserError naming the file and the key.
    """
    if dtype is not None:
        check_float_dtype("dtype", dtype)
    device = check_device("device", device)
    if config is not None and not isinstance(config, GPTConfig):
        raise UserError(f"config: expected a GPTConfig or None, got {describe(config)}")
    files = weight_files(path)
    source = str(files[0] if len(files) == 1 else path)
    located = {}  # GPT-2 key -> (file, header entry)
    tied_head = None
    metadata = None
    for file in files:
        entries, file_metadata = _read_header(file)
        metadata = file_metadata if metadata is None else metadata
        scheme = metadata.get(QUANTIZATION_KEY) and check_scheme(f"{file}: metadata {QUANTIZATION_KEY}",
                                                                 metadata[QUANTIZATION_KEY])
        for key, entry in entries.items():
            name = key.removeprefix("transformer.")
            if _MASK_BUFFER.match(name):
                continue
            if name in located or (name == "lm_head.weight" and tied_head is not None):
                earlier = located[name][1] if name in located else tied_head[1]
                raise UserError(f"{file}: holds both {earlier} and {key}; which one is meant is unclear")
            if not entry.dtype.is_floating_point and not (scheme and entry.dtype == torch.int8):
                raise UserError(f"{file}: tensor {key} has dtype {_DTYPE_NAMES[entry.dtype]}; parameters must be "
                                f"floating point (F32, F16, BF16, F64; I8 in a file whose {QUANTIZATION_KEY} "
                                f"metadata names its scheme)")
            if name == "lm_head.weight":
                tied_head = (file, key, entry)
            else:
                located[name] = (file, key, entry)
    shapes = {name: entry.shape for name, (_, _, entry) in located.items()
              if not (scheme and name.rpartition(".")[2] == SCALE)}
    config = config or _config_for(files[0], metadata, shapes)
    check_shapes(shapes, config, source)
    scales = [name for name in located if name not in shapes]
    as_read = lambda name, e: (e.dtype if name in scales or e.dtype == torch.int8 else dtype or e.dtype)
    check_memory(f"{source}'s tensors", sum(math.prod(e.shape) * as_read(name, e).itemsize
                                            for name, (_, _, e) in located.items()), device)
    with ExitStack() as stack:
        handles = {file: stack.enter_context(open(file, "rb", buffering=0)) for file in files}
        flat = {}
        for name in [*param_spec(config), *scales]:  # GPT-2's order, whatever the file's
            file, key, entry = located[name]
            t = _read(handles[file], key, entry, source)
            check_finite({key: t}, source)
            t = t.to(device=device, dtype=as_read(name, entry))
            flat[name] = to_kernel_layout(name, t) if t.dtype == torch.int8 else t
        if tied_head is not None:
            file, key, entry = tied_head
            head = _read(handles[file], key, entry, source).to(device=device, dtype=flat["wte.weight"].dtype)
            if not torch.equal(head, flat["wte.weight"]):
                raise UserError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    params = Params(unflatten(flat), config)
    if scheme:
        check_params(params, config, source)  # each int8 matrix with its scale
    return params, config


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # bytes; safetensors' own limit


def _read_header(file: Path) -> tuple[dict[str, _Entry], dict]:
    """A safetensors header -> ({key: entry}, metadata), every field checked. The format:
    8 bytes giving the header length n (little-endian u64), n bytes of JSON {key: {dtype:
    str, shape: [int], data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the
    data, each tensor's bytes at its offsets from the data's start, without overlaps."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (OSError, struct.error, ValueError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{file}: __metadata__ must be an object of strings, got {metadata!r:.80}")
    data_start, entries = 8 + n, {}
    for key, info in header.items():
        entries[key] = _entry(file, key, info, data_start, size)
    spans = sorted((e.offset, e.offset + e.nbytes, k) for k, e in entries.items() if e.nbytes)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise UserError(f"{file}: tensors {a} and {b} overlap in the file (data_offsets)")
    return entries, metadata


def _entry(file: Path, key: str, info, data_start: int, size: int) -> _Entry:
    """One header entry, checked: its types, its dtype, and that its offsets hold it."""
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                  for x in xs)
    if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape"))
            and ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2):
        raise UserError(f"{file}: bad header entry for tensor {key} (want dtype: str, shape: [int], "
                        f"data_offsets: [begin, end]): {info!r:.120}")
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if dtype not in _DTYPES:
        raise UserError(f"{file}: tensor {key} has dtype {dtype}, not one of {', '.join(_DTYPES)}")
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise UserError(f"{file}: tensor {key}: data_offsets {[begin, end]} do not hold {dtype} {list(shape)}")
    if data_start + end > size:
        raise UserError(f"{file}: truncated: tensor {key} ends at byte {data_start + end}, the file has {size}")
    return _Entry(_DTYPES[dtype], shape, data_start + begin, nbytes)


def _read(f, key: str, entry: _Entry, source: str) -> torch.Tensor:
    """Read one tensor's bytes from the open file `f` into a new CPU tensor."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    buffer = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    f.seek(entry.offset)
    done = 0
    while done < entry.nbytes:  # one read may return less than asked (e.g. over 2 GiB)
        n = f.readinto(buffer[done:])
        if not n:
            raise UserError(f"{source}: cannot read tensor {key}: the file ends early")
        done += n
    return t


def _config_for(file: Path, metadata: dict, shapes: dict) -> GPTConfig:
    if CONFIG_METADATA_KEY in metadata:
        try:
            return GPTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except ValueError as e:
            raise UserError(f"{file}: bad config in metadata ({e})") from None
        except UserError as e:
            raise UserError(f"{file}: metadata {CONFIG_METADATA_KEY}: {e}") from None
    if (file.parent / "config.json").is_file():
        return read_hf_config(file.parent / "config.json")
    size = ", ".join(f"{k} {list(shapes[k])}" for k in ("wte.weight", "wpe.weight") if k in shapes)
    raise UserError(f"{file}: holds no config ({CONFIG_METADATA_KEY} metadata or a config.json beside it), and "
                    f"the shapes ({size or 'none'}) do not tell n_head or layer_norm_epsilon; write the model's "
                    f"config.json beside it (functional_gpt.write_hf_config), or pass load_params(..., config=)")

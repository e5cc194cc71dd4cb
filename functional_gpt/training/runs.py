"""A training run's files, in its run directory: this module alone writes and reads them.

A checkpoint is `model.safetensors` (params + config, loadable by `load_params`),
`optimizer.safetensors` (Adam's moments keyed `exp_avg.<GPT-2 key>` and
`exp_avg_sq.<GPT-2 key>`, a Muon matrix's momentum buffer as its exp_avg alone, the step in
its metadata) and `state.json` (step, data
position, RNG state, the full run configuration; the commit marker, written last). The
run directory holds the latest checkpoint at its root and the best-validation one in
`best/`, beside `metrics.jsonl` (one JSON object per step and per evaluation).

A LoRA run's checkpoint holds the adapter instead of the model: `adapter_config.json` and
`adapter_model.safetensors` in peft's format (model/lora_files.py), its moments keyed by the
adapter's keys, and in state.json the CRC-32 of the frozen base weights (`base_crc32`),
which it reloads from the run's `init`.

Each reader checks what it reads: a garbled, truncated or hand-edited file is a
one-line UserError naming the file and the field, never a raw JSON or key error.
"""

import json
import math
import os
import shutil
from pathlib import Path

import torch

from safetensors import SafetensorError, safe_open

from ..model.checkpoint import load_params, save_params
from ..model.config import GPTConfig
from ..model.lora_files import CONFIG_FILE as ADAPTER_CONFIG, WEIGHTS_FILE as ADAPTER_WEIGHTS, load_adapter, save_adapter
from ..checks import check_path
from ..errors import UserError
from .data import Position
from .distributed import crc32_of
from ..files import atomic_path, write_json
from .muon import second_moment_keys
from .optim import AdamWState
from ..model.params import check_finite, flatten
from .step import LossScale, TrainState

MODEL, OPTIMIZER, STATE, METRICS, BEST = "model.safetensors", "optimizer.safetensors", "state.json", "metrics.jsonl", "best"


def save_checkpoint(run_dir: str | os.PathLike, state: TrainState, config: GPTConfig, record: dict,
                    fetch_moment=None) -> None:
    """Write `state` as a checkpoint so that a kill at any instant leaves a complete one behind.

    record: the run's own fields for state.json besides the TrainState's (data_dir,
    train_tokens, lr, val_loss, best_val_loss, config). fetch_moment(kind, key) -> the
    moment ("exp_avg" or "exp_avg_sq") of a param that `state.opt` lacks (another rank's
    share under --shard_optimizer), called in the file's order as it is written, so that
    no more than one such tensor need exist at a time. Phase 1 writes model, optimizer and
    state.json (last) into `run_dir/.next/`; phase 2 renames them into `run_dir`,
    state.json last. A kill in phase 1 leaves the previous checkpoint untouched (the
    partial `.next` is discarded later); a kill in phase 2 is rolled forward by `recover`,
    since every new file was already complete.
    """
    run_dir = Path(run_dir)
    recover(run_dir)
    pending = run_dir / ".next"
    if state.adapter is None:
        save_params(pending / MODEL, state.params, config)
    else:
        save_adapter(pending, state.adapter, base=record.get("config", {}).get("init"))
    flat = state.trainable()
    kept = moment_keys(flat, record.get("config", {}).get("optimizer") or "adamw")
    specs = [(f"{kind}.{k}", flat[k].shape, flat[k].dtype) for kind in MOMENTS for k in kept[kind]]

    def moments():
        for kind, have in zip(MOMENTS, (state.opt.exp_avg, state.opt.exp_avg_sq)):
            for key in kept[kind]:
                yield have[key] if key in have else fetch_moment(kind, key)

    with atomic_path(pending / OPTIMIZER) as tmp:
        write_safetensors(tmp, specs, moments(), metadata={"adam_step": str(state.opt.step)})
    fields = {"step": state.step, "data_position": state.position._asdict(),
              "rng": {name: bytes(t.tolist()).hex() for name, t in state.rng.items()},
              "model_config": config.to_dict(), **record}
    if state.loss_scale is not None:
        fields["loss_scale"] = state.loss_scale._asdict()
    write_json(pending / STATE, fields)
    _commit(run_dir)


def save_run_checkpoint(run_dir: str | os.PathLike, state: TrainState, config: GPTConfig, record: dict,
                        *, is_best: bool, fetch_moment=None) -> None:
    """The run's checkpoint at the root and, when `is_best`, in `best/` too (see
    `checkpoint_dirs`). fetch_moment: as for save_checkpoint, once per directory."""
    for directory in checkpoint_dirs(run_dir, is_best):
        save_checkpoint(directory, state, config, record, fetch_moment)


def checkpoint_dirs(run_dir: str | os.PathLike, is_best: bool) -> list[Path]:
    """Where save_run_checkpoint writes, in order. best/ is written first: a kill between
    the two leaves best/ ahead of the root (a resume replays the same steps bit-exactly
    and writes the same best/ again), never behind it."""
    return [Path(run_dir) / BEST, Path(run_dir)] if is_best else [Path(run_dir)]


MOMENTS = ("exp_avg", "exp_avg_sq")


def moment_keys(flat: dict, optimizer: str) -> dict[str, list[str]]:
    """{moment kind: the keys of `flat` an `optimizer` run keeps it for}, in file order."""
    return {"exp_avg": list(flat), "exp_avg_sq": second_moment_keys(flat, optimizer)}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def write_safetensors(path: str | os.PathLike, specs: list, tensors, metadata: dict) -> None:
    """A safetensors file whose tensors arrive one at a time: specs [(name, shape, dtype)]
    make the header, then each tensor of the iterable `tensors`, in that order, is written
    as it comes (so a caller can produce them lazily; safetensors' own save_file needs
    them all at once). A tensor unlike its spec is a ValueError."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for (name, shape, dtype), t in zip(specs, tensors, strict=True):
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: got {t.dtype} {list(t.shape)}, the header says {dtype} {list(shape)}")
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)


def _commit(run_dir: Path) -> None:
    pending = run_dir / ".next"
    for name in (OPTIMIZER, MODEL, ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE):
        if (pending / name).exists():
            os.replace(pending / name, run_dir / name)
    pending.rmdir()


def recover(run_dir: str | os.PathLike) -> None:
    """Finish a save that was killed after its state.json was written, or discard one
    killed before (see `save_checkpoint`)."""
    pending = Path(run_dir) / ".next"
    try:
        if (pending / STATE).is_file():
            _commit(Path(run_dir))
        elif pending.exists():
            shutil.rmtree(pending)
    except OSError as e:
        raise UserError(f"{pending}: cannot finish or discard an interrupted save ({e.strerror or e})") from None


# ------------------------------------------------------------------ state.json


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _hex(x) -> bool:
    return isinstance(x, str) and len(x) % 2 == 0 and all(c in "0123456789abcdef" for c in x)


# field -> (what it must be, check)
_STATE_FIELDS = {
    "step": ("an integer >= 0", _count),
    "data_dir": ("a string", lambda x: isinstance(x, str) and x != ""),
    "data_position": ("an object {epoch, index} of integers >= 0",
                      lambda x: isinstance(x, dict) and set(x) == {"epoch", "index"} and all(map(_count, x.values()))),
    "train_tokens": ("an integer >= 0", _count),
    "lr": ("a finite number", _number),
    "val_loss": ("a finite number or null", lambda x: x is None or _number(x)),
    "best_val_loss": ("a finite number or null", lambda x: x is None or _number(x)),
    "rng": ("an object of hex strings with a 'torch' entry",
            lambda x: isinstance(x, dict) and "torch" in x and all(map(_hex, x.values()))),
    "config": ("an object", lambda x: isinstance(x, dict)),
    "model_config": ("an object", lambda x: isinstance(x, dict)),
}
# Present in LoRA runs only: the frozen base weights' fingerprint (base_crc32).
_BASE_CRC = ("'crc32 ' and 8 hex digits", lambda x: isinstance(x, str) and len(x) == 14 and x.startswith("crc32 ")
             and _hex(x[6:]))
# Present in time-budget runs only: the seconds spent, and the steps once the cooldown fixed them.
_BUDGET_FIELDS = {"time_spent": ("a number >= 0", lambda x: _number(x) and x >= 0),
                  "planned_steps": ("null or an integer >= 1", lambda x: x is None or (_count(x) and x >= 1))}
# Present in float16 runs only.
_LOSS_SCALE = ("an object {scale: a number > 0, good_steps: an integer >= 0}",
               lambda x: isinstance(x, dict) and set(x) == {"scale", "good_steps"} and _number(x["scale"])
               and x["scale"] > 0 and _count(x["good_steps"]))


def read_state(run_dir: str | os.PathLike) -> dict:
    """`run_dir`/state.json, every field checked (see _STATE_FIELDS) -> the dict. A save
    killed half-way is first rolled forward or discarded (`recover`)."""
    run_dir = check_path("run_dir", run_dir, "a run directory")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    recover(run_dir)
    path = run_dir / STATE
    if not path.is_file():
        raise UserError(f"{run_dir}: holds no checkpoint to resume ({STATE} is missing)")
    state = _read_json(path)
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for field, (kind, ok) in _STATE_FIELDS.items():
        if field not in state:
            raise UserError(f"{path}: field {field!r} is missing")
        if not ok(state[field]):
            raise UserError(f"{path}: field {field!r} must be {kind}, got {state[field]!r:.80}")
    if "loss_scale" in state and not _LOSS_SCALE[1](state["loss_scale"]):
        raise UserError(f"{path}: field 'loss_scale' must be {_LOSS_SCALE[0]}, got {state['loss_scale']!r:.80}")
    for field, (kind, ok) in _BUDGET_FIELDS.items() if state["config"].get("time_budget") is not None else ():
        if not ok(state.get(field, ...)):
            raise UserError(f"{path}: field {field!r} must be {kind} in a time-budget run, got "
                            f"{state.get(field, 'nothing')!r:.80}")
    if state["config"].get("lora_rank") is not None and not _BASE_CRC[1](state.get("base_crc32")):
        raise UserError(f"{path}: field 'base_crc32' must be {_BASE_CRC[0]} in a LoRA run, got "
                        f"{state.get('base_crc32')!r:.80}")
    return state


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


# --------------------------------------------------------------- metrics.jsonl


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """`run_dir`/metrics.jsonl -> its entries (none if the file is absent). Each line must
    be a JSON object with an integer "step"; the first that is not is a UserError naming
    its line."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line, parse_constant=_no_constants)
        except ValueError as e:
            raise UserError(f"{path}: line {number} is not valid JSON ({e})") from None
        if not isinstance(entry, dict) or not _count(entry.get("step")):
            raise UserError(f"{path}: line {number} is not an object with an integer step: {line:.80}")
        entries.append(entry)
    return entries


def write_metrics(run_dir: str | os.PathLike, metrics: list[dict]) -> None:
    with atomic_path(Path(run_dir) / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(m, allow_nan=False) + "\n" for m in metrics), encoding="utf-8")


# ------------------------------------------------------- optimizer.safetensors


def read_optimizer(path: str | os.PathLike, flat: dict, device="cpu", keep=None, optimizer: str = "adamw") -> AdamWState:
    """The optimizer's moments for the params `flat` from `path`: exactly the keys
    exp_avg.<key> / exp_avg_sq.<key> an `optimizer` run keeps (moment_keys), each of its
    param's shape, finite, and an integer adam_step in the metadata. keep: read the
    moments of these params only (a rank's share under --shard_optimizer; default all)."""
    keep = set(flat) if keep is None else set(keep)
    path = Path(path)
    expected = {f"{kind}.{k}": tuple(flat[k].shape) for kind, keys in moment_keys(flat, optimizer).items()
                for k in keys}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            if keys != set(expected):
                missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
                raise UserError(f"{path}: keys do not match the model's parameters (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
            tensors = {k: f.get_tensor(k) for k in expected if k.split(".", 1)[1] in keep}
            step = (f.metadata() or {}).get("adam_step", "")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable optimizer state ({e})") from None
    for key, shape in expected.items():
        if key not in tensors:
            continue
        if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
            raise UserError(f"{path}: {key} is {tensors[key].dtype} {list(tensors[key].shape)}, "
                            f"expected floating point {list(shape)}")
    check_finite(tensors, str(path))
    if not step.isdigit():
        raise UserError(f"{path}: metadata adam_step must be an integer >= 0, got {step!r}")
    kept = [k for k in flat if k in keep]
    return AdamWState({k: tensors[f"exp_avg.{k}"] for k in kept},
                      {k: tensors[f"exp_avg_sq.{k}"] for k in kept if f"exp_avg_sq.{k}" in expected}, int(step))


def load_checkpoint(run_dir: str | os.PathLike, device="cpu", moments_of=None) -> tuple[TrainState, GPTConfig, dict]:
    """-> (the TrainState, the model config, state.json's fields) of the checkpoint in
    `run_dir`, every file checked against the others. moments_of(flat params) -> the keys
    whose AdamW moments to load (default all)."""
    fields = read_state(run_dir)
    run_dir = Path(run_dir)
    if fields["config"].get("lora_rank") is None:
        params, config = load_params(run_dir / MODEL, device=device)
        if config.to_dict() != GPTConfig.from_dict(fields["model_config"]).to_dict():
            raise UserError(f"{run_dir / MODEL}: its config differs from the run's ({STATE} model_config); "
                            f"the file was replaced")
        adapter, flat = None, flatten(params)
    else:
        params, config, adapter = _lora_checkpoint(run_dir, fields, device)
        flat = dict(adapter.tensors)
    opt = read_optimizer(run_dir / OPTIMIZER, flat, device, keep=None if moments_of is None else moments_of(flat),
                         optimizer=fields["config"].get("optimizer") or "adamw")
    if opt.step != fields["step"]:
        raise UserError(f"{run_dir}: {OPTIMIZER} is at step {opt.step}, {STATE} at step {fields['step']}")
    rng = {name: _generator_state(run_dir / STATE, name, text) for name, text in fields["rng"].items()}
    loss_scale = LossScale(**fields["loss_scale"]) if "loss_scale" in fields else None
    state = TrainState(params, opt, fields["step"], Position(**fields["data_position"]), rng, loss_scale, adapter)
    return state, config, fields


def base_crc32(params) -> str:
    """A LoRA run's fingerprint of its frozen base weights (state.json's base_crc32)."""
    return crc32_of(flatten(params).values())


def _lora_checkpoint(run_dir: Path, fields: dict, device):
    """-> (the frozen base params from the run's init, checked against base_crc32, the
    model config, the adapter in `run_dir`, checked against the run's rank and alpha)."""
    run, base = fields["config"], fields["config"].get("init")
    if not isinstance(base, str) or not base:
        raise UserError(f"{run_dir / STATE}: config.init must name the base weights of a LoRA run, got {base!r:.80}")
    params, config = load_params(base, device=device, config=GPTConfig.from_dict(fields["model_config"]))
    found = base_crc32(params)
    if found != fields["base_crc32"]:
        raise UserError(f"{base}: the base weights of the LoRA run {run_dir} changed since it started ({found}, the "
                        f"run's {fields['base_crc32']}); give the run its own base back, or train a new --out")
    adapter = load_adapter(run_dir, params)
    for field, setting, value in (("r", "lora_rank", adapter.rank), ("lora_alpha", "lora_alpha", adapter.alpha)):
        if value != run.get(setting):
            raise UserError(f"{run_dir / ADAPTER_CONFIG}: {field} is {value}, the run's {setting} "
                            f"{run.get(setting)} ({STATE})")
    return params, config, adapter


def _generator_state(path: Path, name: str, text: str) -> torch.Tensor:
    state = torch.tensor(list(bytes.fromhex(text)), dtype=torch.uint8)
    if name == "torch":  # a CUDA state can only be checked on a GPU, as it is set
        try:
            torch.Generator().set_state(state)
        except RuntimeError:
            raise UserError(f"{path}: field 'rng' does not hold a torch generator state") from None
    return state

"""A training run's checkpoint, in its run directory, written so that a kill at any
instant leaves a complete one behind and read back for an exact resume.

A checkpoint is `model.safetensors` (params + config, loadable by `load_params`),
`optimizer.safetensors` (Adam's moments keyed `exp_avg.<GPT-2 key>` and
`exp_avg_sq.<GPT-2 key>`, the step in its metadata) and `state.json` (step, data
position, RNG state, the full run configuration; the commit marker, written last).
"""

import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import load_params, save_params
from .config import GPTConfig
from .errors import UserError
from .files import atomic_path, write_json
from .optim import AdamWState
from .params import flatten, unflatten

MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"


def save_checkpoint(run_dir: str | os.PathLike, flat: dict, config: GPTConfig, opt: AdamWState, state: dict) -> None:
    """Write a checkpoint so that a kill at any instant leaves a complete one behind.

    Phase 1 writes model, optimizer and state.json (last) into `run_dir/.next/`; phase 2
    renames them into `run_dir`, state.json last. A kill in phase 1 leaves the previous
    checkpoint untouched (the partial `.next` is discarded later); a kill in phase 2 is
    rolled forward by `recover`, since every new file was already complete.
    """
    run_dir = Path(run_dir)
    recover(run_dir)
    pending = run_dir / ".next"
    save_params(pending / MODEL, unflatten(flat), config)
    moments = {f"exp_avg.{k}": t.contiguous() for k, t in opt.exp_avg.items()}
    moments |= {f"exp_avg_sq.{k}": t.contiguous() for k, t in opt.exp_avg_sq.items()}
    with atomic_path(pending / OPTIMIZER) as tmp:
        save_file(moments, str(tmp), metadata={"adam_step": str(opt.step)})
    write_json(pending / STATE, state)
    _commit(run_dir)


def _commit(run_dir: Path) -> None:
    pending = run_dir / ".next"
    for name in (OPTIMIZER, MODEL, STATE):
        if (pending / name).exists():
            os.replace(pending / name, run_dir / name)
    pending.rmdir()


def recover(run_dir: str | os.PathLike) -> None:
    """Finish a save that was killed after its state.json was written, or discard one
    killed before (see `save_checkpoint`)."""
    pending = Path(run_dir) / ".next"
    if (pending / STATE).is_file():
        _commit(Path(run_dir))
    elif pending.exists():
        shutil.rmtree(pending)


def load_checkpoint(run_dir: str | os.PathLike, device="cpu"):
    """-> (flat params, model config, AdamWState, state dict) of the checkpoint in `run_dir`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    recover(run_dir)
    if not (run_dir / STATE).is_file():
        raise UserError(f"{run_dir}: holds no checkpoint to resume ({STATE} is missing)")
    state = json.loads((run_dir / STATE).read_text(encoding="utf-8"))
    params, config = load_params(run_dir / MODEL, device=device)
    flat = flatten(params)
    try:
        with safe_open(str(run_dir / OPTIMIZER), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            expected = {f"{kind}.{k}" for kind in ("exp_avg", "exp_avg_sq") for k in flat}
            if keys != expected:
                raise UserError(f"{run_dir / OPTIMIZER}: keys do not match the model's parameters")
            opt = AdamWState(
                {k: f.get_tensor(f"exp_avg.{k}") for k in flat},
                {k: f.get_tensor(f"exp_avg_sq.{k}") for k in flat},
                int(f.metadata()["adam_step"]),
            )
    except (SafetensorError, OSError, KeyError) as e:
        raise UserError(f"{run_dir / OPTIMIZER}: not a readable optimizer state ({e})") from None
    return flat, config, opt, state

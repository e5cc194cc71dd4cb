"""Training: `loss = cross_entropy(forward(params, x), y)`, AdamW, checkpoints that resume
bit-exactly, progress, metrics and a loss plot.

A run directory holds the latest checkpoint at its root and the best-validation one in
`best/` (see runs.py for their files and how they are written). Beside them:
`metrics.jsonl` (one JSON object per step and per evaluation) and `loss.png`.
"""

import ctypes
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import load_params
from .config import GPTConfig, preset
from .data import (DEFAULT_DATA_DIR, Position, check_fits, eval_starts, gather_windows, load_tokens, next_batch,
                   window_starts)
from .device import pick_device
from .errors import UserError
from .files import atomic_path, make_dir
from .generate import generate
from .model import forward
from .optim import adamw_init, adamw_step, clip_grad_norm, lr_at
from .params import Params, flatten, init_params, unflatten
from .runs import STATE, load_checkpoint, read_metrics, read_state, save_run_checkpoint, write_metrics
from .sampling import Sampling
from .tokenizer import ENDOFTEXT_ID, decode



@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. The defaults are the main job: the cpu-small preset
    on the prepared Shakespeare corpus, sized for about 9 minutes on 2 CPU cores."""

    data: str = DEFAULT_DATA_DIR  # prepared data directory (train.bin, val.bin)
    out: str = "runs/shakespeare"  # run directory
    preset: str = "cpu-small"  # model preset when training from scratch
    init: str | None = None  # start from these weights (file, run dir or HF dir) instead
    max_steps: int = 1000  # optimizer updates in all
    decay_steps: int | None = None  # where the cosine reaches min_lr (default max_steps)
    batch_size: int = 8  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per update
    context_length: int | None = None  # tokens per window (default: the model's n_positions)
    stride: int | None = None  # offset between training windows (default context_length)
    lr: float = 1.2e-3  # peak learning rate
    min_lr: float | None = None  # floor of the cosine (default lr / 10)
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on 2-D block weights only (see optim.decays)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    dropout: float | None = None  # sets all three dropout rates (default: the model's)
    seed: int = 0  # init, data order, dropout and samples
    eval_interval: int = 100  # steps between evaluations and checkpoints
    eval_windows: int = 64  # validation windows in a periodic evaluation (fixed set)
    sample_tokens: int = 48  # tokens of the sample printed at each evaluation; 0: none
    device: str | None = None  # cpu, cuda, mps (default: best available)

    def __post_init__(self):
        """Every field's type and range, checked once here, however the config is built
        (flags, a config file, a resumed state.json, Python): a UserError naming the field."""
        for field in dataclasses.fields(self):
            _check_type(field.name, str(field.type), getattr(self, field.name))
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("context_length", "stride", "decay_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in _UNIT_INTERVAL:
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise UserError(f"--min_lr {self.min_lr} is above --lr {self.lr}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be in 0..2**63-1, got {self.seed}")
        if self.init is None:
            preset(self.preset)  # an unknown name fails now, not after the data is read

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_POSITIVE = ("max_steps", "batch_size", "grad_accum", "lr", "eval_interval")
_NON_NEGATIVE = ("warmup_steps", "weight_decay", "grad_clip", "eval_windows", "sample_tokens", "min_lr")
_UNIT_INTERVAL = ("beta1", "beta2", "dropout")  # in [0, 1)


def _check_type(key: str, kind: str, value) -> None:
    """kind: the field's annotation as text ("int", "float | None", "str | None", ...)."""
    if value is None:
        if "None" not in kind:
            raise UserError(f"--{key}: a value is required")
    elif "str" in kind:
        if not isinstance(value, str) or not value:
            raise UserError(f"--{key}: expected a non-empty string, got {value!r}")
    elif "float" in kind:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"--{key}: expected a finite number, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"--{key}: expected an integer, got {value!r}")


def make_config(values: dict) -> TrainConfig:
    """A TrainConfig from {field: value} (defaults for the rest): a wrong name is a
    UserError, an integer field given as an integral float (4.0, as JSON may) is taken as
    the integer, and TrainConfig checks every type and range."""
    if not isinstance(values, dict):
        raise UserError(f"training settings: expected a table of settings, got {type(values).__name__}")
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    unknown = next((k for k in values if k not in kinds), None)
    if unknown is not None:
        raise UserError(f"unknown training setting {unknown!r}; known: {', '.join(kinds)}")
    integral = lambda k, v: isinstance(v, float) and v.is_integer() and "int" in kinds[k] and "float" not in kinds[k]
    return TrainConfig(**{k: int(v) if integral(k, v) else v for k, v in values.items()})


def read_config_file(path: str | os.PathLike) -> dict:
    """Training settings from a TOML or JSON file (keys are TrainConfig's field names)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ImportError:
        raise UserError(f"{path}: TOML needs Python 3.11 or later; use a JSON file") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a table of settings")
    return values


# ---------------------------------------------------------------------------- the loss


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy with a fused backward, softmax(logits) - onehot(targets): one
    [N, V] buffer instead of log_softmax's and nll's, which matters at V = 50257 on a CPU."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, lse, targets)
        return (lse - logits.gather(1, targets[:, None])[:, 0]).mean()

    @staticmethod
    def backward(ctx, grad):
        logits, lse, targets = ctx.saved_tensors
        g = torch.sub(logits, lse[:, None]).exp_()
        g[torch.arange(len(targets), device=g.device), targets] -= 1
        return g.mul_(grad / len(targets)), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits: float [B, T, V], targets: int64 [B, T] -> mean loss in nats/token (float32)."""
    return _CrossEntropy.apply(logits.flatten(0, 1).float(), targets.flatten())


def loss_and_grads(flat: dict, x, y, config: GPTConfig, *, dropout: bool = False):
    """One forward and backward pass. flat: {GPT-2 key: tensor}; x, y: int64 [B, T].
    -> (loss in nats/token as a 0-d tensor, {key: gradient})."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in flat.items()}
    loss = cross_entropy(forward(unflatten(leaves), x, config, dropout=dropout), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


@torch.inference_mode()
def val_loss(params: Params, config: GPTConfig, tokens: np.ndarray, starts, context_length: int,
             device, should_stop=lambda: False) -> float | None:
    """Mean next-token cross-entropy (nats/token) over the windows at `starts`; None if
    `should_stop()` turns true between two batches (an interrupted evaluation)."""
    total, count = 0.0, 0
    batch_size = max(1, 2048 // context_length)  # bounds the [B, T, V] logits
    for i in range(0, len(starts), batch_size):
        if should_stop():
            return None
        x, y = gather_windows(tokens, starts[i : i + batch_size], context_length)
        logits = forward(params, x.to(device), config)
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum"))
        count += y.numel()
    return total / count


def sample_text(params: Params, config: GPTConfig, n_tokens: int, seed: int, device,
                temperature: float = 0.8) -> str:
    """A short sample from `<|endoftext|>` (token 0 in a smaller vocabulary), drawn from its
    own seeded generator so that it never disturbs the training RNG."""
    generator = torch.Generator(device=device).manual_seed(seed)
    start = ENDOFTEXT_ID if ENDOFTEXT_ID < config.vocab_size else 0
    steps = generate(params, [[start]], config, max_new_tokens=n_tokens,
                     sampling=Sampling(temperature=temperature), generator=generator)
    return decode([int(token[0]) for token in steps])


# ----------------------------------------------------------------------- the run


def resume_config(run_dir: str | os.PathLike, overrides: dict) -> TrainConfig:
    """The stored configuration of the run in `run_dir`. `overrides` (flags given on the
    command line) may only extend max_steps; any other that differs is a UserError."""
    state_file = Path(run_dir) / STATE
    stored = read_state(run_dir)["config"]
    values = dict(stored, out=str(Path(run_dir)))
    for key, given in overrides.items():
        if key == "max_steps":
            values[key] = given
            continue
        same = given == stored.get(key)
        if key in ("data", "out", "init") and given is not None and stored.get(key) is not None:
            same = Path(given).resolve() == Path(stored[key]).resolve()
        if not same:
            raise UserError(
                f"--{key} {given} differs from the checkpoint's {key}={stored.get(key)} "
                f"({state_file}); drop the flag, or train into a new --out"
            )
    try:
        return make_config(values)
    except UserError as e:
        raise UserError(f"{state_file}: config: {e}") from None


def _keep_freed_memory() -> None:
    # glibc hands each block over 32 MB to mmap and back to the kernel when freed; the
    # [B*T, 50257] logits are such blocks, and refaulting their pages every step costs
    # more than the arithmetic on them. Keeping freed memory in the heap avoids that.
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def _model(cfg: TrainConfig, device) -> tuple[dict, GPTConfig]:
    if cfg.init is not None:
        params, config = load_params(cfg.init, device=device)
    else:
        config = preset(cfg.preset)
        params = init_params(config, seed=cfg.seed, device=device)
    if cfg.dropout is not None:
        config = dataclasses.replace(config, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, resid_pdrop=cfg.dropout)
    return flatten(params), config


def resolve(cfg: TrainConfig, config: GPTConfig) -> TrainConfig:
    """Fill the defaults that depend on the model, and check the run fits it."""
    context = cfg.context_length or config.n_positions
    if context > config.n_positions:
        raise UserError(f"--context_length {context} does not fit the model's n_positions={config.n_positions}")
    return dataclasses.replace(
        cfg,
        data=str(Path(cfg.data).resolve()),
        init=None if cfg.init is None else str(Path(cfg.init).resolve()),
        context_length=context,
        stride=cfg.stride or context,
        decay_steps=cfg.decay_steps or cfg.max_steps,
        min_lr=cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr,
    )


# A weight this large means a blow-up: AdamW moves a weight by about lr per step, and no
# trained GPT-2 holds one within orders of magnitude of it.
DIVERGED_WEIGHT = 1e6


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train (or resume, when `resume`) the run `cfg` describes; returns its summary
    (step, val_loss, best_val_loss, seconds, peak memory). Ctrl-C or SIGTERM finishes the
    step, saves and returns. A non-finite loss, gradient or validation loss, or params
    that are not finite or exceed DIVERGED_WEIGHT, stop the run with a UserError before
    anything of that step is saved: the last good checkpoint stays as it was."""
    _keep_freed_memory()
    device = pick_device(cfg.device)
    run = Path(cfg.out)
    if resume:
        flat, config, opt, state = load_checkpoint(run, device=device)
        cfg = dataclasses.replace(cfg, data=state["data_dir"])
        step, position = state["step"], Position(**state["data_position"])
        _set_rng_state(state["rng"], device, run / STATE)
        metrics = [m for m in read_metrics(run) if m["step"] <= step]
        best = state["best_val_loss"]
    else:
        if (run / STATE).exists():
            raise UserError(f"{run}: already holds a run; continue it with --resume {run}, or pick another --out")
        make_dir(run)
        flat, config = _model(cfg, device)
        cfg = resolve(cfg, config)
        opt, step, position, metrics, best = adamw_init(flat), 0, Position(), [], None
        torch.manual_seed(cfg.seed)
    if step >= cfg.max_steps:
        raise UserError(f"{run} is already at step {step}; pass a larger --max_steps to train on")
    train_tokens = load_tokens(cfg.data, "train", vocab_size=config.vocab_size)
    val_tokens = load_tokens(cfg.data, "val", vocab_size=config.vocab_size)
    check_fits(train_tokens, cfg.context_length, f"{cfg.data}/train.bin")
    check_fits(val_tokens, cfg.context_length, f"{cfg.data}/val.bin")
    if resume:
        if len(train_tokens) != state["train_tokens"]:
            raise UserError(f"{cfg.data}/train.bin holds {len(train_tokens)} tokens, the run was trained on "
                            f"{state['train_tokens']}: the data changed since the checkpoint")
        n_windows = len(window_starts(len(train_tokens), cfg.context_length, cfg.stride))
        if position.index >= n_windows:
            raise UserError(f"{run / STATE}: data_position index {position.index} is past the "
                            f"{n_windows} windows of an epoch")
    quick_starts = eval_starts(len(val_tokens), cfg.context_length, cfg.eval_windows or None)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.context_length
    stop = _StopOnSignal()
    log(f"training {run} on {cfg.data}: {sum(t.numel() for t in flat.values()):,} parameters, "
        f"{tokens_per_step} tokens/step, steps {step}..{cfg.max_steps}, device {device}")

    def checkpoint(val: float | None, is_best: bool, lr: float):
        state = {
            "step": step,
            "data_dir": cfg.data,
            "data_position": position._asdict(),
            "train_tokens": len(train_tokens),
            "lr": lr,
            "val_loss": val,
            "best_val_loss": best,
            "rng": _rng_state(device),
            "config": cfg.to_dict(),
            "model_config": config.to_dict(),
        }
        write_metrics(run, metrics)
        save_run_checkpoint(run, flat, config, opt, state, is_best=is_best)

    def stopped(at: int, what: str):
        kept = f"the last good checkpoint in {run} is kept" if (run / STATE).exists() else "nothing was saved"
        return UserError(f"step {at}: {what}; stopped, {kept}; try a lower --lr or check the data")

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    start = time.time()
    with stop, bar:  # the bar is closed before any error is printed
        while step < cfg.max_steps:
            t0 = time.time()
            lr = lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps,
                       min_lr=cfg.min_lr)
            loss, grads = 0.0, None
            for _ in range(cfg.grad_accum):
                x, y, position = next_batch(train_tokens, position, batch_size=cfg.batch_size,
                                            context_length=cfg.context_length, stride=cfg.stride, seed=cfg.seed)
                micro_loss, micro_grads = loss_and_grads(flat, x.to(device), y.to(device), config, dropout=True)
                loss += float(micro_loss) / cfg.grad_accum
                if grads is None:
                    grads = micro_grads
                else:
                    torch._foreach_add_(list(grads.values()), list(micro_grads.values()))
            if cfg.grad_accum > 1:
                torch._foreach_div_(list(grads.values()), cfg.grad_accum)
            norm = clip_grad_norm(grads, cfg.grad_clip or None)
            if not math.isfinite(loss):
                raise stopped(step + 1, f"loss is {loss}")
            if not math.isfinite(norm):
                raise stopped(step + 1, f"gradient norm is {norm}")
            opt = adamw_step(flat, grads, opt, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
            largest = max_abs(flat)
            if not largest[1] <= DIVERGED_WEIGHT:
                raise stopped(step + 1, f"the update made {largest[0]} "
                              f"{'diverge' if math.isfinite(largest[1]) else 'non-finite'} (max |w| {largest[1]:.3g})")
            step += 1
            seconds = time.time() - t0
            metrics.append({"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                            "tokens_per_s": tokens_per_step / seconds})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:.0f}")
            bar.update()
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                params = unflatten(flat)
                val = val_loss(params, config, val_tokens, quick_starts, cfg.context_length, device)
                if not math.isfinite(val):
                    raise stopped(step, f"validation loss is {val}")
                is_best = best is None or val < best
                best = min(val, best) if best is not None else val
                entry = {"step": step, "val_loss": val}
                if cfg.sample_tokens:
                    entry["sample"] = sample_text(params, config, cfg.sample_tokens, cfg.seed + step, device)
                metrics.append(entry)
                bar.write(f"step {step}: train loss {loss:.4f}, val loss {val:.4f} ({len(quick_starts)} windows)"
                          + (f"\n  sample: {entry['sample']!r}" if cfg.sample_tokens else ""))
                checkpoint(val, is_best, lr)
                plot_losses(metrics, run / "loss.png")
            elif stop.requested:
                checkpoint(None, False, lr)
            if stop.requested and step < cfg.max_steps:
                bar.close()
                log(f"stopped by {stop.requested} at step {step}; checkpoint saved. "
                    f"Resume with: fgpt train --resume {run}")
                return {"step": step, "interrupted": True}
        bar.close()
        elapsed = time.time() - start
        # The figure a run is judged by: every val token predicted once, at the model's full
        # context (the training context when val.bin is shorter than that).
        final_T = config.n_positions if len(val_tokens) > config.n_positions else cfg.context_length
        final_starts = eval_starts(len(val_tokens), final_T)
        final = None if stop.requested else val_loss(unflatten(flat), config, val_tokens, final_starts, final_T,
                                                     device, should_stop=lambda: stop.requested is not None)
    if final is None:
        log(f"stopped by {stop.requested} after the last step ({step}): the run is complete and saved; the final "
            f"evaluation over all of val.bin was skipped (run: fgpt eval --weights {run})")
        return {"step": step, "interrupted": True}
    peak_mb = _peak_rss_mb()
    log(f"val loss {final:.4f} nats/token (all {len(final_starts)} non-overlapping windows of "
        f"{final_T} tokens in val.bin); training {elapsed:.0f}s, peak memory {peak_mb:.0f} MiB")
    summary = {"step": step, "val_loss": final, "best_val_loss": best, "train_seconds": elapsed,
               "peak_rss_mib": peak_mb, "interrupted": False}
    metrics.append({"step": step, "final_val_loss": final})
    write_metrics(run, metrics)
    plot_losses(metrics, run / "loss.png")
    return summary


def max_abs(flat: dict) -> tuple[str, float]:
    """-> (key, value) of the params' largest |w| (NaN wins: then the value is NaN)."""
    norms = torch.stack(torch._foreach_norm(list(flat.values()), float("inf"))).tolist()
    i = next((i for i, n in enumerate(norms) if not math.isfinite(n)), max(range(len(norms)), key=norms.__getitem__))
    return list(flat)[i], norms[i]


class _StopOnSignal:
    """Within `with`, Ctrl-C and SIGTERM set `requested` (the signal's name) instead of
    killing the process, so the loop can finish its step and save."""

    requested: str | None = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _rng_state(device) -> dict:
    rng = {"torch": bytes(torch.get_rng_state().tolist()).hex()}
    if device.type == "cuda":
        rng["cuda"] = bytes(torch.cuda.get_rng_state().tolist()).hex()
    return rng


def _set_rng_state(rng: dict, device, source) -> None:
    try:
        torch.set_rng_state(torch.tensor(list(bytes.fromhex(rng["torch"])), dtype=torch.uint8))
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(list(bytes.fromhex(rng["cuda"])), dtype=torch.uint8))
    except RuntimeError:
        raise UserError(f"{source}: field 'rng' does not hold a torch generator state") from None


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def plot_losses(metrics: list[dict], path: str | os.PathLike) -> None:
    """Train loss per step (faint), its moving average, the periodic validation loss and
    the final one over all of val.bin, in nats/token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="tab:blue", label=f"train (mean of {k} steps)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation (fixed windows)")
    for m in metrics:
        if "final_val_loss" in m:
            ax.plot(m["step"], m["final_val_loss"], "*", color="tab:red", markersize=12,
                    label=f"final validation, all of val.bin: {m['final_val_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

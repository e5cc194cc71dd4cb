"""Training: the loop around `step.train_step` (batches, progress, evaluation, checkpoints
that resume bit-exactly, signals, a time budget), its metrics and a loss plot; its
settings are settings.py's `TrainConfig`.

A run directory holds the latest checkpoint at its root and the best-validation one in
`best/` (see runs.py for their files and how they are written). Beside them:
`metrics.jsonl` (one JSON object per step and per evaluation) and `loss.png`.
"""

import ctypes
import dataclasses
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ..model.checkpoint import load_params
from ..model.lora import Adapter, attach, init_adapter, trainable_count
from ..model.config import GPTConfig, preset
from .budget import budget_seconds, expected_steps, plan_steps
from .data import check_fits, eval_starts, gather_windows, load_tokens, next_batch, window_starts
from . import distributed
from ..device import pick_device, pick_dtype
from .distributed import SINGLE, World
from ..checks import describe
from ..errors import AgreedError, UserError
from ..files import make_dir, save_png
from ..generation.decoding import generate
from .loss import lm_head_loss
from ..model.transformer import forward_hidden
from ..model.params import Params, flatten, init_params
from .runs import (STATE, base_crc32, checkpoint_dirs, load_checkpoint, read_metrics, save_run_checkpoint,
                   write_metrics)
from ..generation.sampling import Sampling
from .settings import TrainConfig, lora_layers, lora_targets, resolve
from .step import Batch, Diverged, LossScale, StepSettings, TrainState, new_state, train_step
from ..model.tokenizer import ENDOFTEXT_ID, decode


# ---------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def val_loss(params: Params, config: GPTConfig, tokens: np.ndarray, starts, context_length: int,
             device, should_stop=lambda: False, world: World = SINGLE) -> float | None:
    """Mean next-token cross-entropy (nats/token) over the windows at `starts`; None if
    `should_stop()` turns true between two batches (an interrupted evaluation). In a
    data-parallel world each rank takes every world.size-th window and the sums are
    all-reduced: every rank returns the mean over all of `starts`."""
    starts = starts[world.rank :: world.size]
    total, count = 0.0, 0
    batch_size = max(1, 2048 // context_length)
    for i in range(0, len(starts), batch_size):
        if should_stop():
            return None
        x, y = gather_windows(tokens, starts[i : i + batch_size], context_length)
        # The head and loss in chunks: no [B, T, V] logits (822 MB at 2 x 1024 on GPT-2).
        loss = lm_head_loss(forward_hidden(params, x.to(device), config), params["wte"]["weight"], y.to(device))
        total += float(loss) * y.numel()
        count += y.numel()
    total, count = distributed.total(world, [total, count], device)
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



def keep_freed_memory() -> None:
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


def _model(cfg: TrainConfig, device) -> tuple[Params, GPTConfig]:
    if cfg.init is not None:
        params, config = load_params(cfg.init, device=device)
    else:
        config = preset(cfg.preset)
        params = init_params(config, seed=cfg.seed, device=device)
    if cfg.dropout is not None:
        config = dataclasses.replace(config, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, resid_pdrop=cfg.dropout)
    return params, config



def new_adapter(cfg: TrainConfig, params: Params, config: GPTConfig) -> Adapter:
    """The fresh LoRA adapter a --lora_rank run trains (A drawn from --seed, B zero); a
    setting that does not fit the model is a UserError naming its flag."""
    layers = lora_layers(cfg.lora_layers)
    outside = next((i for i in layers or () if i >= config.n_layer), None)
    if outside is not None:
        raise UserError(f"--lora_layers: block {outside} is not in the model, whose blocks are 0..{config.n_layer - 1}")
    try:
        return init_adapter(params, cfg.lora_rank, cfg.lora_alpha, lora_targets(cfg.lora_targets), layers=layers,
                            seed=cfg.seed, config=config)
    except UserError as e:  # init_adapter names its arguments: rank, layers, ...
        raise UserError(f"--lora_{e}") from None


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train (or resume, when `resume`) the run `cfg` describes; returns its summary
    (step, val_loss, best_val_loss, seconds, peak memory). The loop around
    `step.train_step`: batches, progress, evaluation, checkpoints, signals. Ctrl-C or
    SIGTERM finishes the step, saves and returns. A non-finite loss, gradient or
    validation loss, or params that are not finite or exceed DIVERGED_WEIGHT, stop the run
    with a UserError before anything of that step is saved: the last good checkpoint stays
    as it was.

    Under torchrun (WORLD_SIZE > 1) it trains data parallel: each rank takes its share
    (batch_size / WORLD_SIZE) of every micro-batch, gradients are averaged over the ranks,
    and rank 0 alone logs, shows progress and writes files. The checkpoint is the one a
    single process writes, so a run resumes with any number of ranks. Before any
    collective the ranks compare what they will train with (`_facts`): a difference, or
    an error on any rank, stops every rank with the same AgreedError."""
    if not isinstance(cfg, TrainConfig):
        raise UserError(f"cfg: expected a TrainConfig (make_config), got {describe(cfg)}")
    keep_freed_memory()
    world = distributed.world_from_env()
    if not world.is_main:
        log, progress = _silent, False
    try:
        store = distributed.meet(world)
    except RuntimeError as e:
        raise UserError(f"data parallel: cannot reach the rendezvous endpoint ({_first_line(e)})") from None
    # Every rank reads and checks its flags, weights and data, then the ranks compare them
    # before any collective: one that differs or fails stops them all, in one line.
    start = distributed.start_together(world, store, lambda: _start(cfg, world, resume=resume, log=log),
                                       lambda s: _facts(s, resume))
    try:
        distributed.join(world, start.device, store)
        return _train(start, world, progress=progress, log=log)
    except RuntimeError as e:  # gloo and NCCL raise RuntimeErrors (DistBackendError, ...) when a peer is gone
        if world.size == 1:
            raise
        kept = f"the last checkpoint in {cfg.out} is kept" if (Path(cfg.out) / STATE).exists() else "nothing was saved"
        raise UserError(f"another rank stopped or cannot be reached ({type(e).__name__}: {_first_line(e)}); "
                        f"{kept}; torchrun --max-restarts N resumes from it") from None
    finally:
        distributed.leave()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _silent(*args, **kwargs) -> None:
    pass


class _Start(NamedTuple):
    """What a rank has read and checked before its first step: the resolved config, the
    device and compute dtype, the state to start from (fresh or resumed), the model's
    config, the metrics and best validation loss so far, the train and val tokens."""

    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype
    state: TrainState
    config: GPTConfig
    metrics: list[dict]
    best: float | None
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    base_crc32: str | None  # a LoRA run's frozen weights' fingerprint
    spent: float  # seconds of its --time_budget the run has spent
    planned: int | None  # the run's length in steps: --max_steps, or once a budget has fixed it


def _start(cfg: TrainConfig, world: World, *, resume: bool, log) -> _Start:
    """Read and check everything a run needs before its first step (the weights or the
    checkpoint, the data), each problem a UserError. Writes nothing."""
    if cfg.batch_size % world.size:
        what = (f"is fewer windows than the {world.size} processes: each needs at least one"
                if cfg.batch_size < world.size else f"does not split evenly over {world.size} processes")
        raise UserError(f"--batch_size {cfg.batch_size} {what}; give a multiple of {world.size}")
    device = pick_device(cfg.device)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    dtype = pick_dtype(cfg.dtype, device, log=log)
    run = Path(cfg.out)
    if resume:
        state, config, fields = load_checkpoint(run, device=device, moments_of=_moments_of(cfg, world))
        cfg = dataclasses.replace(cfg, data=fields["data_dir"])
        stored_dtype = fields["config"].get("dtype", "float32")
        if stored_dtype != cfg.dtype:
            log(f"resuming a {stored_dtype} run in {cfg.dtype}: the master weights and Adam's moments are float32, "
                f"so only the precision of the compute changes")
        metrics = [m for m in read_metrics(run) if m["step"] <= state.step]
        best, base_crc = fields["best_val_loss"], fields.get("base_crc32")
        spent, planned = fields.get("time_spent", 0.0), fields.get("planned_steps")
    else:
        if (run / STATE).exists():
            raise UserError(f"{run}: already holds a run; continue it with --resume {run}, or pick another --out")
        params, config = _model(cfg, device)
        cfg = resolve(cfg, config)
        adapter = None if cfg.lora_rank is None else new_adapter(cfg, params, config)
        base_crc = None if adapter is None else base_crc32(params)
        state = new_state(params, cfg.seed, device, moments_of=_moments_of(cfg, world), adapter=adapter,
                          optimizer=cfg.optimizer)
        metrics, best, spent, planned = [], None, 0.0, None
    if dtype == torch.float16 and state.loss_scale is None:
        state = dataclasses.replace(state, loss_scale=LossScale())
    if cfg.time_budget is None:
        planned = cfg.max_steps
        if state.step >= planned:
            raise UserError(f"{run} is already at step {state.step}; pass a larger --max_steps to train on")
    elif planned is not None and state.step >= planned:
        raise UserError(f"{run} has trained its --time_budget {cfg.time_budget} ({state.step} steps); train on from "
                        f"it into a new run: --init {run} --out DIR")
    train_tokens = load_tokens(cfg.data, "train", vocab_size=config.vocab_size)
    val_tokens = load_tokens(cfg.data, "val", vocab_size=config.vocab_size)
    check_fits(train_tokens, cfg.context_length, f"{cfg.data}/train.bin")
    check_fits(val_tokens, cfg.context_length, f"{cfg.data}/val.bin")
    if resume:
        if len(train_tokens) != fields["train_tokens"]:
            raise UserError(f"{cfg.data}/train.bin holds {len(train_tokens)} tokens, the run was trained on "
                            f"{fields['train_tokens']}: the data changed since the checkpoint")
        n_windows = len(window_starts(len(train_tokens), cfg.context_length, cfg.stride))
        if state.position.index >= n_windows:
            raise UserError(f"{run / STATE}: data_position index {state.position.index} is past the "
                            f"{n_windows} windows of an epoch")
    return _Start(cfg, device, dtype, state, config, metrics, best, train_tokens, val_tokens, base_crc, spent,
                  planned)


def _moments_of(cfg: TrainConfig, world: World):
    return distributed.my_share(world) if cfg.shard_optimizer and world.size > 1 else None


# May differ across ranks: where each reads and writes (--data, --init and --out: the data and
# weights they hold are compared instead, and rank 0 alone writes), --device's index,
# --sample_tokens (rank 0 alone samples) and --checkpoint_activations (the same gradients,
# bit for bit, in less memory).
_MAY_DIFFER = ("data", "out", "init", "device", "sample_tokens", "checkpoint_activations")


def _facts(start: _Start, resume: bool) -> dict:
    """What every rank of a data-parallel run must agree on, {what: a JSON value}, in the
    order a difference is reported: the flags (resolved), the device kind and compute
    dtype, the model's config, the state it starts from (step, data position, RNG, loss
    scale, best validation loss, Adam's moments when every rank holds them all), the
    data (tokens and CRC-32 of each file) and the weights (CRC-32 of each tensor). For
    gpt2 on 2 CPU cores: 0.15-0.25 s for the 475 MiB of weights, 0.5-0.6 s in all."""
    cfg, state = start.cfg, start.state
    facts = {"--resume": resume}
    facts |= {f"--{k}": v for k, v in cfg.to_dict().items() if k not in _MAY_DIFFER}
    facts |= {"the device kind": start.device.type, "the compute dtype": str(start.dtype).removeprefix("torch.")}
    facts |= {f"the model's {k}": v for k, v in start.config.to_dict().items()}
    facts |= {"the starting step": state.step, "the data position": list(state.position),
              "the RNG state": distributed.crc32_of(state.rng[k] for k in sorted(state.rng)),
              "the loss scale": None if state.loss_scale is None else list(state.loss_scale),
              "the best validation loss": start.best}
    if not cfg.shard_optimizer:  # sharded, each rank holds the only copy of its share
        facts["Adam's moments"] = distributed.crc32_of(m[k] for m in (state.opt.exp_avg, state.opt.exp_avg_sq) for k in m)
    for name, tokens in (("train.bin", start.train_tokens), ("val.bin", start.val_tokens)):
        facts[f"--data {name}"] = f"{len(tokens):,} tokens (crc32 {distributed.crc32(tokens):08x})"
    source = "the checkpoint's" if resume else "--init" if cfg.init is not None else "the initial"
    facts |= {f"{source} {k}": f"crc32 {distributed.crc32(t):08x}" for k, t in flatten(state.params).items()}
    if state.adapter is not None:
        facts |= {f"the adapter's {k}": f"crc32 {distributed.crc32(t):08x}" for k, t in state.adapter.tensors.items()}
    return facts


def _make_run_dir(run: Path, world: World, device) -> None:
    """Rank 0 makes (or checks it can write) the run directory, once the ranks agree to
    start, so that a job that does not start leaves none; if it cannot, every rank stops
    (rank 0 says why)."""
    problem = None
    if world.is_main:
        try:
            make_dir(run)
        except UserError as e:
            problem = e
    if distributed.any_rank(world, problem is not None, device):
        raise AgreedError(str(problem) if problem else "rank 0 cannot write the run directory")


def _train(start: _Start, world: World, *, progress: bool, log) -> dict:
    cfg, device, dtype, state, config = start.cfg, start.device, start.dtype, start.state, start.config
    metrics, best, train_tokens, val_tokens = start.metrics, start.best, start.train_tokens, start.val_tokens
    run = Path(cfg.out)
    moments_of = _moments_of(cfg, world)
    _make_run_dir(run, world, device)
    budget = None if cfg.time_budget is None else budget_seconds(cfg.time_budget)
    planned = start.planned  # the run's length in steps, once known
    settings = StepSettings(config, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                            decay_steps=cfg.decay_steps or planned or UNPLANNED, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip or None, dtype=dtype,
                            world=world, shard_optimizer=cfg.shard_optimizer,
                            checkpoint_activations=cfg.checkpoint_activations, compile=cfg.compile,
                            schedule=cfg.schedule, cooldown=cfg.cooldown, optimizer=cfg.optimizer)
    quick_starts = eval_starts(len(val_tokens), cfg.context_length, cfg.eval_windows or None)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.context_length
    stop = _StopOnSignal()
    n_params = sum(t.numel() for t in flatten(state.params).values())
    ranks = f", {world.size} processes x {cfg.batch_size // world.size} windows" if world.size > 1 else ""
    lora = "" if state.adapter is None else (
        f" ({trainable_count(state.adapter):,} train: LoRA r={cfg.lora_rank}, alpha {cfg.lora_alpha:g} on "
        f"{cfg.lora_targets} of {'every block' if cfg.lora_layers is None else 'blocks ' + cfg.lora_layers})")
    length = (f"steps {state.step}..{planned}" if budget is None else
              f"for {cfg.time_budget} ({start.spent:.0f}s spent, " + (f"{planned} steps)" if planned is not None
                                                                   else "its steps fixed when the cooldown is due)"))
    ns = "bfloat16" if dtype == torch.bfloat16 else "float32"
    optimizer = "AdamW" if cfg.optimizer == "adamw" else f"Muon (Newton-Schulz in {ns}) + AdamW"
    log(f"training {run} on {cfg.data}: {n_params:,} parameters{lora}, {tokens_per_step} tokens/step{ranks}, "
        f"{length}, {optimizer}, {cfg.schedule} schedule, device {device}, {str(dtype).removeprefix('torch.')}")
    began = time.time()

    def spent() -> float:  # seconds of the budget spent so far; under a budget the slowest rank's
        local = start.spent + time.time() - began
        return local if budget is None else max(distributed.every_rank(world, local, device))

    def model() -> Params:  # what the run has trained, as the model runs it
        return state.params if state.adapter is None else attach(state.params, state.adapter, config=config)

    def checkpoint(val: float | None, is_best: bool, lr: float):
        flat = state.trainable()
        clock = spent()
        if not world.is_main:  # under --shard_optimizer, rank 0 writes this rank's moments too
            for _ in checkpoint_dirs(run, is_best) if moments_of is not None else ():
                distributed.send_moments(world, state.opt, flat)
            return
        record = {"data_dir": cfg.data, "train_tokens": len(train_tokens), "lr": lr, "val_loss": val,
                  "best_val_loss": best, "config": cfg.to_dict()}
        if start.base_crc32 is not None:
            record["base_crc32"] = start.base_crc32
        if budget is not None:
            record |= {"time_spent": clock, "planned_steps": planned}
        write_metrics(run, metrics)
        fetch = distributed.fetch_moments(flat, world.size) if moments_of is not None else None
        save_run_checkpoint(run, state, config, record, is_best=is_best, fetch_moment=fetch)

    def stopped(at: int, what: str):
        kept = f"the last good checkpoint in {run} is kept" if (run / STATE).exists() else "nothing was saved"
        return AgreedError(f"step {at}: {what}; stopped, {kept}; try a lower --lr or check the data")

    share = slice(world.rank * cfg.batch_size // world.size, (world.rank + 1) * cfg.batch_size // world.size)

    def next_step_batch() -> Batch:
        windows, position = [], state.position
        for _ in range(cfg.grad_accum):
            x, y, position = next_batch(train_tokens, position, batch_size=cfg.batch_size,
                                        context_length=cfg.context_length, stride=cfg.stride, seed=cfg.seed)
            windows.append((x[share], y[share]))
        x, y = (torch.stack(t).to(device) for t in zip(*windows))
        return Batch(x, y, position)

    bar = tqdm(total=planned, initial=state.step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    say = bar.write if world.is_main else _silent
    unfinished = lambda: planned is None or state.step < planned
    # The figure a run is judged by: every val token predicted once, at the model's full
    # context (the training context when val.bin is shorter than that).
    final_T = config.n_positions if len(val_tokens) > config.n_positions else cfg.context_length
    final_starts = eval_starts(len(val_tokens), final_T)
    # Under a budget, the seconds its end takes beyond the steps: the last periodic evaluation
    # and checkpoint as the latest one took, and the final evaluation at that one's pace.
    held_back = 0.0
    with stop, bar:  # the bar is closed before any error is printed
        while unfinished():
            if planned is None:  # under a budget, until its cooldown is due
                clock = spent()
                planned = plan_steps(state.step, clock, budget - held_back, cfg.cooldown)
                if planned is not None:
                    settings = dataclasses.replace(settings, decay_steps=planned)
                    say(f"step {state.step}: {clock:.0f}s of {budget:.0f}s spent, the cooldown starts: the run "
                        f"takes {planned} steps (as --max_steps {planned} would)")
                bar.total = planned or expected_steps(state.step, clock, budget)
            t0 = time.time()
            try:
                state, result = train_step(state, next_step_batch(), settings)
            except Diverged as e:
                raise stopped(state.step + 1, e.what) from None
            seconds = time.time() - t0
            loss, lr = result["loss"], result["lr"]
            metrics.append({"step": state.step, **result, "tokens_per_s": tokens_per_step / seconds})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:.0f}")
            bar.update()
            stop_now = distributed.any_rank(world, stop.requested is not None, device)
            if state.step % cfg.eval_interval == 0 or state.step == planned:
                evaluation_began = spent() if budget is not None else 0.0
                val = val_loss(model(), config, val_tokens, quick_starts, cfg.context_length, device, world=world)
                evaluated = spent() if budget is not None else 0.0
                if not math.isfinite(val):
                    raise stopped(state.step, f"validation loss is {val}")
                is_best = best is None or val < best
                best = min(val, best) if best is not None else val
                entry = {"step": state.step, "val_loss": val}
                if cfg.sample_tokens and world.is_main:
                    entry["sample"] = sample_text(model(), config, cfg.sample_tokens, cfg.seed + state.step, device)
                metrics.append(entry)
                say(f"step {state.step}: train loss {loss:.4f}, val loss {val:.4f} ({len(quick_starts)} "
                    f"windows)" + (f"\n  sample: {entry['sample']!r}" if "sample" in entry else ""))
                checkpoint(val, is_best, lr)
                if world.is_main:
                    plot_losses(metrics, run / "loss.png")
                if budget is not None:
                    per_token = (evaluated - evaluation_began) / (len(quick_starts) * cfg.context_length)
                    held_back = spent() - evaluation_began + per_token * len(final_starts) * final_T
            elif stop_now:
                checkpoint(None, False, lr)
            if stop_now and unfinished():
                bar.close()
                log(f"stopped by {stop.requested or 'a signal to another rank'} at step {state.step}; checkpoint "
                    f"saved. Resume with: fgpt train --resume {run}")
                return {"step": state.step, "interrupted": True}
        bar.close()
        elapsed = time.time() - began
        # Ranks stop a final evaluation together or not at all: a signal only skips it in a single process.
        should_stop = (lambda: stop.requested is not None) if world.size == 1 else (lambda: False)
        final = None if stop_now else val_loss(model(), config, val_tokens, final_starts, final_T,
                                               device, should_stop=should_stop, world=world)
    step = state.step
    clock = spent()
    if final is None:
        log(f"stopped by {stop.requested or 'a signal to another rank'} after the last step ({step}): the run is "
            f"complete and saved; the final evaluation over all of val.bin was skipped (run: fgpt eval "
            f"{_weights_flags(cfg)})")
        return {"step": step, "interrupted": True}
    peaks = distributed.every_rank(world, _peak_rss_mb(), device)
    log(f"val loss {final:.4f} nats/token (all {len(final_starts)} non-overlapping windows of "
        f"{final_T} tokens in val.bin); training {elapsed:.0f}s, peak memory "
        + (f"{peaks[0]:.0f} MiB" if world.size == 1 else f"{' / '.join(f'{p:.0f}' for p in peaks)} MiB (ranks "
           f"0..{world.size - 1})"))
    summary = {"step": step, "val_loss": final, "best_val_loss": best, "train_seconds": elapsed,
               "peak_rss_mib": peaks[0], "interrupted": False}
    if budget is not None:
        log(f"time budget {cfg.time_budget}: {step} steps in {clock:.0f}s, the final evaluation included; the same "
            f"flags with --max_steps {step} instead of --time_budget replay this run step for step")
        summary["budget_seconds_spent"] = clock
    if world.size > 1:
        summary["peak_rss_mib_per_rank"] = peaks
    if world.is_main:
        metrics.append({"step": step, "final_val_loss": final})
        write_metrics(run, metrics)
        plot_losses(metrics, run / "loss.png")
    return summary


UNPLANNED = 2**62  # decay_steps while a budget's length is unknown: wsd keeps lr constant until it is


def _weights_flags(cfg: TrainConfig) -> str:
    """The flags that load what the run `cfg` trained: its directory, or a LoRA run's base and adapter."""
    return f"--weights {cfg.out}" if cfg.lora_rank is None else f"--weights {cfg.init} --adapter {cfg.out}"


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
    save_png(fig, path)

"""One training step as a function of the training state: `train_step(state, batch,
settings) -> (state, metrics)`.

The state is one value (params, AdamW's moments, step, data position, RNG state); the
loop in train.py only draws batches, shows progress, evaluates and saves. Mixed precision
lives here: the float32 master weights are cast once per step to the compute dtype
(bfloat16, or float16 with a dynamic loss scale), the model and the chunked LM-head loss
run in it, and the gradients update the float32 weights and moments.
"""

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from .config import GPTConfig
from .data import Position
from .loss import lm_head_loss
from .model import forward_hidden
from .optim import AdamWState, adamw_init, adamw_step, clip_grad_norm, lr_at
from .params import Params, flatten, unflatten


class LossScale(NamedTuple):
    """float16's dynamic loss scale: the loss is multiplied by `scale` before the backward
    pass so small gradients do not underflow; a step with non-finite gradients is skipped
    and halves it, `GROWTH_INTERVAL` good steps in a row double it (torch's GradScaler)."""

    scale: float = 2.0**16
    good_steps: int = 0


GROWTH_INTERVAL = 2000


@dataclass(frozen=True)
class TrainState:
    """What a run carries from one step to the next, as one value.

    params: the nested GPT-2 params, float32 master weights. opt: AdamW's moments (under
    the flat GPT-2 keys) and its step count. step: optimizer updates made. position:
    where the next batch starts in the shuffled windows (data.next_batch). rng: the
    generator state(s) dropout draws from, {"torch": CPU state[, "cuda": CUDA state]}
    as uint8 tensors. loss_scale: float16 training only.
    """

    params: Params
    opt: AdamWState
    step: int
    position: Position
    rng: dict
    loss_scale: LossScale | None = None


def new_state(params: Params, seed: int, device: torch.device) -> TrainState:
    """The state before the first step: fresh moments, position 0, the RNG seeded as
    torch.manual_seed(seed) would seed it (without touching torch's global generator)."""
    rng = {"torch": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return TrainState(params, adamw_init(flatten(params)), 0, Position(), rng)


@dataclass(frozen=True)
class StepSettings:
    """How a step computes: the model's config (n_head, epsilon, dropout rates), the
    schedule (optim.lr_at), AdamW's settings, the clipping norm (None: none), the compute
    dtype and whether dropout is on."""

    config: GPTConfig
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    dtype: torch.dtype = torch.float32
    dropout: bool = True


class Batch(NamedTuple):
    """One optimizer step's data: x, y int64 [A, B, T], A micro-batches of B windows and
    their next tokens (gradients are averaged over all A * B windows); end: the data
    position after this batch."""

    x: torch.Tensor
    y: torch.Tensor
    end: Position


class Diverged(Exception):
    """A step whose loss, gradient norm or updated params blew up: `what` says which."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


# A weight this large means a blow-up: AdamW moves a weight by about lr per step, and no
# trained GPT-2 holds one within orders of magnitude of it.
DIVERGED_WEIGHT = 1e6


def train_step(state: TrainState, batch: Batch, settings: StepSettings) -> tuple[TrainState, dict]:
    """One optimizer update -> (the state after it, {"loss", "lr", "grad_norm"}).

    loss is the mean over the batch in nats/token before the update; grad_norm is the
    global gradient norm before clipping. The step is fixed by (state, batch, settings):
    dropout draws from `state.rng`, not from whatever torch's generator holds. The params
    and moments are updated in place and shared by the returned state (they are the
    largest thing in memory): treat `state` as consumed. Raises Diverged, after which the
    params must not be saved, when the loss or gradient norm is not finite or an updated
    weight is not finite or exceeds DIVERGED_WEIGHT. With float16, non-finite gradients
    skip the update and halve the loss scale instead.
    """
    flat = flatten(state.params)
    lr = lr_at(state.step, lr=settings.lr, warmup_steps=settings.warmup_steps,
               decay_steps=settings.decay_steps, min_lr=settings.min_lr)
    scale = state.loss_scale.scale if state.loss_scale is not None else 1.0
    _set_rng(state.rng)
    # Each weight is cast once per step; its gradient arrives in the compute dtype.
    compute = flat if settings.dtype == torch.float32 else {k: t.to(settings.dtype) for k, t in flat.items()}
    n_micro = len(batch.x)
    loss, grads = 0.0, None
    for x, y in zip(batch.x, batch.y):
        micro_loss, micro_grads = loss_and_grads(compute, x, y, settings.config, dropout=settings.dropout,
                                                 loss_scale=scale)
        loss += float(micro_loss) / n_micro
        grads = micro_grads if grads is None else _add(_in_float32(grads), micro_grads)
    del compute
    rng = _get_rng(state.rng)
    if n_micro > 1 or scale != 1.0:  # the mean over the micro-batches, unscaled, in float32
        grads = _in_float32(grads)
        torch._foreach_div_(list(grads.values()), n_micro * scale)
    if not math.isfinite(loss):
        raise Diverged(f"loss is {loss}")
    norm = clip_grad_norm(grads, settings.grad_clip)
    loss_scale = state.loss_scale
    if loss_scale is not None:
        loss_scale = _next_loss_scale(loss_scale, math.isfinite(norm))
        if not math.isfinite(norm):  # float16 overflow: skip this update
            after = replace(state, step=state.step + 1, position=batch.end, rng=rng, loss_scale=loss_scale)
            return after, {"loss": loss, "lr": lr, "grad_norm": norm, "skipped": True}
    if not math.isfinite(norm):
        raise Diverged(f"gradient norm is {norm}")
    opt = adamw_step(flat, grads, state.opt, lr=lr, betas=settings.betas, weight_decay=settings.weight_decay)
    key, largest = max_abs(flat)
    if not largest <= DIVERGED_WEIGHT:
        raise Diverged(f"the update made {key} {'diverge' if math.isfinite(largest) else 'non-finite'} "
                       f"(max |w| {largest:.3g})")
    after = replace(state, opt=opt, step=state.step + 1, position=batch.end, rng=rng, loss_scale=loss_scale)
    return after, {"loss": loss, "lr": lr, "grad_norm": norm}


def loss_and_grads(flat: dict, x, y, config: GPTConfig, *, dropout: bool = False, loss_scale: float = 1.0):
    """One forward and backward pass. flat: {GPT-2 key: tensor}, in the compute dtype;
    x, y: int64 [B, T]. -> (loss in nats/token as a float32 0-d tensor, {key: gradient of
    loss * loss_scale}, in flat's dtypes)."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in flat.items()}
    params = unflatten(leaves)
    loss = lm_head_loss(forward_hidden(params, x, config, dropout=dropout), params["wte"]["weight"], y)
    grads = torch.autograd.grad(loss * loss_scale if loss_scale != 1.0 else loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def max_abs(flat: dict) -> tuple[str, float]:
    """-> (key, value) of the params' largest |w| (NaN wins: then the value is NaN)."""
    # min and max per tensor: a tenth of the time of an inf-norm, and NaN propagates as well.
    ranges = torch.stack([torch.stack(torch.aminmax(t)) for t in flat.values()])  # [n_tensors, 2]
    norms = ranges.abs().amax(dim=1).tolist()
    i = next((i for i, n in enumerate(norms) if not math.isfinite(n)), max(range(len(norms)), key=norms.__getitem__))
    return list(flat)[i], norms[i]


def _in_float32(grads: dict) -> dict:
    return {k: g if g.dtype == torch.float32 else g.float() for k, g in grads.items()}


def _add(total: dict, more: dict) -> dict:  # total += more, key by key (total in float32)
    for key, g in more.items():
        total[key].add_(g)
    return total


def _next_loss_scale(scale: LossScale, finite: bool) -> LossScale:
    if not finite:
        return LossScale(scale.scale / 2, 0)
    if scale.good_steps + 1 >= GROWTH_INTERVAL:
        return LossScale(scale.scale * 2, 0)
    return LossScale(scale.scale, scale.good_steps + 1)


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def _get_rng(like: dict) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if "cuda" in like:
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng

"""One training step as a function of the training state: `train_step(state, batch,
settings) -> (state, metrics)`.

The state is one value (params, AdamW's moments, step, data position, RNG state); the
loop in loop.py only draws batches, shows progress, evaluates and saves. Mixed precision
lives here: the float32 master weights are cast once per step to the compute dtype
(bfloat16, or float16 with a dynamic loss scale), the model and the chunked LM-head loss
run in it, and the gradients update the float32 weights and moments.
"""

import math
import sys
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..model.config import GPTConfig
from .data import Position
from ..checks import check_bool, check_choice, check_int, check_tensor, check_tensor_dict, describe
from ..device import check_device, same_device
from ..errors import UserError
from .distributed import SINGLE, GradientReducer, World, broadcast_owned, mean, owners
from .loss import lm_head_loss
from ..model.transformer import forward_hidden
from .muon import is_muon_matrix, muon_step, second_moment_keys
from .optim import (SCHEDULES, AdamWState, adamw_init, adamw_step, check_adamw, check_cooldown, check_schedule,
                    clip_grad_norm, lr_at)
from ..model.lora import Adapter, attach, check_adapter
from ..model.params import Params, check_params, flatten, unflatten


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

    params: the nested GPT-2 params, float32 master weights. adapter: with a LoRA adapter
    (model/lora.py) the only thing that trains: the model runs `attach(params, adapter)`
    (the low-rank product per call), params stay frozen and have no moments. opt: AdamW's
    moments (under the flat GPT-2 keys, or the adapter's) and its step count. step: optimizer updates made. position:
    where the next batch starts in the shuffled windows (data.next_batch). Under Muon, a
    Muon matrix's exp_avg is its momentum buffer, and it has no exp_avg_sq. rng: the
    generator state(s) dropout draws from, {"torch": CPU state[, "cuda": CUDA state]}
    as uint8 tensors. loss_scale: float16 training only.
    """

    params: Params
    opt: AdamWState
    step: int
    position: Position
    rng: dict
    loss_scale: LossScale | None = None
    adapter: Adapter | None = None

    def trainable(self) -> dict:
        """{key: tensor} of what the optimizer updates: the flat params, or the adapter's."""
        return flatten(self.params) if self.adapter is None else dict(self.adapter.tensors)


def new_state(params: Params, seed: int, device: torch.device, moments_of=None, *,
              adapter: Adapter | None = None, optimizer: str = "adamw") -> TrainState:
    """The state before the first step: fresh moments, position 0, the RNG seeded as
    torch.manual_seed(seed) would seed it (without touching torch's global generator).
    moments_of(flat trainable tensors) -> the keys to keep moments for (a rank's share
    under shard_optimizer; default all). adapter: train this LoRA adapter of `params`
    alone (its float32 tensors; params frozen). optimizer: "adamw", or "muon" (Muon for the
    blocks' matrices, AdamW for the rest; see StepSettings), whose moments it makes."""
    if not isinstance(params, dict):
        raise UserError(f"params: expected the nested dict of GPT-2 tensors, got {describe(params)}")
    if isinstance(params, Params):
        check_params(params, params.config, quantized=False)
    flat = check_tensor_dict("params", flatten(params))  # train_step checks them against its config
    seed = check_int("seed", seed, -2**63, 2**64 - 1)
    device = check_device("device", device)
    elsewhere = next((k for k, t in flat.items() if not same_device(t.device, device)), None)
    if elsewhere is not None:
        raise UserError(f"device: {device}, but the params' {elsewhere} is on {flat[elsewhere].device}")
    rng = {"torch": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    if adapter is not None:
        check_adapter(adapter, flat)
        flat = check_tensor_dict("adapter.tensors", dict(adapter.tensors))
        wrong = next((k for k, t in flat.items() if t.dtype != torch.float32), None)
        if wrong is not None:
            raise UserError(f"adapter: {wrong} is {describe(flat[wrong])}; an adapter trains in float32")
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "muon" and adapter is not None:
        raise UserError("optimizer: a LoRA adapter trains with 'adamw'; Muon is for the full model's block matrices")
    keys = flat if moments_of is None else moments_of(flat)
    opt = adamw_init({k: flat[k] for k in keys})
    second = set(second_moment_keys(flat, optimizer))  # Muon's matrices keep one moment, their momentum buffer
    opt = opt._replace(exp_avg_sq={k: v for k, v in opt.exp_avg_sq.items() if k in second})
    return TrainState(params, opt, 0, Position(), rng, adapter=adapter)


OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class StepSettings:
    """How a step computes: the model's config (n_head, epsilon, dropout rates), the
    schedule (optim.lr_at: "cosine" or "wsd" with its cooldown fraction), the optimizer
    ("adamw"; or "muon": muon.muon_step for the blocks' 2-D matrices, with Newton-Schulz in
    bfloat16 when the compute dtype is bfloat16, else in float32, and AdamW for the
    embeddings, the tied head, biases and gains, one lr for both), AdamW's settings (the
    weight decay applies to Muon's matrices too), the clipping norm (None: none), the compute
    dtype, whether dropout is on, and the data-parallel world: each rank computes the
    gradients of its own share of the batch and they are averaged over the ranks;
    shard_optimizer: each rank keeps the moments of its own tensors only (ZeRO-1, the
    state's opt then holds those keys alone); checkpoint_activations: each block's
    activations are recomputed in the backward pass instead of kept; compile: the model
    runs through torch.compile (the head and loss stay as they are)."""

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
    world: World = SINGLE
    shard_optimizer: bool = False
    checkpoint_activations: bool = False
    compile: bool = False
    schedule: str = "cosine"
    cooldown: float = 0.25
    optimizer: str = "adamw"

    def __post_init__(self):
        """Every field checked here, by the rules `fgpt train`'s flags follow too (optim's
        check_schedule and check_adamw): grad_clip 0 means no clipping, as --grad_clip 0."""
        if not isinstance(self.config, GPTConfig):
            raise UserError(f"config: expected a GPTConfig, got {describe(self.config)}")
        check_schedule(lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise UserError(f"betas: expected a pair (beta1, beta2), got {describe(self.betas)}")
        check_adamw(beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
                    grad_clip=self.grad_clip)
        check_choice("dtype", self.dtype, (torch.float32, torch.bfloat16, torch.float16))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_cooldown(self.cooldown)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if not isinstance(self.world, World):
            raise UserError(f"world: expected a World (distributed.world_from_env), got {describe(self.world)}")
        for name in ("dropout", "shard_optimizer", "checkpoint_activations", "compile"):
            check_bool(name, getattr(self, name))


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
    """One optimizer update -> (the state after it, {"loss", "lr", "grad_norm"} and, in a
    data-parallel world, "allreduce_wait_s": the time spent waiting for the gradients'
    all-reduce after the backward pass).

    loss is the mean over the batch in nats/token before the update; grad_norm is the
    global gradient norm before clipping. The step is fixed by (state, batch, settings):
    dropout draws from `state.rng`, not from whatever torch's generator holds. The params
    and moments are updated in place and shared by the returned state (they are the
    largest thing in memory): treat `state` as consumed. Raises Diverged, after which the
    params must not be saved, when the loss or gradient norm is not finite or an updated
    weight is not finite or exceeds DIVERGED_WEIGHT. With float16, non-finite gradients
    skip the update and halve the loss scale instead. In a data-parallel world
    (settings.world) `batch` is this rank's share of the windows: the loss and gradients
    are the means over every rank's windows, and every rank makes the same update.
    """
    _check_step(state, batch, settings)
    flat = state.trainable()
    world = settings.world
    lr = lr_at(state.step, lr=settings.lr, warmup_steps=settings.warmup_steps, decay_steps=settings.decay_steps,
               min_lr=settings.min_lr, schedule=settings.schedule, cooldown=settings.cooldown)
    scale = state.loss_scale.scale if state.loss_scale is not None else 1.0
    rng = _dropout_rng(state.rng, world)
    # Each weight is cast once per step; its gradient arrives in the compute dtype.
    compute = _cast(flat, settings.dtype)
    frozen = None if state.adapter is None else _cast(flatten(state.params), settings.dtype)  # what it adapts
    n_micro = len(batch.x)
    loss, grads = 0.0, None
    for i, (x, y) in enumerate(zip(batch.x, batch.y)):
        # Across ranks, gradients are summed once per step: with the last micro-batch's
        # backward pass, into which the local sum of the earlier ones is folded.
        reducer = None
        if world.size > 1 and i == n_micro - 1:
            reducer = GradientReducer({k: t.shape for k, t in flat.items()}, x.device,
                                      accumulated=None if grads is None else _in_float32(grads))
        micro_loss, micro_grads = loss_and_grads(compute, x, y, settings.config, dropout=settings.dropout,
                                                 loss_scale=scale, reducer=reducer,
                                                 checkpoint=settings.checkpoint_activations, compile=settings.compile,
                                                 frozen=frozen, adapter=state.adapter)
        loss += float(micro_loss) / n_micro
        grads = micro_grads if grads is None or reducer is not None else _add(_in_float32(grads), micro_grads)
    del compute, frozen
    rng = rng if rng is not None else _get_rng(state.rng)
    if n_micro > 1 or scale != 1.0 or world.size > 1:  # the mean over all windows, unscaled, in float32
        grads = _in_float32(grads)
        torch._foreach_div_(list(grads.values()), n_micro * scale * world.size)
    (loss,) = mean(world, [loss], batch.x.device)
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
    if settings.shard_optimizer and world.size > 1:
        owner = owners(flat, world.size)
        mine = {k: t for k, t in flat.items() if owner[k] == world.rank}
        opt = _update(mine, grads, state.opt, lr, settings)
        broadcast_owned(flat, owner)
    else:
        opt = _update(flat, grads, state.opt, lr, settings)
    key, largest = max_abs(flat)
    if not largest <= DIVERGED_WEIGHT:
        raise Diverged(f"the update made {key} {'diverge' if math.isfinite(largest) else 'non-finite'} "
                       f"(max |w| {largest:.3g})")
    after = replace(state, opt=opt, step=state.step + 1, position=batch.end, rng=rng, loss_scale=loss_scale)
    metrics = {"loss": loss, "lr": lr, "grad_norm": norm}
    if reducer is not None:
        metrics["allreduce_wait_s"] = reducer.waited
    return after, metrics


def _update(params: dict, grads: dict, opt: AdamWState, lr: float, settings: StepSettings) -> AdamWState:
    """The optimizer's update of `params` (those whose moments `opt` holds), in place."""
    if settings.optimizer == "adamw":
        return adamw_step(params, grads, opt, lr=lr, betas=settings.betas, weight_decay=settings.weight_decay)
    matrices = {k: p for k, p in params.items() if is_muon_matrix(k, p)}
    rest = {k: p for k, p in params.items() if k not in matrices}
    after = adamw_step(rest, {k: grads[k] for k in rest}, opt._replace(exp_avg={k: opt.exp_avg[k] for k in rest}),
                       lr=lr, betas=settings.betas, weight_decay=settings.weight_decay)
    muon_step(matrices, {k: grads[k] for k in matrices}, {k: opt.exp_avg[k] for k in matrices}, lr=lr,
              weight_decay=settings.weight_decay, ns_dtype=torch.bfloat16 if settings.dtype == torch.bfloat16
              else torch.float32)
    return opt._replace(step=after.step)


def _check_step(state: TrainState, batch: Batch, settings: StepSettings) -> None:
    """train_step's arguments, checked before anything is computed or changed: a TrainState
    whose params the settings' config describes, and x, y int64 [A, B, T] of one shape
    (y[a, b, t] the token after x[a, b, t]), ids within the vocabulary, T within the
    context, on the params' device."""
    if not isinstance(settings, StepSettings):
        raise UserError(f"settings: expected a StepSettings, got {describe(settings)}")
    if not isinstance(state, TrainState):
        raise UserError(f"state: expected a TrainState (new_state), got {describe(state)}")
    config = settings.config
    check_params(state.params, config, "state.params", quantized=False)
    if state.adapter is not None:
        check_adapter(state.adapter, flatten(state.params))
        if settings.optimizer == "muon":
            raise UserError("settings.optimizer: a LoRA adapter trains with 'adamw'; Muon is for the full model")
    if not isinstance(batch, Batch):
        raise UserError(f"batch: expected a Batch(x, y, end), got {describe(batch)}")
    x = check_tensor("batch.x", batch.x, dims="A B T", kind="integer")
    check_tensor("batch.y", batch.y, shape=tuple(x.shape), kind="integer")
    if not isinstance(batch.end, Position):
        raise UserError(f"batch.end: expected a data.Position, got {describe(batch.end)}")
    if 0 in x.shape:
        raise UserError(f"batch.x: empty ({list(x.shape)})")
    if x.shape[2] > config.n_positions:
        raise UserError(f"batch.x: windows of {x.shape[2]} tokens, more than the context of {config.n_positions}")
    device = state.params["wte"]["weight"].device
    for name, t in (("batch.x", x), ("batch.y", batch.y)):
        if t.device != device:
            raise UserError(f"{name} is on {t.device}, the params on {device}")
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= config.vocab_size:
            raise UserError(f"{name}: token id {low if low < 0 else high} is out of range for "
                            f"vocab_size={config.vocab_size}")


def loss_and_grads(flat: dict, x, y, config: GPTConfig, *, dropout: bool = False, loss_scale: float = 1.0,
                   reducer: GradientReducer | None = None, checkpoint: bool = False, compile: bool = False,
                   frozen: dict | None = None, adapter: Adapter | None = None):
    """One forward and backward pass. flat: {GPT-2 key: tensor}, in the compute dtype;
    x, y: int64 [B, T]. -> (loss in nats/token as a float32 0-d tensor, {key: gradient of
    loss * loss_scale}, in flat's dtypes). With a `reducer`, each gradient goes to it as
    backward produces it, and the result is `reducer.wait()`: the float32 sums over the
    ranks. checkpoint: recompute each block in the backward pass (model.forward_hidden).
    compile: run the model compiled (`compiled_model`). With an adapter, flat holds its
    tensors and `frozen` the flat params they adapt (no gradients for those)."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in flat.items()}
    if adapter is None:
        params = unflatten(leaves)
    else:
        params = attach(Params(unflatten(frozen), config), adapter.with_tensors(leaves))
    hidden = (compiled_model() if compile else forward_hidden)(params, x, config, dropout=dropout,
                                                              checkpoint=checkpoint)
    loss = lm_head_loss(hidden, params["wte"]["weight"], y)
    scaled = loss * loss_scale if loss_scale != 1.0 else loss
    if reducer is None:
        grads = torch.autograd.grad(scaled, list(leaves.values()))
        return loss.detach(), dict(zip(leaves, grads))
    hooks = [leaf.register_post_accumulate_grad_hook(reducer.hook(key)) for key, leaf in leaves.items()]
    try:
        scaled.backward(inputs=list(leaves.values()))
    finally:
        for hook in hooks:
            hook.remove()
    return loss.detach(), reducer.wait()


def compiled_model():
    """forward_hidden through torch.compile, made once per process. Where compiling fails
    (no C++ compiler, an unsupported backend), the first call says so in one line on
    stderr and this and every later call run forward_hidden as it is."""
    if _COMPILED:
        return _COMPILED[0]
    compiled = torch.compile(forward_hidden)

    def run(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except UserError:
            raise
        except Exception as e:  # torch.compile's failures have no common base class
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"--compile: torch.compile failed ({type(e).__name__}: {first}); training without it",
                  file=sys.stderr)
            _COMPILED[0] = forward_hidden
            return forward_hidden(*args, **kwargs)

    _COMPILED.append(run)
    return run


_COMPILED: list = []  # [the model compiled_model returns], once made


def max_abs(flat: dict) -> tuple[str, float]:
    """-> (key, value) of the params' largest |w| (NaN wins: then the value is NaN)."""
    # min and max per tensor: a tenth of the time of an inf-norm, and NaN propagates as well.
    ranges = torch.stack([torch.stack(torch.aminmax(t)) for t in flat.values()])  # [n_tensors, 2]
    norms = ranges.abs().amax(dim=1).tolist()
    i = next((i for i, n in enumerate(norms) if not math.isfinite(n)), max(range(len(norms)), key=norms.__getitem__))
    return list(flat)[i], norms[i]


def _cast(flat: dict, dtype: torch.dtype) -> dict:  # the tensors in the compute dtype (float32: as they are)
    return flat if dtype == torch.float32 else {k: t.to(dtype) for k, t in flat.items()}


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


def _dropout_rng(rng: dict, world: World) -> dict | None:
    """Set torch's generators for this step's dropout from the state's `rng`. A single
    process draws from `rng` itself (-> None: the state after the step is the generators'
    own). In a world of N, every rank draws one seed from `rng` (-> the state after that
    draw, the same on every rank) and rank r's dropout runs on seed + r: masks differ
    across ranks, and a resume with the same N replays them exactly."""
    _set_rng(rng)
    if world.size == 1:
        return None
    seed = int(torch.randint(2**62, ()))
    after = _get_rng(rng)
    torch.manual_seed(seed + world.rank)
    return after


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def _get_rng(like: dict) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if "cuda" in like:
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng

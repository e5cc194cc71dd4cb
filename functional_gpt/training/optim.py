"""AdamW, the learning-rate schedules and gradient clipping as plain functions over
{GPT-2 key: tensor} dicts, so the optimizer state is data that saves under parameter names.
"""

import math
from typing import NamedTuple

import torch

from ..checks import check_choice, check_int, check_number, check_tensor_dict, describe
from ..errors import UserError

Flat = dict[str, torch.Tensor]  # GPT-2 dotted key -> tensor


def check_schedule(*, lr, min_lr, warmup_steps, decay_steps, name=lambda field: field) -> tuple:
    """The schedule's rules, which `StepSettings` (Python) and `TrainConfig` (flags, config
    files) both apply, each naming a field its own way (`name`: "lr" or "--lr"): lr > 0,
    0 <= min_lr <= lr, warmup_steps >= 0, decay_steps >= 1 (a run's 0 would read as "no
    decay" and mean the opposite: min_lr from the end of the warm-up)."""
    lr, min_lr = check_number(name("lr"), lr, 0, low_open=True), check_number(name("min_lr"), min_lr, 0)
    if min_lr > lr:
        raise UserError(f"{name('min_lr')} {min_lr} is above {name('lr')} {lr}")
    return lr, min_lr, check_int(name("warmup_steps"), warmup_steps, 0), check_int(name("decay_steps"), decay_steps, 1)


def check_adamw(*, beta1, beta2, weight_decay, grad_clip, name=lambda field: field) -> None:
    """AdamW's and clipping's rules, shared as check_schedule's: beta1, beta2 in [0, 1),
    weight_decay >= 0, grad_clip >= 0 (0 or None: no clipping)."""
    check_number(name("beta1"), beta1, 0, 1, high_open=True)
    check_number(name("beta2"), beta2, 0, 1, high_open=True)
    check_number(name("weight_decay"), weight_decay, 0)
    if grad_clip is not None:
        check_number(name("grad_clip"), grad_clip, 0)


class AdamWState(NamedTuple):
    """Adam's moving averages per parameter (same keys and shapes as the params) and the
    number of updates made so far."""

    exp_avg: Flat
    exp_avg_sq: Flat
    step: int


def decays(key: str, tensor: torch.Tensor) -> bool:
    """Weight decay applies to the 2-D matrices of the blocks only: not to biases or
    layer-norm gains (1-D), nor to the token and position embeddings, whose rows are
    looked up rather than multiplied and which the tied LM head already regularises."""
    return tensor.dim() == 2 and key not in ("wte.weight", "wpe.weight")


def adamw_init(params: Flat) -> AdamWState:
    """Zero moments for `params` ({key: tensor}), step 0."""
    check_tensor_dict("params", params)
    zeros = {k: torch.zeros_like(p) for k, p in params.items()}
    return AdamWState(zeros, {k: torch.zeros_like(p) for k, p in params.items()}, 0)


# The update goes through the params in groups of about this many elements (large tensors
# split into flat pieces), so its temporaries (square roots, float32 copies of bf16
# gradients) stay near 4 MB instead of a copy of the model: pieces that small fit the holes
# the step leaves in the heap (64 MB pieces grew a gpt2 bf16 step's peak RSS by 80 MiB).
GROUP_ELEMENTS = 2**20


def adamw_step(
    params: Flat,
    grads: Flat,
    state: AdamWState,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> AdamWState:
    """One AdamW update (Loshchilov & Hutter, as torch.optim.AdamW computes it).

    `params` and the moment tensors of `state` are updated in place (they are large and
    the caller owns them); the returned state carries the new step count. Decay follows
    `decays`. `grads` may have a lower precision than the params (bfloat16 gradients of
    float32 master weights): each is taken in the params' dtype as it is used. Everything
    is checked before anything changes.
    """
    check_tensor_dict("params", params)
    check_tensor_dict("grads", grads, like=params)
    if not isinstance(state, AdamWState):
        raise UserError(f"state: expected an AdamWState (adamw_init), got {describe(state)}")
    check_tensor_dict("state.exp_avg", state.exp_avg, like=params)
    check_tensor_dict("state.exp_avg_sq", state.exp_avg_sq, like=params)
    previous = check_int("state.step", state.step, 0)
    lr, eps = check_number("lr", lr, 0), check_number("eps", eps, 0, low_open=True)
    if not isinstance(betas, tuple) or len(betas) != 2:
        raise UserError(f"betas: expected a pair (beta1, beta2), got {describe(betas)}")
    beta1, beta2 = betas
    check_adamw(beta1=beta1, beta2=beta2, weight_decay=weight_decay, grad_clip=None,
                name=lambda field: f"betas[{'12'.index(field[-1])}]" if field.startswith("beta") else field)
    step = previous + 1
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    check_update_fits(params, lr=lr, weight_decay=weight_decay, step=lr / bias1, step_is="lr / (1 - beta1**step)")
    with torch.no_grad():
        for group in _groups(params, grads, state):
            p, g, m, v, decayed = (list(column) for column in zip(*group))
            g = [gi if gi.dtype == pi.dtype else gi.to(pi.dtype) for gi, pi in zip(g, p)]  # a group at a time
            decayed = [piece for piece, decay in zip(p, decayed) if decay]
            if weight_decay and decayed:
                torch._foreach_mul_(decayed, 1 - lr * weight_decay)
            torch._foreach_lerp_(m, g, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, 1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bias2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(p, m, denom, -lr / bias1)
    return AdamWState(state.exp_avg, state.exp_avg_sq, step)


def check_update_fits(params: Flat, *, lr: float, weight_decay: float, step: float, step_is: str) -> None:
    """An update's factors within the params' dtype: the largest factor on the step
    (`step`, the expression `step_is`) and the decay's lr * weight_decay; else a UserError
    naming lr or weight_decay, before anything changes."""
    largest = min((torch.finfo(t.dtype).max for t in params.values()), default=math.inf)
    if step > largest:
        raise UserError(f"lr: {lr:g} overflows the params' dtype in the update ({step_is} = {step:.3g}, at most "
                        f"{largest:.3g})")
    if lr * weight_decay > largest:
        raise UserError(f"weight_decay: {weight_decay:g} overflows the params' dtype in the update (lr * "
                        f"weight_decay = {lr * weight_decay:.3g}, at most {largest:.3g})")


def _groups(params: Flat, grads: Flat, state: AdamWState):
    """(param, grad, exp_avg, exp_avg_sq, decays) pieces in groups of about GROUP_ELEMENTS;
    a contiguous tensor larger than that is split into flat views."""
    group, size = [], 0
    for key, p in params.items():
        columns = (p, grads[key], state.exp_avg[key], state.exp_avg_sq[key])
        if all(t.is_contiguous() for t in columns) and p.numel() > GROUP_ELEMENTS:
            pieces = zip(*(t.view(-1).split(GROUP_ELEMENTS) for t in columns))
        else:
            pieces = [columns]
        for piece in pieces:
            group.append((*piece, decays(key, p)))
            size += piece[0].numel()
            if size >= GROUP_ELEMENTS:
                yield group
                group, size = [], 0
    if group:
        yield group


SCHEDULES = ("cosine", "wsd")


def cooldown_start(decay_steps: int, cooldown: float) -> int:
    """The first update of a warmup-stable-decay schedule's final linear decay: the last
    round(cooldown * decay_steps) updates of `decay_steps` decay (at least one). Each more
    step of decay_steps moves it by 0 or 1, so every step is the start for some length."""
    return decay_steps - max(1, round(cooldown * decay_steps))


def lr_at(step: int, *, lr: float, warmup_steps: int, decay_steps: int, min_lr: float,
          schedule: str = "cosine", cooldown: float = 0.25) -> float:
    """Learning rate for update `step` (0-based): linear warm-up from lr/warmup_steps to
    lr over `warmup_steps`, then down to `min_lr` at `decay_steps`, then min_lr. The way
    down: "cosine" from the end of the warm-up; "wsd" (warmup-stable-decay, trapezoidal)
    constant at lr, then linear over the last `cooldown` fraction of decay_steps (from
    cooldown_start), reaching min_lr at update decay_steps - 1."""
    step, decay_steps = check_int("step", step, 0), check_int("decay_steps", decay_steps, 0)
    lr, min_lr, warmup_steps, _ = check_schedule(lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                                                 decay_steps=max(1, decay_steps))  # the formula takes decay 0 too
    check_choice("schedule", schedule, SCHEDULES)
    cooldown = check_cooldown(cooldown)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    if schedule == "wsd":
        start = cooldown_start(decay_steps, cooldown)
        if step < start:
            return lr
        return lr + (min_lr - lr) * (step + 1 - start) / (decay_steps - start)
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def check_cooldown(cooldown, name: str = "cooldown") -> float:
    """The share of a wsd run in its final decay: in (0, 1) (a time budget learns the
    pace from the steps before it)."""
    return check_number(name, cooldown, 0, 1, low_open=True, high_open=True)


# The norm is summed over flat pieces of at most this many elements: torch's float32 norm of
# one 38.6M-element tensor (gpt2's wte) is 0.27% off (6196.8 for 6213.3), over pieces of
# 2**22 elements 8e-5, of 2**16 1.2e-7 (for 9 ms instead of 7 on 2 cores); and a bfloat16
# gradient is widened to float32 a piece at a time instead of all at once.
NORM_PIECE = 2**16


def clip_grad_norm(grads: Flat, max_norm: float | None) -> float:
    """Scale `grads` in place so their global L2 norm is at most `max_norm` (None or 0: no
    clipping, as `--grad_clip 0`). -> the norm before clipping (inf or nan when a gradient
    is not finite), accumulated in float32 over pieces of NORM_PIECE elements."""
    if max_norm is not None:
        max_norm = check_number("max_norm", max_norm, 0) or None
    check_tensor_dict("grads", grads)
    g = list(grads.values())
    if not g:
        return 0.0
    with torch.no_grad():
        pieces = [piece for t in g for piece in t.reshape(-1).split(NORM_PIECE)]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32)))
        if max_norm is not None and math.isfinite(norm) and norm > max_norm:
            torch._foreach_mul_(g, max_norm / (float(norm) + 1e-6))
    return float(norm)

"""Muon (Jordan et al., 2024) for the blocks' 2-D matrices, as a plain function over
{GPT-2 key: tensor} dicts: momentum, then the update orthogonalized by a Newton-Schulz
iteration, scaled to AdamW's update size so that one learning rate serves both (Moonshot's
"match_rms_adamw", arXiv 2502.16982). It computes what `torch.optim.Muon` computes with
adjust_lr_fn="match_rms_adamw"; the embeddings, the tied head, biases and gains stay
with AdamW (optim.py).
"""

import math

import torch

from ..checks import check_choice, check_number, check_tensor_dict
from ..errors import UserError
from .optim import Flat, check_update_fits, decays

# Keller Jordan's quintic coefficients and step count, torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
MOMENTUM = 0.95


def is_muon_matrix(key: str, tensor: torch.Tensor) -> bool:
    """Muon trains the 2-D matrices of the blocks (attention's c_attn and c_proj, the MLP's
    c_fc and c_proj): the tensors AdamW decays (optim.decays)."""
    return decays(key, tensor)


def second_moment_keys(flat: Flat, optimizer: str) -> list[str]:
    """The keys of `flat` whose squared-gradient average (exp_avg_sq) an optimizer keeps:
    every key under "adamw"; under "muon" all but the Muon matrices (their one moment is
    the momentum buffer, kept as exp_avg)."""
    return [k for k, t in flat.items() if optimizer == "adamw" or not is_muon_matrix(k, t)]


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The Newton-Schulz approximation of U V^T for g = U S V^T ([m, n] -> [m, n], in
    `dtype`): singular values pushed into about [0.7, 1.2], directions kept. bfloat16 is
    torch.optim.Muon's arithmetic; float32 is for CPUs without bf16 arithmetic, where
    bfloat16 matmuls are emulated and several times slower."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the short side's Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=EPS)  # spectral norm <= Frobenius norm = 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def update_scale(shape: torch.Size) -> float:
    """The factor on an orthogonalized [A, B] update that gives it AdamW's typical RMS
    (0.2): 0.2 * sqrt(max(A, B)), whichever way round the matrix is stored."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))


def muon_step(params: Flat, grads: Flat, momentum_buffers: Flat, *, lr: float, weight_decay: float = 0.0,
              momentum: float = MOMENTUM, ns_dtype: torch.dtype = torch.bfloat16) -> None:
    """One Muon update of the 2-D `params`, in place, with their `momentum_buffers` (same
    keys and shapes; an exponential average of the gradients, torch's momentum_buffer):

        buf = lerp(buf, g, 1 - momentum);  u = lerp(g, buf, momentum)  (Nesterov)
        p  *= 1 - lr * weight_decay;        p -= lr * update_scale(p) * orthogonalize(u)

    `grads` may have a lower precision than the params (bfloat16 gradients of float32
    master weights). Everything is checked before anything changes."""
    check_tensor_dict("params", params)
    check_tensor_dict("grads", grads, like=params)
    check_tensor_dict("momentum_buffers", momentum_buffers, like=params)
    flat = next((k for k, p in params.items() if p.dim() != 2), None)
    if flat is not None:
        raise UserError(f"params: Muon updates 2-D matrices; {flat} is {list(params[flat].shape)}")
    lr = check_number("lr", lr, 0)
    check_number("weight_decay", weight_decay, 0)
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_choice("ns_dtype", ns_dtype, (torch.bfloat16, torch.float32))
    check_update_fits(params, lr=lr, weight_decay=weight_decay, step_is="lr * update_scale",
                      step=max((lr * update_scale(p.shape) for p in params.values()), default=0.0))
    with torch.no_grad():
        for key, p in params.items():
            g, buf = grads[key], momentum_buffers[key]
            g = g if g.dtype == p.dtype else g.to(p.dtype)
            buf.lerp_(g, 1 - momentum)
            update = orthogonalize(g.lerp(buf, momentum), ns_dtype)
            p.mul_(1 - lr * weight_decay)
            p.add_(update, alpha=-lr * update_scale(p.shape))

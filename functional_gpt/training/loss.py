"""The training loss: GPT-2's tied LM head and cross-entropy, fused and taken in chunks.

`logits = hidden @ wte.T` is [N, V] with V = 50257: at N = 1024 rows that is 206 MB in
float32, and the usual head + cross-entropy writes and reads it (and its gradient) several
times per step. Here the rows go through in chunks, and each chunk's gradient, softmax(logits)
- onehot(targets), is made and consumed in the forward pass while it is hot, so no more than
one chunk of logits ever exists and the backward pass only scales the saved gradients.
"""

import torch

from ..checks import check_int, check_tensor, describe
from ..errors import UserError

# A chunk's [rows, V] logits hold at most this many elements (64 MB in float32; GPT-2's
# 1024 rows go in 4 chunks of 256): on 2 cores, 4 or 2 chunks made no difference to the
# step time of `gpt2` at 1 x 1024 beyond noise, and 4 keep 120 MB less at the peak of a bf16
# step. In bf16 a chunk has no float32 [rows, V] tensor at all (the logits and their
# softmax stay bf16: 120 MiB less at the peak of a gpt2 step than float32 log-probs).
CHUNK_ELEMENTS = 2**24


# A low-precision chunk's log-sum-exp widens this many rows to float32 at a time.
LSE_ROWS = 32


def _log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i log_softmax(logits.float())[i, targets[i]], in float64, for bf16/fp16 logits
    [n, V]: the float32 log-sum-exp of LSE_ROWS rows at a time, never of the whole chunk."""
    lse = torch.cat([torch.logsumexp(logits[i : i + LSE_ROWS].float(), dim=-1)
                     for i in range(0, len(logits), LSE_ROWS)])
    return (logits.gather(1, targets[:, None]).squeeze(1).float() - lse).sum(dtype=torch.float64)


class _LMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, wte, targets, rows: int):
        N = hidden.shape[0]
        want_hidden, want_wte = ctx.needs_input_grad[:2]
        d_hidden = torch.empty_like(hidden) if want_hidden else None
        d_wte = torch.zeros_like(wte) if want_wte else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, N, rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            if wte.dtype == torch.float32:
                log_probs = torch.log_softmax(h @ wte.T, dim=-1)  # [n, V]
                total -= log_probs.gather(1, t[:, None]).sum(dtype=torch.float64)
                g = log_probs.exp_() if want_hidden or want_wte else None
            else:  # no float32 [n, V] tensor: softmax widens inside and rounds once
                logits = h @ wte.T
                total -= _log_likelihood(logits, t)
                g = torch.softmax(logits, dim=-1) if want_hidden or want_wte else None
                del logits
            if g is None:
                continue
            g[torch.arange(len(t), device=g.device), t] -= 1  # softmax - onehot
            if want_hidden:
                torch.mm(g, wte, out=d_hidden[start : start + rows])
            if want_wte:  # accumulated in fp32 inside each matmul, rounded once per chunk
                d_wte.addmm_(g.T, h)
        ctx.save_for_backward(d_hidden, d_wte)
        ctx.n_rows = N
        return (total / N).float()

    @staticmethod
    def backward(ctx, grad):
        d_hidden, d_wte = ctx.saved_tensors
        scale = grad / ctx.n_rows
        return (
            None if d_hidden is None else d_hidden * scale.to(d_hidden.dtype),
            None if d_wte is None else d_wte * scale.to(d_wte.dtype),
            None,
            None,
        )


def lm_head_loss(hidden: torch.Tensor, wte: torch.Tensor, targets: torch.Tensor,
                 chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the tied LM head, in nats/token (a float32 0-d tensor).

    hidden: float [..., C], the ln_f output; wte: [V, C] (the head is hidden @ wte.T), of
    hidden's dtype; targets: int64 [...], the next tokens. bfloat16 inputs give bfloat16
    matmuls with the logits, softmax and loss in float32. chunk_rows: rows per chunk
    (default: the fewest equal chunks within CHUNK_ELEMENTS). Differentiable in hidden and wte; equals
    F.cross_entropy(hidden @ wte.T, targets) and its gradients, without the [N, V] tensors.
    """
    check_tensor("hidden", hidden, kind="float")
    if hidden.dim() < 1 or not hidden.numel():
        raise UserError(f"hidden: expected a non-empty float tensor [..., C], got {describe(hidden)}")
    check_tensor("wte", wte, shape=(None, hidden.shape[-1]), kind="float")
    check_tensor("targets", targets, shape=tuple(hidden.shape[:-1]), kind="integer")
    if wte.dtype != hidden.dtype or wte.device != hidden.device or targets.device != hidden.device:
        raise UserError(f"wte: {describe(wte)} and targets on {targets.device}, but hidden is {describe(hidden)}; "
                        f"they must share hidden's device (and wte its dtype)")
    low, high = (int(v) for v in torch.aminmax(targets))
    if low < 0 or high >= wte.shape[0]:
        raise UserError(f"targets: token id {low if low < 0 else high} is out of range for vocab_size={wte.shape[0]}")
    if chunk_rows is not None:
        chunk_rows = check_int("chunk_rows", chunk_rows, 1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if chunk_rows is None:  # equal chunks, each within CHUNK_ELEMENTS
        n_chunks = -(-hidden.shape[0] * wte.shape[0] // CHUNK_ELEMENTS)
        chunk_rows = max(1, -(-hidden.shape[0] // n_chunks))
    return _LMHeadLoss.apply(hidden, wte, targets.reshape(-1), chunk_rows)

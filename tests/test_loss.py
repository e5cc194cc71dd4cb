"""The fused, chunked LM head + cross-entropy against torch's own head and loss."""

import pytest
import torch
import torch.nn.functional as F

from functional_gpt.training.loss import lm_head_loss

from conftest import assert_rel_close


def inputs(N=13, C=24, V=97, seed=0):
    """Rows of trained-like scale (logits of a few units, so the softmax is far from flat)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=generator) * 2
    wte = torch.randn(V, C, generator=generator) * 0.5
    targets = torch.randint(V, (N,), generator=generator)
    return hidden, wte, targets


def reference(hidden, wte, targets):
    """torch's head and loss in float32: (loss, d hidden, d wte)."""
    h, w = hidden.float().detach().requires_grad_(), wte.float().detach().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 13, 100])
def test_equals_torch_head_and_cross_entropy(chunk_rows):
    """Any chunking, a last chunk shorter than the rest included, gives torch's loss and
    both gradients."""
    hidden, wte, targets = inputs()
    expected, d_hidden, d_wte = reference(hidden, wte, targets)
    h, w = hidden.clone().requires_grad_(), wte.clone().requires_grad_()
    loss = lm_head_loss(h, w, targets, chunk_rows)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert_rel_close(loss, expected, 1e-6)
    assert_rel_close(h.grad, d_hidden, 1e-5)
    assert_rel_close(w.grad, d_wte, 1e-5)


def test_batched_rows_and_upstream_gradient():
    """hidden [B, T, C] with targets [B, T] is the mean over all B * T rows; a loss used
    as 3 * loss gets three times the gradients."""
    hidden, wte, targets = inputs(N=12)
    expected, d_hidden, d_wte = reference(hidden, wte, targets)
    h, w = hidden.view(3, 4, -1).clone().requires_grad_(), wte.clone().requires_grad_()
    loss = lm_head_loss(h, w, targets.view(3, 4), chunk_rows=5)
    (3 * loss).backward()
    assert_rel_close(loss, expected, 1e-6)
    assert_rel_close(h.grad, 3 * d_hidden.view(3, 4, -1), 1e-5)
    assert_rel_close(w.grad, 3 * d_wte, 1e-5)


def test_one_input_needing_its_gradient_and_none():
    hidden, wte, targets = inputs()
    expected, d_hidden, d_wte = reference(hidden, wte, targets)
    h = hidden.clone().requires_grad_()
    (g,) = torch.autograd.grad(lm_head_loss(h, wte, targets, 4), h)
    assert_rel_close(g, d_hidden, 1e-5)
    w = wte.clone().requires_grad_()
    (g,) = torch.autograd.grad(lm_head_loss(hidden, w, targets, 4), w)
    assert_rel_close(g, d_wte, 1e-5)
    with torch.inference_mode():
        assert_rel_close(lm_head_loss(hidden, wte, targets, 4), expected, 1e-6)


def test_bfloat16_matmuls_with_float32_softmax():
    """bf16 inputs: the loss is float32, the gradients come back in bf16 and match
    float32's on the same (bf16-rounded) values within bf16's precision (8 bits)."""
    hidden, wte, targets = inputs(N=64, C=64, V=500)
    hidden, wte = hidden.bfloat16(), wte.bfloat16()
    expected, d_hidden, d_wte = reference(hidden, wte, targets)
    h, w = hidden.clone().requires_grad_(), wte.clone().requires_grad_()
    loss = lm_head_loss(h, w, targets, chunk_rows=16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert_rel_close(loss, expected, 1e-2)
    assert_rel_close(h.grad.float(), d_hidden, 2e-2)
    assert_rel_close(w.grad.float(), d_wte, 2e-2)


def test_a_bfloat16_chunk_takes_its_loss_from_the_bf16_logits_in_float32():
    """The bf16 path (no float32 [rows, V] tensor): its loss equals F.cross_entropy over the
    same bf16 logits widened to float32 within 1e-6 (the log-sum-exp taken LSE_ROWS rows at
    a time, here over a chunk of 70 rows: two full blocks and a part), and its gradients
    are softmax - onehot rounded to bf16 once: within 1e-2 of float32's on those logits."""
    hidden, wte, targets = inputs(N=140, C=32, V=300)
    hidden, wte = hidden.bfloat16(), wte.bfloat16()
    logits = (hidden @ wte.T).float()
    expected = F.cross_entropy(logits, targets)
    h, w = hidden.clone().requires_grad_(), wte.clone().requires_grad_()
    loss = lm_head_loss(h, w, targets, chunk_rows=70)
    loss.backward()
    assert_rel_close(loss, expected, 1e-6)
    g = (torch.softmax(logits, -1) - F.one_hot(targets, 300)) / len(targets)
    assert_rel_close(h.grad.float(), g @ wte.float(), 1e-2)
    assert_rel_close(w.grad.float(), g.T @ hidden.float(), 1e-2)

"""AdamW, schedule and clipping against torch.optim.AdamW, torch's clip_grad_norm_ and
the closed-form schedule."""

import math

import pytest
import torch

from functional_gpt import flatten, init_params
from functional_gpt.optim import adamw_init, adamw_step, clip_grad_norm, decays, lr_at


def test_decay_applies_to_block_matrices_only(tiny_config):
    flat = flatten(init_params(tiny_config))
    decayed = sorted(k for k, t in flat.items() if decays(k, t))
    expected = sorted(
        f"h.{i}.{name}.weight" for i in range(tiny_config.n_layer)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert decayed == expected


def test_adamw_matches_torch_adamw(tiny_config):
    flat = flatten(init_params(tiny_config, seed=1))
    ours = {k: t.clone() for k, t in flat.items()}
    theirs = {k: t.clone().requires_grad_(True) for k, t in flat.items()}
    reference = torch.optim.AdamW(
        [
            {"params": [t for k, t in theirs.items() if decays(k, t)], "weight_decay": 0.1},
            {"params": [t for k, t in theirs.items() if not decays(k, t)], "weight_decay": 0.0},
        ],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )
    state = adamw_init(ours)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        lr = 1e-2 * (step + 1) / 5
        grads = {k: torch.randn(t.shape, generator=generator) for k, t in flat.items()}
        for group in reference.param_groups:
            group["lr"] = lr
        for k, t in theirs.items():
            t.grad = grads[k].clone()
        reference.step()
        state = adamw_step(ours, grads, state, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert state.step == 5
    for k in flat:
        torch.testing.assert_close(ours[k], theirs[k].detach(), rtol=1e-6, atol=1e-7, msg=k)
        torch.testing.assert_close(state.exp_avg[k], reference.state[theirs[k]]["exp_avg"], rtol=1e-6, atol=1e-9)


def test_schedule_warmup_cosine_floor():
    kw = dict(lr=1.0, warmup_steps=10, decay_steps=110, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    assert lr_at(0, lr=1.0, warmup_steps=0, decay_steps=10, min_lr=0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    generator = torch.Generator().manual_seed(0)
    grads = {f"g{i}": torch.randn(5, i + 1, generator=generator) for i in range(4)}
    leaves = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for leaf, g in zip(leaves, grads.values()):
        leaf.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(leaves, max_norm)
    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    for leaf, g in zip(leaves, grads.values()):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-5, atol=1e-7)


def test_clip_reports_non_finite_norm_without_scaling():
    grads = {"a": torch.tensor([1.0, float("nan")]), "b": torch.tensor([3.0])}
    assert math.isnan(clip_grad_norm(grads, 1.0))
    assert grads["b"].item() == 3.0

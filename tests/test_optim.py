"""AdamW, schedule and clipping against torch.optim.AdamW, torch's clip_grad_norm_ and
the closed-form schedule."""

import math

import pytest
import torch

from functional_gpt import flatten, init_params
from functional_gpt.training.optim import adamw_init, adamw_step, clip_grad_norm, decays, lr_at


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


def test_adamw_over_tensors_larger_than_a_group_matches_torch_adamw():
    """Tensors over GROUP_ELEMENTS (2**20) go through in flat pieces: a decayed matrix, a
    non-contiguous one (a transposed view, updated whole), a long bias and small ones
    around them match torch.optim.AdamW, decay by each tensor's own shape."""
    g = torch.Generator().manual_seed(2)
    big = 2**20 + 1000
    flat = {"h.0.mlp.c_fc.weight": torch.randn(1025, 1024, generator=g),
            "h.0.mlp.c_fc.bias": torch.randn(big, generator=g),
            "h.0.ln_1.weight": torch.randn(7, generator=g),
            "h.0.mlp.c_proj.weight": torch.randn(1024, 1030, generator=g).t(),
            "h.0.attn.c_proj.weight": torch.randn(3, 5, generator=g)}
    assert not flat["h.0.mlp.c_proj.weight"].is_contiguous()
    ours = {k: t.clone() if t.is_contiguous() else t.clone().t().contiguous().t() for k, t in flat.items()}
    theirs = {k: t.clone().requires_grad_(True) for k, t in flat.items()}
    reference = torch.optim.AdamW(
        [{"params": [t for k, t in theirs.items() if decays(k, t)], "weight_decay": 0.1},
         {"params": [t for k, t in theirs.items() if not decays(k, t)], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    state = adamw_init(ours)
    for _ in range(3):
        grads = {k: torch.randn(t.shape, generator=g) for k, t in flat.items()}
        for k, t in theirs.items():
            t.grad = grads[k].clone()
        reference.step()
        state = adamw_step(ours, grads, state, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for k in flat:
        torch.testing.assert_close(ours[k], theirs[k].detach(), rtol=1e-6, atol=1e-7, msg=k)
        torch.testing.assert_close(state.exp_avg_sq[k], reference.state[theirs[k]]["exp_avg_sq"], rtol=1e-6,
                                   atol=1e-9, msg=k)


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


def test_schedule_with_no_decay_phase_is_at_the_floor_after_warm_up():
    """decay_steps == warmup_steps: no cosine at all, min_lr from the end of warm-up on."""
    kw = dict(lr=1.0, warmup_steps=10, decay_steps=10, min_lr=0.1)
    assert lr_at(9, **kw) == 1.0
    assert lr_at(10, **kw) == 0.1
    assert lr_at(0, lr=1.0, warmup_steps=0, decay_steps=0, min_lr=0.1) == 0.1


def test_adamw_defaults_are_torchs_eps_and_no_decay(tiny_config):
    """adamw_step's defaults (eps 1e-8, weight_decay 0) are torch.optim.AdamW's eps and
    no decay, at gradients small enough (1e-8) that eps is a large part of the step."""
    flat = flatten(init_params(tiny_config, seed=2))
    ours = {k: t.clone() for k, t in flat.items()}
    theirs = {k: t.clone().requires_grad_(True) for k, t in flat.items()}
    reference = torch.optim.AdamW(list(theirs.values()), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    state = adamw_init(ours)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        grads = {k: 1e-8 * torch.randn(t.shape, generator=generator) for k, t in flat.items()}
        for k, t in theirs.items():
            t.grad = grads[k].clone()
        reference.step()
        state = adamw_step(ours, grads, state, lr=1e-2)
    for k in flat:
        torch.testing.assert_close(ours[k], theirs[k].detach(), rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("scale", [1e-7, 1e-4])
def test_clip_grad_norm_matches_torch_on_tiny_gradients(scale):
    """At a global norm near 1e-6, torch's + 1e-6 in the clip coefficient matters: the
    scale applied is max_norm / (norm + 1e-6), not max_norm / norm."""
    generator = torch.Generator().manual_seed(1)
    grads = {f"g{i}": scale * torch.randn(3, i + 2, generator=generator) for i in range(3)}
    leaves = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for leaf, g in zip(leaves, grads.values()):
        leaf.grad = g.clone()
    max_norm = 0.1 * float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()])))
    expected = torch.nn.utils.clip_grad_norm_(leaves, max_norm)
    assert clip_grad_norm(grads, max_norm) == pytest.approx(float(expected), rel=1e-6)
    for leaf, g in zip(leaves, grads.values()):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-5, atol=0)


def test_clip_at_exactly_max_norm_or_none_leaves_gradients_alone():
    """A norm of exactly max_norm (3-4-5) needs no clipping, and max_norm None never
    clips: the gradients stay bit-identical, and the norm is still returned."""
    grads = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}
    assert clip_grad_norm(grads, 5.0) == 5.0
    assert grads["a"].item() == 3.0 and grads["b"].item() == 4.0
    assert clip_grad_norm(grads, None) == 5.0
    assert grads["a"].item() == 3.0 and grads["b"].item() == 4.0


def test_weight_decay_with_nothing_to_decay_is_plain_adam():
    """Only embeddings and 1-D tensors: weight_decay 0.1 decays none of them, so the step is
    torch's AdamW with no decay (and an empty list of decayed tensors is not an error)."""
    generator = torch.Generator().manual_seed(4)
    flat = {"wte.weight": torch.randn(6, 4, generator=generator), "ln_f.weight": torch.randn(4, generator=generator)}
    ours = {k: t.clone() for k, t in flat.items()}
    theirs = [t.clone().requires_grad_(True) for t in flat.values()]
    reference = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    grads = {k: torch.randn(t.shape, generator=generator) for k, t in flat.items()}
    for t, g in zip(theirs, grads.values()):
        t.grad = g.clone()
    reference.step()
    adamw_step(ours, grads, adamw_init(ours), lr=1e-2, weight_decay=0.1)
    for (k, got), expected in zip(ours.items(), theirs):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_of_an_embedding_sized_gradient_is_float64s(dtype):
    """A gradient the size of gpt2's wte (38.6M elements): the norm within 1e-5 of the
    float64 norm of the same values (torch's own float32 norm of it is 0.27% off, which is
    what a single-pass norm gave here), for float32 and bfloat16 gradients alike."""
    g = torch.randn(50257, 768, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = float(g.double().norm())
    assert clip_grad_norm({"wte.weight": g}, None) == pytest.approx(expected, rel=1e-5)

"""torch.func over the model: per-example gradients against a loop of autograd.grad, an
ensemble against each member run alone."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from functional_gpt import UserError, flatten, forward, unflatten
from functional_gpt.interp.func import ensemble_logits, per_example_grads, stack_params

from conftest import TINY, hf_model, params_of


@pytest.fixture(scope="module")
def params():
    return params_of(hf_model(TINY, seed=2))


def _windows(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(TINY.vocab_size, (batch, length), generator=g), torch.randint(TINY.vocab_size,
                                                                                      (batch, length), generator=g)


def test_per_example_grads_equal_a_loop_of_autograd_grad(params):
    """Each window's gradient, every tensor within 1e-5 of its scale (the key bias, whose
    gradient is zero in exact arithmetic, within 1e-5 of the query bias's scale)."""
    tokens, targets = _windows(4, 12, 0)
    got = per_example_grads(params, tokens, targets, TINY)
    flat = {k: v.clone().requires_grad_() for k, v in flatten(params).items()}
    assert set(got) == set(flat) and all(got[k].shape == (4, *flat[k].shape) for k in flat)
    for b in range(4):
        loss = F.cross_entropy(forward(unflatten(flat), tokens[b : b + 1], TINY)[0], targets[b])
        expected = dict(zip(flat, torch.autograd.grad(loss, list(flat.values()))))
        for key, e in expected.items():
            scale = float(e.abs().max()) or float(expected["h.0.attn.c_attn.bias"].abs().max())
            assert float((got[key][b] - e).abs().max()) <= 1e-5 * scale, (b, key)
    assert not torch.allclose(got["wte.weight"][0], got["wte.weight"][1])  # the windows really differ


def test_more_windows_than_positions_are_fine(params):
    """33 windows of 2 tokens on a 32-position model: the batch is not a length."""
    tokens, targets = _windows(33, 2, 1)
    got = per_example_grads(params, tokens, targets, TINY)
    flat = {k: v.clone().requires_grad_() for k, v in flatten(params).items()}
    loss = F.cross_entropy(forward(unflatten(flat), tokens[32:], TINY)[0], targets[32])
    want = torch.autograd.grad(loss, [flat["ln_f.weight"]])[0]
    assert got["ln_f.weight"].shape == (33, TINY.n_embd)
    assert float((got["ln_f.weight"][32] - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_an_ensemble_equals_each_member_alone(params):
    members = [params_of(hf_model(TINY, seed=s)) for s in (1, 2, 3)]
    tokens, _ = _windows(2, 9, 1)
    logits = ensemble_logits(stack_params(members), tokens, TINY)
    assert logits.shape == (3, 2, 9, TINY.vocab_size)
    for m, member in enumerate(members):
        expected = forward(member, tokens, TINY)
        assert float((logits[m] - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), m


def test_bad_input_to_the_transforms_is_named(params):
    tokens, targets = _windows(2, 5, 2)
    with pytest.raises(UserError, match=r"^targets: an int64 tensor \[2, 4\], but tokens is an int64 tensor \[2, 5\]; "
                                        r"they must have one shape$"):
        per_example_grads(params, tokens, targets[:, :4], TINY)
    with pytest.raises(UserError, match="^targets id 128 is out of range for vocab_size=128$"):
        per_example_grads(params, tokens, torch.full_like(targets, 128), TINY)
    other = flatten(params_of(hf_model(TINY, seed=1)))
    other["ln_f.bias"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"^members\[1\] \(for 2 layers .*\): shape mismatch for ln_f\.bias: expected "
                                        r"\[32\], got \[3\]$"):
        stack_params([params, unflatten(other)])
    other = flatten(params_of(hf_model(TINY, seed=1)))
    with pytest.raises(UserError, match=r"^members\[1\]: tensors of several dtypes"):
        stack_params([params, unflatten({k: v.double() if k == "wte.weight" else v for k, v in other.items()})])
    with pytest.raises(UserError, match=r"^members\[1\]: wte\.weight is a float64 tensor \[128, 32\], members\[0\]'s "
                                        r"a float32 tensor \[128, 32\]; an ensemble is of one dtype on one device$"):
        stack_params([params, unflatten({k: v.double() for k, v in other.items()})])
    with pytest.raises(UserError, match=r"^members: expected a non-empty list of params, got a list of 0$"):
        stack_params([])


def test_an_ensemble_takes_its_config_from_the_stack_or_from_the_call(params):
    """One member is an ensemble too; a plain dict of stacked tensors runs with config=
    and without it is refused by name; a config that is not the params' is refused."""
    tokens, _ = _windows(2, 6, 3)
    one = ensemble_logits(stack_params([params]), tokens)
    assert one.shape == (1, 2, 6, TINY.vocab_size) and torch.allclose(one[0], forward(params, tokens, TINY), atol=1e-5)
    plain = unflatten(dict(flatten(stack_params([params, params]))))
    assert torch.equal(ensemble_logits(plain, tokens, TINY)[1], ensemble_logits(plain, tokens, TINY)[0])
    with pytest.raises(UserError, match=r"^config: these stacked params do not carry their config; pass config= or "
                                        r"stack them with stack_params\(members, config\)$"):
        ensemble_logits(plain, tokens)
    two_heads = dataclasses.replace(TINY, n_head=2)  # the same shapes: the config given is the one run
    assert torch.allclose(ensemble_logits(stack_params([params]), tokens, two_heads)[0],
                          forward(params, tokens, two_heads), atol=1e-5)
    assert not torch.allclose(forward(params, tokens, two_heads), one[0], atol=1e-3)
    with pytest.raises(UserError, match=r"^stacked: expected the params stack_params returns \(tensors with a leading "
                                        r"\[M\]\)$"):
        ensemble_logits(unflatten({k: v[0, 0] if v.dim() == 2 else v.sum()
                                   for k, v in flatten(stack_params([params])).items()}), tokens, TINY)
    with pytest.raises(UserError, match=r"^stacked: expected the params stack_params returns, got a list of 1$"):
        ensemble_logits([params], tokens, TINY)


def test_per_example_grads_name_their_targets(params):
    tokens, targets = _windows(2, 5, 4)
    with pytest.raises(UserError, match=r"^targets: expected an integer tensor, got a float32 tensor \[2, 5\]$"):
        per_example_grads(params, tokens, targets.float(), TINY)
    two_heads = dataclasses.replace(TINY, n_head=2)  # the same shapes: the config given is the one run
    assert not torch.allclose(per_example_grads(params, tokens, targets, two_heads)["wte.weight"],
                              per_example_grads(params, tokens, targets, TINY)["wte.weight"], atol=1e-6)

"""The pure training step: its mixed-precision gradients against transformers, its RNG
held in the state, float16's loss scale, and blow-ups."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import functional_gpt.training.step as step_module
from functional_gpt import flatten, unflatten
from functional_gpt.training.data import Position
from functional_gpt.model.transformer import forward_hidden
from functional_gpt.training.optim import adamw_init, adamw_step, clip_grad_norm, lr_at
from functional_gpt.training.step import (Batch, Diverged, LossScale, StepSettings, loss_and_grads, new_state,
                                 train_step)

from conftest import TINY, assert_rel_close, hf_model, params_of

CPU = torch.device("cpu")


def tokens(shape, seed=0):
    return torch.randint(TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def batch(n_micro=1, rows=3, T=16, seed=0):
    t = tokens((n_micro, rows, T + 1), seed)
    return Batch(t[..., :-1], t[..., 1:], Position(0, 7))


def settings(**overrides):
    values = dict(config=TINY, lr=1e-2, min_lr=1e-3, warmup_steps=1, decay_steps=10, weight_decay=0.1,
                  grad_clip=1.0, dropout=False)
    return StepSettings(**values | overrides)


def reference_grads(model, x, y):
    """transformers' float32 loss and gradients under our flat keys."""
    model.zero_grad()
    loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    loss.backward()
    return loss.item(), {k.removeprefix("transformer."): p.grad.clone() for k, p in model.named_parameters()}


def low_precision_grads(model, x, y, dtype):
    flat = {k: t.to(dtype) for k, t in flatten(params_of(model)).items()}
    return loss_and_grads(flat, x, y, TINY)


def relative_errors(grads, expected) -> dict:
    """key -> |g - expected| / |expected| (the key bias's true gradient is 0: left out)."""
    return {k: float((g.float() - expected[k]).norm() / expected[k].norm()) for k, g in grads.items()
            if not k.endswith("attn.c_attn.bias")}


def test_float32_gradients_match_transformers():
    model = hf_model(TINY, seed=3)
    x, y = (t[0] for t in batch(rows=4)[:2])
    expected_loss, expected = reference_grads(model, x, y)
    loss, grads = low_precision_grads(model, x, y, torch.float32)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6) and set(grads) == set(expected)
    for key, g in grads.items():
        if key.endswith("attn.c_attn.bias"):  # the key bias's true gradient is 0: only rounding noise
            g, expected[key] = torch.cat([g[:32], g[64:]]), torch.cat([expected[key][:32], expected[key][64:]])
        assert_rel_close(g, expected[key], 1e-5, key)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_low_precision_gradients_match_transformers_float32(dtype, rtol):
    """bf16 and fp16 compute (weights cast once, matmuls in the low dtype, softmax and loss
    in float32) give transformers' float32 gradients within the dtype's precision: every
    key's |g - expected| / |expected| below rtol (measured: bf16 3.3e-2, fp16 5.3e-3),
    the gradients in the compute dtype, the loss in float32 within 1e-4 relative
    (measured: 6e-5, 2e-5)."""
    model = hf_model(TINY, seed=3)
    x, y = (t[0] for t in batch(rows=4)[:2])
    expected_loss, expected = reference_grads(model, x, y)
    loss, grads = low_precision_grads(model, x, y, dtype)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected_loss, rel=1e-4)
    assert set(grads) == set(expected) and all(g.dtype == dtype for g in grads.values())
    errors = relative_errors(grads, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] < rtol, f"{worst}: relative error {errors[worst]:.3e}"


def test_bfloat16_gradients_are_as_close_to_float32_as_transformers_own_autocast():
    """The yardstick for "within bf16 tolerance": transformers under torch.autocast(bf16)
    on the same weights and tokens. Our worst per-key relative error stays within 1.5x of
    its worst (measured: 3.3e-2 against 3.3e-2)."""
    model = hf_model(TINY, seed=3)
    x, y = (t[0] for t in batch(rows=4)[:2])
    _, expected = reference_grads(model, x, y)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x).logits
    F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
    autocast = {k.removeprefix("transformer."): p.grad for k, p in model.named_parameters()}
    ours = max(relative_errors(low_precision_grads(model, x, y, torch.bfloat16)[1], expected).values())
    theirs = max(relative_errors(autocast, expected).values())
    assert 1e-3 < theirs and ours <= 1.5 * theirs, f"ours {ours:.3e}, transformers' autocast {theirs:.3e}"


def test_bfloat16_step_updates_the_float32_master_weights_with_the_bf16_gradients():
    """A bf16 step is AdamW on the float32 masters and moments, fed the gradients of the
    weights cast once to bf16 (clipped as float32 would be); nothing of the model is left
    in bf16."""
    model = hf_model(TINY, seed=4)
    x, y = (t[0] for t in batch()[:2])
    state = new_state(params_of(model), seed=0, device=CPU)
    masters = {k: t.clone() for k, t in flatten(state.params).items()}
    _, grads = loss_and_grads({k: t.bfloat16() for k, t in masters.items()}, x, y, TINY)
    clip_grad_norm(grads, 1.0)
    expected = adamw_step(masters, grads, adamw_init(masters), lr=lr_at(0, lr=1e-2, warmup_steps=1,
                          decay_steps=10, min_lr=1e-3), betas=(0.9, 0.95), weight_decay=0.1)
    after, metrics = train_step(state, batch(), settings(dtype=torch.bfloat16))
    assert after.step == 1 and after.position == Position(0, 7) and after.opt.step == expected.step == 1
    flat = flatten(after.params)
    for key, t in flat.items():
        assert t.dtype == after.opt.exp_avg[key].dtype == after.opt.exp_avg_sq[key].dtype == torch.float32
        assert torch.equal(t, masters[key]), key
        assert torch.equal(after.opt.exp_avg_sq[key], expected.exp_avg_sq[key]), key


def test_bfloat16_gradients_of_micro_batches_are_accumulated_in_float32():
    """Eight bf16 micro-batches: their gradients are summed in float32 (in order) and
    averaged, so the step's grad_norm and second moments equal that sum's; summed in
    bf16 they would be off by about 1e-3."""
    model = hf_model(TINY, seed=6)
    b = batch(n_micro=8, rows=2)
    state = new_state(params_of(model), seed=0, device=CPU)
    masters = {k: t.clone() for k, t in flatten(state.params).items()}
    total = None
    for x, y in zip(b.x, b.y):
        _, grads = loss_and_grads({k: t.bfloat16() for k, t in masters.items()}, x, y, TINY)
        grads = {k: g.float() for k, g in grads.items()}
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
    mean_grads = {k: g / 8 for k, g in total.items()}
    expected_norm = float(torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in mean_grads.values()])))
    clip_grad_norm(mean_grads, 1.0)
    expected = adamw_step(masters, mean_grads, adamw_init(masters), lr=lr_at(0, lr=1e-2, warmup_steps=1,
                          decay_steps=10, min_lr=1e-3), betas=(0.9, 0.95), weight_decay=0.1)
    after, metrics = train_step(state, b, settings(dtype=torch.bfloat16))
    assert metrics["grad_norm"] == pytest.approx(expected_norm, rel=1e-6)
    for key, v in after.opt.exp_avg_sq.items():
        assert_rel_close(v, expected.exp_avg_sq[key], 1e-5, key)


def test_the_step_draws_dropout_from_the_state_not_from_torchs_generator():
    """With dropout on, the same state and batch give the same params, whatever torch's
    global generator holds; the state's generator moves on (the next step's masks differ)."""
    config = dataclasses.replace(TINY, embd_pdrop=0.2, attn_pdrop=0.2, resid_pdrop=0.2)
    model = hf_model(TINY, seed=5)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = new_state(params_of(model), seed=7, device=CPU)
        after, metrics = train_step(state, batch(), settings(config=config, dropout=True))
        results.append((flatten(after.params), metrics["loss"], after.rng["torch"]))
    (a, loss_a, rng_a), (b, loss_b, rng_b) = results
    assert loss_a == loss_b and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng_a, rng_b) and not torch.equal(rng_a, new_state(params_of(model), 7, CPU).rng["torch"])
    no_dropout, _ = train_step(new_state(params_of(model), seed=7, device=CPU), batch(), settings(config=config))
    assert not torch.equal(flatten(no_dropout.params)["wte.weight"], a["wte.weight"])  # dropout did act


def test_micro_batches_average_to_one_batch():
    model = hf_model(TINY, seed=6)
    two = batch(n_micro=2, rows=2)
    one = Batch(two.x.reshape(1, 4, -1), two.y.reshape(1, 4, -1), two.end)
    a, ma = train_step(new_state(params_of(model), 0, CPU), two, settings())
    b, mb = train_step(new_state(params_of(model), 0, CPU), one, settings())
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    for key, t in flatten(b.params).items():
        assert_rel_close(flatten(a.params)[key], t, 1e-5, key)


def test_float16_loss_scale_skips_an_overflow_halves_and_grows(monkeypatch):
    """A scale so large that the float16 gradients overflow: the update is skipped (params
    unchanged), the step still counts, the scale halves. Good steps in a row double it."""
    model = hf_model(TINY, seed=8)
    state = dataclasses.replace(new_state(params_of(model), 0, CPU), loss_scale=LossScale(2.0**40, 5))
    before = {k: t.clone() for k, t in flatten(state.params).items()}
    after, metrics = train_step(state, batch(), settings(dtype=torch.float16))
    assert metrics["skipped"] and after.loss_scale == LossScale(2.0**39, 0) and after.step == 1
    assert all(torch.equal(before[k], t) for k, t in flatten(after.params).items())
    monkeypatch.setattr(step_module, "GROWTH_INTERVAL", 2)
    after, metrics = train_step(dataclasses.replace(after, loss_scale=LossScale(256.0, 0)), batch(),
                                settings(dtype=torch.float16))
    assert "skipped" not in metrics and after.loss_scale == LossScale(256.0, 1)
    assert not torch.equal(flatten(after.params)["wte.weight"], before["wte.weight"])
    after, _ = train_step(after, batch(), settings(dtype=torch.float16))
    assert after.loss_scale == LossScale(512.0, 0)


def test_float16_gradients_are_unscaled():
    """The logged norm and the update are those of the true gradient, not of loss * scale."""
    model = hf_model(TINY, seed=9)
    plain, m32 = train_step(new_state(params_of(model), 0, CPU), batch(), settings(grad_clip=None))
    scaled = dataclasses.replace(new_state(params_of(model), 0, CPU), loss_scale=LossScale(1024.0, 0))
    half, m16 = train_step(scaled, batch(), settings(dtype=torch.float16, grad_clip=None))
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=1e-2)


def test_a_non_finite_loss_raises_diverged(monkeypatch):
    real = step_module.loss_and_grads
    monkeypatch.setattr(step_module, "loss_and_grads", lambda *a, **k: (real(*a, **k)[0] * float("nan"),
                                                                         real(*a, **k)[1]))
    with pytest.raises(Diverged, match="loss is nan"):
        train_step(new_state(params_of(hf_model(TINY)), 0, CPU), batch(), settings())


# ------------------------------------------- activation checkpointing, torch.compile


def saved_bytes(fn) -> int:
    """The bytes autograd saves for the backward pass while `fn()` runs its forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointed_blocks_give_the_same_gradients_and_save_less(dtype):
    """--checkpoint_activations: with dropout on, the same loss and gradients (within 1e-6
    of each tensor's scale; measured: equal) as keeping the activations, since the
    recomputation replays the same dropout masks; and the forward pass saves less for
    backward than a third of what it saves without (measured on the tiny model: 0.2)."""
    config = dataclasses.replace(TINY, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    flat = {k: t.to(dtype) for k, t in flatten(params_of(hf_model(TINY))).items()}
    x, y = tokens((2, 4, 16), seed=3)
    results = []
    for checkpoint in (False, True):
        torch.manual_seed(7)
        results.append(loss_and_grads(flat, x, y, config, dropout=True, checkpoint=checkpoint))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert float(loss_ckpt) == pytest.approx(float(loss), rel=1e-6)
    for key in grads:
        assert_rel_close(grads_ckpt[key].float(), grads[key].float(), 1e-6, key)
    leaves = {k: t.detach().requires_grad_(True) for k, t in flat.items()}
    kept = saved_bytes(lambda: forward_hidden(unflatten(leaves), x, config, dropout=True))
    recomputed = saved_bytes(lambda: forward_hidden(unflatten(leaves), x, config, dropout=True, checkpoint=True))
    assert recomputed < kept / 3, (recomputed, kept)


def test_a_model_that_fails_to_compile_runs_eager_after_one_line(monkeypatch, capsys):
    """--compile where torch.compile fails: one line on stderr naming the failure, and
    the step's loss and gradients are eager's; the next call does not try again."""
    calls = []

    def broken_compile(fn):
        def run(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("no C++ compiler found\nsecond line")
        return run

    monkeypatch.setattr(step_module, "_COMPILED", [])
    monkeypatch.setattr(torch, "compile", broken_compile)
    flat = flatten(params_of(hf_model(TINY)))
    x, y = tokens((2, 2, 16), seed=4)
    loss, grads = loss_and_grads(flat, x, y, TINY)
    loss_c, grads_c = loss_and_grads(flat, x, y, TINY, compile=True)
    loss_again, _ = loss_and_grads(flat, x, y, TINY, compile=True)
    assert capsys.readouterr().err == ("--compile: torch.compile failed (RuntimeError: no C++ compiler found); "
                                       "training without it\n")
    assert len(calls) == 1 and float(loss_c) == float(loss) == float(loss_again)
    assert all(torch.equal(grads_c[k], grads[k]) for k in grads)


@pytest.mark.slow
def test_the_compiled_model_gives_eagers_loss_and_gradients(monkeypatch):
    """--compile for real (inductor on the CPU), with and without checkpointing: the loss
    within 1e-6 and every gradient within 1e-5 of its scale of eager's (measured: 4e-7)."""
    monkeypatch.setattr(step_module, "_COMPILED", [])
    flat = flatten(params_of(hf_model(TINY)))
    x, y = tokens((2, 4, 16), seed=5)
    loss, grads = loss_and_grads(flat, x, y, TINY)
    for checkpoint in (False, True):
        loss_c, grads_c = loss_and_grads(flat, x, y, TINY, compile=True, checkpoint=checkpoint)
        assert step_module._COMPILED[0] is not step_module.forward_hidden  # it did compile
        assert float(loss_c) == pytest.approx(float(loss), rel=1e-6)
        for key in grads:
            assert_rel_close(grads_c[key], grads[key], 1e-5, key)


# ------------------------------------------------------------- the step's checks of its input


def test_targets_that_do_not_line_up_with_the_inputs_are_refused_before_any_change():
    """y one token shorter than x used to train on misaligned targets."""
    params = params_of(hf_model(TINY))
    before = {k: v.clone() for k, v in flatten(params).items()}
    state = new_state(params, 0, CPU)
    b = batch()
    with pytest.raises(step_module.UserError, match=r"^batch\.y: expected shape \[1, 3, 16\], got an int64 tensor "
                                                    r"\[1, 3, 15\]$"):
        train_step(state, Batch(b.x, b.y[..., :-1], b.end), settings())
    assert all(torch.equal(before[k], v) for k, v in flatten(params).items())


@pytest.mark.parametrize("overrides, message", [
    (dict(grad_clip=-1), r"^grad_clip: expected a finite number >= 0, got -1 \(an int\)$"),
    (dict(lr=0.0), r"^lr: expected a finite number > 0, got 0\.0"),
    (dict(lr=float("nan")), r"^lr: expected a finite number > 0, got nan"),
    (dict(min_lr=0.1, lr=0.01), r"^min_lr 0\.1 is above lr 0\.01$"),
    (dict(betas=(0.9, 1.0)), r"^beta2: expected a finite number in \[0, 1\), got 1\.0"),
    (dict(betas=[0.9, 0.95]), r"^betas: expected a pair \(beta1, beta2\), got a list of 2$"),
    (dict(warmup_steps=-1), r"^warmup_steps: expected an integer >= 0"),
    (dict(decay_steps=2.5), r"^decay_steps: expected an integer >= 1"),
    (dict(weight_decay=-0.1), r"^weight_decay: expected a finite number >= 0"),
    (dict(dtype=torch.int8), r"^dtype: expected one of torch\.float32, torch\.bfloat16, torch\.float16"),
    (dict(dropout=1), r"^dropout: expected True or False, got 1 \(an int\)$"),
    (dict(config=TINY.to_dict()), r"^config: expected a GPTConfig, got a dict$"),
    (dict(world=None), r"^world: expected a World"),
])
def test_step_settings_follow_the_flags_rules(overrides, message):
    with pytest.raises(step_module.UserError, match=message):
        settings(**overrides)


def test_grad_clip_zero_means_no_clipping_as_the_flag_does():
    """grad_clip=0.0 used to zero every update; now it is None's update, and 1e-3 clips."""
    results = {}
    for clip in (None, 0.0, 1e-3):
        params = params_of(hf_model(TINY))
        state, metrics = train_step(new_state(params, 0, CPU), batch(), settings(grad_clip=clip))
        results[clip] = flatten(state.params)["h.0.mlp.c_fc.weight"]
    start = flatten(params_of(hf_model(TINY)))["h.0.mlp.c_fc.weight"]
    assert torch.equal(results[None], results[0.0]) and not torch.equal(results[0.0], start)
    assert not torch.equal(results[1e-3], results[None])


@pytest.mark.parametrize("call, message", [
    (lambda p: new_state(p, 2**70, CPU), r"^seed: expected an integer in -9223372036854775808\.\.18446744073709551615"),
    (lambda p: new_state(p, 0, "gpu"), r"^device 'gpu': unknown device"),
    (lambda p: new_state([p], 0, CPU), r"^params: expected the nested dict of GPT-2 tensors, got a list of 1$"),
    (lambda p: train_step(new_state(p, 0, CPU), batch(), dict(lr=1)), r"^settings: expected a StepSettings"),
    (lambda p: train_step(p, batch(), settings()), r"^state: expected a TrainState \(new_state\), got a Params$"),
    (lambda p: train_step(new_state(p, 0, CPU), (batch().x, batch().y), settings()),
     r"^batch: expected a Batch\(x, y, end\), got a tuple of 2$"),
    (lambda p: train_step(new_state(p, 0, CPU), Batch(batch().x[0], batch().y[0], Position()), settings()),
     r"^batch\.x: expected an integer tensor \[A, B, T\], got an int64 tensor \[3, 16\]$"),
    (lambda p: train_step(new_state(p, 0, CPU), Batch(batch().x.float(), batch().y, Position()), settings()),
     r"^batch\.x: expected an integer tensor \[A, B, T\], got a float32 tensor"),
    (lambda p: train_step(new_state(p, 0, CPU), Batch(batch().x, batch().y + 200, Position()), settings()),
     r"^batch\.y: token id \d+ is out of range for vocab_size=128$"),
    (lambda p: train_step(new_state(p, 0, CPU), Batch(*batch(T=40)[:2], Position()), settings()),
     r"^batch\.x: windows of 40 tokens, more than the context of 32$"),
    (lambda p: train_step(new_state(p, 0, CPU), batch(), settings(config=GPT_OTHER)),
     r"^state\.params \(for 3 layers .*\): missing keys: h\.2\."),
])
def test_the_step_names_bad_arguments(call, message):
    with pytest.raises(step_module.UserError, match=message):
        call(params_of(hf_model(TINY)))


GPT_OTHER = dataclasses.replace(TINY, n_layer=3)


@pytest.mark.parametrize("call, message", [
    (lambda f: adamw_step(f, {k: v for k, v in f.items() if k != "wte.weight"}, adamw_init(f), lr=0.1),
     r"^grads: no wte\.weight \(it must hold every key of the params\)$"),
    (lambda f: adamw_step(f, {k: v[..., :1] for k, v in f.items()}, adamw_init(f), lr=0.1),
     r"^grads: wte\.weight is a float32 tensor \[128, 1\], the param \[128, 32\]$"),
    (lambda f: adamw_step(f, f, (0, 0), lr=0.1), r"^state: expected an AdamWState \(adamw_init\), got a tuple of 2$"),
    (lambda f: adamw_step(f, f, adamw_init(f), lr=-1.0), r"^lr: expected a finite number >= 0, got -1\.0"),
    (lambda f: adamw_step(f, f, adamw_init(f), lr=0.1, betas=(1.5, 0.9)), r"^betas\[0\]: expected a finite number in"),
    (lambda f: adamw_step(f, f, adamw_init(f), lr=0.1, eps=0), r"^eps: expected a finite number > 0"),
    (lambda f: clip_grad_norm(f, -1.0), r"^max_norm: expected a finite number >= 0, got -1\.0"),
    (lambda f: lr_at(-1, lr=1.0, warmup_steps=1, decay_steps=2, min_lr=0.1), r"^step: expected an integer >= 0"),
    (lambda f: lr_at(1, lr=1.0, warmup_steps=1, decay_steps=2, min_lr=2.0), r"^min_lr 2\.0 is above lr 1\.0$"),
])
def test_the_optimizer_names_bad_arguments_and_changes_nothing(call, message):
    flat = flatten(params_of(hf_model(TINY)))
    before = {k: v.clone() for k, v in flat.items()}
    with pytest.raises(step_module.UserError, match=message):
        call(flat)
    assert all(torch.equal(before[k], v) for k, v in flat.items())


def test_new_state_takes_cpu_0_for_cpu():
    """torch.device("cpu:0") != torch.device("cpu"), yet they are one device (--device cpu:0
    on a rank was refused)."""
    state = new_state(params_of(hf_model(TINY)), 0, "cpu:0")
    assert state.step == 0

"""Shared fixtures: tiny random models, and transformers' GPT2LMHeadModel as the reference.

No network: transformers builds its models from a config and random init, then writes
them with save_pretrained, exactly as a published checkpoint is laid out.

Reference weights are *trained-like*, not GPT-2's init: layer-norm gains 1 + N(0, 0.3),
biases N(0, 0.2), embeddings N(0, 0.1), matrices N(0, (1.5 / sqrt(fan_in))^2). With them
the MLP's pre-activations reach |x| ~ 3, so on the tiny model the exact-erf GELU moves
the logits by 2e-4 of their scale and a layer-norm epsilon of 1e-6 instead of 1e-5 by
1e-3, while fp32 rounding stays below 1e-6: `assert_rel_close` at 1e-5 tells them apart.
"""

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from functional_gpt import GPTConfig, init_params, unflatten, with_config

# Hypothesis: CI's budget is bounded and derandomized (the same examples every run); a
# maintainer digs deeper with HYPOTHESIS_PROFILE=deep (README, maintainers).
settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("deep", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY = GPTConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
MACHINE_THREADS = torch.get_num_threads()


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_checkout_or_root():
    """No test leaves files in the checkout's top level or in / (a drawn relative path
    once put 574 files into the checkout and two into /)."""
    places = (Path(__file__).resolve().parents[1], Path("/"))
    before = [set(os.listdir(p)) for p in places]
    yield
    expected = {".pytest_cache", ".hypothesis", "mutants"}
    new = [sorted(set(os.listdir(p)) - b - expected) for p, b in zip(places, before)]
    assert not any(new), f"tests wrote into the checkout or /: {new[0][:5]}, {new[1][:5]}"


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models spend their time in per-op overhead, which a second thread only adds
    to (the quick selection runs in less than half the time on one); the `slow` 124M
    tests keep every thread the machine has."""
    torch.set_num_threads(MACHINE_THREADS if request.node.get_closest_marker("slow") else 1)
    yield


@pytest.fixture
def tiny_config() -> GPTConfig:
    return TINY


@pytest.fixture
def tiny_params():
    return init_params(TINY, seed=0)


def make_trained_like(named_tensors, generator: torch.Generator) -> None:
    """Overwrite (name, tensor) pairs in place with trained-like values (module doc)."""
    with torch.no_grad():
        for name, p in named_tensors:
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("weight") and (".ln_" in name or "ln_f" in name):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 1.5 / math.sqrt(p.shape[0]))


def hf_model(config: GPTConfig, seed: int = 0):
    """A transformers GPT2LMHeadModel (eval mode) of `config` with trained-like weights
    drawn from `seed`, lm_head tied to wte as in GPT-2."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        **config.to_dict(), bos_token_id=0, eos_token_id=0, activation_function="gelu_new"
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    make_trained_like(
        [(n, p) for n, p in model.named_parameters() if n != "lm_head.weight"],
        torch.Generator().manual_seed(seed),
    )
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model


def params_of(model):
    """A transformers model's weights as functional_gpt params carrying its config (copies,
    so that changing one side never changes the other)."""
    flat = {k.removeprefix("transformer."): v.detach().clone() for k, v in model.state_dict().items()
            if k != "lm_head.weight"}
    return with_config(unflatten(flat), GPTConfig.from_dict(model.config.to_dict()))


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """max |got - expected| <= rtol * max |expected|: a tolerance relative to the scale of
    what is compared (and a shape check)."""
    assert got.shape == expected.shape, f"{what}: shape {list(got.shape)} vs {list(expected.shape)}"
    scale = expected.detach().abs().max().item()
    error = (got.detach().double() - expected.detach().double()).abs().max().item()
    assert error <= rtol * scale, f"{what}: max |diff| {error:.3e} > {rtol:g} x scale {scale:.3e}"


@pytest.fixture
def hf_tiny(tmp_path):
    """(model, directory): a tiny transformers model saved with save_pretrained."""
    model = hf_model(TINY)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def published_layout(model, dtype=torch.float32) -> dict:
    """A transformers model's tensors laid out as the published GPT-2 files are: no
    `transformer.` prefix, the causal-mask buffers attn.bias / attn.masked_bias, and
    (as some conversions do) an explicit lm_head.weight equal to wte.weight."""
    P = model.config.n_positions
    tensors = {k.removeprefix("transformer."): v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.ones(P, P).tril().view(1, 1, P, P)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    return tensors


def random_token_data(data, vocab_size: int, n_train: int, n_val: int, seed: int = 0):
    """A prepared data directory `data` (created) of uniformly random tokens below
    vocab_size: train.bin then val.bin drawn from one seeded generator. -> data."""
    import numpy as np

    generator = np.random.default_rng(seed)
    data.mkdir()
    generator.integers(0, vocab_size, n_train).astype("<u2").tofile(data / "train.bin")
    generator.integers(0, vocab_size, n_val).astype("<u2").tofile(data / "val.bin")
    return data


def hf_from(flat: dict, config):
    """transformers' GPT2LMHeadModel (eval mode: no dropout) holding `flat`'s weights."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(**config.to_dict(), bos_token_id=0, eos_token_id=0,
                                        activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.transformer.load_state_dict({k: v.clone() for k, v in flat.items()}, strict=True)
    return model


def reference_training(start: dict, config, batches, *, lrs, weight_decay: float, clip: float,
                       betas=(0.9, 0.95)):
    """The independent reference of a training run: transformers' GPT2LMHeadModel holding
    `start` (flat params), trained by torch.optim.AdamW with the decay / no-decay groups of
    `optim.decays`, clip_grad_norm_ and F.cross_entropy over each step's windows at once.
    batches: one (x, y) [B, T] per step; lrs: each step's learning rate.
    -> ({GPT-2 key: param after the last step}, [loss per step], [pre-clip norm per step])."""
    from functional_gpt.training.optim import decays

    model = hf_from(start, config)
    named = [(k.removeprefix("transformer."), p) for k, p in model.named_parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": [p for k, p in named if decays(k, p)], "weight_decay": weight_decay},
         {"params": [p for k, p in named if not decays(k, p)], "weight_decay": 0.0}],
        lr=lrs[0], betas=betas, eps=1e-8)
    assert len(optimizer.param_groups[0]["params"]) == 4 * config.n_layer  # c_attn, c_proj, c_fc, c_proj
    losses, norms = _torch_training(model, list(model.parameters()), optimizer, batches, lrs, clip)
    return {k: p.detach() for k, p in named}, losses, norms


def _torch_training(model, trained: list, optimizer, batches, lrs, clip: float) -> tuple[list, list]:
    """Each step: F.cross_entropy over its windows, backward, clip_grad_norm_ of `trained`,
    the step's lr, optimizer.step() -> ([loss per step], [pre-clip norm per step])."""
    import torch.nn.functional as F

    losses, norms = [], []
    for (x, y), lr in zip(batches, lrs, strict=True):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(torch.as_tensor(x)).logits.flatten(0, 1), torch.as_tensor(y).flatten())
        loss.backward()
        losses.append(float(loss.detach()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(trained, clip)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    return losses, norms


def reference_lora_training(start: dict, config, adapter_dir, batches, *, lrs, weight_decay: float, clip: float,
                            betas=(0.9, 0.95)):
    """The independent reference of a LoRA run: Hugging Face peft's LoRA (the adapter in
    `adapter_dir`, peft's format) on transformers' GPT2LMHeadModel holding `start` (flat
    params), its LoRA weights trained by torch.optim.AdamW (weight decay on all of them, as
    transformers' Trainer decays every matrix), clip_grad_norm_ over them and F.cross_entropy.
    batches: one (x, y) [B, T] per step; lrs: each step's learning rate.
    -> ({our adapter key: tensor after the last step, in our layout}, [loss per step],
    [pre-clip norm per step])."""
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(hf_from(start, config), adapter_dir, is_trainable=True).eval()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lora.values(), lr=lrs[0], betas=betas, eps=1e-8, weight_decay=weight_decay)
    losses, norms = _torch_training(model, list(lora.values()), optimizer, batches, lrs, clip)
    ours = lambda name: name.removeprefix("base_model.model.transformer.").replace(".default", "").removesuffix(".weight")
    return {ours(n): p.detach().t() for n, p in lora.items()}, losses, norms


def without_key_bias(key: str, t: torch.Tensor, n_embd: int) -> torch.Tensor:
    """`t`, less the key bias when `key` is a c_attn bias: that bias's gradient is zero in
    exact arithmetic (softmax ignores a shift common to a query's scores), so any two
    computations move it by rounding noise that Adam scales up to +-lr."""
    if key.endswith("attn.c_attn.bias"):
        return torch.cat([t[:n_embd], t[2 * n_embd :]])
    return t

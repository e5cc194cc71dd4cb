"""Shared fixtures: tiny random models, and transformers' GPT2LMHeadModel as the reference.

No network: transformers builds its models from a config and random init, then writes
them with save_pretrained, exactly as a published checkpoint is laid out.
"""

import pytest
import torch

from functional_gpt import GPTConfig, init_params

TINY = GPTConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture
def tiny_config() -> GPTConfig:
    return TINY


@pytest.fixture
def tiny_params():
    return init_params(TINY, seed=0)


def hf_model(config: GPTConfig, seed: int = 0):
    """A randomly initialised transformers GPT2LMHeadModel (eval mode) of `config`."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        **config.to_dict(), bos_token_id=0, eos_token_id=0, activation_function="gelu_new"
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    # Random (not zero) biases and layer-norm gains, so a swapped or dropped one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model


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

import dataclasses
import math

import pytest
import torch

from functional_gpt import PRESETS, count_params, flatten, init_params, param_spec, unflatten
from functional_gpt.model.params import check_shapes
from functional_gpt.errors import UserError


def test_gpt2_has_124_439_808_parameters():
    assert count_params(PRESETS["gpt2"]) == 124_439_808
    params = init_params(PRESETS["cpu-tiny"])
    assert sum(t.numel() for t in flatten(params).values()) == count_params(PRESETS["cpu-tiny"])


def test_init_follows_gpt2_rules(tiny_config):
    config = tiny_config.__class__(**{**tiny_config.to_dict(), "n_embd": 256, "n_head": 4, "n_layer": 8})
    p = init_params(config, seed=1)
    assert p["wte"]["weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert p["h"][0]["attn"]["c_attn"]["weight"].std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    assert p["h"][3]["mlp"]["c_proj"]["weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert p["h"][3]["attn"]["c_proj"]["weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert torch.equal(p["h"][1]["ln_2"]["weight"], torch.ones(256))
    assert torch.equal(p["h"][1]["mlp"]["c_fc"]["bias"], torch.zeros(1024))


def test_init_is_reproducible_from_the_seed(tiny_config):
    a, b, c = (flatten(init_params(tiny_config, seed=s)) for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_flatten_unflatten_round_trip(tiny_params, tiny_config):
    flat = flatten(tiny_params)
    assert list(flat) == list(param_spec(tiny_config))
    nested = unflatten(flat)
    assert isinstance(nested["h"], list) and len(nested["h"]) == tiny_config.n_layer
    assert nested["h"][1]["attn"]["c_proj"]["bias"] is tiny_params["h"][1]["attn"]["c_proj"]["bias"]


def test_check_shapes_names_missing_unexpected_and_mismatched(tiny_config):
    shapes = {k: s.shape for k, s in param_spec(tiny_config).items()}
    check_shapes(shapes, tiny_config, "f")
    with pytest.raises(UserError, match=r"f: missing keys: h\.1\.ln_2\.bias"):
        check_shapes({k: v for k, v in shapes.items() if k != "h.1.ln_2.bias"}, tiny_config, "f")
    with pytest.raises(UserError, match=r"unexpected keys: h\.9\.mlp\.c_fc\.weight"):
        check_shapes({**shapes, "h.9.mlp.c_fc.weight": (1,)}, tiny_config, "f")
    with pytest.raises(UserError, match=r"shape mismatch for wpe.weight: expected \[32, 32\], got \[16, 32\]"):
        check_shapes({**shapes, "wpe.weight": (16, 32)}, tiny_config, "f")


# ------------------------------------------------- the Python API's checks of its input


def _without(params, *path):
    import copy
    params = copy.copy(params)
    node = params
    for part in path[:-1]:
        node[part] = copy.copy(node[part])
        node = node[part]
    del node[path[-1]]
    return params


@pytest.mark.parametrize("change, message", [
    (lambda p, c: (p, dataclasses.replace(c, n_layer=3)), r"missing keys: h\.2\.ln_1\.weight"),
    (lambda p, c: (p, dataclasses.replace(c, vocab_size=100)), r"shape mismatch for wte.weight: expected \[100, 32\]"),
    (lambda p, c: (_without(p, "ln_f"), c), r"missing keys: ln_f.weight, ln_f.bias"),
    (lambda p, c: ({**p, "lm_head": {"weight": p["wte"]["weight"]}}, c), "unexpected keys: lm_head.weight"),
    (lambda p, c: ({**p, "wte": {"weight": p["wte"]["weight"].tolist()}}, c), r"wte\.weight\.0\.0 is .* \(a float\), not a torch\.Tensor"),
    (lambda p, c: ({**p, "wpe": {"weight": "zeros"}}, c), r"wpe\.weight is 'zeros' \(a str\), not a torch\.Tensor"),
    (lambda p, c: ({**p, "wpe": {"weight": p["wpe"]["weight"].long()}}, c), "wpe.weight has dtype torch.int64"),
    (lambda p, c: ([p], c), "expected the nested dict of GPT-2 tensors, got a list of 1"),
    (lambda p, c: (p, c.to_dict()), "config: expected a GPTConfig, got dict"),
])
def test_forward_names_what_is_wrong_with_params_or_config(tiny_params, tiny_config, change, message):
    from functional_gpt import forward
    params, config = change(tiny_params, tiny_config)
    with pytest.raises(UserError, match=message):
        forward(params, torch.zeros(1, 4, dtype=torch.long), config)


def test_forward_without_a_config_on_a_malformed_dict(tiny_params):
    from functional_gpt import forward
    with pytest.raises(UserError, match="these params do not carry their config"):
        forward({"h": []}, torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("tokens, message", [
    ([[1, 2, 3]], r"tokens: expected an integer tensor \[B, T\], got a list of 1"),
    (torch.zeros(0, 4, dtype=torch.long), r"empty batch or sequence \(shape \[0, 4\]\)"),
    (torch.tensor(3), r"tokens: expected an integer tensor \[B, T\], got an int64 tensor \[\]"),
])
def test_forward_names_bad_tokens(tiny_params, tiny_config, tokens, message):
    from functional_gpt import forward
    with pytest.raises(UserError, match=message):
        forward(tiny_params, tokens, tiny_config)


def test_forward_cached_checks_its_cache(tiny_params, tiny_config):
    from functional_gpt import forward_cached, new_cache
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(UserError, match="cache: expected a KVCache"):
        forward_cached(tiny_params, tokens, {"k": None}, tiny_config)
    with pytest.raises(UserError, match=r"tokens: 2 rows for a cache of 1 rows"):
        forward_cached(tiny_params, tokens, new_cache(tiny_config, 1), tiny_config)
    with pytest.raises(UserError, match=r"counts\[1\]: expected an integer in 1\.\.3, got 4"):
        forward_cached(tiny_params, tokens, new_cache(tiny_config, 2), tiny_config, counts=(3, 4))

import math

import pytest
import torch

from functional_gpt import PRESETS, count_params, flatten, init_params, param_spec, unflatten
from functional_gpt.params import check_shapes
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

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


def test_params_whose_blocks_are_a_dict_or_of_mixed_dtypes_are_named(tiny_params, tiny_config):
    from functional_gpt import forward
    tokens = torch.zeros(1, 4, dtype=torch.long)
    as_dict = {**tiny_params, "h": {str(i): block for i, block in enumerate(tiny_params["h"])}}
    with pytest.raises(UserError, match=r"^params\['h'\]: expected a list of the 2 blocks \(params\['h'\]\[i\] is "
                                        r"block i\), got a dict$"):
        forward(as_dict, tokens, tiny_config)
    flat = flatten(tiny_params)
    mixed = unflatten({k: v.bfloat16() if k.startswith("h.1.") else v for k, v in flat.items()})
    with pytest.raises(UserError, match=r"^params: tensors of several dtypes \(wte\.weight is float32, "
                                        r"h\.1\.ln_1\.weight is bfloat16\); cast them all to one$"):
        forward(mixed, tokens, tiny_config)


@pytest.mark.parametrize("flat, message", [
    ({"a.b": torch.zeros(1), "a.b.c": torch.zeros(1)}, r"^flat: a\.b\.c is both a tensor and a prefix of other keys$|"
                                                       r"^flat: a\.b is both a tensor and a prefix of a\.b\.c$"),
    ({"a.b.c": torch.zeros(1), "a.b": torch.zeros(1)}, r"^flat: a\.b is both a tensor and a prefix of other keys$"),
    ({"a..b": torch.zeros(1)}, r"^flat: key 'a\.\.b' is not a dotted name"),
    ({3: torch.zeros(1)}, r"^flat: key 3 is not a dotted name"),
    ([("wte.weight", torch.zeros(1))], r"^flat: expected a dict of dotted keys to tensors, got a list of 1$"),
])
def test_unflatten_names_keys_that_do_not_make_a_tree(flat, message):
    with pytest.raises(UserError, match=message):
        unflatten(flat)


def test_unflatten_keeps_digit_keys_with_gaps_as_a_dict():
    """h.0 and h.2 without h.1 is not a list of blocks; check_params then names h.1 missing."""
    tree = unflatten({"h.0.x": torch.zeros(1), "h.2.x": torch.ones(1)})
    assert isinstance(tree["h"], dict) and set(tree["h"]) == {"0", "2"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=2**70), r"^seed: expected an integer in -9223372036854775808\.\.18446744073709551615, got "),
    (dict(seed=1.5), r"^seed: expected an integer"),
    (dict(dtype=torch.int64), r"^dtype: expected a floating-point torch\.dtype"),
    (dict(dtype="float32"), r"^dtype: expected a floating-point torch\.dtype"),
    (dict(device="gpu"), r"^device 'gpu': unknown device"),
    (dict(device=3), r"^device: expected a device such as 'cpu' or 'cuda', got 3 \(an int\)$"),
])
def test_init_params_names_bad_arguments(tiny_config, kwargs, message):
    with pytest.raises(UserError, match=message):
        init_params(tiny_config, **kwargs)


def test_init_params_on_meta_has_the_shapes_and_carries_the_config(tiny_config):
    params = init_params(tiny_config, device="meta")
    assert params["wte"]["weight"].is_meta and params.config is tiny_config
    with pytest.raises(UserError, match=r"^config: expected a GPTConfig"):
        init_params(tiny_config.to_dict())


def test_params_survive_torch_func_with_their_config(tiny_params, tiny_config):
    """Params are a pytree node: grad over them gives Params carrying the same config."""
    from functional_gpt import forward
    tokens = torch.zeros(1, 4, dtype=torch.long)
    grads = torch.func.grad(lambda p: forward(p, tokens).sum())(tiny_params)
    assert type(grads) is type(tiny_params) and grads.config is tiny_config
    assert set(flatten(grads)) == set(flatten(tiny_params))

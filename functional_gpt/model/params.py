"""The one description of GPT-2's parameters, and everything derived from it.

`param_spec` lists every key (GPT-2's safetensors names), its shape and its init rule.
`init_params`, `check_params` and `check_shapes` (used by the loader), `count_params` and
the tests all read it, so they cannot disagree. Only `flatten` / `unflatten` handle
dotted keys. `Params` is the nested dict that carries its config.

Quantized params (model/quantize.py) keep every key and shape: a quantized matrix holds
int8 values under its own key, with its bf16 per-output-channel scale beside it under
`weight_scale` (`h.0.attn.c_attn.weight_scale` [3C], `wte.weight_scale` [vocab]).
"""

import math
from typing import NamedTuple

import torch
from torch.utils import _pytree

from ..checks import check_float_dtype, check_int, describe
from ..device import check_device, check_memory
from .config import GPTConfig
from ..errors import UserError


class Params(dict):
    """The nested params under GPT-2's keys, a plain dict ({"wte": {"weight": T}, "h":
    [{"ln_1": {...}, "attn": {...}, ...}, ...], "ln_f": {...}}) that also carries `config`,
    the GPTConfig they were made for.

    The head count and the layer-norm epsilon cannot be read off the shapes, so
    `forward(params, tokens)` takes them from here and never guesses. `init_params`,
    `load_params` and `load_checkpoint` return one; `with_config` makes one of any nested
    dict. torch.func sees it as the dict it is (a pytree node that keeps the config), so
    `grad` and `vmap` over params give params back.
    """

    def __init__(self, tree: dict, config: GPTConfig):
        super().__init__(tree)
        self.config = config


_pytree.register_pytree_node(
    Params,
    lambda p: (list(p.values()), (list(p), p.config)),
    lambda values, context: Params(dict(zip(context[0], values)), context[1]),
    serialized_type_name="functional_gpt.Params",
    flatten_with_keys_fn=lambda p: ([(_pytree.MappingKey(k), v) for k, v in p.items()], (list(p), p.config)),
)


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    init: str  # "normal" (std 0.02), "residual" (std 0.02 / sqrt(2 n_layer)), "ones", "zeros"


def param_spec(config: GPTConfig) -> dict[str, ParamSpec]:
    """Every parameter's dotted key -> (shape, init rule), in GPT-2's order.

    Weights are stored [in, out] as GPT-2's Conv1D stores them (`y = x @ w + b`).
    The LM head is tied to `wte.weight` and has no key of its own.
    """
    _check_config(config)
    V, P, C = config.vocab_size, config.n_positions, config.n_embd
    spec = {"wte.weight": ParamSpec((V, C), "normal"), "wpe.weight": ParamSpec((P, C), "normal")}
    for i in range(config.n_layer):
        h = f"h.{i}."
        spec |= {
            h + "ln_1.weight": ParamSpec((C,), "ones"),
            h + "ln_1.bias": ParamSpec((C,), "zeros"),
            h + "attn.c_attn.weight": ParamSpec((C, 3 * C), "normal"),
            h + "attn.c_attn.bias": ParamSpec((3 * C,), "zeros"),
            h + "attn.c_proj.weight": ParamSpec((C, C), "residual"),
            h + "attn.c_proj.bias": ParamSpec((C,), "zeros"),
            h + "ln_2.weight": ParamSpec((C,), "ones"),
            h + "ln_2.bias": ParamSpec((C,), "zeros"),
            h + "mlp.c_fc.weight": ParamSpec((C, 4 * C), "normal"),
            h + "mlp.c_fc.bias": ParamSpec((4 * C,), "zeros"),
            h + "mlp.c_proj.weight": ParamSpec((4 * C, C), "residual"),
            h + "mlp.c_proj.bias": ParamSpec((C,), "zeros"),
        }
    spec |= {"ln_f.weight": ParamSpec((C,), "ones"), "ln_f.bias": ParamSpec((C,), "zeros")}
    return spec


SCALE = "weight_scale"  # the key beside a quantized weight that holds its scales
LORA = ("lora_A", "lora_B")  # the keys beside a block matrix that an attached LoRA adapter adds (lora.attach)


def quantizable_keys(config: GPTConfig) -> list[str]:
    """The matrices a weight-only scheme quantizes: the tied wte and each block's four."""
    return ["wte.weight"] + [f"h.{i}.{m}.weight" for i in range(config.n_layer)
                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def output_size(key: str, shape: tuple[int, ...]) -> int:
    """A matrix's output channels: wte's rows (the tied head's outputs), a Conv1D's columns."""
    return shape[0] if key == "wte.weight" else shape[1]


def init_params(
    config: GPTConfig,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Params:
    """GPT-2's initialisation, reproducible from `seed`: normal(0, 0.02) weights and
    embeddings, residual output projections scaled by 1/sqrt(2 * n_layer), layer norms
    at (1, 0), biases zero. Tensors are drawn in `param_spec` order on the CPU, so the
    same seed gives the same values on every device."""
    _check_config(config)
    generator = torch.Generator().manual_seed(check_int("seed", seed, -2**63, 2**64 - 1))
    dtype, device = check_float_dtype("dtype", dtype), check_device("device", device, meta=True)
    check_memory(f"the parameters of {config.n_layer} layers x {config.n_embd}", count_params(config) * dtype.itemsize,
                 device)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    flat = {}
    for key, (shape, rule) in param_spec(config).items():
        if rule == "ones":
            t = torch.ones(shape)
        elif rule == "zeros":
            t = torch.zeros(shape)
        else:
            std = residual_std if rule == "residual" else 0.02
            t = torch.empty(shape).normal_(0.0, std, generator=generator)
        flat[key] = t.to(device=device, dtype=dtype)
    return Params(unflatten(flat), config)


def with_config(params: dict, config: GPTConfig) -> Params:
    """`params` (any nested dict of GPT-2 tensors, e.g. built with `unflatten`) as Params
    that carry `config`, after checking that they are what it describes (the tensors are
    shared, not copied)."""
    _check_config(config)
    check_params(params, config)
    return Params(params, config)


def _check_config(config) -> None:
    if not isinstance(config, GPTConfig):
        raise UserError(f"config: expected a GPTConfig (functional_gpt.preset('gpt2'), GPTConfig(...)), got "
                        f"{describe(config)}")


def flatten(params: Params, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested params -> {dotted GPT-2 key: tensor}; list items become their index."""
    if not isinstance(params, (dict, list)):
        raise UserError(f"params: expected the nested dict of GPT-2 tensors, got {describe(params)}")
    items = enumerate(params) if isinstance(params, list) else params.items()
    flat = {}
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, (dict, list)):
            flat |= flatten(value, key + ".")
        else:
            flat[key] = value
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> dict:
    """{dotted key: tensor} -> nested params; a level whose keys are all digits becomes
    a list (so `params["h"][3]` is block 3)."""
    if not isinstance(flat, dict):
        raise UserError(f"flat: expected a dict of dotted keys to tensors, got {describe(flat)}")
    tree: dict = {}
    for key, value in flat.items():
        if not isinstance(key, str) or not all(key.split(".")):
            raise UserError(f"flat: key {key!r} is not a dotted name such as 'h.0.attn.c_attn.weight'")
        node = tree
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"flat: {'.'.join(parents[:depth + 1])} is both a tensor and a prefix of {key}")
        if isinstance(node.get(leaf), dict):
            raise UserError(f"flat: {key} is both a tensor and a prefix of other keys")
        node[leaf] = value
    return _lists_from_digit_dicts(tree)


def _lists_from_digit_dicts(node):
    if not isinstance(node, dict):
        return node
    node = {k: _lists_from_digit_dicts(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node) and set(node) == {str(i) for i in range(len(node))}:
        return [node[str(i)] for i in range(len(node))]
    return node


def count_params(config: GPTConfig) -> int:
    """Number of parameters (the tied LM head counted once)."""
    _check_config(config)
    return sum(math.prod(s.shape) for s in param_spec(config).values())


def check_shapes(shapes: dict[str, tuple[int, ...]], config: GPTConfig, source: str) -> None:
    """Raise a one-line UserError naming `source` unless `shapes` (dotted key -> shape) has
    exactly the keys and shapes of `param_spec(config)`: it lists missing keys, else
    unexpected keys, else names the first shape mismatch (key, expected, got)."""
    spec = param_spec(config)
    missing = [k for k in spec if k not in shapes]
    unexpected = [k for k in shapes if k not in spec]
    if missing:
        raise UserError(f"{source}: missing keys: {_listing(missing)}")
    if unexpected:
        raise UserError(f"{source}: unexpected keys: {_listing(unexpected)}")
    for key, (shape, _) in spec.items():
        if tuple(shapes[key]) != shape:
            raise UserError(
                f"{source}: shape mismatch for {key}: expected {list(shape)}, got {list(shapes[key])}"
            )


def check_params(params: Params, config: GPTConfig, source: str = "params", *, quantized: bool = True) -> None:
    """Raise a one-line UserError unless `params` is the nested GPT-2 dict that `config`
    describes: every key present (no others), the blocks a list under "h", each a
    floating-point torch.Tensor of the spec's shape, all of one dtype on one device that
    holds values (not "meta"); quantized matrices (int8, each with its bf16 scale [outputs]
    beside it) where `quantized` allows them. For public entry points (`forward`,
    `generate`); costs about a microsecond per key, nothing per element."""
    _check_config(config)
    if not isinstance(params, dict):
        raise UserError(f"{source}: expected the nested dict of GPT-2 tensors, got {describe(params)}")
    flat = flatten(params)
    bad = next(((k, v) for k, v in flat.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{source}: {bad[0]} is {describe(bad[1])}, not a torch.Tensor")
    scales = {k: flat.pop(k) for k in [k for k in flat if k.rpartition(".")[2] == SCALE]}
    factors = {k: flat.pop(k) for k in [k for k in flat if k.rpartition(".")[2] in LORA]}
    check_shapes({k: tuple(v.shape) for k, v in flat.items()}, config, f"{source} (for {config.n_layer} layers "
                 f"x {config.n_embd}, vocab {config.vocab_size}, {config.n_positions} positions)")
    _check_scales(flat, scales, config, source, quantized)
    _check_factors(flat, factors, config, source)
    flat |= scales | factors
    if not isinstance(params["h"], list):  # a dict keyed "0", "1", ... has the right keys but no order
        raise UserError(f"{source}['h']: expected a list of the {config.n_layer} blocks (params['h'][i] is block "
                        f"i), got {describe(params['h'])}")
    devices = {v.device for v in flat.values()}
    if len(devices) > 1:
        raise UserError(f"{source}: tensors on several devices ({', '.join(sorted(map(str, devices)))})")
    if next(iter(devices)).type == "meta":
        raise UserError(f"{source}: the tensors are on the meta device, which holds no values; load or "
                        f"initialise real ones (load_params, init_params)")
    floats = {k: v for k, v in flat.items() if k not in scales and f"{k}_scale" not in scales}
    key, t = next(((k, v) for k, v in floats.items() if not v.is_floating_point()), (None, None))
    if key is not None:
        raise UserError(f"{source}: {key} has dtype {t.dtype}; parameters must be floating point")
    dtypes = {}
    for k, v in floats.items():
        dtypes.setdefault(v.dtype, k)
    if len(dtypes) > 1:
        seen = ", ".join(f"{k} is {str(d).removeprefix('torch.')}" for d, k in dtypes.items())
        raise UserError(f"{source}: tensors of several dtypes ({seen}); cast them all to one")


def _check_scales(flat: dict, scales: dict, config: GPTConfig, source: str, quantized: bool) -> None:
    """Each scale sits beside a quantizable weight that holds int8, as bf16 [its outputs];
    each int8 weight has its scale."""
    if scales and not quantized:
        raise UserError(f"{source}: quantized ({next(iter(scales))}); these params are for inference only: "
                        f"use the float weights they were made from")
    allowed = set(quantizable_keys(config))
    for key, scale in scales.items():
        weight_key = key.removesuffix("_scale")
        if weight_key not in allowed:
            raise UserError(f"{source}: unexpected key {key}: only the matrices (wte.weight, "
                            f"h.N.attn.c_attn.weight, ...) have a {SCALE}")
        weight = flat[weight_key]
        if weight.dtype != torch.int8:
            raise UserError(f"{source}: {key} is beside {weight_key} of dtype "
                            f"{str(weight.dtype).removeprefix('torch.')}; a scale goes with int8 values")
        shape = (output_size(weight_key, tuple(weight.shape)),)
        if tuple(scale.shape) != shape or scale.dtype != torch.bfloat16:
            raise UserError(f"{source}: {key} must be bfloat16 {list(shape)}, one per output of {weight_key}; "
                            f"got {describe(scale)}")
    key = next((k for k, v in flat.items() if v.dtype == torch.int8 and f"{k}_scale" not in scales), None)
    if key is not None:
        raise UserError(f"{source}: {key} holds int8 values without the {SCALE} beside it "
                        f"(functional_gpt.quantize makes both)")


def _check_factors(flat: dict, factors: dict, config: GPTConfig, source: str) -> None:
    """Each attached LoRA pair sits beside a block matrix [n_in, n_out]: lora_A [n_in, r]
    and lora_B [r, n_out] (lora.attach)."""
    allowed = set(quantizable_keys(config)) - {"wte.weight"}
    for key, t in factors.items():
        stem, _, side = key.rpartition(".")
        weight_key, pair = f"{stem}.weight", f"{stem}.{'lora_B' if side == 'lora_A' else 'lora_A'}"
        if weight_key not in allowed:
            raise UserError(f"{source}: unexpected key {key}: only a block's matrices (h.N.attn.c_attn, ...) carry "
                            f"LoRA factors")
        if pair not in factors:
            raise UserError(f"{source}: {key} has no {pair.rpartition('.')[2]} beside it")
        n_in, n_out = flat[weight_key].shape
        r = factors[f"{stem}.lora_A"].shape[-1]
        want = (n_in, r) if side == "lora_A" else (r, n_out)
        if tuple(t.shape) != want:
            raise UserError(f"{source}: {key} has shape {list(t.shape)}, but {weight_key} is {[n_in, n_out]}: "
                            f"expected {list(want)}")


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise a one-line UserError naming the first key whose tensor holds NaN or infinity
    (and how many such values)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{source}: {key} holds {n_bad} non-finite values (NaN or infinity)")


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")

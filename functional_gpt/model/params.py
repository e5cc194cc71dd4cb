"""The one description of GPT-2's parameters, and everything derived from it.

`param_spec` lists every key (GPT-2's safetensors names), its shape and its init rule.
`init_params`, `check_flat_params` (used by the loader), `count_params` and the tests
all read it, so they cannot disagree. Only `flatten` / `unflatten` handle dotted keys.
"""

import math
from typing import NamedTuple

import torch

from .config import GPTConfig
from ..errors import UserError

Params = dict  # nested: {"wte": {"weight": T}, "h": [{"ln_1": {...}, ...}, ...], ...}


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    init: str  # "normal" (std 0.02), "residual" (std 0.02 / sqrt(2 n_layer)), "ones", "zeros"


def param_spec(config: GPTConfig) -> dict[str, ParamSpec]:
    """Every parameter's dotted key -> (shape, init rule), in GPT-2's order.

    Weights are stored [in, out] as GPT-2's Conv1D stores them (`y = x @ w + b`).
    The LM head is tied to `wte.weight` and has no key of its own.
    """
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
    generator = torch.Generator().manual_seed(seed)
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
    return unflatten(flat)


def flatten(params: Params, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested params -> {dotted GPT-2 key: tensor}; list items become their index."""
    items = enumerate(params) if isinstance(params, list) else params.items()
    flat = {}
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, (dict, list)):
            flat |= flatten(value, key + ".")
        else:
            flat[key] = value
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> Params:
    """{dotted key: tensor} -> nested params; a level whose keys are all digits becomes
    a list (so `params["h"][3]` is block 3)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _lists_from_digit_dicts(tree)


def _lists_from_digit_dicts(node):
    if not isinstance(node, dict):
        return node
    node = {k: _lists_from_digit_dicts(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node):
        return [node[str(i)] for i in range(len(node))]
    return node


def count_params(config: GPTConfig) -> int:
    """Number of parameters (the tied LM head counted once)."""
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


def check_params(params: Params, config: GPTConfig, source: str = "params") -> None:
    """Raise a one-line UserError unless `params` is the nested GPT-2 dict that `config`
    describes: every key present (no others), each a floating-point torch.Tensor of the
    spec's shape, all on one device. For public entry points (`forward`, `generate`);
    costs about a microsecond per key, nothing per element."""
    if not isinstance(params, dict):
        raise UserError(f"{source}: expected the nested dict of GPT-2 tensors, got {type(params).__name__}")
    flat = flatten(params)
    bad = next(((k, v) for k, v in flat.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{source}: {bad[0]} is a {type(bad[1]).__name__}, not a torch.Tensor")
    check_shapes({k: tuple(v.shape) for k, v in flat.items()}, config, f"{source} (for {config.n_layer} layers "
                 f"x {config.n_embd}, vocab {config.vocab_size}, {config.n_positions} positions)")
    devices = {v.device for v in flat.values()}
    if len(devices) > 1:
        raise UserError(f"{source}: tensors on several devices ({', '.join(sorted(map(str, devices)))})")
    key, t = next(((k, v) for k, v in flat.items() if not v.is_floating_point()), (None, None))
    if key is not None:
        raise UserError(f"{source}: {key} has dtype {t.dtype}; parameters must be floating point")


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


def config_from_shapes(flat_shapes: dict[str, tuple[int, ...]], head_dim: int = 64) -> GPTConfig:
    """Read a GPTConfig off parameter shapes (dotted keys -> shape); the head count is
    n_embd / head_dim, 64 in every released GPT-2. Dropout takes GPT-2's defaults."""
    try:
        V, C = flat_shapes["wte.weight"]
        P, _ = flat_shapes["wpe.weight"]
    except (KeyError, ValueError):
        raise UserError("cannot infer the config: wte.weight [V, C] and wpe.weight [P, C] are needed") from None
    n_layer = len({k.split(".")[1] for k in flat_shapes if k.startswith("h.")})
    if C % head_dim:
        raise UserError(f"cannot infer n_head: n_embd={C} is not a multiple of head size {head_dim}")
    return GPTConfig(vocab_size=V, n_positions=P, n_embd=C, n_layer=n_layer, n_head=C // head_dim)

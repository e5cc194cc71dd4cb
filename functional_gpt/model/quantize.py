"""Weight-only int8 as a pure transform of params: `quantize(params, "int8") -> params`.

Each matrix (the tied wte and every block's four) becomes int8 values q with one scale
per output channel beside it, symmetric: w ~= q * scale, |q| <= 127. The scale is
max|w| / 127 of its channel rounded up to a bf16 value, since the kernel reads bf16
scales: rounding up keeps every q in range and costs no second rounding. The values keep
their GPT-2 key and shape ([n_in, n_out]; wte [vocab, C]) with the scale under
`weight_scale`, so `flatten`, `save_params` and the hooks see the keys they know. Biases,
layer norms and wpe stay in the params' float dtype, the one activations run in.

Everything that runs params runs these (`forward`, `forward_cached`, generate, serve,
eval, hooks): `layers.linear` and the tied head dispatch on the scale, one model
(`dequantize` gives the float params they stand for, to what reads matrices whole). An int8
matrix is held as the transpose of a contiguous [n_out, n_in] buffer, the layout the
kernel reads (`to_kernel_layout`: quantize and the loader do it once).
"""

import torch

from ..checks import describe
from ..errors import UserError
from .config import GPTConfig
from .params import SCALE, Params, check_params, flatten, quantizable_keys, unflatten

SCHEMES = ("int8",)
METADATA_KEY = "functional_gpt.quantization"  # a file's scheme, in its safetensors metadata


def quantize(params: Params, scheme: str = "int8") -> Params:
    """float params (carrying their config) -> the same params with every matrix int8 and
    its scale beside it; `params` is not changed. Refuses params already quantized, and a
    width the kernel cannot read (n_embd % 16)."""
    check_scheme("scheme", scheme)
    config = _checked(params, "quantize", quantized=False)
    if config.n_embd % 16:
        raise UserError(f"n_embd={config.n_embd}: the int8 kernel reads 16 inputs at a time, so n_embd must be a "
                        f"multiple of 16")
    flat = dict(flatten(params))
    with torch.no_grad():
        for key in quantizable_keys(config):
            flat[key], flat[f"{key}_scale"] = _int8(key, flat[key])
    return Params(unflatten(flat), config)


def dequantize(params: Params, config: GPTConfig | None = None) -> Params:
    """The float params int8 params stand for (each matrix q * scale, in the dtype of the
    rest), attached LoRA factors folded in (W + A @ B, lora.attach); plain float params as
    they are. config: None takes the one they carry. For what reads matrices whole: the
    weights by role, transformers as the reference."""
    config = _checked(params, "dequantize", config=config)
    flat = dict(flatten(params))
    factors = [k for k in flat if k.endswith(".lora_A")]
    if scheme_of(params) is None and not factors:
        return params
    dtype = params["wpe"]["weight"].dtype
    for key in [k for k in flat if k.endswith(f".{SCALE}")]:
        weight_key, scale = key.removesuffix("_scale"), flat.pop(key).to(dtype)
        flat[weight_key] = flat[weight_key].to(dtype) * (scale[:, None] if weight_key == "wte.weight" else scale)
    for key in factors:
        stem = key.removesuffix(".lora_A")
        flat[f"{stem}.weight"] = flat[f"{stem}.weight"] + flat.pop(key) @ flat.pop(f"{stem}.lora_B")
    return Params(unflatten(flat), config)


def check_scheme(name: str, scheme) -> str:
    """scheme, if it is one this version knows, else a UserError naming `name`."""
    if scheme not in SCHEMES:
        raise UserError(f"{name}: unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return scheme


def quantize_flag(params: Params, scheme: str | None, flag: str = "--quantize") -> Params:
    """What a command's --quantize asks of the params it loaded: None keeps them; a scheme
    quantizes float params, and keeps params already in it."""
    if scheme is None:
        return params
    check_scheme(flag, scheme)
    if scheme_of(params) == scheme:
        return params
    try:
        return quantize(params, scheme)
    except UserError as e:
        raise UserError(f"{flag} {scheme}: {e}") from None


def scheme_of(params: Params) -> str | None:
    """"int8" for quantized params, None for float ones."""
    return "int8" if SCALE in params["wte"] else None


def _checked(params, what: str, *, quantized: bool = True, config: GPTConfig | None = None):
    """config, else the one params carry, after checking params against it (a UserError
    naming params)."""
    config = getattr(params, "config", None) if config is None else config
    if not isinstance(config, GPTConfig):
        raise UserError(f"params: {what} needs params that carry their config (init_params, load_params, "
                        f"with_config), got {describe(params)}")
    check_params(params, config, quantized=quantized)
    return config


def to_kernel_layout(key: str, weight: torch.Tensor) -> torch.Tensor:
    """The int8 matrix under `key` laid out as the kernel reads it (the same values and
    shape): a block's [n_in, n_out] as the transpose of a contiguous [n_out, n_in] buffer;
    wte [vocab, C], already [n_out, n_in], contiguous."""
    return weight.contiguous() if key == "wte.weight" else weight.t().contiguous().t()


def _int8(key: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix -> (int8 values, bf16 scales [outputs]); per output channel, symmetric."""
    rows = w if key == "wte.weight" else w.t()  # [n_out, n_in]
    amax = rows.float().abs().amax(dim=1)
    scale = _round_up_to_bf16(torch.where(amax > 0, amax / 127, torch.ones_like(amax)))
    q = (rows.float() / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    return (q if key == "wte.weight" else q.t()), scale


def _round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 x > 0 -> the least bf16 value >= x."""
    down = x.to(torch.bfloat16)  # round to nearest: at most one bf16 step below x
    above = (down.view(torch.int16) + 1).view(torch.bfloat16)  # the next bf16 up (x > 0: its bits count up)
    return torch.where(down.float() >= x, down, above)

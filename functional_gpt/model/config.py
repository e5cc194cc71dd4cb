"""Model hyperparameters under GPT-2's own names, presets, and Hugging Face config.json I/O."""

import dataclasses
import json
import os
from dataclasses import dataclass

from ..checks import check_int, check_number, check_path, describe
from ..errors import UserError
from ..files import write_json


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 hyperparameters, named as in Hugging Face's GPT2Config."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    def __post_init__(self):
        """Every field's type and range, checked once here: whatever builds a config (a
        preset, a file's metadata, a config.json, Python code) gets the same one-line
        UserError naming the field."""
        for name in _INT_FIELDS:  # stored as plain ints and floats (numpy scalars are taken as theirs)
            object.__setattr__(self, name, check_int(f"config: {name}", getattr(self, name), 1,
                                                     MAX_LAYERS if name == "n_layer" else None))
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, check_number(f"config: {name}", getattr(self, name)))
        V, P, C, L = self.vocab_size, self.n_positions, self.n_embd, self.n_layer
        total = V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C  # params.count_params, in closed form
        if total > MAX_PARAMETERS:
            raise UserError(f"config: {total:,} parameters, more than {MAX_PARAMETERS:,} (no machine holds them; "
                            f"check vocab_size, n_positions, n_embd and n_layer)")
        if self.n_embd % self.n_head:
            raise UserError(f"config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0 < self.layer_norm_epsilon < 1:
            raise UserError(f"config: layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"config: {name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "GPTConfig":
        """Build from a dict with GPT-2's names; keys this class does not know are ignored
        (a Hugging Face config.json carries many). An integer field given as an integral
        float (128.0) is taken as the integer; anything else wrong is a UserError."""
        if not isinstance(d, dict):
            raise UserError(f"config: expected a JSON object of GPT-2 hyperparameters, got {type(d).__name__}")
        kwargs = {k: v for k, v in d.items() if k in _INT_FIELDS + _FLOAT_FIELDS}
        for key in _INT_FIELDS:
            value = kwargs.get(key)
            if isinstance(value, float) and value.is_integer():
                kwargs[key] = int(value)
        return cls(**kwargs)


_INT_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
# Sanity ceilings, far past any real GPT-2 (48 layers, 1.5B parameters): beyond them every
# function that walks the layers or allocates the weights would exhaust memory instead of
# answering.
MAX_LAYERS = 4096
MAX_PARAMETERS = 2**40
_FLOAT_FIELDS = ("layer_norm_epsilon", "embd_pdrop", "attn_pdrop", "resid_pdrop")

_SMALL_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)

PRESETS: dict[str, GPTConfig] = {
    # The four released GPT-2 sizes: 124M, 355M, 774M, 1558M parameters.
    "gpt2": GPTConfig(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
    # Sized for training on a 2-core CPU in minutes (GPT-2's vocabulary, short context).
    "cpu-small": GPTConfig(n_positions=128, n_embd=256, n_layer=4, n_head=4, **_SMALL_DROPOUT),
    "cpu-tiny": GPTConfig(n_positions=128, n_embd=128, n_layer=2, n_head=2, **_SMALL_DROPOUT),
}


def preset(name: str) -> GPTConfig:
    """The config of a named preset; an unknown name is a UserError listing the known ones."""
    if not isinstance(name, str):
        raise UserError(f"preset: expected a preset name ({', '.join(PRESETS)}), got {describe(name)}")
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def read_hf_config(path: str | os.PathLike) -> GPTConfig:
    """Read a Hugging Face GPT-2 config.json (file, or a directory holding one)."""
    path = check_path("path", path, "a config.json or its directory")
    if path.is_dir():
        path = path / "config.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON config ({e})") from None
    try:
        config = GPTConfig.from_dict(d)
        check_computation(d, config)
        return config
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


# config.json fields that change what transformers computes, and the values that compute
# what this model does. gelu_new, gelu_fast and gelu_pytorch_tanh are one formula, GELU's
# tanh approximation; reorder_and_upcast_attn only moves the attention scores to float32
# in half precision (in float32 it computes the same, tested against transformers).
IMPLEMENTED = {
    "model_type": ("gpt2",),
    "activation_function": ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
    "reorder_and_upcast_attn": (False, True),
}


def check_computation(d: dict, config: GPTConfig) -> None:
    """A UserError naming the first field of a Hugging Face config (a config.json's dict,
    read as `config`) that asks for a computation this model does not implement
    (IMPLEMENTED); n_inner, the MLP's width, must be absent, null or 4 * n_embd."""
    for field, allowed in IMPLEMENTED.items():
        if field in d and not any(type(d[field]) is type(a) and d[field] == a for a in allowed):
            raise UserError(f"config: {field}={json.dumps(d[field])} is not implemented (this model computes "
                            f"{' or '.join(json.dumps(a) for a in allowed)})")
    n_inner = d.get("n_inner")
    if n_inner is not None and not (type(n_inner) is int and n_inner == 4 * config.n_embd):
        raise UserError(f"config: n_inner={json.dumps(n_inner)} is not implemented (the MLP is 4 * n_embd = "
                        f"{4 * config.n_embd} wide, or n_inner null)")


def hf_config_dict(config: GPTConfig) -> dict:
    """The config.json content transformers' GPT2Config expects, GPT-2 defaults included."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_ctx": config.n_positions,
        "n_inner": None,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "use_cache": True,
        **config.to_dict(),
    }


def write_hf_config(config: GPTConfig, path: str | os.PathLike) -> None:
    """Write config.json for transformers (atomically: temp file, then rename)."""
    write_json(path, hf_config_dict(config))

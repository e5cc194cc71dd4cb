"""functional-gpt: GPT-2 as pure functions over a nested dict of GPT-2-named tensors."""

from .checkpoint import load_params, save_params
from .config import PRESETS, GPTConfig, preset, read_hf_config, write_hf_config
from .errors import UserError
from .model import KVCache, config_of, decode_step, forward, forward_cached, new_cache
from .taps import no_tap, recorder
from .params import count_params, flatten, init_params, param_spec, unflatten
from .tokenizer import ENDOFTEXT, ENDOFTEXT_ID, decode, encode, gpt2_encoding

__all__ = [
    "ENDOFTEXT", "ENDOFTEXT_ID", "GPTConfig", "KVCache", "PRESETS", "UserError",
    "config_of", "count_params", "decode", "decode_step", "encode", "flatten", "forward", "forward_cached",
    "gpt2_encoding", "init_params", "load_params", "new_cache", "no_tap", "param_spec",
    "preset", "read_hf_config", "recorder", "save_params", "unflatten", "write_hf_config",
]

"""The model: GPT-2 as pure functions over a nested dict of tensors under GPT-2's keys.

`config` (GPTConfig, presets, config.json) -> `params` (the one parameter spec, init,
flatten) -> `layers` (layer_norm ... transformer_block) -> `transformer` (forward, the
KV cache, decode_step); beside them `taps` (seeing and changing activations), the
`tokenizer`, `quantize` (weight-only int8 params), `lora` (LoRA adapters as a pure
transform: merge) -> `lora_files` (peft's adapter format) and `checkpoint` (safetensors
and Hugging Face layouts on disk).

Every name listed here checks its arguments (a UserError naming the one that is wrong).
The layers are the building blocks inside forward, one small function each as the
paper draws them: import them from `functional_gpt.model.layers`; they trust their
callers (their shape comments say what they take), so the model's hot path checks
nothing twice.
"""

from .checkpoint import load_params, save_params
from .config import PRESETS, GPTConfig, preset, read_hf_config, write_hf_config
from .lora import Adapter, init_adapter, merge, trainable_count, unmerge
from .lora_files import load_adapter, save_adapter, with_adapter
from .quantize import dequantize, quantize
from .params import Params, count_params, flatten, init_params, param_spec, unflatten, with_config
from .taps import no_tap, recorder
from .tokenizer import ENDOFTEXT, ENDOFTEXT_ID, decode, encode, gpt2_encoding, to_single_token, to_str_tokens
from .transformer import KVCache, config_of, decode_step, forward, forward_cached, forward_hidden, new_cache

__all__ = [
    "Adapter", "ENDOFTEXT", "ENDOFTEXT_ID", "GPTConfig", "KVCache", "PRESETS", "Params", "config_of", "count_params", "decode",
    "decode_step", "dequantize", "encode", "flatten", "forward", "forward_cached", "forward_hidden", "gpt2_encoding",
    "init_adapter", "init_params", "load_adapter", "load_params", "merge", "new_cache", "no_tap", "param_spec", "preset",
    "quantize", "read_hf_config", "recorder", "save_adapter", "save_params", "to_single_token", "to_str_tokens",
    "trainable_count", "unflatten", "unmerge", "with_adapter", "with_config", "write_hf_config",
]

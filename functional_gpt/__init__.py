"""functional-gpt: GPT-2 as pure functions over a nested dict of GPT-2-named tensors.

The package's areas, each a subpackage whose `__init__` lists what users may call:
`model` (config, params, layers, forward, KV cache, tokenizer, checkpoints),
`generation` (sampling, generate, the batching engine, `fgpt serve`), `training` (data,
loss, AdamW, `train_step`, runs, data parallel), `interp` (hooks, patching, lens,
torch.func) and `reference` (transformers as the reference, dumps and diffs, export,
perplexity). Imports run one way: model <- generation <- training; interp and reference
sit on the model (reference's export also reads training runs). The model's names are
re-exported here.
"""

from .errors import UserError
from .model import (ENDOFTEXT, ENDOFTEXT_ID, PRESETS, GPTConfig, KVCache, Params, config_of, count_params, decode,
                    decode_step, dequantize, encode, flatten, forward, forward_cached, gpt2_encoding, init_params, load_params,
                    new_cache, no_tap, param_spec, preset, quantize, read_hf_config, recorder, save_params, to_single_token,
                    to_str_tokens, unflatten, with_config, write_hf_config)

__all__ = [
    "ENDOFTEXT", "ENDOFTEXT_ID", "GPTConfig", "KVCache", "PRESETS", "Params", "UserError",
    "config_of", "count_params", "decode", "decode_step", "dequantize", "encode", "flatten", "forward", "forward_cached",
    "gpt2_encoding", "init_params", "load_params", "new_cache", "no_tap", "param_spec",
    "preset", "quantize", "read_hf_config", "recorder", "save_params", "to_single_token", "to_str_tokens", "unflatten",
    "with_config", "write_hf_config",
]

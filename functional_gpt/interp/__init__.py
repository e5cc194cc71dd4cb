"""Looking inside: `hooks` (every hook point by name, TransformerLens's names,
`run_with_cache`, `run_with_hooks`) -> `patching` (head ablation, patching sweeps) and
`lens` (logit lens, direct logit attribution); `attention_map` (attention PNGs) and
`func` (torch.func: per-example gradients, ensembles) beside them.
"""

from .attention_map import attention_maps, draw_attention, plot_attention
from .func import ensemble_logits, per_example_grads, stack_params
from .hooks import (BLOCK_POINTS, ActivationCache, from_transformer_lens, hook_names, run_with_cache,
                    run_with_hooks, to_transformer_lens)
from .lens import Attribution, draw_lens, logit_attribution, logit_lens
from .patching import ablate_heads, patch_sweep, plot_sweep

__all__ = [
    "ActivationCache", "Attribution", "BLOCK_POINTS", "ablate_heads", "attention_maps", "draw_attention",
    "draw_lens", "ensemble_logits", "from_transformer_lens", "hook_names", "logit_attribution", "logit_lens",
    "patch_sweep", "per_example_grads", "plot_attention", "plot_sweep", "run_with_cache", "run_with_hooks",
    "stack_params", "to_transformer_lens",
]

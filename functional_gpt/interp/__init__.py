"""Looking inside: `names` (every hook point by name, TransformerLens's names both ways)
-> `cache` (what a run recorded, with TransformerLens's cache methods) -> `hooks`
(`run_with_cache`, `run_with_hooks`) -> `patching` (head ablation, patching sweeps) and
`lens` (logit lens, direct logit attribution); `weights` (the weights by role, W_Q ...
W_U), `attention_map` (attention PNGs) and `func` (torch.func: per-example gradients,
ensembles) beside them.
"""

from .attention_map import attention_maps, draw_attention, plot_attention
from .func import ensemble_logits, per_example_grads, stack_params
from .cache import ActivationCache
from .hooks import HookPoint, run_with_cache, run_with_hooks
from .names import BLOCK_POINTS, from_transformer_lens, hook_names, tl_name, to_transformer_lens
from .lens import Attribution, draw_lens, logit_attribution, logit_lens
from .patching import ablate_heads, patch_sweep, plot_sweep
from .weights import RoleWeights, weights_by_role

__all__ = [
    "ActivationCache", "Attribution", "BLOCK_POINTS", "HookPoint", "RoleWeights", "ablate_heads", "attention_maps", "draw_attention",
    "draw_lens", "ensemble_logits", "from_transformer_lens", "hook_names", "logit_attribution", "logit_lens",
    "patch_sweep", "per_example_grads", "plot_attention", "plot_sweep", "run_with_cache", "run_with_hooks",
    "stack_params", "tl_name", "to_transformer_lens", "weights_by_role",
]

"""Hook points by name, and running the model with hooks: `run_with_cache` records
activations (and on request their gradients), `run_with_hooks` changes them.

Every intermediate the model computes has a name that follows the param keys (the table
below, `hook_names`); TransformerLens's names translate both ways
(`to_transformer_lens`, `from_transformer_lens`), so a TransformerLens notebook ports
line by line. Shapes: B batch, T positions, C n_embd, H heads, D head size, S keys.

A hook is a tensor (the activation is replaced by it) or a function of the activation
returning a tensor of the same shape (or None: unchanged). Hooks run where the model
reaches their point, several on one point in the order given; a cache records the value
the rest of the model sees, after the hooks at that point.
"""

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..model.config import MAX_LAYERS, GPTConfig
from ..checks import check_callable, check_int, check_str, describe
from ..errors import UserError
from ..model.transformer import checked_config, forward
from ..model.params import Params

# (our name within block i, as "h.i.<name>"; TransformerLens's within "blocks.i."; shape)
BLOCK_POINTS = (
    ("resid_pre", "hook_resid_pre", "[B, T, C]"),
    ("ln_1", "ln1.hook_normalized", "[B, T, C]"),
    ("attn.q", "attn.hook_q", "[B, T, H, D]"),
    ("attn.k", "attn.hook_k", "[B, T, H, D]"),
    ("attn.v", "attn.hook_v", "[B, T, H, D]"),
    ("attn.scores", "attn.hook_attn_scores", "[B, H, T, S]"),
    ("attn.pattern", "attn.hook_pattern", "[B, H, T, S]"),
    ("attn.z", "attn.hook_z", "[B, T, H, D]"),
    ("attn.result", "attn.hook_result", "[B, T, H, C]"),
    ("attn", "hook_attn_out", "[B, T, C]"),
    ("resid_mid", "hook_resid_mid", "[B, T, C]"),
    ("ln_2", "ln2.hook_normalized", "[B, T, C]"),
    ("mlp.pre", "mlp.hook_pre", "[B, T, 4C]"),
    ("mlp.post", "mlp.hook_post", "[B, T, 4C]"),
    ("mlp", "hook_mlp_out", "[B, T, C]"),
    ("", "hook_resid_post", "[B, T, C]"),  # "h.i": the block's output
)
# Before and after the blocks: (our name, TransformerLens's or None, shape).
EMBED_POINTS = (("wte", "hook_embed", "[B, T, C]"), ("wpe", "hook_pos_embed", "[B, T, C]"),
                ("embed", None, "[B, T, C]"))
FINAL_POINTS = (("ln_f", "ln_final.hook_normalized", "[B, T, C]"), ("logits", None, "[B, T, V]"))

_BLOCK_NAME = re.compile(r"h\.(\d+)(?:\.(.+))?")
_TL_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")
_TO_TL = {ours: tl for ours, tl, _ in BLOCK_POINTS}
_FROM_TL = {tl: ours for ours, tl, _ in BLOCK_POINTS}


def hook_names(n_layer: int) -> list[str]:
    """Every hook point of a model of n_layer blocks, in the order the model reaches them."""
    n_layer = check_int("n_layer", n_layer, 1, MAX_LAYERS)
    block = [f"h.{i}.{n}" if n else f"h.{i}" for i in range(n_layer) for n, _, _ in BLOCK_POINTS]
    return [n for n, _, _ in EMBED_POINTS] + block + [n for n, _, _ in FINAL_POINTS]


def to_transformer_lens(name: str) -> str:
    """Our hook name -> TransformerLens's ("h.3.attn.pattern" -> "blocks.3.attn.hook_pattern")."""
    m = _BLOCK_NAME.fullmatch(check_str("name", name))
    if m and (m[2] or "") in _TO_TL:
        return f"blocks.{m[1]}.{_TO_TL[m[2] or '']}"
    for ours, tl, _ in EMBED_POINTS + FINAL_POINTS:
        if name == ours and tl:
            return tl
    if name == "embed":
        raise UserError("hook 'embed' has no TransformerLens name; blocks.0.hook_resid_pre holds the same value")
    if name == "logits":
        raise UserError("hook 'logits' has no TransformerLens name: it is the model's output")
    raise UserError(f"unknown hook name {name!r}")


def from_transformer_lens(name: str) -> str:
    """TransformerLens's hook name -> ours ("blocks.3.hook_resid_post" -> "h.3")."""
    m = _TL_BLOCK_NAME.fullmatch(check_str("name", name))
    if m and m[2] in _FROM_TL:
        ours = _FROM_TL[m[2]]
        return f"h.{m[1]}.{ours}" if ours else f"h.{m[1]}"
    for ours, tl, _ in EMBED_POINTS + FINAL_POINTS:
        if name == tl:
            return ours
    raise UserError(f"{name!r} is not a TransformerLens hook point of GPT-2 that functional_gpt has")


def check_hook_names(names, n_layer: int) -> list[str]:
    """names as a list, each a hook point of a model of n_layer blocks; else a UserError
    naming the first unknown one and the nearest valid names."""
    valid = hook_names(n_layer)
    known = set(valid)
    if not isinstance(names, (str, list, tuple, set, frozenset)):
        raise UserError(f"names: expected a hook name or a list of them, got {describe(names)}")
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name in known:
            continue
        if not isinstance(name, str):
            raise UserError(f"hook name {describe(name)}: expected a string such as 'h.0.attn.pattern'")
        hint = ""
        try:
            ours = from_transformer_lens(name)
            hint = f" (TransformerLens's name for {ours!r})" if ours in known else ""
        except UserError:
            pass
        nearest = difflib.get_close_matches(name, valid, n=3, cutoff=0.5) or valid[:3]
        raise UserError(f"unknown hook name {name!r}{hint}; nearest valid names: {', '.join(nearest)} "
                        f"({len(valid)} points: functional_gpt.interp.hook_names({n_layer}))")
    return names


@dataclass(frozen=True)
class ActivationCache(Mapping):
    """What `run_with_cache` recorded: name -> activation (detached), in the order the
    model reached them, and `grads`: name -> the gradient of the metric with respect to
    that activation (empty unless asked for)."""

    activations: dict
    grads: dict

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.activations:
            nearest = difflib.get_close_matches(str(name), list(self.activations), n=3, cutoff=0.5)
            raise UserError(f"{name!r} is not in this cache (it holds {len(self.activations)} names"
                            + (f"; nearest: {', '.join(nearest)})" if nearest else ")"))
        return self.activations[name]

    def __contains__(self, name) -> bool:
        return name in self.activations

    def __iter__(self):
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)


def run_with_hooks(params: Params, tokens: torch.Tensor, hooks, config: GPTConfig | None = None) -> torch.Tensor:
    """forward with hooks: tokens int64 [B, T] -> logits [B, T, V].

    hooks: {name: hook} or a list of (name, hook) pairs (several on one name run in
    order); a hook is a tensor of the activation's shape or a function of the
    activation (see the module doc)."""
    config = checked_config(params, config)
    tap = _HookTap(_hook_pairs(hooks, config.n_layer), record=())
    return forward(params, tokens, config, tap=tap)


def run_with_cache(
    params: Params,
    tokens: torch.Tensor,
    names=None,
    *,
    hooks=(),
    grad_of=None,
    config: GPTConfig | None = None,
) -> tuple[torch.Tensor, ActivationCache]:
    """forward recording activations: tokens int64 [B, T] -> (logits [B, T, V], cache).

    names: the hook points to record (default every one; the attention scores, pattern
      and per-head results cost work of their own, so name what you need).
    hooks: applied as in `run_with_hooks`; the cache holds the values after them.
    grad_of: a function of the logits returning a scalar (a metric such as a logit
      difference); cache.grads then holds its gradient with respect to each recorded
      activation (zeros where it does not depend on it).
    """
    config = checked_config(params, config)
    names = hook_names(config.n_layer) if names is None else check_hook_names(names, config.n_layer)
    if grad_of is not None:
        check_callable("grad_of", grad_of, "a function of the logits returning a scalar")
    tap = _HookTap(_hook_pairs(hooks, config.n_layer), record=names, keep_graph=grad_of is not None)
    if grad_of is None:
        with torch.no_grad():
            logits = forward(params, tokens, config, tap=tap)
        return logits, ActivationCache(tap.store, {})
    with torch.enable_grad():
        logits = forward(params, tokens, config, tap=tap)
        metric = grad_of(logits)
        if not isinstance(metric, torch.Tensor) or metric.numel() != 1:
            raise UserError(f"grad_of must return a scalar tensor, got {describe(metric)}")
        recorded = list(tap.store.values())
        grads = torch.autograd.grad(metric.reshape(()), recorded, allow_unused=True)
    grads = {n: torch.zeros_like(a) if g is None else g for (n, a), g in zip(tap.store.items(), grads)}
    return logits.detach(), ActivationCache({n: a.detach() for n, a in tap.store.items()}, grads)


class _HookTap:
    """The tap behind run_with_hooks and run_with_cache: applies the hooks of each point,
    then records it if asked. `names` tells the model which costly points to compute."""

    def __init__(self, hooks: list[tuple[str, object]], record, keep_graph: bool = False):
        self.hooks = {}
        for name, hook in hooks:
            self.hooks.setdefault(name, []).append(hook)
        self.record = frozenset(record)
        self.names = self.record | set(self.hooks)
        self.keep_graph = keep_graph
        self.store = {}

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks.get(name, ()):
            x = _apply(hook, name, x)
        if name in self.record:
            if self.keep_graph and not x.requires_grad:  # a leaf to take the gradient at
                x = x.detach().requires_grad_()
            self.store[name] = x if self.keep_graph else x.detach()
        return x


def _apply(hook, name: str, x: torch.Tensor) -> torch.Tensor:
    value = hook(x) if callable(hook) else hook
    if value is None and callable(hook):
        return x
    if not isinstance(value, torch.Tensor):
        raise UserError(f"hook {name}: expected a tensor {list(x.shape)} or a function returning one, "
                        f"got {describe(value)}")
    if value.shape != x.shape:
        raise UserError(f"hook {name}: the patch has shape {list(value.shape)}, the activation "
                        f"{list(x.shape)}")
    return value.to(dtype=x.dtype, device=x.device)


def _hook_pairs(hooks, n_layer: int) -> list[tuple[str, object]]:
    """hooks ({name: hook} or (name, hook) pairs) as a list of pairs, each name a hook
    point and each hook a tensor or a function."""
    if not isinstance(hooks, (Mapping, list, tuple)):
        raise UserError(f"hooks: expected {{name: hook}} or a list of (name, hook) pairs, got {describe(hooks)}")
    pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
        raise UserError("hooks: expected {name: hook} or a list of (name, hook) pairs")
    check_hook_names([n for n, _ in pairs], n_layer)
    for name, hook in pairs:
        if not (isinstance(hook, torch.Tensor) or callable(hook)):
            raise UserError(f"hook {name}: expected a tensor or a function of the activation, got {describe(hook)}")
    return pairs

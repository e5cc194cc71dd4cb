"""What `run_with_cache` recorded, with TransformerLens's cache methods.

An `ActivationCache` maps our hook names to activations; it is also indexed by
TransformerLens's names and short forms (`cache["pattern", 1]`). Its methods are
TransformerLens 4's, with its definitions (outside its compatibility mode: nothing folded):
stacks of the residual stream by layer (`accumulated_resid`) or by piece
(`decompose_resid`, `stack_head_results`), the layer norm's recorded scale applied to a
stack (`apply_ln_to_stack`), and a stack's dot product with tokens' unembedding columns
(`logit_attrs`). Each returns a new tensor or cache; none changes the cache.

A stack is [K, B, T, C] (K pieces; [K, T, C] once `remove_batch_dim`). `pos_slice` and
`batch_slice` take what TransformerLens's Slice takes: None (all), an int (that one, its
axis dropped), (start, stop[, step]), a slice, or a list or 1-D tensor of indices.
"""

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from ..checks import check_bool, check_int, check_str, check_tensor, describe
from ..errors import UserError
from ..model.config import GPTConfig
from ..model.layers import float_weight, layer_norm
from ..model.params import Params
from ..model.tokenizer import to_single_token
from ..model.transformer import embed_tokens
from .names import BLOCK_POINTS, is_tl_name, our_name, tl_name

_BLOCK_WITHIN = {ours for ours, _, _ in BLOCK_POINTS}
_SHORT_FORM = re.compile(r"[a-z_]+?\d+[a-z]*\d*")


@dataclass(frozen=True)
class ActivationCache(Mapping):
    """activations: our name -> activation (detached), in the order the model reached them;
    grads: name -> the gradient of run_with_cache's metric there (empty unless asked for);
    params, config: the model they came from (the methods that need weights read them)."""

    activations: dict
    grads: dict
    params: Params | None = field(default=None, repr=False)
    config: GPTConfig | None = None
    has_batch_dim: bool = True

    # -- a Mapping of our names, also indexed by TransformerLens's names and short forms

    def __getitem__(self, key) -> torch.Tensor:
        name = self._name(key)
        if name not in self.activations:
            nearest = difflib.get_close_matches(str(name), list(self.activations), n=3, cutoff=0.5)
            raise UserError(f"{name!r} is not in this cache (it holds {len(self.activations)} names"
                            + (f"; nearest: {', '.join(nearest)})" if nearest else ")"))
        return self.activations[name]

    def _name(self, key):
        """key (ours, TransformerLens's, or its (name, layer[, layer_type]) short form) -> ours."""
        if not isinstance(key, (str, tuple)):
            raise UserError(f"cache key {describe(key)}: expected a hook name or (name, layer[, layer_type])")
        if isinstance(key, str) and key in self.activations:
            return key
        if isinstance(key, tuple) and 2 <= len(key) <= 3 and isinstance(key[0], str):
            layer = key[1]
            if layer is not None:
                layer = check_int("layer", layer, -self._n_layer(), self._n_layer() - 1) % self._n_layer()
            return our_name(tl_name(key[0], layer, *key[2:]), self._n_layer())
        if isinstance(key, str) and (is_tl_name(key) or _SHORT_FORM.fullmatch(key)):
            return our_name(tl_name(key), self._n_layer())  # "blocks.1.attn.hook_z", "pattern1", "scale2ln1"
        return key

    def __contains__(self, key) -> bool:
        try:
            return self._name(key) in self.activations
        except UserError:
            return False

    def __iter__(self):
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def _n_layer(self) -> int:
        return self._config().n_layer

    def _config(self) -> GPTConfig:
        if self.config is None:
            raise UserError("this cache does not know its model (make it with run_with_cache)")
        return self.config

    def _params(self) -> Params:
        self._config()
        return self.params

    # -- TransformerLens's methods

    def remove_batch_dim(self) -> "ActivationCache":
        """The cache of a batch of one without its batch axis ([1, T, ...] -> [T, ...])."""
        if not self.has_batch_dim:
            raise UserError("this cache has no batch axis left to remove")
        sizes = {a.shape[0] for a in self.activations.values()}
        if sizes - {1}:
            raise UserError(f"remove_batch_dim: the cache holds a batch of {max(sizes)}, not 1")
        return replace(self, activations={n: a[0] for n, a in self.activations.items()},
                       grads={n: g[0] for n, g in self.grads.items()}, has_batch_dim=False)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> torch.Tensor:
        """The activation `activation_name` (TransformerLens's short form, or ours within a
        block such as "attn.pattern") of each block before `layer` (-1 or None: all),
        stacked: [layer, ...]."""
        check_str("activation_name", activation_name)
        layers = range(self._upto(layer))
        if not layers:
            raise UserError("stack_activation: layer 0 has no block before it to stack")
        try:
            return torch.stack([self[self._block_key(activation_name, i, sublayer_type)] for i in layers])
        except UserError as e:
            raise UserError(f"activation_name {activation_name!r}: {e}") from None

    def _block_key(self, name, i, sublayer_type):
        return f"h.{i}.{name}" if name in _BLOCK_WITHIN and sublayer_type is None else (name, i, sublayer_type)

    def _upto(self, layer) -> int:
        """layer (0 .. n_layer; -1 or None: n_layer) as an int."""
        L = self._n_layer()
        layer = L if layer is None else check_int("layer", layer, -1, L)
        return L if layer == -1 else layer

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream entering each block up to `layer` ("l_pre"; with incl_mid also
        each earlier "l_mid"; with mlp_input also layer's own "l_mid"), and at layer
        n_layer (-1, None) the last block's output too ("final_post"): [K, B, T, C].
        apply_ln: at n_layer, ln_f itself on each piece (the logit lens); before it, the
        recorded scale of the layer's ln_1 (ln_2 with mlp_input)."""
        L, layer = self._n_layer(), self._upto(layer)
        pieces, labels = [], []
        for i in range(layer + 1):
            if i == L:
                pieces.append(self[f"h.{L - 1}"])
                labels.append("final_post")
                continue
            pieces.append(self[f"h.{i}.resid_pre"])
            labels.append(f"{i}_pre")
            if (check_bool("incl_mid", incl_mid) and i < layer) or (check_bool("mlp_input", mlp_input) and i == layer):
                pieces.append(self[f"h.{i}.resid_mid"])
                labels.append(f"{i}_mid")
        stack = torch.stack([_sliced(p, pos_slice, -2) for p in pieces])
        if check_bool("apply_ln", apply_ln):
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == L)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream entering `layer` as its pieces: "embed" and "pos_embed" (when
        recorded and incl_embeds), each earlier block's "l_attn_out" and "l_mlp_out" (mode
        "attn" or "mlp": those alone), with mlp_input also layer's own attention output:
        [K, B, T, C]. apply_ln: divided by the recorded scale (apply_ln_to_stack)."""
        if mode not in ("all", "mlp", "attn"):
            raise UserError(f"mode: expected 'all', 'mlp' or 'attn', got {describe(mode)}")
        layer = self._upto(layer)
        pieces, labels = [], []
        if check_bool("incl_embeds", incl_embeds):
            for name, label in (("wte", "embed"), ("wpe", "pos_embed")):
                if name in self.activations:
                    pieces.append(self[name])
                    labels.append(label)
        for i in range(layer):
            for kind, name in (("attn", "attn"), ("mlp", "mlp")):
                if mode in ("all", kind):
                    pieces.append(self[f"h.{i}.{name}"])
                    labels.append(f"{i}_{kind}_out")
        if check_bool("mlp_input", mlp_input) and mode != "mlp":
            pieces.append(self[f"h.{layer}.attn"])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([_sliced(p, pos_slice, -2) for p in pieces])
        if check_bool("apply_ln", apply_ln):
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> torch.Tensor:
        """Each head's contribution to the residual stream in `layer`, [B, T, H, C]: the
        recorded "h.l.attn.result", else "h.l.attn.z" through the head's rows of c_proj."""
        name = f"h.{layer}.attn.result"
        if name in self.activations:
            return self.activations[name]
        z = self[f"h.{layer}.attn.z"]
        W_O = float_weight(self._params()["h"][layer]["attn"]["c_proj"], z.dtype).view(z.shape[-2], z.shape[-1], -1)
        return torch.einsum("...hd,hdc->...hc", z, W_O.to(z.dtype))

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Every head's result in the blocks before `layer` (-1, None: all), one piece each
        ("L{l}H{h}"), with incl_remainder the rest of the last block's output
        ("remainder"): [K, B, T, C]. apply_ln: divided by the recorded scale."""
        layer, H = self._upto(layer), self._config().n_head
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(H)]
        pieces = [_sliced(self.head_results(i), pos_slice, -3) for i in range(layer)]
        if pieces:
            stack = torch.cat(pieces, dim=-2).movedim(-2, 0)
        else:
            stack = _sliced(self["wte"], pos_slice, -2)[None][:0]
        if check_bool("incl_remainder", incl_remainder):
            if not layer:
                raise UserError("stack_head_results: layer 0 has no block before it to take a remainder of")
            rest = _sliced(self[f"h.{layer - 1}"], pos_slice, -2) - stack.sum(0)
            stack, labels = torch.cat([stack, rest[None]]), labels + ["remainder"]
        if check_bool("apply_ln", apply_ln):
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """A stack [K, B, T, C] read as the input of `layer`'s ln_1 (ln_2 with mlp_input; at
        n_layer, -1, None: ln_f): each piece centred and divided by the scale recorded on the
        whole stream there (points "h.l.ln_1.scale" ... "ln_f.scale", which the cache must
        hold), so the pieces sum to the normalized stream before the gain and bias.
        recompute_ln (at n_layer only): ln_f itself on each piece instead, gain and bias
        included. pos_slice: the positions the stack already holds; batch_slice: applied to
        the stack's batch axis and the scale."""
        check_tensor("residual_stack", residual_stack, kind="float")
        C = self._config().n_embd
        if not residual_stack.dim() or residual_stack.shape[-1] != C:
            raise UserError(f"residual_stack: expected [..., n_embd={C}], got {describe(residual_stack)}")
        L, layer = self._n_layer(), self._upto(layer)
        if check_bool("has_batch_dim", has_batch_dim) and residual_stack.dim() >= 2:
            residual_stack = _sliced(residual_stack, batch_slice, 1, "batch_slice")
        if check_bool("recompute_ln", recompute_ln) and layer == L:
            return layer_norm(residual_stack, **self._params()["ln_f"], eps=self._config().layer_norm_epsilon)
        name = "ln_f.scale" if layer == L else f"h.{layer}.ln_{2 if check_bool('mlp_input', mlp_input) else 1}.scale"
        if name not in self.activations:
            raise UserError(f"apply_ln_to_stack: the cache holds no {name!r}; record it (run_with_cache names)")
        scale = _sliced(self.activations[name], pos_slice, -2)
        if self.has_batch_dim:
            scale = _sliced(scale, batch_slice, 0, "batch_slice")
        centred = _lined_up(residual_stack - residual_stack.mean(-1, keepdim=True), scale, f"the scale of {name!r}")
        return centred / scale

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """Each piece of a stack [K, B, T, C] dotted, after `apply_ln_to_stack` at ln_f, with
        the unembedding column of `tokens` (a token's text, an id, ids [B] (one per row),
        [T] or [B, T]), minus that of incorrect_tokens when given (a logit difference):
        [K, B, T]. As in TransformerLens, the column is W_U's alone: ln_f's gain is not in
        it (lens.logit_attribution splits the model's own logit difference)."""
        direction = self._directions(tokens, "tokens")
        if incorrect_tokens is not None:
            other = self._directions(incorrect_tokens, "incorrect_tokens")
            if other.shape != direction.shape:
                raise UserError(f"incorrect_tokens: shape {list(other.shape[:-1])}, tokens {list(direction.shape[:-1])}")
            direction = direction - other
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        if (has_batch_dim and not isinstance(batch_slice, int) and scaled.dim() == 4 and direction.dim() == 2
                and direction.shape[0] == scaled.shape[1]):
            direction = direction[:, None]  # one target per row, for each of its positions
        return (_lined_up(scaled, direction, "the tokens' directions") * direction).sum(-1)

    def _directions(self, tokens, name: str) -> torch.Tensor:
        """tokens -> their unembedding columns (rows of the tied wte; of int8 params, the
        rows they stand for), [*tokens.shape, C]; one token -> [C]."""
        params = self._params()
        V = params["wte"]["weight"].shape[0]
        if isinstance(tokens, str):
            try:
                tokens = to_single_token(tokens)
            except UserError as e:
                raise UserError(f"{name}: {e}") from None
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.tensor(check_int(name, tokens, 0, V - 1))
        check_tensor(name, tokens, kind="integer")
        if not tokens.numel():
            raise UserError(f"{name}: empty ({describe(tokens)})")
        if not (0 <= int(tokens.min()) and int(tokens.max()) < V):
            raise UserError(f"{name}: ids must be in 0..{V - 1}, got {int(tokens.min())}..{int(tokens.max())}")
        ids = tokens.reshape(()) if tokens.numel() == 1 else tokens
        return embed_tokens(params, ids.long().to(params["wte"]["weight"].device))


def _sliced(x: torch.Tensor, how, dim: int, name: str = "pos_slice") -> torch.Tensor:
    """x indexed along dim as TransformerLens's Slice indexes (the module doc)."""
    if how is None:
        return x
    if isinstance(how, torch.Tensor):
        how = check_tensor(name, how, dims="N", kind="integer").tolist()
    if isinstance(how, tuple):
        if not 1 <= len(how) <= 3 or not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                             for v in how):
            raise UserError(f"{name}: expected (start, stop[, step]) of ints, got {describe(how)}")
        how = slice(*how)
    if isinstance(how, list) and not all(isinstance(v, int) and not isinstance(v, bool) for v in how):
        raise UserError(f"{name}: expected a list of int indices, got {describe(how)}")
    if not isinstance(how, (int, slice, list)) or isinstance(how, bool):
        raise UserError(f"{name}: expected None, an int, (start, stop[, step]), a slice or a list of indices, "
                        f"got {describe(how)}")
    index = [slice(None)] * x.dim()
    index[dim] = how
    try:
        return x[tuple(index)]
    except (IndexError, ValueError, TypeError) as e:
        raise UserError(f"{name} {how!r}: not an index of an axis of {x.shape[dim]} ({e})") from None


def _lined_up(stack: torch.Tensor, other: torch.Tensor, what: str) -> torch.Tensor:
    """stack, after a UserError naming residual_stack if it does not broadcast with other."""
    try:
        torch.broadcast_shapes(stack.shape, other.shape)
    except RuntimeError:
        raise UserError(f"residual_stack: {describe(stack)} does not line up with {what} "
                        f"{list(other.shape)}") from None
    return stack

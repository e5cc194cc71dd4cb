"""Hook point names: ours, which follow the param keys, and TransformerLens's, both ways.

Every intermediate the model computes has a name (the tables below, `hook_names`).
TransformerLens 4's names translate both ways (`to_transformer_lens`,
`from_transformer_lens`), its other names for the same values (each component's
`hook_in`/`hook_out`) and its short forms (`tl_name("pattern", 1)`) one way, so a
TransformerLens notebook ports line by line. TransformerLens 3 differs only in the layer
norms: its `hook_normalized` came after the gain and bias (`version=3`). Shapes: B batch,
T positions, C n_embd, H heads, D head size, S keys, V vocab_size.
"""

import difflib
import re

from ..checks import check_int, check_str, describe
from ..errors import UserError
from ..model.config import MAX_LAYERS

# (our name within block i, as "h.i.<name>"; TransformerLens 4's within "blocks.i."; shape),
# in the order the model reaches them.
BLOCK_POINTS = (
    ("resid_pre", "hook_resid_pre", "[B, T, C]"),
    ("ln_1.scale", "ln1.hook_scale", "[B, T, 1]"),
    ("ln_1.normalized", "ln1.hook_normalized", "[B, T, C]"),
    ("ln_1", "ln1.hook_out", "[B, T, C]"),
    ("attn.in", "hook_attn_in", "[B, T, H, C]"),
    ("attn.q_in", "hook_q_input", "[B, T, H, C]"),
    ("attn.k_in", "hook_k_input", "[B, T, H, C]"),
    ("attn.v_in", "hook_v_input", "[B, T, H, C]"),
    ("attn.q", "attn.hook_q", "[B, T, H, D]"),
    ("attn.k", "attn.hook_k", "[B, T, H, D]"),
    ("attn.v", "attn.hook_v", "[B, T, H, D]"),
    ("attn.scores", "attn.hook_attn_scores", "[B, H, T, S]"),
    ("attn.pattern", "attn.hook_pattern", "[B, H, T, S]"),
    ("attn.z", "attn.hook_z", "[B, T, H, D]"),
    ("attn.result", "attn.hook_result", "[B, T, H, C]"),
    ("attn", "hook_attn_out", "[B, T, C]"),
    ("resid_mid", "hook_resid_mid", "[B, T, C]"),
    ("mlp.in", "hook_mlp_in", "[B, T, C]"),
    ("ln_2.scale", "ln2.hook_scale", "[B, T, 1]"),
    ("ln_2.normalized", "ln2.hook_normalized", "[B, T, C]"),
    ("ln_2", "ln2.hook_out", "[B, T, C]"),
    ("mlp.pre", "mlp.hook_pre", "[B, T, 4C]"),
    ("mlp.post", "mlp.hook_post", "[B, T, 4C]"),
    ("mlp", "hook_mlp_out", "[B, T, C]"),
    ("", "hook_resid_post", "[B, T, C]"),  # "h.i": the block's output
)
# Before and after the blocks: (our name, TransformerLens 4's or None, shape).
EMBED_POINTS = (("wte", "hook_embed", "[B, T, C]"), ("wpe", "hook_pos_embed", "[B, T, C]"),
                ("embed", None, "[B, T, C]"))
FINAL_POINTS = (("ln_f.scale", "ln_final.hook_scale", "[B, T, 1]"),
                ("ln_f.normalized", "ln_final.hook_normalized", "[B, T, C]"),
                ("ln_f", "ln_final.hook_out", "[B, T, C]"), ("logits", "hook_unembed", "[B, T, V]"))
# TransformerLens 4's other names for the same values: within blocks.i. -> ours within h.i.
_TL_BLOCK_ALIASES = {
    "hook_in": "resid_pre", "ln1.hook_in": "resid_pre", "attn.hook_in": "ln_1", "attn.q.hook_in": "ln_1",
    "attn.k.hook_in": "ln_1", "attn.v.hook_in": "ln_1", "attn.hook_attn_in": "attn.in",
    "attn.hook_q_input": "attn.q_in", "attn.hook_k_input": "attn.k_in", "attn.hook_v_input": "attn.v_in",
    "attn.q.hook_out": "attn.q", "attn.k.hook_out": "attn.k", "attn.v.hook_out": "attn.v", "attn.o.hook_in": "attn.z",
    "attn.o.hook_out": "attn", "attn.hook_hidden_states": "attn", "attn.hook_out": "attn", "ln2.hook_in": "resid_mid",
    "mlp.hook_in": "ln_2", "mlp.in.hook_in": "ln_2", "mlp.in.hook_out": "mlp.pre", "mlp.out.hook_in": "mlp.post",
    "mlp.out.hook_out": "mlp", "mlp.hook_out": "mlp", "hook_out": "",
}
_TL_ALIASES = {"embed.hook_out": "wte", "pos_embed.hook_out": "wpe", "unembed.hook_in": "ln_f",
               "unembed.hook_out": "logits"}
# TransformerLens 3, where it differs: hook_normalized held the output, after the gain and bias,
# and the values before them had no name.
_TL3 = {"ln_1": "ln1.hook_normalized", "ln_2": "ln2.hook_normalized", "ln_f": "ln_final.hook_normalized",
        "ln_1.normalized": None, "ln_2.normalized": None, "ln_f.normalized": None}
_FROM_TL3_BLOCK = {"ln1.hook_normalized": "ln_1", "ln2.hook_normalized": "ln_2"}

_BLOCK_NAME = re.compile(r"h\.(\d+)(?:\.(.+))?")
_TL_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")
_TO_TL = {ours: tl for ours, tl, _ in BLOCK_POINTS}
_FROM_TL = {tl: ours for ours, tl, _ in BLOCK_POINTS} | _TL_BLOCK_ALIASES
_OUTSIDE = {ours: tl for ours, tl, _ in EMBED_POINTS + FINAL_POINTS}
_FROM_TL_OUTSIDE = {tl: ours for ours, tl in _OUTSIDE.items() if tl} | _TL_ALIASES


def hook_names(n_layer: int) -> list[str]:
    """Every hook point of a model of n_layer blocks, in the order the model reaches them."""
    n_layer = check_int("n_layer", n_layer, 1, MAX_LAYERS)
    block = [f"h.{i}.{n}" if n else f"h.{i}" for i in range(n_layer) for n, _, _ in BLOCK_POINTS]
    return [n for n, _, _ in EMBED_POINTS] + block + [n for n, _, _ in FINAL_POINTS]


def _check_version(version) -> int:
    if version not in (3, 4) or isinstance(version, bool):
        raise UserError(f"version: expected TransformerLens's major version, 3 or 4, got {describe(version)}")
    return version


def to_transformer_lens(name: str, *, version: int = 4) -> str:
    """Our hook name -> TransformerLens's ("h.3.attn.pattern" -> "blocks.3.attn.hook_pattern";
    "h.0.ln_1" -> "blocks.0.ln1.hook_out", with version=3 "blocks.0.ln1.hook_normalized")."""
    check_str("name", name)
    version = _check_version(version)
    m = _BLOCK_NAME.fullmatch(name)
    within = (m[2] or "") if m else name
    table = _TO_TL if m else _OUTSIDE
    if within not in table:
        raise UserError(f"unknown hook name {name!r}")
    if within == "embed":
        raise UserError("hook 'embed' has no TransformerLens name; blocks.0.hook_resid_pre holds the same value")
    tl = table[within]
    if version == 3 and within in _TL3:
        tl = _TL3[within]
        if tl is None:
            raise UserError(f"hook {name!r} has no TransformerLens 3 name: its hook_normalized came after the gain "
                            f"and bias ({name.removesuffix('.normalized')!r})")
    return f"blocks.{m[1]}.{tl}" if m else tl


def from_transformer_lens(name: str, *, version: int = 4, n_layer: int | None = None) -> str:
    """TransformerLens's hook name -> ours ("blocks.3.hook_resid_post" -> "h.3"), from any of
    its names for a value ("blocks.3.mlp.out.hook_out" -> "h.3.mlp"). n_layer: needed only
    for "ln_final.hook_in", the last block's output."""
    check_str("name", name)
    version = _check_version(version)
    if name == "ln_final.hook_in":
        if n_layer is None:
            raise UserError("'ln_final.hook_in' is the last block's output: pass n_layer= to name it")
        return f"h.{check_int('n_layer', n_layer, 1, MAX_LAYERS) - 1}"
    m = _TL_BLOCK_NAME.fullmatch(name)
    within = m[2] if m else name
    table = _FROM_TL if m else _FROM_TL_OUTSIDE
    if version == 3:
        table = table | (_FROM_TL3_BLOCK if m else {"ln_final.hook_normalized": "ln_f"})
    if within not in table:
        raise UserError(f"{name!r} is not a TransformerLens hook point of GPT-2 that functional_gpt has")
    ours = table[within]
    return (f"h.{m[1]}.{ours}" if ours else f"h.{m[1]}") if m else ours


_SHORT_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                  "mlp_pre": "pre", "mlp_post": "post"}
_LAYER_TYPES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}


def tl_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's short form -> its full hook name, as its `get_act_name` reads it:
    ("pattern", 1) -> "blocks.1.attn.hook_pattern", ("scale", 0, "ln1") ->
    "blocks.0.ln1.hook_scale", "resid_pre3" -> "blocks.3.hook_resid_pre"; a full name as it is."""
    check_str("name", name)
    if layer_type is not None:
        check_str("layer_type", layer_type)
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    m = re.fullmatch(r"([a-z_]+?)(\d+)([a-z]\w*)?", name)
    if m and layer is None:
        name, layer, layer_type = m[1], int(m[2]), m[3]
    name = _SHORT_ALIASES.get(name, name)
    if name in ("q", "k", "v", "z", "result", "pattern", "attn_scores"):
        layer_type = "attn"
    elif name in ("pre", "post"):
        layer_type = "mlp"
    else:
        layer_type = _LAYER_TYPES.get(layer_type, layer_type)
    full = (f"blocks.{check_int('layer', layer, 0)}." if layer is not None else "") + \
        (f"{layer_type}." if layer_type else "") + f"hook_{name}"
    return f"ln_final.{full}" if name in ("scale", "normalized") and layer is None else full


def is_tl_name(name: str) -> bool:
    """Whether `name` is in TransformerLens's naming (ours never say "blocks." or "hook_")."""
    return name.startswith("blocks.") or "hook_" in name


def our_name(name: str, n_layer: int) -> str:
    """A hook name in either naming -> ours (unchanged when it is ours already)."""
    return from_transformer_lens(name, n_layer=n_layer) if is_tl_name(name) else name


def check_hook_names(names, n_layer: int) -> list[str]:
    """names as a list of our names, each a hook point of a model of n_layer blocks: a name
    or a list of names (ours or TransformerLens 4's), or a function of a name returning
    whether to take that point (TransformerLens's `names_filter`: asked with each point's
    name in both namings, the point is taken when either answer is true). Else a UserError
    naming the first unknown name and the nearest valid ones."""
    valid = hook_names(n_layer)
    if callable(names) and not isinstance(names, str):
        return [n for n in valid if any(_asks(names, each) for each in [n, *_tl_names(n, n_layer)])]
    known = set(valid)
    if not isinstance(names, (str, list, tuple, set, frozenset)):
        raise UserError(f"names: expected a hook name, a list of them or a function of a name, got {describe(names)}")
    names = [names] if isinstance(names, str) else list(names)
    ours = []
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"hook name {describe(name)}: expected a string such as 'h.0.attn.pattern'")
        try:
            translated = our_name(name, n_layer)
        except UserError:
            translated = name
        if translated not in known:
            candidates = [to_transformer_lens(n) for n in valid if _has_tl_name(n)] if is_tl_name(name) else valid
            nearest = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5) or candidates[:3]
            raise UserError(f"unknown hook name {name!r}; nearest valid names: {', '.join(nearest)} "
                            f"({len(valid)} points: functional_gpt.interp.hook_names({n_layer}))")
        ours.append(translated)
    return ours


def _has_tl_name(name: str) -> bool:
    return name != "embed"


def _tl_names(name: str, n_layer: int) -> list[str]:
    """Every TransformerLens 4 name of our point `name` (its own, then the aliases)."""
    m = _BLOCK_NAME.fullmatch(name)
    if not m:
        return [tl for tl, ours in _FROM_TL_OUTSIDE.items() if ours == name]
    within = m[2] or ""
    names = [f"blocks.{m[1]}.{tl}" for tl, ours in _FROM_TL.items() if ours == within]
    return names + (["ln_final.hook_in"] if name == f"h.{n_layer - 1}" else [])


def _asks(names_filter, name: str) -> bool:
    answer = names_filter(name)
    if not isinstance(answer, bool):
        raise UserError(f"names: a names filter must return True or False, got {describe(answer)} for {name!r}")
    return answer

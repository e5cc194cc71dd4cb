"""Comparing two runs of GPT-2 tensor by tensor: activation and gradient dumps, and a
diff table in forward order that says where two implementations first part ways.

A dump is a safetensors file of {name: tensor}: the taps of `model.forward` that
transformers' modules also output ("wte", "wpe", "embed", "h.0.ln_1", "h.0.attn", "h.0.ln_2", "h.0.mlp", "h.0", ..., "ln_f",
"logits"), and with gradients "loss" (mean next-token cross-entropy over the prompt,
nats/token) and "grad.<GPT-2 key>" for every parameter. Its metadata records the side
(functional_gpt or transformers), the prompt, the token ids and the forward order of the
names. `reference.capture_reference` produces the same names from transformers.
"""

import json
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checks import check_bool, check_number, check_tensor, describe
from ..device import pick_device
from ..errors import UserError
from ..files import atomic_path
from ..model.checkpoint import load_params
from ..model.lora_files import with_adapter
from ..model.config import GPTConfig
from ..model.transformer import checked_config, forward
from ..model.taps import recorder
from ..model.params import Params, flatten, unflatten
from .hf_model import capture_reference, reference_model, reference_names
from ..model.tokenizer import decode, encode

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (atol, rtol) per compute dtype: fp32 agrees to rounding; half precisions differ by
# their own rounding (eps 1e-3, 8e-3) compounded over the layers.
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (1e-1, 5e-2)}
SIDES = ("functional_gpt", "transformers")


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], tokens [B, T] -> mean cross-entropy of predicting tokens 1..T-1
    (nats/token), computed in fp32, as transformers computes it with labels=tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().long())


def capture(params: Params, tokens: torch.Tensor, config: GPTConfig, *, grads: bool = False) -> dict:
    """Run functional_gpt on tokens int64 [B, T] (no dropout) -> {name: tensor} in forward
    order: every tap that transformers' modules have too (reference_names), then with
    `grads` "loss" and "grad.<key>" for every parameter."""
    config = checked_config(params, config)
    check_tensor("tokens", tokens, dims="B T", kind="integer")
    check_bool("grads", grads)
    store = {}
    if not grads:
        with torch.no_grad():
            forward(params, tokens, config, tap=recorder(store, reference_names(config.n_layer)))
        return store
    if tokens.shape[1] < 2:
        raise UserError("--prompt: gradients need a prompt of at least 2 tokens (the loss predicts token t+1 "
                        "from 1..t)")
    leaves = {k: v.detach().requires_grad_() for k, v in flatten(params).items()}
    loss = next_token_loss(forward(unflatten(leaves), tokens, config, tap=recorder(store, reference_names(config.n_layer))), tokens)
    loss.backward()
    store["loss"] = loss.detach()
    store |= {f"grad.{k}": v.grad for k, v in leaves.items()}
    return store


def run_side(side: str, params: Params, config: GPTConfig, tokens: torch.Tensor, *, grads: bool) -> dict:
    """`capture` by functional_gpt or by transformers on the same params and tokens."""
    if side == "functional_gpt":
        return capture(params, tokens, config, grads=grads)
    return capture_reference(reference_model(params, config), tokens, grads=grads)


def prompt_tokens(prompt: str, config: GPTConfig, device) -> torch.Tensor:
    """The prompt as int64 [1, T] on `device`, checked against the config."""
    ids = encode(prompt)
    if not ids:
        raise UserError("--prompt: empty prompt (no tokens)")
    if len(ids) > config.n_positions:
        raise UserError(f"--prompt: {len(ids)} tokens is longer than the context of {config.n_positions}")
    if max(ids) >= config.vocab_size:
        raise UserError(f"--prompt: token id {max(ids)} is out of range for vocab_size={config.vocab_size}")
    return torch.tensor([ids], device=device)


class Dump(NamedTuple):
    tensors: dict[str, torch.Tensor]  # in forward order
    metadata: dict[str, str]


def write_dump(path: str | os.PathLike, tensors: dict, *, side: str, prompt: str, tokens: torch.Tensor) -> None:
    """Write a dump (see the module doc) atomically."""
    metadata = {
        "format": "pt",
        "side": side,
        "prompt": prompt,
        "tokens": json.dumps(tokens.tolist()),
        "order": json.dumps(list(tensors)),
    }
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=metadata)
        except SafetensorError as e:  # its I/O errors are not OSErrors
            raise UserError(f"{path}: cannot write ({first_line(str(e))})") from None


def read_dump(path: str | os.PathLike) -> Dump:
    """Read a dump, or any safetensors file (its names then in file order)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        order = [k for k in json.loads(metadata.get("order", "[]")) if k in tensors]
    except ValueError:
        order = []
    order += [k for k in tensors if k not in order]
    return Dump({k: tensors[k] for k in order}, metadata)


def dump(weights, prompt: str, out, *, side: str = "functional_gpt", grads: bool = False,
         dtype: str = "float32", device: str | None = None, adapter=None) -> str:
    """Load `weights` (with the LoRA `adapter` directory merged in, when given), run `side`
    on the prompt, write the dump to `out`; returns a summary line."""
    dev = pick_device(device)
    params, config = load_params(weights, dtype=DTYPES[dtype], device=dev)
    params = with_adapter(params, adapter)
    tokens = prompt_tokens(prompt, config, dev)
    tensors = run_side(side, params, config, tokens, grads=grads)
    write_dump(out, tensors, side=side, prompt=prompt, tokens=tokens)
    return f"wrote {out}: {len(tensors)} tensors from {side} on {tokens.shape[1]} tokens"


class Row(NamedTuple):
    name: str
    shape: str
    max_abs: float  # max |A - B|
    max_rel: float  # max |A - B| / max |B|: relative to the tensor's scale
    cosine: float  # of A and B flattened
    status: str  # OK, DIFF, SHAPE, MISSING
    note: str = ""


def diff_tensors(a: dict, b: dict, *, atol: float, rtol: float) -> list[Row]:
    """One row per name, in A's order then B's extra names. A tensor pair agrees (OK)
    when max |A - B| <= atol + rtol * max |B|; NaN anywhere is a DIFF."""
    check_tolerances(atol, rtol)
    for name, tensors in (("a", a), ("b", b)):
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise UserError(f"{name}: expected a dict of {{name: tensor}} (a dump's tensors), got {describe(tensors)}")
    rows = []
    for name in list(a) + [k for k in b if k not in a]:
        if name not in a or name not in b:
            t = a.get(name, b.get(name))
            rows.append(Row(name, str(list(t.shape)), math.nan, math.nan, math.nan, "MISSING",
                            "only in A" if name in a else "only in B"))
            continue
        x, y = a[name], b[name]
        if x.shape != y.shape:
            rows.append(Row(name, f"{list(x.shape)} vs {list(y.shape)}", math.nan, math.nan, math.nan, "SHAPE"))
            continue
        shape = str(list(x.shape))
        x, y = x.detach().cpu().double().flatten(), y.detach().cpu().double().flatten()
        max_abs = (x - y).abs().max().item() if x.numel() else 0.0
        scale = y.abs().max().item() if y.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        norms = x.norm().item() * y.norm().item()
        cosine = (x @ y).item() / norms if norms > 0 else float(torch.equal(x, y))
        ok = max_abs <= atol + rtol * scale  # False for NaN
        rows.append(Row(name, shape, max_abs, max_rel, cosine, "OK" if ok else "DIFF"))
    return rows


def format_diff(rows: list[Row], *, atol: float, rtol: float, headers: list[str] = ()) -> tuple[str, bool]:
    """The table (forward order, first entry past tolerance marked) and a verdict line,
    llm.c style -> (text, all agree)."""
    width = max([len(r.name) for r in rows] + [4]) + 2
    shape_width = max([len(r.shape) for r in rows] + [5]) + 2
    lines = list(headers) + [
        f"agree when max|A-B| <= atol + rtol * max|B|  (atol {atol:g}, rtol {rtol:g})",
        "",
        f"{'name':<{width}}{'shape':<{shape_width}}{'max abs':>10}{'max rel':>10}{'cosine':>11}  status",
    ]
    first = next((r for r in rows if r.status != "OK"), None)
    for r in rows:
        numbers = f"{r.max_abs:>10.2e}{r.max_rel:>10.2e}{r.cosine:>11.6f}" if r.status in ("OK", "DIFF") else " " * 31
        mark = "  <- first past tolerance" if r is first else ""
        note = f"  ({r.note})" if r.note else ""
        lines.append(f"{r.name:<{width}}{r.shape:<{shape_width}}{numbers}  [{r.status}]{note}{mark}")
    counts = {s: sum(r.status == s for r in rows) for s in ("OK", "DIFF", "SHAPE", "MISSING")}
    lines += ["", f"{len(rows)} entries: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    lines.append("overall okay" if first is None else f"overall DIFFERENT: first at {first.name} [{first.status}]")
    return "\n".join(lines), first is None


def check_tolerances(atol: float, rtol: float) -> None:
    """--atol and --rtol must be finite numbers >= 0 (a negative or NaN one makes every
    tensor DIFFERENT, an infinite one makes every tensor agree)."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        check_number(flag, value, 0)


def diff_files(a_path, b_path, *, atol: float, rtol: float) -> tuple[str, bool]:
    """`fgpt diff`: compare two dumps -> (report, all agree)."""
    check_tolerances(atol, rtol)
    a, b = read_dump(a_path), read_dump(b_path)
    headers = [f"{label}  {path}  ({d.metadata.get('side', 'safetensors file')}"
               + (f", prompt {d.metadata['prompt']!r}" if "prompt" in d.metadata else "") + ")"
               for label, path, d in (("A", a_path, a), ("B", b_path, b))]
    if a.metadata.get("tokens") != b.metadata.get("tokens"):
        headers.append("note: A and B were not run on the same token ids")
    return format_diff(diff_tensors(a.tensors, b.tensors, atol=atol, rtol=rtol), atol=atol, rtol=rtol, headers=headers)


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def top_tokens(logits: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
    """logits [V] -> the k likeliest next tokens as (repr of the text, probability)."""
    probs = logits.float().softmax(-1)
    top = probs.topk(k)
    return [(_token_text(int(i)), p.item()) for p, i in zip(top.values, top.indices)]


def _token_text(token_id: int) -> str:
    return repr(decode([token_id])) if token_id < 50257 else f"<id {token_id}>"


def compare(weights, prompt: str, *, grads: bool = False, dtype: str = "float32", device: str | None = None,
            atol: float | None = None, rtol: float | None = None, adapter=None) -> tuple[str, bool]:
    """`fgpt compare`: run functional_gpt and transformers on the same weights (with the
    LoRA `adapter` directory merged in, when given) and prompt -> (diff table + top-5 next
    tokens side by side, all agree). Tolerances default to TOLERANCES[dtype]."""
    atol = TOLERANCES[dtype][0] if atol is None else atol
    rtol = TOLERANCES[dtype][1] if rtol is None else rtol
    check_tolerances(atol, rtol)
    dev = pick_device(device)
    params, config = load_params(weights, dtype=DTYPES[dtype], device=dev)
    params = with_adapter(params, adapter)
    tokens = prompt_tokens(prompt, config, dev)
    ours, theirs = (run_side(side, params, config, tokens, grads=grads) for side in SIDES)
    merged = "" if adapter is None else f" + adapter {adapter}"
    headers = [f"A  functional_gpt   B  transformers   weights {weights}{merged}, {dtype} on {dev}, "
               f"prompt {prompt!r} ({tokens.shape[1]} tokens)"]
    table, ok = format_diff(diff_tensors(ours, theirs, atol=atol, rtol=rtol), atol=atol, rtol=rtol, headers=headers)
    lines = ["", f"{'next token':<12}{'functional_gpt':<20}{'prob':>9}    {'transformers':<20}{'prob':>9}"]
    pairs = zip(top_tokens(ours["logits"][0, -1]), top_tokens(theirs["logits"][0, -1]))
    for rank, ((text_a, p_a), (text_b, p_b)) in enumerate(pairs, 1):
        lines.append(f"{rank:>4}{'':<8}{text_a:<20}{p_a:>9.3g}    {text_b:<20}{p_b:>9.3g}")
    return table + "\n" + "\n".join(lines), ok

"""How well a model predicts a text: mean cross-entropy (nats/token), perplexity and bits
per byte, with a sliding window over texts longer than the context.

The window is the method of transformers' perplexity guide: windows of `max_length`
tokens start every `stride` tokens; each window scores only the tokens the previous
window did not reach, so every token after the first is scored exactly once, with at
least max_length - stride tokens of context (except near the start). Unlike the guide's
code, which weights each window's mean loss by its number of labels minus one, the
total here is the exact sum over scored tokens.

bits per byte = total nats / ln 2 / UTF-8 bytes of the scored tokens (each text's first
token, which nothing predicts, excluded), a measure that does not depend on the tokenizer.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checks import check_bool, check_int, check_path, describe
from ..errors import UserError
from ..files import os_error
from ..model.config import GPTConfig
from ..model.transformer import checked_config, forward
from ..model.params import Params
from ..model.tokenizer import encode, gpt2_encoding
from ..training.data import TEXT_SUFFIXES


@dataclass(frozen=True)
class EvalResult:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the scored tokens
    nats: float  # total cross-entropy, nats
    max_length: int
    stride: int

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "nats_per_token": self.nats_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of each window over a text of n_tokens: the window covers
    tokens begin..end-1 and scores its last n_scored tokens (never token 0)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def text_nats(params: Params, tokens: torch.Tensor, config: GPTConfig, *, max_length: int, stride: int,
              batch_size: int = 8, progress=None) -> float:
    """tokens: int64 [N] -> total cross-entropy (nats) of tokens 1..N-1, each predicted
    from its window (see the module doc). Windows of equal length run `batch_size` at a time."""
    total = 0.0
    spans = windows(len(tokens), max_length, stride)
    device = params["wte"]["weight"].device
    with torch.inference_mode():
        i = 0
        while i < len(spans):
            length = spans[i][1] - spans[i][0]
            group = [spans[i]]
            while len(group) < batch_size and i + len(group) < len(spans) and \
                    spans[i + len(group)][1] - spans[i + len(group)][0] == length:
                group.append(spans[i + len(group)])
            i += len(group)
            batch = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)
            logits = forward(params, batch, config).float()
            for row, (_, _, n) in enumerate(group):
                total += F.cross_entropy(logits[row, -n - 1 : -1], batch[row, -n:].long(), reduction="sum").item()
            if progress is not None:
                progress.update(sum(n for _, _, n in group))
    return total


def evaluate(params: Params, texts: list[torch.Tensor], config: GPTConfig, *, max_length: int | None = None,
             stride: int | None = None, batch_size: int = 8, show_progress: bool = True) -> EvalResult:
    """Score each token sequence (int64 [N_i], evaluated separately) -> EvalResult.

    max_length: window size in tokens, 2..n_positions (default n_positions); stride:
    1..max_length-1 (default max_length // 2); batch_size >= 1. None means the default;
    any other value out of range (0 included) is a UserError naming the flag.
    """
    config = checked_config(params, config)
    if not isinstance(texts, (list, tuple)):
        raise UserError(f"texts: expected a list of 1-D integer token tensors [N], got {describe(texts)}")
    check_bool("show_progress", show_progress)
    max_length = check_int("--max_length", config.n_positions if max_length is None else max_length, 2,
                           config.n_positions)
    stride = check_int("--stride", max(1, max_length // 2) if stride is None else stride, 1, max_length - 1)
    check_int("--batch_size", batch_size, 1)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() for t in texts):
        raise UserError("texts: expected a list of 1-D integer token tensors [N]")
    n_tokens = sum(len(t) - 1 for t in texts)
    if n_tokens < 1:
        raise UserError("nothing to evaluate: need at least 2 tokens")
    bad = next((t for t in texts if len(t) and not 0 <= int(t.min()) <= int(t.max()) < config.vocab_size), None)
    if bad is not None:
        raise UserError(f"token ids {int(bad.min())}..{int(bad.max())} are out of range for vocab_size={config.vocab_size}")
    enc = gpt2_encoding()
    n_bytes = sum(len(enc.decode_bytes(t[1:].tolist())) for t in texts)
    with tqdm(total=n_tokens, unit="tok", desc="eval", disable=not show_progress, dynamic_ncols=True) as bar:
        nats = sum(text_nats(params, t, config, max_length=max_length, stride=stride, batch_size=batch_size,
                             progress=bar) for t in texts if len(t) > 1)
    return EvalResult(tokens=n_tokens, bytes=n_bytes, nats=nats, max_length=max_length, stride=stride)


def load_eval_data(data: str | os.PathLike | None, weights: str | os.PathLike) -> tuple[list[torch.Tensor], str]:
    """What `fgpt eval` scores -> (token sequences, a description of the source).

    data None: `weights` is a training run directory (or its model.safetensors) whose
    state.json names the prepared data directory; its val.bin is scored. A directory holding val.bin, or a .bin file:
    uint16 little-endian token ids. A text file, or a directory of text files (all files
    below it with the suffixes `fgpt prepare` reads, .txt and .md, hidden ones skipped, each
    evaluated on its own): UTF-8 text, tokenized.
    """
    if data is None:
        weights = check_path("--weights", weights, "a training run")
        state = (weights if weights.is_dir() else weights.parent) / "state.json"
        if not state.is_file():
            raise UserError(f"--data is required unless --weights is a training run directory (no {state})")
        try:
            data_dir = json.loads(state.read_text(encoding="utf-8"))["data_dir"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{state}: no data_dir ({type(e).__name__}: {e})") from None
        if not isinstance(data_dir, str) or not data_dir:
            raise UserError(f"{state}: data_dir must be a path, got {data_dir!r}")
        return [_read_bin(Path(data_dir) / "val.bin")], str(Path(data_dir) / "val.bin")
    path = check_path("--data", data)
    if not path.exists():
        raise UserError(f"--data {path}: no such file or directory")
    if path.is_dir() and (path / "val.bin").is_file():
        return [_read_bin(path / "val.bin")], str(path / "val.bin")
    if path.suffix == ".bin":
        return [_read_bin(path)], str(path)
    try:
        files = [path] if path.is_file() else sorted(
            f for f in path.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file()
            and not any(p.startswith(".") for p in f.relative_to(path).parts))
    except OSError as e:
        raise os_error(e.filename or path, e, "cannot read") from None
    if not files:
        raise UserError(f"--data {path}: no {' or '.join(TEXT_SUFFIXES)} files to evaluate")
    return [torch.tensor(encode(_read_text(f)), dtype=torch.long) for f in files], str(path)


def _read_bin(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise UserError(f"{path}: {size} bytes, not a non-empty file of uint16 token ids")
    try:
        return torch.from_numpy(np.fromfile(path, dtype="<u2").astype(np.int64))
    except OSError as e:
        raise os_error(path, e, "cannot read") from None


def _read_text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise os_error(path, e, "cannot read") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise UserError(f"{path}: empty file")
    return text

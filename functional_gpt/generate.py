"""Generation with an explicit KV cache: `prefill` the prompts, then one `decode_step` (model.py)
per token; `generate` yields the new tokens step by step (streaming), `stream_text` turns
one prompt's tokens into text pieces with stop strings.

The context window. A row's context is the last tokens of its sequence, at most
n_positions of them. A prompt longer than that is cropped from the left. When one more
token would overflow the context, the context restarts from the row's last `window`
tokens (default n_positions // 2), which are prefilled afresh: GPT-2's positions are
absolute, so the cached keys of a shifted window are stale. As a definition without a
cache: before predicting each token, if the row's context (tokens since `start`) is
longer than n_positions, `start = len(sequence) - window`; the logits are those of
`forward(params, sequence[start:])` at the last position. The cached path computes
exactly that, re-prefilling every n_positions + 1 - window tokens.

Batches. Prompts of different lengths are left-padded (`valid=False`), so each row
computes what it would alone; each row follows its own window rule (a re-prefill of one
row re-prefills the batch, each row from its own context). Greedy rows thus give the same
tokens as the row alone. Sampled rows draw from one generator, so a sampled row depends
on its batch.
"""

import numbers
import time
from typing import Iterator

import torch

from .config import GPTConfig
from .errors import UserError
from .model import KVCache, decode_step, forward_cached, new_cache
from .params import Params
from .sampling import Sampling, sample
from .tokenizer import ENDOFTEXT_ID, decode, encode

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1


def prefill(params: Params, tokens: torch.Tensor, config: GPTConfig, *, valid=None) -> tuple[torch.Tensor, KVCache]:
    """tokens: int64 [B, T] (left-padded where `valid`, bool [B, T], is False) -> (logits
    of the last position [B, V], a fresh cache of n_positions holding the T tokens).
    Checks the tokens (range, length) once for the decode steps that follow."""
    w = params["wte"]["weight"]
    cache = new_cache(config, tokens.shape[0], dtype=w.dtype, device=w.device)
    logits, cache = forward_cached(params, tokens, cache, config, valid=valid, last_only=True)
    return logits[:, -1], cache


def generate(
    params: Params,
    prompts: list[list[int]],
    config: GPTConfig,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(greedy=True),
    generator: torch.Generator | None = None,
    stop_tokens: tuple[int, ...] = (),
    window: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, int64 [B] on the params' device, step by step.

    prompts: one list of token ids per row (each non-empty). A row stops at its first
    token in `stop_tokens` (that token is yielded; later steps repeat it for that row);
    the generator ends when every row has stopped or after max_new_tokens steps. window:
    see the module doc. Runs under torch.inference_mode.
    """
    P = config.n_positions
    window = P // 2 if window is None else window
    if not _is_int(window) or not 1 <= window <= P:
        raise UserError(f"window must be an integer in 1..n_positions={P}, got {window!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise UserError(f"--max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise UserError(f"sampling: expected a Sampling, got {type(sampling).__name__}")
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise UserError("prompts: expected a list of token-id lists, e.g. [encode(text)]")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("prompt: empty (give at least one token)")
    bad = next((t for p in prompts for t in p if not _is_int(t) or not 0 <= t < config.vocab_size), None)
    if bad is not None:
        raise UserError(f"prompt: token id {bad!r} is out of range for vocab_size={config.vocab_size}")
    device = params["wte"]["weight"].device
    seqs = [list(p) for p in prompts]
    starts = [max(0, len(s) - P) for s in seqs]
    stopped = [False] * len(seqs)
    with torch.inference_mode():
        logits, cache, padded = _prefill_rows(params, seqs, starts, config)
        seen = None  # bool [B, V]: the tokens of each row so far, for the repetition penalty
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(len(seqs), config.vocab_size, dtype=torch.bool, device=device)
            for i, s in enumerate(seqs):
                seen[i, torch.tensor(s, device=device)] = True
        for step in range(max_new_tokens):
            next_tokens = sample(logits, sampling, seen, generator)
            ids = next_tokens.tolist()
            for i in range(len(ids)):
                if stopped[i]:
                    ids[i] = seqs[i][-1]
                seqs[i].append(ids[i])
                stopped[i] = stopped[i] or ids[i] in stop_tokens
            next_tokens = torch.tensor(ids, device=device)
            yield next_tokens
            if all(stopped) or step == max_new_tokens - 1:
                return
            if seen is not None:
                seen[torch.arange(len(ids), device=device), next_tokens] = True
            overflow = False
            for i, s in enumerate(seqs):
                if len(s) - starts[i] > P:
                    starts[i], overflow = len(s) - window, True
            if overflow:
                logits, cache, padded = _prefill_rows(params, seqs, starts, config)
            else:
                logits, cache = decode_step(params, next_tokens, cache, config, padded=padded)


def _prefill_rows(params, seqs, starts, config):
    """Prefill each row's context seqs[i][starts[i]:], left-padded to the longest."""
    contexts = [s[start:] for s, start in zip(seqs, starts)]
    T = max(len(c) for c in contexts)
    tokens = torch.tensor([[0] * (T - len(c)) + c for c in contexts])  # the pad id is never attended to
    valid = torch.tensor([[False] * (T - len(c)) + [True] * len(c) for c in contexts])
    padded = not bool(valid.all())
    device = params["wte"]["weight"].device
    logits, cache = prefill(params, tokens.to(device), config, valid=valid.to(device) if padded else None)
    return logits, cache, padded


def encode_prompt(text: str, config: GPTConfig) -> tuple[list[int], str | None]:
    """Prompt text -> (token ids, a notice or None). An empty prompt becomes
    `<|endoftext|>`, GPT-2's start of an unconditional sample. A prompt longer than the
    context is kept whole; generation sees its last n_positions tokens, which the notice says."""
    ids = encode(text) or [ENDOFTEXT_ID]
    notice = None
    if len(ids) > config.n_positions:
        notice = (f"prompt of {len(ids)} tokens is longer than the context; "
                  f"cropped from the left to its last {config.n_positions}")
    return ids, notice


def stream_text(
    params: Params,
    prompt: list[int],
    config: GPTConfig,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    generator: torch.Generator | None = None,
    stop: tuple[str, ...] = (),
    stats: dict | None = None,
) -> Iterator[str]:
    """Yield the continuation of one prompt (token ids) as text pieces, as produced.

    Ends at `<|endoftext|>` (not printed), at the first of the `stop` strings (the text
    before it is yielded, the stop string is not), or after max_new_tokens tokens. Text is
    held back while it might be the start of a stop string or of an unfinished UTF-8
    character. If `stats` is given, it is filled at the end with prompt_tokens,
    new_tokens, prefill_s (prompt to first new token) and decode_s (the rest).
    """
    if any(s == "" for s in stop):
        raise UserError("--stop: empty stop string")
    new: list[int] = []  # the continuation's tokens, without <|endoftext|>
    produced, emitted, hit_stop = 0, 0, False
    t0 = time.perf_counter()
    t_first = t_last = t0
    tokens = generate(params, [prompt], config, max_new_tokens=max_new_tokens, sampling=sampling,
                      generator=generator, stop_tokens=(ENDOFTEXT_ID,))
    try:
        for step in tokens:
            t_last = time.perf_counter()
            t_first = t_first if produced else t_last
            produced += 1
            token = int(step[0])
            if token == ENDOFTEXT_ID:
                break
            new.append(token)
            text = decode(new)
            cut = min((i for i in (text.find(s, emitted) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                yield text[emitted:cut]
                hit_stop = True
                break
            safe = len(text.rstrip("\ufffd"))
            safe -= max((k for s in stop for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if not hit_stop and len(text := decode(new)) > emitted:
            yield text[emitted:]
    finally:
        tokens.close()
        if stats is not None:
            stats.update(prompt_tokens=len(prompt), new_tokens=produced,
                         prefill_s=t_first - t0, decode_s=t_last - t_first)


def print_samples(
    params: Params,
    prompt_text: str,
    config: GPTConfig,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    num_samples: int = 1,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    out,
    err,
) -> None:
    """`fgpt generate`: stream `num_samples` continuations of the prompt to `out`, one
    after another, each followed on `err` by a summary line (prompt tokens, new tokens,
    prefill and decode tokens/s). Sample i draws with seed + i, so it does not depend on
    how many samples were asked for; seed None draws a fresh seed, else seed + num_samples - 1
    must fit torch's seed range 0..2**64-1."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise UserError(f"--max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_int(num_samples) or num_samples < 1:
        raise UserError(f"--num_samples must be an integer >= 1, got {num_samples!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED - (num_samples - 1)):
        raise UserError(f"--seed must be an integer in 0..{MAX_SEED - (num_samples - 1)} (torch's seeds are "
                        f"0..2**64-1 and sample i uses seed + i), got {seed!r}")
    ids, notice = encode_prompt(prompt_text, config)
    if notice:
        print(f"note: {notice}", file=err)
    device = params["wte"]["weight"].device
    for i in range(num_samples):
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed + i)
        if num_samples > 1:
            print(f"--- sample {i + 1} ---", file=out, flush=True)
        stats = {}
        for piece in stream_text(params, ids, config, max_new_tokens=max_new_tokens, sampling=sampling,
                                 generator=generator, stop=stop, stats=stats):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        print(_summary(stats), file=err, flush=True)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _summary(stats: dict) -> str:
    prefill = stats["prompt_tokens"] / stats["prefill_s"] if stats["prefill_s"] > 0 else float("nan")
    decode_steps = stats["new_tokens"] - 1
    decode = decode_steps / stats["decode_s"] if decode_steps > 0 and stats["decode_s"] > 0 else float("nan")
    return (f"[prompt {stats['prompt_tokens']} tokens, {stats['new_tokens']} new tokens; "
            f"prefill {prefill:.1f} tok/s, decode {decode:.1f} tok/s]")

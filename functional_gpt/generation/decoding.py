"""Generation with an explicit KV cache: `prefill` each prompt, then one `decode_step` (transformer.py)
per token for all rows together; `generate` yields the new tokens step by step (streaming), `stream_text` turns
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

Batches. Each row holds its own sequence from position 0 of its cache row, prefilled on
its own and then decoded with the others, one token per row per step (model.decode_step:
the same block as every other path, each row attending on its own), and follows its own
window rule (a row that overflows is prefilled afresh alone). A row computes what it
computes alone, up to the rounding of the batched matrix products; with one generator
per row, a sampled row does not depend on which rows share its batch either.
"""

import numbers
import time
from typing import Iterator

import torch

from ..model.config import GPTConfig
from ..checks import check_callable, describe
from ..errors import UserError
from ..model.transformer import KVCache, decode_step, forward_cached, new_cache
from ..model.params import Params
from ..model.taps import no_tap
from .sampling import Sampling, sample_rows
from .speculative import speculative_generate
from ..model.tokenizer import ENDOFTEXT_ID, decode, encode

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1


def prefill(params: Params, tokens: torch.Tensor, config: GPTConfig, *,
            counts: tuple[int, ...] | None = None) -> tuple[torch.Tensor, KVCache]:
    """tokens: int64 [B, T] (right-padded past counts[b] real tokens) -> (logits of each
    row's last real token [B, V], a fresh cache of n_positions holding them). Checks the
    tokens (range, length) once for the decode steps that follow."""
    w = params["wpe"]["weight"]  # the dtype activations run in (wte may be int8)
    cache = new_cache(config, tokens.shape[0], dtype=w.dtype, device=w.device)
    logits, cache = forward_cached(params, tokens, cache, config, counts=counts, last_only=True)
    return logits[:, -1], cache


def generate(
    params: Params,
    prompts: list[list[int]],
    config: GPTConfig,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(greedy=True),
    generator: torch.Generator | None = None,
    generators: list[torch.Generator] | None = None,
    stop_tokens: tuple[int, ...] = (),
    window: int | None = None,
    tap=no_tap,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, int64 [B] on the params' device, step by step.

    prompts: one list of token ids per row (each non-empty). A row stops at its first
    token in `stop_tokens` (that token is yielded; later steps repeat it for that row);
    the generator ends when every row has stopped or after max_new_tokens steps. window:
    see the module doc. generators: one per row (each row draws from its own); else every
    row draws from `generator`. tap: sees each call's activations (interp/hooks.py names): a
    row's prefill [1, T, ...], then each decode step [B, 1, ...]; each equals what a full
    forward over the row's context computes at those positions. Runs under
    torch.inference_mode.
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
    # a list, not next(..., None): None is a bad id too
    bad = [t for p in prompts for t in p if not _is_int(t) or not 0 <= t < config.vocab_size][:1]
    if bad:
        raise UserError(f"prompt: token id {bad[0]!r} is out of range for vocab_size={config.vocab_size}")
    if generators is not None and len(generators) != len(prompts):
        raise UserError(f"generators: {len(generators)} for {len(prompts)} prompts (one per row)")
    if not isinstance(stop_tokens, (tuple, list, set, frozenset)) or not all(_is_int(t) for t in stop_tokens):
        raise UserError(f"stop_tokens: expected a tuple of token ids, got {describe(stop_tokens)}")
    check_callable("tap", tap)
    device = params["wte"]["weight"].device
    seqs = [list(p) for p in prompts]
    starts = [max(0, len(s) - P) for s in seqs]
    stopped = [False] * len(seqs)
    with torch.inference_mode():
        w = params["wpe"]["weight"]  # the dtype activations run in (wte may be int8)
        cache = new_cache(config, len(seqs), dtype=w.dtype, device=w.device)
        rows = []
        for i, s in enumerate(seqs):
            row, cache = _prefill_row(params, cache, i, s[starts[i]:], config, tap)
            rows.append(row)
        logits = torch.cat(rows)
        seen = None  # bool [B, V]: the tokens of each row so far, for the repetition penalty
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(len(seqs), config.vocab_size, dtype=torch.bool, device=device)
            for i, s in enumerate(seqs):
                seen[i, torch.tensor(s, device=device)] = True
        for step in range(max_new_tokens):
            next_tokens = sample_rows(logits, sampling, seen, generators or [generator] * len(seqs))
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
            for i, s in enumerate(seqs):
                if len(s) - starts[i] > P:  # the window restarts; its last token comes with the others' below
                    starts[i] = len(s) - window
                    if window > 1:
                        _, cache = _prefill_row(params, cache, i, s[starts[i]:-1], config, tap)
                    else:
                        cache = cache.with_length(i, 0)
            logits, cache = decode_step(params, next_tokens, cache, config, tap=tap)


def _prefill_row(params, cache: KVCache, i: int, tokens: list[int], config, tap=no_tap):
    """Prefill row i of `cache` afresh with `tokens`: -> (its last logits [1, V], the cache)."""
    device = params["wte"]["weight"].device
    logits, _ = forward_cached(params, torch.tensor([tokens], device=device), cache.with_length(i, 0).row(i),
                               config, tap=tap, last_only=True)
    return logits[:, -1], cache.with_length(i, len(tokens))


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


class TextStream:
    """One row's new tokens as text pieces. `push(token)` returns the text that token
    makes final: text is held back while it might be the start of a stop string or of an
    unfinished UTF-8 character. The stream is `done` at `<|endoftext|>` (not text) or at
    the first stop string (the text before it is given, the stop string is not)."""

    def __init__(self, stop: tuple[str, ...] = ()):
        if any(s == "" for s in stop):
            raise UserError("--stop: empty stop string")
        self.stop, self.tokens, self.emitted = stop, [], 0
        self.done = self.stopped = False  # stopped: done at a stop string

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token == ENDOFTEXT_ID:
            return self.finish()
        self.tokens.append(token)
        text = decode(self.tokens)
        cut = min((i for i in (text.find(s, self.emitted) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.done = self.stopped = True
            return text[self.emitted : cut]
        safe = len(text.rstrip("\ufffd"))
        # Hold back the longest tail that may begin a stop string: a tail within the text
        # not yet given (a stop string starting earlier is not looked for), so a stop string
        # far longer than the text costs little more than a short one.
        held = range(1, safe - self.emitted + 1)
        safe -= max((k for s in self.stop for k in held if k < len(s) and text[:safe].endswith(s[:k])), default=0)
        piece, self.emitted = text[self.emitted : max(safe, self.emitted)], max(safe, self.emitted)
        return piece

    def finish(self) -> str:
        """The text held back, at the end of the row (none after a stop string)."""
        if self.done:
            return ""
        self.done = True
        return decode(self.tokens)[self.emitted :]


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
    before it is yielded, the stop string is not), or after max_new_tokens tokens (see
    TextStream). If `stats` is given, it is filled at the end with prompt_tokens,
    new_tokens, prefill_s (prompt to first new token) and decode_s (the rest).
    """
    text = TextStream(stop)
    produced = 0
    t0 = time.perf_counter()
    t_first = t_last = t0
    tokens = generate(params, [prompt], config, max_new_tokens=max_new_tokens, sampling=sampling,
                      generator=generator, stop_tokens=(ENDOFTEXT_ID,))
    try:
        for step in tokens:
            t_last = time.perf_counter()
            t_first = t_first if produced else t_last
            produced += 1
            piece = text.push(int(step[0]))
            if piece or text.stopped:  # a stop string right away still ends the stream with its (empty) text
                yield piece
            if text.done:
                break
        if piece := text.finish():
            yield piece
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
    proposer=None,
    speculate: int = 4,
    out,
    err,
) -> None:
    """`fgpt generate`: `num_samples` continuations of the prompt, computed as one batch
    (one row each) and written to `out` one after another, each followed on `err` by a
    summary line (prompt tokens, new tokens, prefill and decode tokens/s of its row).
    Sample 1 streams as it is produced, each later one as soon as the ones before it are
    written. Sample i draws from its own generator seeded with seed + i, so it does not
    depend on how many samples were asked for; seed None draws fresh seeds, else
    seed + num_samples - 1 must fit torch's seed range 0..2**64-1. proposer (a
    speculative.PromptLookup or DraftModel): verify `speculate` guesses per forward
    (speculative.py): greedy, the same text; sampling, the same distribution; one sample."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise UserError(f"--max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_int(num_samples) or num_samples < 1:
        raise UserError(f"--num_samples must be an integer >= 1, got {num_samples!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED - (num_samples - 1)):
        raise UserError(f"--seed must be an integer in 0..{MAX_SEED - (num_samples - 1)} (torch's seeds are "
                        f"0..2**64-1 and sample i uses seed + i), got {seed!r}")
    if proposer is not None and num_samples != 1:
        raise UserError("--draft / --prompt_lookup: speculative decoding here runs one sample (--num_samples 1)")
    texts = [TextStream(stop) for _ in range(num_samples)]
    ids, notice = encode_prompt(prompt_text, config)
    if notice:
        print(f"note: {notice}", file=err)
    device = params["wte"]["weight"].device
    generators = [torch.Generator(device=device) for _ in range(num_samples)]
    for i, g in enumerate(generators):
        g.seed() if seed is None else g.manual_seed(seed + i)
    shown, held = 0, [[] for _ in range(num_samples)]  # the sample being written; the text not yet written

    def show(i: int) -> None:  # sample i's header
        if num_samples > 1:
            print(f"--- sample {i + 1} ---", file=out, flush=True)

    def write_held(i: int) -> None:
        for piece in held[i]:
            out.write(piece)
        held[i] = []
        out.flush()

    def end(i: int) -> None:
        out.write("\n")
        out.flush()
        print(_summary(dict(prompt_tokens=len(ids), new_tokens=produced[i], prefill_s=t_first - t0,
                            decode_s=t_last[i] - t_first)), file=err, flush=True)

    produced, t_last = [0] * num_samples, [0.0] * num_samples
    t0 = t_first = time.perf_counter()
    show(0)
    if proposer is None:
        rows = generate(params, [ids] * num_samples, config, max_new_tokens=max_new_tokens, sampling=sampling,
                        generators=generators, stop_tokens=(ENDOFTEXT_ID,))
    else:
        rows = speculative_generate(params, ids, config, max_new_tokens=max_new_tokens, proposer=proposer,
                                    k=speculate, stop_tokens=(ENDOFTEXT_ID,), sampling=sampling,
                                    generator=generators[0])
    for step, tokens in enumerate(rows):
        now = time.perf_counter()
        t_first = now if step == 0 else t_first
        for i, token in enumerate(tokens.tolist()):
            if texts[i].done:
                continue
            produced[i], t_last[i] = produced[i] + 1, now
            if piece := texts[i].push(token):
                held[i].append(piece)
        while shown < num_samples and (held[shown] or texts[shown].done):
            write_held(shown)
            if not texts[shown].done:
                break
            end(shown)
            shown += 1
            if shown < num_samples:
                show(shown)
        if all(t.done for t in texts):
            break
    rows.close()
    for i in range(shown, num_samples):  # the rows max_new_tokens ended
        if i > shown:
            show(i)
        held[i].append(texts[i].finish())
        write_held(i)
        end(i)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _summary(stats: dict) -> str:
    prefill = stats["prompt_tokens"] / stats["prefill_s"] if stats["prefill_s"] > 0 else float("nan")
    decode_steps = stats["new_tokens"] - 1
    decode = decode_steps / stats["decode_s"] if decode_steps > 0 and stats["decode_s"] > 0 else float("nan")
    return (f"[prompt {stats['prompt_tokens']} tokens, {stats['new_tokens']} new tokens; "
            f"prefill {prefill:.1f} tok/s, decode {decode:.1f} tok/s]")

"""Speculative decoding: the target model's own tokens (greedy) or distribution (sampling),
several tokens per forward.

A proposer guesses the next k tokens; the target model verifies them in one cached
forward over [last token, guesses] (the one block path), so each forward yields between 1
and k + 1 tokens. The cache rolls back past the rejected guesses (`KVCache.with_length`:
what lies past a row's length is never read).
- Greedy: the guesses that equal the target's own greedy choices are kept, then the
  target's next choice after them: exactly the tokens `decoding.generate` yields.
- Sampling: the rejection rule of Leviathan et al. and Chen et al. (2023). Guess x, drawn
  from the draft's distribution q, is kept with probability min(1, p(x) / q(x)), p the
  target's (the `Sampling` rules applied to its logits, as plain sampling applies them);
  at the first rejection the token is drawn from max(p - q, 0) renormalized, and when all
  are kept, one more from p. Each token is then distributed as plain sampling's, whatever
  the draft (a prompt lookup's guess is a point mass: kept with probability p(x), else
  the token is drawn from p without x). The draws differ from plain sampling's with the
  same seed: same distribution, not the same tokens.

Proposers: `DraftModel` (a smaller model with the same tokenizer and context, greedy on
its own KV cache; train one with `fgpt train`) and `PromptLookup` (the continuation of the
latest earlier match of the context's last n-gram: transformers' prompt_lookup_num_tokens,
no second model). When the context is full, the window restarts exactly as in
`decoding.generate`; the guesses never reach past the window, so every token is chosen
from the context plain decoding would use.
"""

import numbers
from collections.abc import Iterator

import torch

from ..checks import check_int, describe
from ..errors import UserError
from ..model.config import GPTConfig
from ..model.params import Params
from ..model.transformer import KVCache, checked_config, decode_step, forward_cached, new_cache
from .sampling import Sampling, process_logits

GREEDY = Sampling(greedy=True)


class PromptLookup:
    """Guesses the tokens that followed the latest earlier occurrence of the context's last
    `max_ngram` tokens (then shorter n-grams, down to 1); none when nothing matches."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = check_int("--prompt_lookup", max_ngram, 1, 64)

    def propose(self, context: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(context) - 1), 0, -1):
            tail = context[-n:]
            for i in range(len(context) - n - 1, -1, -1):
                if context[i:i + n] == tail:
                    return context[i + n:i + n + k]
        return []

    def restart(self) -> None:
        pass  # no state


class DraftModel:
    """Guesses with a smaller model on its own KV cache of `rows` rows (one per sequence it
    serves: a server's rows). A row holds its last context and the guesses after it; the
    next context must extend the last by the guesses kept, so the row keeps all but its
    new context's last position and catches up from there (one forward for all the rows
    asked). speculative_generate restarts it at the start and whenever the window
    restarts; a server restarts a row when a new request takes it."""

    def __init__(self, params: Params, config: GPTConfig, target: GPTConfig, *, rows: int = 1,
                 flag: str = "--draft"):
        config = checked_config(params, config)
        if not isinstance(target, GPTConfig):
            raise UserError(f"target: expected the model's GPTConfig, got {describe(target)}")
        for field in ("vocab_size", "n_positions"):
            if getattr(config, field) != getattr(target, field):
                raise UserError(f"{flag}: the draft's {field} is {getattr(config, field)}, the model's "
                                f"{getattr(target, field)}; a draft must share the tokenizer and the context")
        self.params, self.config, self.rows = params, config, check_int("rows", rows, 1)
        self.cache: KVCache | None = None  # row r holds its context's first `cache.lengths[r]` tokens

    def restart(self, row: int | None = None) -> None:
        """Forget row `row`'s context (None: every row's)."""
        if row is None or self.cache is None:
            self.cache = None
        else:
            self.cache = self.cache.with_length(row, 0)

    def propose(self, context: list[int], k: int) -> list[int]:
        """k greedy guesses after the context."""
        return self.draw(context, k, GREEDY)[0]

    def draw(self, context: list[int], k: int, sampling: Sampling, generator: torch.Generator | None = None):
        """-> (k guesses after the context, each drawn from the draft's distribution under
        `sampling`'s temperature and filters (no repetition penalty), and those
        distributions [k, V]; None when greedy: each guess a point mass). Row 0's cache."""
        return self.draw_rows([0], [context], k, [sampling], [generator])[0]

    def draw_rows(self, rows: list[int], contexts: list[list[int]], k: int, samplings: list[Sampling],
                  generators: list) -> list[tuple[list[int], torch.Tensor | None]]:
        """`draw` for several rows at once, row rows[b] after contexts[b] under samplings[b]
        with generators[b]: one catch-up forward, then k - 1 decode steps of those rows."""
        if not isinstance(rows, (list, tuple)) or not rows or not all(
                isinstance(x, (list, tuple)) and len(x) == len(rows) for x in (contexts, samplings, generators)):
            raise UserError(f"draw_rows: expected rows, contexts, samplings and generators of one length, got "
                            f"{describe(rows)}, {describe(contexts)}, {describe(samplings)}, {describe(generators)}")
        if k == 0:
            return [([], None) for _ in rows]
        if self.cache is None:
            w = self.params["wpe"]["weight"]
            self.cache = new_cache(self.config, self.rows, dtype=w.dtype, device=w.device)
        device = self.cache.k.device
        for r, context in zip(rows, contexts):  # rejected guesses past it are dropped; the last token is run again
            self.cache = self.cache.with_length(r, min(self.cache.lengths[r], len(context) - 1))
        missing = [context[self.cache.lengths[r]:] for r, context in zip(rows, contexts)]
        T = max(len(m) for m in missing)
        tokens = torch.tensor([m + [0] * (T - len(m)) for m in missing], device=device)
        logits, self.cache = forward_cached(self.params, tokens, self.cache, self.config, cache_rows=tuple(rows),
                                            counts=tuple(len(m) for m in missing), last_only=True)
        logits = logits[:, -1]
        guesses, probs = [[] for _ in rows], [[] for _ in rows]
        busy = tuple(r in rows for r in range(self.rows))
        while True:
            for b, (sampling, generator) in enumerate(zip(samplings, generators)):
                if sampling.is_greedy:
                    guesses[b].append(int(logits[b].argmax()))
                else:
                    probs[b].append(process_logits(logits[b : b + 1].float(), sampling).softmax(-1)[0])
                    guesses[b].append(int(torch.multinomial(probs[b][-1], 1, generator=generator)))
            if len(guesses[0]) == k:
                return [(g, torch.stack(p) if p else None) for g, p in zip(guesses, probs)]
            step = torch.zeros(self.rows, dtype=torch.long, device=device)
            step[list(rows)] = torch.tensor([g[-1] for g in guesses], device=device)
            logits, self.cache = decode_step(self.params, step, self.cache, self.config, rows=busy, fixed_shape=False)
            logits = logits[list(rows)]


def proposer_flags(draft: str | None, prompt_lookup: int | None, config: GPTConfig, device=None, *,
                   rows: int = 1) -> "PromptLookup | DraftModel | None":
    """The proposer `--draft WEIGHTS` or `--prompt_lookup N` asks for (a draft of `rows`
    rows, loaded on `device`), or None for neither."""
    from ..device import pick_device
    from ..model.checkpoint import load_params

    if draft is not None and prompt_lookup is not None:
        raise UserError("--draft and --prompt_lookup: give one proposer, not both")
    if prompt_lookup is not None:
        return PromptLookup(prompt_lookup)
    if draft is not None:
        params, draft_config = load_params(draft, device=pick_device(device))
        return DraftModel(params, draft_config, config, rows=rows)
    return None


def speculative_generate(
    params: Params,
    prompt: list[int],
    config: GPTConfig,
    *,
    max_new_tokens: int,
    proposer: PromptLookup | DraftModel,
    k: int = 4,
    stop_tokens: tuple[int, ...] = (),
    window: int | None = None,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Decoding of one prompt (token ids) under `sampling` (default greedy): yields each
    new token as int64 [1] (as `decoding.generate` yields a row of one), ending after a
    token in `stop_tokens` or max_new_tokens; greedy, generate's tokens; sampling, their
    distribution (the module doc), drawing from `generator`. k: guesses verified per
    forward (1..64). window: as in generate. Runs under torch.inference_mode."""
    config = checked_config(params, config)
    P = config.n_positions
    window = P // 2 if window is None else check_int("window", window, 1, P)
    k = check_int("--speculate", k, 1, 64)
    max_new_tokens = check_int("--max_new_tokens", max_new_tokens, 0)
    if not isinstance(proposer, (PromptLookup, DraftModel)):
        raise UserError(f"proposer: expected a PromptLookup or a DraftModel, got {describe(proposer)}")
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(_is_id(t, config) for t in prompt):
        raise UserError(f"prompt: expected a non-empty list of token ids in 0..{config.vocab_size - 1}, got "
                        f"{describe(prompt)}")
    if not isinstance(stop_tokens, (list, tuple, set, frozenset)) or not all(_is_id(t, config) for t in stop_tokens):
        raise UserError(f"stop_tokens: expected a tuple of token ids, got {describe(stop_tokens)}")
    if not isinstance(sampling, Sampling):
        raise UserError(f"sampling: expected a Sampling, got {describe(sampling)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise UserError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    if max_new_tokens == 0:
        return
    device = params["wte"]["weight"].device
    proposer.restart()
    s = list(prompt)
    start = max(0, len(s) - P)
    seen = None  # bool [1, V]: the tokens so far, for the repetition penalty (as generate keeps them)
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(1, config.vocab_size, dtype=torch.bool, device=device)
        seen[0, torch.tensor(s, device=device)] = True
    with torch.inference_mode():
        cache, logits = _prefill(params, config, s[start:], device)
        choices = verify(logits[None], [], None, sampling, seen, generator)
        produced = 0
        while True:
            for token in choices:
                if seen is not None:
                    seen[0, token] = True
                s.append(token)
                produced += 1
                yield torch.tensor([token], device=device)
                if token in stop_tokens or produced == max_new_tokens:
                    return
            if len(s) - start > P:  # the window restarts, as in generate
                start = len(s) - window
                cache = _prefill(params, config, s[start:-1], device)[0] if window > 1 else \
                    new_cache(config, 1, dtype=cache.k.dtype, device=device)
                proposer.restart()
            held = cache.lengths[0]  # the window but its last token
            context = s[start:]
            n = min(k, P - (held + 1), max_new_tokens - produced - 1)
            if isinstance(proposer, DraftModel):
                guesses, draft_probs = proposer.draw(context, n, sampling, generator)
            else:
                guesses, draft_probs = proposer.propose(context, n), None
            logits, cache = forward_cached(params, torch.tensor([[s[-1], *guesses]], device=device), cache, config)
            choices = verify(logits[0], guesses, draft_probs, sampling, seen, generator)
            kept = len(choices) - 1
            cache = cache.with_length(0, held + 1 + kept)


def verify(logits, guesses: list[int], draft_probs, sampling: Sampling, seen, generator) -> list[int]:
    """The tokens one verifying forward yields: the guesses kept, then one more.
    logits: the target's [n + 1, V] after the last token and each of the n guesses;
    draft_probs: [n, V] the distributions the guesses were drawn from, None for point
    masses; seen: bool [1, V] the tokens before the guesses (None: no repetition penalty)."""
    n = len(guesses)
    seen_rows = None
    if seen is not None:  # row j also holds guesses 0 .. j-1
        seen_rows = seen.repeat(n + 1, 1)
        for j, guess in enumerate(guesses):
            seen_rows[j + 1 :, guess] = True
    processed = process_logits(logits.float(), sampling, seen_rows)
    if sampling.is_greedy:
        target = processed.argmax(-1).tolist()
        kept = 0
        while kept < n and guesses[kept] == target[kept]:
            kept += 1
        return guesses[:kept] + [target[kept]]
    p = processed.softmax(-1)
    for j, guess in enumerate(guesses):
        q = None if draft_probs is None else draft_probs[j]
        if float(torch.rand((), generator=generator, device=p.device)) * (1.0 if q is None else float(q[guess])) \
                < float(p[j, guess]):  # kept with probability min(1, p / q)
            continue
        residual = p[j].clone()
        if q is None:
            residual[guess] = 0.0
        else:
            residual = (residual - q).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # p and q equal to rounding: p itself
            residual = p[j]
        return guesses[:j] + [int(torch.multinomial(residual, 1, generator=generator))]
    return guesses + [int(torch.multinomial(p[n], 1, generator=generator))]


def _is_id(token, config: GPTConfig) -> bool:
    return isinstance(token, numbers.Integral) and not isinstance(token, bool) and 0 <= token < config.vocab_size


def _prefill(params, config, tokens: list[int], device) -> tuple[KVCache, torch.Tensor]:
    """A fresh cache holding `tokens`, and the logits after them [V]."""
    w = params["wpe"]["weight"]
    cache = new_cache(config, 1, dtype=w.dtype, device=device)
    logits, cache = forward_cached(params, torch.tensor([tokens], device=device), cache, config, last_only=True)
    return cache, logits[0, -1]

"""Continuous batching: many completions share one decode step, each in its own row.

An `Engine` owns a KV cache of `max_batch` rows. Each `step()`:
1. admits waiting requests into free rows: each prompt is prefilled alone into its row
   (`KVCache.row`), and its first token is sampled and sent at once, before the next
   prompt's prefill;
2. samples each other active row with its own rules and its own seeded generator, and
   retires the rows that finished (`<|endoftext|>`, a stop string, max_tokens, cancelled),
   freeing them at once for the next request;
3. decodes the new token of every row still active in one `decode_step`.

With a speculative proposer (speculative.py: a `DraftModel` of `max_batch` rows, batched
over the busy rows, or a `PromptLookup`), steps 2 and 3 become one: each busy row's guesses
after its last token are verified in one `forward_cached` over the busy rows (each row its
own number of guesses), and each row sends the guesses it keeps and one more token, then
rolls its cache back past the rejected ones. Greedy rows get plain decoding's tokens,
sampled rows its distribution (the rejection rule), frequency, presence and repetition
penalties applied per position as plain decoding applies them.

Two modes:
- default: the decode step multiplies only the busy rows (a lone request costs what it
  costs alone), and prompts reuse the keys and values of a shared prefix (prefix caching):
  each busy row knows the tokens its cache holds, and a finished request leaves a copy of
  its keys and values in a prefix store (least recently used out first, within
  `prefix_cache_mb`); a new prompt copies its longest reusable prefix from either and
  prefills only the rest (`Done.cached_tokens` counts the reused tokens);
- `batch_invariant`: the decode step always multiplies all `max_batch` rows and every
  prompt is prefilled whole, so a request gets exactly the tokens and log-probs it gets
  alone, whichever requests share its batch (a BLAS rounds a row differently by the
  product's row count, and a reused prefix's numbers by the prefill that made them).

A failure belongs
to its request, as vLLM aborts one sequence and not the batch: a prefill or a sampling
step that raises retires that row alone (`Done` "error", saying where and why) and the
others go on; only a failure of the shared decode step ends every row it held.

Events go to each request's `sink` (called on the engine's thread): one `Prompt` after
the prefill when the prompt's log-probs were asked for, a `Token` per new token (the
`<|endoftext|>` that ends a row included), then one `Done`. The engine is not
thread-safe except for `submit` and `Handle.cancel`, which only touch a locked queue and
a flag.
"""

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..checks import check_bool, check_callable, check_int, check_number, describe
from ..errors import UserError
from ..model.config import GPTConfig
from ..model.params import Params
from ..model.tokenizer import decode
from ..model.transformer import decode_step, forward_cached, new_cache
from .decoding import MAX_SEED, TextStream
from .sampling import Sampling, sample
from .speculative import DraftModel, PromptLookup, verify

MAX_LOGPROBS = 5  # also how many alternatives a row keeps per prompt token, for a later prompt sharing it
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's do


def check_penalty(name: str, value) -> float:
    """A presence or frequency penalty: a finite number in [-2, 2]."""
    return check_number(name, value, -MAX_PENALTY, MAX_PENALTY)


def check_logprobs(name: str, value) -> int:
    """How many alternatives to report per token: 0..MAX_LOGPROBS."""
    return check_int(name, value, 0, MAX_LOGPROBS)


@dataclass(frozen=True)
class Request:
    """One completion, its fields checked (and kept in plain form) when it is made.
    prompt: token ids (non-empty; within the vocabulary, and prompt + max_tokens within
    the context, checked by `Engine.submit`). seed: 0..2**64-1, None for a fresh one.
    stop: strings that end the text (non-empty). logprobs: how many alternatives to report
    per token (0..5), None for no log-probs. prompt_logprobs: also score every prompt
    token (echo with logprobs). presence_penalty, frequency_penalty: OpenAI's, in [-2, 2],
    over the tokens generated so far:
    logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        if not isinstance(self.prompt, (tuple, list)) or not self.prompt:
            raise UserError(f"prompt: expected a non-empty tuple of token ids, got {describe(self.prompt)}")
        plain = {"prompt": tuple(check_int("prompt", t, 0) for t in self.prompt),
                 "max_tokens": check_int("max_tokens", self.max_tokens, 0),
                 "seed": None if self.seed is None else check_int("seed", self.seed, 0, MAX_SEED),
                 "logprobs": None if self.logprobs is None else check_logprobs("logprobs", self.logprobs),
                 "prompt_logprobs": check_bool("prompt_logprobs", self.prompt_logprobs),
                 "presence_penalty": check_penalty("presence_penalty", self.presence_penalty),
                 "frequency_penalty": check_penalty("frequency_penalty", self.frequency_penalty)}
        if not isinstance(self.sampling, Sampling):
            raise UserError(f"sampling: expected a Sampling, got {describe(self.sampling)}")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop: expected a tuple of non-empty strings, got {describe(self.stop)}")
        plain["stop"] = tuple(self.stop)
        for name, value in plain.items():
            object.__setattr__(self, name, value)  # frozen: set once, here


@dataclass(frozen=True)
class Prompt:
    """The prompt's own log-probs, after its prefill, when `prompt_logprobs` was asked:
    [(token, log-prob or None, {alt: log-prob} or None)] per prompt token (the first has
    no log-prob)."""

    logprobs: list


@dataclass(frozen=True)
class Token:
    """A new token: its id, the text it makes final (see decoding.TextStream; a closing
    `<|endoftext|>` brings what was held back), its log-probability under the model
    (log-softmax of the raw logits) and the top alternatives {token id: log-prob} when
    asked."""

    id: int
    text: str
    logprob: float | None = None
    top: dict[int, float] | None = None


@dataclass(frozen=True)
class Done:
    """The end of a request: reason "stop" (<|endoftext|> or a stop string), "length"
    (max_tokens), "cancelled" or "error" (then `error` says where and why); text: what
    the text stream held back to the end; the time to the first token; cached_tokens: the
    prompt tokens whose keys and values were reused, not prefilled (prefix caching)."""

    reason: str
    new_tokens: int
    text: str = ""
    first_token_s: float = math.nan
    error: str | None = None
    cached_tokens: int = 0


@dataclass
class Handle:
    """What `submit` returns: cancel() frees the request's row at the next step."""

    request: Request
    sink: Callable
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:  # an active row's state
    handle: Handle
    generator: torch.Generator
    text: TextStream
    counts: torch.Tensor  # int [V]: how often each token was generated (penalties)
    seen: torch.Tensor | None  # bool [1, V]: prompt and generated tokens (repetition penalty)
    logits: torch.Tensor  # [V]: the next token's logits
    cached: int = 0  # prompt tokens reused from a shared prefix
    produced: int = 0
    first_token_s: float = math.nan
    next_token: int = 0  # the last token sampled: the next decode step's input


@dataclass
class _Held:
    """Keys and values a prompt may start from: a busy cache row's (`row`), or a copy a
    finished request left in the prefix store (`k`, `v`: [n_layer, n_head, n, head_dim])."""

    tokens: list  # the ids whose keys and values fill positions 0 .. len-1
    scored: list  # (log-prob, {alt: log-prob}) of tokens 1 .. len(scored), kept from prompt log-probs
    row: int | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class QueueFull(Exception):
    pass


def check_sizes(max_batch, max_queue, flag: str = "") -> None:
    """max_batch >= 1 rows and max_queue >= 1 waiting places (0 would refuse every
    request); a refusal names them with `flag` before ("--" for the command line)."""
    check_int(f"{flag}max_batch", max_batch, 1)
    check_int(f"{flag}max_queue", max_queue, 1)


def check_modes(batch_invariant: bool, speculative: bool) -> None:
    """Batch invariance and speculative decoding exclude each other."""
    if batch_invariant and speculative:
        raise UserError("--batch_invariant and speculative decoding (--draft, --prompt_lookup) cannot both hold: "
                        "a verifying step's shape, so a row's rounding, depends on the other rows' guesses")


class Engine:
    def __init__(self, params: Params, config: GPTConfig, *, max_batch: int = 8, max_queue: int = 64,
                 batch_invariant: bool = False, prefix_cache_mb: int = 1024,
                 proposer: DraftModel | PromptLookup | None = None, speculate: int = 4):
        check_sizes(max_batch, max_queue)
        self.params, self.config, self.max_queue = params, config, max_queue
        self.batch_invariant = check_bool("batch_invariant", batch_invariant)
        self.proposer, self.speculate = proposer, check_int("speculate", speculate, 1, 64)
        if proposer is not None and not isinstance(proposer, (DraftModel, PromptLookup)):
            raise UserError(f"proposer: expected a DraftModel, a PromptLookup or None, got {describe(proposer)}")
        check_modes(self.batch_invariant, proposer is not None)
        if isinstance(proposer, DraftModel) and proposer.rows < max_batch:
            raise UserError(f"proposer: a DraftModel of {proposer.rows} rows for max_batch {max_batch} "
                            f"(DraftModel(..., rows={max_batch}))")
        self.prefix_budget = check_int("prefix_cache_mb", prefix_cache_mb, 0) * 2**20
        self.prefixes: list[_Held] = []  # the prefix store, least recently used first
        w = params["wpe"]["weight"]  # the dtype activations run in (wte may be int8)
        self.device = w.device
        self.cache = new_cache(config, max_batch, dtype=w.dtype, device=w.device)
        self.rows: list[_Row | None] = [None] * max_batch
        self.held = [_Held([], [], row=i) for i in range(max_batch)]  # what each busy row's cache holds
        self.waiting: deque[Handle] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()

    # ---------------------------------------------------------------- any thread

    def submit(self, request: Request, sink: Callable) -> Handle:
        """Queue a request whose prompt fits the vocabulary and, with max_tokens, the
        context (else a UserError naming the field); raises QueueFull when max_queue
        requests already wait."""
        if not isinstance(request, Request):
            raise UserError(f"request: expected a Request, got {describe(request)}")
        check_callable("sink", sink)
        V, P = self.config.vocab_size, self.config.n_positions
        bad = next((t for t in request.prompt if t >= V), None)
        if bad is not None:
            raise UserError(f"prompt: token id {bad} is out of range for vocab_size={V}")
        if len(request.prompt) + request.max_tokens > P:
            raise UserError(f"max_tokens: a prompt of {len(request.prompt)} tokens and max_tokens "
                            f"{request.max_tokens} exceed the context of {P} tokens")
        handle = Handle(request, sink)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max_queue {self.max_queue})")
            self.waiting.append(handle)
        self.wake.set()
        return handle

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # ---------------------------------------------------------------- the engine's thread

    def step(self) -> None:
        """Admit, sample one token per active row, retire, decode (see the module doc)."""
        with torch.inference_mode():
            admitted = self._admit()  # their first token is out already
            for i, row in enumerate(self.rows):
                if row is None or i in admitted:
                    continue
                if row.handle.cancelled:
                    self._retire(i, "cancelled")
                elif self.proposer is None:
                    self._advance(i)
            live = tuple(r is not None for r in self.rows)
            if not any(live):
                return
            if self.proposer is not None:
                return self._speculate([i for i, on in enumerate(live) if on])
            tokens = [0 if r is None else r.next_token for r in self.rows]
            try:
                logits, self.cache = decode_step(self.params, torch.tensor(tokens, device=self.device), self.cache,
                                                 self.config, rows=live, fixed_shape=self.batch_invariant)
            except Exception as e:  # the shared step: every row it held fails with it
                for i, on in enumerate(live):
                    if on:
                        self._fail(i, "the batched decode step", e)
                return
            for i, on in enumerate(live):
                if on:
                    self.rows[i].logits = logits[i]
                    self.held[i].tokens.append(tokens[i])

    def _speculate(self, busy: list[int]) -> None:
        """Verify the busy rows' guesses after their last sent token in one forward, send
        what each keeps and one more, roll each cache back past its rejected guesses."""
        contexts = [self.held[i].tokens + [self.rows[i].next_token] for i in busy]
        wanted = [min(self.speculate, self.rows[i].handle.request.max_tokens - self.rows[i].produced - 1)
                  for i in busy]
        try:
            if isinstance(self.proposer, DraftModel):
                drawn = self.proposer.draw_rows(busy, contexts, max(wanted),
                                                [self.rows[i].handle.request.sampling for i in busy],
                                                [self.rows[i].generator for i in busy])
                drawn = [(g[:n], None if q is None else q[:n]) for (g, q), n in zip(drawn, wanted)]
            else:
                drawn = [(self.proposer.propose(c, n), None) for c, n in zip(contexts, wanted)]
            T = 1 + max(len(g) for g, _ in drawn)
            tokens = torch.tensor([[c[-1], *g] + [0] * (T - 1 - len(g)) for c, (g, _) in zip(contexts, drawn)],
                                  device=self.device)
            logits, self.cache = forward_cached(self.params, tokens, self.cache, self.config, cache_rows=tuple(busy),
                                                counts=tuple(1 + len(g) for g, _ in drawn))
        except Exception as e:  # the shared step: every row it held fails with it
            for i in busy:
                self._fail(i, "the speculative step", e)
            return
        for b, (i, context, (guesses, q)) in enumerate(zip(busy, contexts, drawn)):
            row = self.rows[i]
            try:
                choices = verify(self._penalized(row, logits[b, : 1 + len(guesses)], guesses), guesses, q,
                                 row.handle.request.sampling, row.seen, row.generator)
            except Exception as e:  # this row's failure: the others go on
                self.cache = self.cache.with_length(i, len(self.held[i].tokens))
                self._fail(i, "sampling", e)
                continue
            kept = len(choices) - 1
            self.held[i].tokens = context + guesses[:kept]
            self.cache = self.cache.with_length(i, len(self.held[i].tokens))
            for j, token in enumerate(choices):
                row.logits = logits[b, j]
                row.next_token = token
                self._emit(i, token)
                if self.rows[i] is None:
                    break

    @staticmethod
    def _penalized(row: _Row, logits: torch.Tensor, guesses: list[int]) -> torch.Tensor:
        """logits [n + 1, V] after the last token and each guess, less the frequency and
        presence penalties of the tokens before each position (the guesses included)."""
        request = row.handle.request
        if not (request.frequency_penalty or request.presence_penalty):
            return logits
        counts = row.counts.repeat(len(guesses) + 1, 1)
        for j, guess in enumerate(guesses):
            counts[j + 1 :, guess] += 1
        return logits.float() - request.frequency_penalty * counts - request.presence_penalty * (counts > 0)

    def cancel_all(self, reason: str = "cancelled", error: str | None = None) -> None:
        """Finish every request, waiting or running, with `reason` (and `error`)."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for handle in waiting:
            handle.sink(Done(reason, 0, error=error))
        for i, row in enumerate(self.rows):
            if row is not None:
                self._retire(i, reason, error=error)

    def _admit(self) -> set[int]:
        """Fill free rows from the queue in order -> the rows filled. A request cancelled
        while waiting, one whose prefill fails and one of max_tokens 0 end at once, and the
        next waiting request takes their place in the same step."""
        admitted = set()
        while None in self.rows:
            with self.lock:
                if not self.waiting:
                    break
                handle = self.waiting.popleft()
            if handle.cancelled:
                handle.sink(Done("cancelled", 0))
                continue
            i, source, reused = self._place(handle.request)
            try:
                self._prefill(i, handle, source, reused)
            except Exception as e:  # this request's failure: its row stays free for the next
                self.rows[i] = None
                self.cache = self.cache.with_length(i, 0)
                handle.sink(Done("error", 0, error=_failure("prefill", e)))
                continue
            admitted.add(i)
        return admitted

    def _place(self, request: Request) -> tuple[int, _Held | None, int]:
        """-> (the first free row, the busy row or stored prefix holding the prompt's longest
        reusable prefix, that prefix's length; None, 0 when there is none or batch_invariant)."""
        i = self.rows.index(None)
        best, source = 0, None
        if not self.batch_invariant:
            for held in [self.held[j] for j, row in enumerate(self.rows) if row is not None] + self.prefixes:
                n = _reusable(held, request)
                if n > best:
                    best, source = n, held
        if source is not None and source.row is None:  # a stored prefix used: now the most recent
            self.prefixes.remove(source)
            self.prefixes.append(source)
        return i, source, best

    def _prefill(self, i: int, handle: Handle, source: _Held | None, reused: int) -> None:
        """Run the prompt in row i after the `reused` positions copied from `source`, record
        what the row holds, and send the first token."""
        request, V = handle.request, self.config.vocab_size
        earlier = source.scored[:reused] if source is not None and request.prompt_logprobs else []
        if source is None:
            self.cache = self.cache.with_length(i, 0)
        elif source.row is None:
            self.cache = self.cache.with_prefix(i, source.k, source.v, reused)
        else:
            self.cache = self.cache.with_prefix(i, self.cache.k[:, source.row], self.cache.v[:, source.row], reused)
        tokens = torch.tensor([request.prompt], device=self.device)
        logits, row_cache = forward_cached(self.params, tokens[:, reused:], self.cache.row(i), self.config,
                                           last_only=not request.prompt_logprobs)
        self.cache = self.cache.with_length(i, row_cache.lengths[0])
        scored = (self._score_prompt(logits[0], request, earlier) if request.prompt_logprobs
                  else [] if source is None else source.scored[:max(reused - 1, 0)])
        self.held[i] = _Held(list(request.prompt), scored, row=i)
        generator = torch.Generator(device=self.device)
        generator.seed() if request.seed is None else generator.manual_seed(request.seed)
        seen = None
        if request.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(1, V, dtype=torch.bool, device=self.device)
            seen[0, tokens[0]] = True
        if request.prompt_logprobs:
            k = request.logprobs or 0
            handle.sink(Prompt([(request.prompt[0], None, None)] + [
                (token, logprob, dict(list(alts.items())[:k]) if k else None)
                for token, (logprob, alts) in zip(request.prompt[1:], scored)]))
        self.rows[i] = _Row(handle, generator, TextStream(request.stop), torch.zeros(V, device=self.device), seen,
                            logits[0, -1], cached=reused)
        if isinstance(self.proposer, DraftModel):
            self.proposer.restart(i)
        if request.max_tokens == 0:
            self._retire(i, "length")
        else:
            self._advance(i)

    def _score_prompt(self, logits: torch.Tensor, request: Request, earlier: list) -> list:
        """-> (log-prob, {alt: log-prob} of the MAX_LOGPROBS best) of prompt tokens 1 .. n-1:
        `earlier` for tokens 1 .. r (reused), the rest from logits [n - r, V] at positions
        r .. n-1."""
        r = len(earlier)
        logp = F.log_softmax(logits[:-1].float(), dim=-1)  # row t (position r + t) predicts token r + t + 1
        ids = torch.tensor(request.prompt[r + 1 :], device=logp.device, dtype=torch.long)
        chosen = logp.gather(-1, ids[:, None])[:, 0].tolist()
        top = logp.topk(min(MAX_LOGPROBS, logp.shape[-1]), dim=-1)
        alts = [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        return earlier + list(zip(chosen, alts))

    def _advance(self, i: int) -> None:
        """Sample row i's next token and send it (a failure retires the row alone)."""
        row = self.rows[i]
        try:
            row.next_token = self._sample(row)
            self._emit(i, row.next_token)
        except Exception as e:  # this row's failure: the others go on
            self._fail(i, "sampling", e)

    def _sample(self, row: _Row) -> int:
        request = row.handle.request
        logits = row.logits.float()
        if request.frequency_penalty or request.presence_penalty:
            logits = logits - request.frequency_penalty * row.counts - request.presence_penalty * (row.counts > 0)
        return int(sample(logits[None], request.sampling, row.seen, row.generator)[0])

    def _emit(self, i: int, token: int) -> None:
        """Send row i's new token; retire the row if that finishes it."""
        row, request = self.rows[i], self.rows[i].handle.request
        row.produced += 1
        if row.produced == 1:
            row.first_token_s = time.perf_counter() - row.handle.submitted
        row.counts[token] += 1
        if row.seen is not None:
            row.seen[0, token] = True
        text = row.text.push(token)  # <|endoftext|> ends the stream and brings what it held back
        logprob = top = None
        if request.logprobs is not None:
            logp = F.log_softmax(row.logits.float(), dim=-1)
            logprob = float(logp[token])
            if request.logprobs:
                best = logp.topk(request.logprobs)
                top = dict(zip(best.indices.tolist(), best.values.tolist()))
        row.handle.sink(Token(token, text, logprob, top))
        if row.text.done:
            self._retire(i, "stop")
        elif row.produced >= request.max_tokens:
            self._retire(i, "length", row.text.finish())

    def _fail(self, i: int, stage: str, e: Exception) -> None:
        """Retire row i, if a failure left it active, with an error saying where and why."""
        if self.rows[i] is not None:
            self._retire(i, "error", error=_failure(stage, e))

    def _retire(self, i: int, reason: str, text: str = "", error: str | None = None) -> None:
        row = self.rows[i]
        self.rows[i] = None
        self._store(self.held[i])
        self.cache = self.cache.with_length(i, 0)
        row.handle.sink(Done(reason, row.produced, text, row.first_token_s, error, row.cached))

    def _store(self, held: _Held) -> None:
        """Keep a copy of a finished row's keys and values in the prefix store, in place of
        the stored prefixes it covers; the least recently used go while over the budget."""
        n = len(held.tokens)
        if self.batch_invariant or not n or 2 * self.cache.k[:, 0, :, :n].numel() * self.cache.k.element_size() \
                > self.prefix_budget:
            return
        kept = _Held(list(held.tokens), list(held.scored), k=self.cache.k[:, held.row, :, :n].clone(),
                     v=self.cache.v[:, held.row, :, :n].clone())
        self.prefixes = [p for p in self.prefixes if not (len(p.tokens) <= n and p.tokens == held.tokens[:len(
            p.tokens)] and len(p.scored) <= len(held.scored))] + [kept]
        while sum(p.nbytes for p in self.prefixes) > self.prefix_budget:
            self.prefixes.pop(0)


def _reusable(held: _Held, request: Request) -> int:
    """How many of the prompt's first positions can come from `held`: its shared prefix, less
    one so that the prompt's last token is run (its logits start the completion); with
    prompt log-probs, only tokens whose log-probs were kept, and not the last shared one
    (the position before each scored token is run)."""
    common = 0
    for a, b in zip(held.tokens, request.prompt):
        if a != b:
            break
        common += 1
    if request.prompt_logprobs:
        return max(0, min(common - 1, len(held.scored)))
    return min(common, len(request.prompt) - 1)


def _failure(stage: str, e: Exception) -> str:
    """One line on a failure: where it happened, the exception and its first line."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{stage} failed: {type(e).__name__}" + (f": {first}" if first else "")


def token_text(token: int) -> str:
    """One token's own text (what OpenAI's logprobs list names it by)."""
    return decode([token])

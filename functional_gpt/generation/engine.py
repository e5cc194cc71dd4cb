"""Continuous batching: many completions share one decode step, each in its own row.

An `Engine` owns a KV cache of `max_batch` rows. Each `step()`:
1. admits waiting requests into free rows: each prompt is prefilled alone into its row
   (`KVCache.row`), exactly as it would be with nothing else running;
2. decodes one token for every active row in one `decode_step` over all `max_batch`
   rows (idle rows are skipped in attention and cost only their share of the matrix
   products); the products always have max_batch rows, so a row's logits never depend
   on how many other rows are busy;
3. samples each row with its own rules and its own seeded generator, and retires the
   rows that finished (`<|endoftext|>`, a stop string, max_tokens, cancelled), freeing
   them at once for the next request.

So a request gets the same tokens whichever requests share its batch. Events go to each
request's `sink` (called on the engine's thread): `Token` per new token, then one `Done`.
The engine is not thread-safe except for `submit` and `Handle.cancel`, which only touch
a locked queue and a flag.
"""

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..model.config import GPTConfig
from ..errors import UserError
from .decoding import TextStream
from ..model.transformer import decode_step, forward_cached, new_cache
from ..model.params import Params
from .sampling import Sampling, process_logits
from ..model.tokenizer import ENDOFTEXT_ID, decode

MAX_LOGPROBS = 5


@dataclass(frozen=True)
class Request:
    """One completion. prompt: token ids (non-empty, prompt + max_tokens within the
    context). logprobs: how many alternatives to report per token (0..5), None for no
    log-probs. prompt_logprobs: also score every prompt token (echo with logprobs).
    presence_penalty, frequency_penalty: OpenAI's, over the tokens generated so far:
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


@dataclass(frozen=True)
class Token:
    """A new token: its id, the text it makes final (see generate.TextStream), its
    log-probability under the model (log-softmax of the raw logits) and the top
    alternatives {token id: log-prob} when asked."""

    id: int
    text: str
    logprob: float | None = None
    top: dict[int, float] | None = None


@dataclass(frozen=True)
class Done:
    """The end of a request: reason "stop" (<|endoftext|> or a stop string), "length"
    (max_tokens) or "cancelled"; text: what the text stream held back to the end;
    prompt_logprobs: [(token, log-prob or None, {alt: log-prob} or None)] per prompt
    token (the first has no log-prob), when asked; the time to the first token."""

    reason: str  # "stop", "length", "cancelled" or "error"
    new_tokens: int
    text: str = ""
    prompt_logprobs: list | None = None
    first_token_s: float = math.nan


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
    prompt_logprobs: list | None = None
    produced: int = 0
    first_token_s: float = math.nan


class QueueFull(Exception):
    pass


def check_sizes(max_batch, max_queue) -> None:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"--max_batch must be an integer >= 1, got {max_batch!r}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise UserError(f"--max_queue must be an integer >= 0, got {max_queue!r}")


class Engine:
    def __init__(self, params: Params, config: GPTConfig, *, max_batch: int = 8, max_queue: int = 64):
        check_sizes(max_batch, max_queue)
        self.params, self.config, self.max_queue = params, config, max_queue
        w = params["wte"]["weight"]
        self.device = w.device
        self.cache = new_cache(config, max_batch, dtype=w.dtype, device=w.device)
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: deque[Handle] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()

    # ---------------------------------------------------------------- any thread

    def submit(self, request: Request, sink: Callable) -> Handle:
        """Queue a request (checked by the caller: see `check_request`); raises QueueFull
        when max_queue requests already wait."""
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
        """Admit, decode one token per active row, retire (see the module doc)."""
        with torch.inference_mode():
            self._admit()
            active = [i for i, r in enumerate(self.rows) if r is not None]
            if not active:
                return
            tokens = [0] * len(self.rows)
            for i in active:
                if self.rows[i].handle.cancelled:
                    self._retire(i, "cancelled")
                else:
                    tokens[i] = self._sample(self.rows[i])
                    self._emit(i, tokens[i])
            live = tuple(r is not None for r in self.rows)
            if any(live):
                logits, self.cache = decode_step(self.params, torch.tensor(tokens, device=self.device), self.cache,
                                                 self.config, rows=live)
                for i, on in enumerate(live):
                    if on:
                        self.rows[i].logits = logits[i]

    def cancel_all(self, reason: str = "cancelled") -> None:
        """Finish every request, waiting or running, with `reason`."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for handle in waiting:
            handle.sink(Done(reason, 0))
        for i, row in enumerate(self.rows):
            if row is not None:
                self._retire(i, reason)

    def _admit(self) -> None:
        for i in range(len(self.rows)):
            if self.rows[i] is not None:
                continue
            with self.lock:
                if not self.waiting:
                    return
                handle = self.waiting.popleft()
            if handle.cancelled:
                handle.sink(Done("cancelled", 0))
                continue
            try:
                self._prefill(i, handle)
            except Exception:
                self.rows[i] = None
                handle.sink(Done("error", 0))
                raise

    def _prefill(self, i: int, handle: Handle) -> None:
        request, V = handle.request, self.config.vocab_size
        tokens = torch.tensor([request.prompt], device=self.device)
        logits, row_cache = forward_cached(self.params, tokens, self.cache.with_length(i, 0).row(i), self.config,
                                           last_only=not request.prompt_logprobs)
        self.cache = self.cache.with_length(i, row_cache.lengths[0])
        prompt_logprobs = None
        if request.prompt_logprobs:
            prompt_logprobs = self._prompt_logprobs(logits[0], request)
        generator = torch.Generator(device=self.device)
        generator.seed() if request.seed is None else generator.manual_seed(request.seed)
        seen = None
        if request.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(1, V, dtype=torch.bool, device=self.device)
            seen[0, tokens[0]] = True
        self.rows[i] = _Row(handle, generator, TextStream(request.stop), torch.zeros(V, device=self.device), seen,
                            logits[0, -1], prompt_logprobs)
        if request.max_tokens == 0:
            self._retire(i, "length")

    def _prompt_logprobs(self, logits: torch.Tensor, request: Request) -> list:
        """[(token, log-prob or None, {alt: log-prob} or None)] for each prompt token."""
        logp = F.log_softmax(logits[:-1].float(), dim=-1)  # position t predicts token t + 1
        ids = torch.tensor(request.prompt[1:], device=logp.device)
        chosen = logp.gather(-1, ids[:, None])[:, 0].tolist()
        k = request.logprobs or 0
        top = logp.topk(k, dim=-1) if k else None
        out = [(request.prompt[0], None, None)]
        for t, token in enumerate(request.prompt[1:]):
            alts = dict(zip(top.indices[t].tolist(), top.values[t].tolist())) if k else None
            out.append((token, chosen[t], alts))
        return out

    def _sample(self, row: _Row) -> int:
        request = row.handle.request
        logits = row.logits.float()
        if request.frequency_penalty or request.presence_penalty:
            logits = logits - request.frequency_penalty * row.counts - request.presence_penalty * (row.counts > 0)
        processed = process_logits(logits[None], request.sampling, row.seen)
        if request.sampling.is_greedy:
            token = int(processed.argmax(-1))
        else:
            token = int(torch.multinomial(processed.softmax(-1), 1, generator=row.generator))
        return token

    def _emit(self, i: int, token: int) -> None:
        """Send row i's new token; retire the row if that finishes it."""
        row, request = self.rows[i], self.rows[i].handle.request
        row.produced += 1
        if row.produced == 1:
            row.first_token_s = time.perf_counter() - row.handle.submitted
        row.counts[token] += 1
        if row.seen is not None:
            row.seen[0, token] = True
        text = row.text.push(token)
        if token == ENDOFTEXT_ID:
            self._retire(i, "stop", text)
            return
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

    def _retire(self, i: int, reason: str, text: str = "") -> None:
        row = self.rows[i]
        self.rows[i] = None
        self.cache = self.cache.with_length(i, 0)
        row.handle.sink(Done(reason, row.produced, text, row.prompt_logprobs, row.first_token_s))


def token_text(token: int) -> str:
    """One token's own text (what OpenAI's logprobs list names it by)."""
    return decode([token])

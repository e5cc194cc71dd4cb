"""Continuous batching: many completions share one decode step, each in its own row.

An `Engine` owns a KV cache of `max_batch` rows. Each `step()`:
1. admits waiting requests into free rows: each prompt is prefilled alone into its row
   (`KVCache.row`), exactly as it would be with nothing else running;
2. samples each active row with its own rules and its own seeded generator, and retires
   the rows that finished (`<|endoftext|>`, a stop string, max_tokens, cancelled),
   freeing them at once for the next request;
3. decodes the new token of every row still active in one `decode_step` over all
   `max_batch` rows (idle rows are skipped in attention and cost only their share of the
   matrix products); the products always have max_batch rows, so a row's logits never
   depend on how many other rows are busy.

So a request gets the same tokens whichever requests share its batch. A failure belongs
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

MAX_LOGPROBS = 5
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
    the text stream held back to the end; the time to the first token."""

    reason: str
    new_tokens: int
    text: str = ""
    first_token_s: float = math.nan
    error: str | None = None


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
    produced: int = 0
    first_token_s: float = math.nan


class QueueFull(Exception):
    pass


def check_sizes(max_batch, max_queue, flag: str = "") -> None:
    """max_batch >= 1 rows and max_queue >= 1 waiting places (0 would refuse every
    request); a refusal names them with `flag` before ("--" for the command line)."""
    check_int(f"{flag}max_batch", max_batch, 1)
    check_int(f"{flag}max_queue", max_queue, 1)


class Engine:
    def __init__(self, params: Params, config: GPTConfig, *, max_batch: int = 8, max_queue: int = 64):
        check_sizes(max_batch, max_queue)
        self.params, self.config, self.max_queue = params, config, max_queue
        w = params["wpe"]["weight"]  # the dtype activations run in (wte may be int8)
        self.device = w.device
        self.cache = new_cache(config, max_batch, dtype=w.dtype, device=w.device)
        self.rows: list[_Row | None] = [None] * max_batch
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
            self._admit()
            tokens = [0] * len(self.rows)
            for i, row in enumerate(self.rows):
                if row is None:
                    continue
                if row.handle.cancelled:
                    self._retire(i, "cancelled")
                    continue
                try:
                    tokens[i] = self._sample(row)
                    self._emit(i, tokens[i])
                except Exception as e:  # this row's failure: the others go on
                    self._fail(i, "sampling", e)
            live = tuple(r is not None for r in self.rows)
            if not any(live):
                return
            try:
                logits, self.cache = decode_step(self.params, torch.tensor(tokens, device=self.device), self.cache,
                                                 self.config, rows=live)
            except Exception as e:  # the shared step: every row it held fails with it
                for i, on in enumerate(live):
                    if on:
                        self._fail(i, "the batched decode step", e)
                return
            for i, on in enumerate(live):
                if on:
                    self.rows[i].logits = logits[i]

    def cancel_all(self, reason: str = "cancelled", error: str | None = None) -> None:
        """Finish every request, waiting or running, with `reason` (and `error`)."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for handle in waiting:
            handle.sink(Done(reason, 0, error=error))
        for i, row in enumerate(self.rows):
            if row is not None:
                self._retire(i, reason, error=error)

    def _admit(self) -> None:
        """Fill the free rows from the queue in order. A request cancelled while waiting, one
        whose prefill fails and one of max_tokens 0 end at once, and their row takes the next
        waiting request in the same step."""
        for i in range(len(self.rows)):
            while self.rows[i] is None:
                with self.lock:
                    if not self.waiting:
                        return
                    handle = self.waiting.popleft()
                if handle.cancelled:
                    handle.sink(Done("cancelled", 0))
                    continue
                try:
                    self._prefill(i, handle)
                except Exception as e:  # this request's failure: its row stays free for the next
                    self.rows[i] = None
                    self.cache = self.cache.with_length(i, 0)
                    handle.sink(Done("error", 0, error=_failure("prefill", e)))

    def _prefill(self, i: int, handle: Handle) -> None:
        request, V = handle.request, self.config.vocab_size
        tokens = torch.tensor([request.prompt], device=self.device)
        logits, row_cache = forward_cached(self.params, tokens, self.cache.with_length(i, 0).row(i), self.config,
                                           last_only=not request.prompt_logprobs)
        self.cache = self.cache.with_length(i, row_cache.lengths[0])
        generator = torch.Generator(device=self.device)
        generator.seed() if request.seed is None else generator.manual_seed(request.seed)
        seen = None
        if request.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(1, V, dtype=torch.bool, device=self.device)
            seen[0, tokens[0]] = True
        if request.prompt_logprobs:
            handle.sink(Prompt(self._prompt_logprobs(logits[0], request)))
        self.rows[i] = _Row(handle, generator, TextStream(request.stop), torch.zeros(V, device=self.device), seen,
                            logits[0, -1])
        if request.max_tokens == 0:
            self._retire(i, "length")

    def _prompt_logprobs(self, logits: torch.Tensor, request: Request) -> list:
        """[(token, log-prob or None, {alt: log-prob} or None)] for each prompt token."""
        logp = F.log_softmax(logits[:-1].float(), dim=-1)  # position t predicts token t + 1
        ids = torch.tensor(request.prompt[1:], device=logp.device, dtype=torch.long)
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
        self.cache = self.cache.with_length(i, 0)
        row.handle.sink(Done(reason, row.produced, text, row.first_token_s, error))


def _failure(stage: str, e: Exception) -> str:
    """One line on a failure: where it happened, the exception and its first line."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{stage} failed: {type(e).__name__}" + (f": {first}" if first else "")


def token_text(token: int) -> str:
    """One token's own text (what OpenAI's logprobs list names it by)."""
    return decode([token])

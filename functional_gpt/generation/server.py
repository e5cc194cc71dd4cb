"""`fgpt serve`: the OpenAI completions API over the continuous-batching `Engine`.

A thin layer: requests are checked (openai_api.py: OpenAI's field names, each field by the
library's own rule), turned into `engine.Request`s (one per prompt and per `n`), and the
engine's events are gathered into OpenAI's response shapes, or streamed as server-sent
events ending in `data: [DONE]`. The engine runs on its own thread; prompts are tokenized
on worker threads, so the event loop keeps answering; each request waits on an asyncio
queue the engine's events are put on.

Every error is OpenAI's object `{"error": {"message", "type", "param", "code"}}`, the
framework's own too (404, 405, 413, a body that is not JSON). A request that fails while
it runs fails alone (engine.py): a non-streamed one gets a 500, a stream ends with an
error event (`data: {"error": {...}}`) before `data: [DONE]`; a stream never ends with a
finish_reason it did not reach.

Log-probs are the model's own (log-softmax of its logits, before penalties, temperature
and filters), as vLLM reports them; a generated `<|endoftext|>` has one like any token.
Choice i of a request with `seed` s draws with seed s + i (as `fgpt generate` does for
sample i).

Chat: GPT-2 has no chat format. /v1/chat/completions renders the messages as plain text,
one "Role: content" paragraph each ("System", "User", "Assistant"), then "Assistant:",
and stops at "\nUser:" (besides the request's own stop strings).

Shutdown: the first SIGTERM or Ctrl-C stops admitting requests (503) and ends every
request in flight at once (a stream with an error event saying so, then [DONE]).
"""

import asyncio
import copy
import json
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..checks import check_int, describe
from ..errors import UserError
from ..model.config import GPTConfig
from ..model.tokenizer import ENDOFTEXT_ID, decode, encode
from .compute_thread import ComputeThread
from .engine import Done, Engine, Prompt, QueueFull, Request, token_text
from .openai_api import (COMMON, GENERATION, ChatBody, ChatChunk, ChatResponse, CompletionBody, CompletionChunk,
                         CompletionResponse, Health, Message, ModelList, error_responses, event_stream)
from .sampling import Sampling

MAX_BODY_BYTES = 4 * 2**20  # far above any prompt that fits a context, far below a memory problem
CHAT_STOP = "\nUser:"


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answer: its status, OpenAI's error object, and any headers it needs (Allow)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def shutting_down() -> APIError:  # a new one each time: a raised exception keeps its traceback
    return APIError(503, "the server is shutting down", None, "shutting_down", "server_error")


class BodyTooLarge(HTTPException):
    """Raised while the body is read, so the app's handler answers it (413)."""

    def __init__(self, size: str):
        super().__init__(413, f"body: {size} is more than the {MAX_BODY_BYTES} bytes this server reads")


class BodyLimit:
    """ASGI middleware: a body over MAX_BODY_BYTES is refused (413) by its Content-Length
    before any of it is kept, else as soon as the bytes received pass the limit (a chunked
    body). uvicorn reads and drops what the client is still sending, so the client reads
    the answer, not a reset connection (tests/test_serve.py sends 20 MiB each way)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
        received = 0

        async def limited():
            nonlocal received
            if int(declared) > MAX_BODY_BYTES:
                raise BodyTooLarge(f"a Content-Length of {int(declared)} bytes")
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise BodyTooLarge(f"a body of at least {received} bytes")
            return message

        await self.app(scope, limited, send)


def _validation_error(request: HTTPRequest, exc: RequestValidationError) -> APIError:
    """pydantic's first complaint as one line naming the field, and what was given."""
    first = exc.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    kind, given = first.get("type"), first.get("input")
    if kind == "json_invalid":
        return APIError(400, f"body: not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))} at "
                             f"character {loc[0] if loc else 0})", None, "invalid_json")
    if not loc and isinstance(given, bytes):  # FastAPI reads a body as JSON only if the type says so
        return APIError(415, f"Content-Type: expected application/json, got "
                             f"{request.headers.get('content-type', 'none')!r}", None, "unsupported_media_type")
    if not loc:
        what = "missing" if kind == "missing" else f"expected a JSON object, got {describe(given)}"
        return APIError(400, f"body: {what}")
    field = ".".join(loc)
    if kind == "checked":
        return APIError(400, first["msg"], loc[0])
    if kind == "extra_forbidden":
        return APIError(400, f"{field}: unknown field", loc[0])
    if kind == "missing":
        return APIError(400, f"{field}: required", loc[0])
    return APIError(400, f"{field}: {first.get('msg')}, got {describe(given)}", loc[0])


def _http_error(request: HTTPRequest, exc: HTTPException) -> APIError:
    """The framework's own errors in OpenAI's shape, saying what was wrong."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return APIError(404, f"{where}: no such endpoint", None, "not_found")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return APIError(405, f"{where}: method not allowed (allowed: {allowed})", None, "method_not_allowed",
                        headers={"Allow": allowed})
    if exc.status_code == 413:
        return APIError(413, exc.detail, None, "body_too_large")
    cause = exc.__cause__  # FastAPI raises its 400 "error parsing the body" from the reason
    if isinstance(cause, UnicodeDecodeError):
        return APIError(400, f"body: not UTF-8 ({cause.reason} at byte {cause.start})", None, "invalid_json")
    if isinstance(cause, RecursionError):
        return APIError(400, "body: JSON nested too deeply", None, "invalid_json")
    if isinstance(cause, ValueError):  # e.g. an integer of more digits than Python reads
        return APIError(400, f"body: not valid JSON ({cause})", None, "invalid_json")
    return APIError(exc.status_code, f"{where}: {exc.detail}", None, None)


# ----------------------------------------------------------------------------- the server


def chat_prompt(messages: list[Message]) -> str:
    """The documented plain-text rendering of a conversation (module doc)."""
    return "".join(f"{m.role.capitalize()}: {m.content}\n\n" for m in messages) + "Assistant:"


def prompts_of(prompts: list, config: GPTConfig, param: str = "prompt") -> list[list[int]]:
    """Checked prompts (strings or id lists) -> token-id lists, each within the vocabulary.
    Slow for long texts: the server calls it on a worker thread."""
    ids = []
    for p in prompts:
        if isinstance(p, str):
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"{param}: not valid Unicode (U+{ord(p[e.start]):04X}, a lone surrogate, at "
                                    f"character {e.start})", param) from None
        tokens = (encode(p) if p else []) if isinstance(p, str) else list(p)
        tokens = tokens or [ENDOFTEXT_ID]
        bad = next((t for t in tokens if t >= config.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is out of range for vocab_size={config.vocab_size}", param)
        ids.append(tokens)
    return ids


class Server:
    """The app's state: the engine, its thread, the model's name, whether it is closing.
    thread: the ComputeThread the engine's loop runs on (the one that loaded the weights;
    default a new one)."""

    def __init__(self, engine: Engine, config: GPTConfig, model_name: str, log=print,
                 thread: ComputeThread | None = None):
        self.engine, self.config, self.model_name, self.log = engine, config, model_name, log
        self.closing = False  # set once by the first signal: no new requests, those in flight end
        self.stopping = threading.Event()  # the engine's loop ends
        self.thread = thread or ComputeThread("fgpt-engine")
        self.loop = None  # the Future of the engine's loop on that thread, once the app starts

    def begin_shutdown(self) -> None:
        """Stop admitting and end what runs (the engine's thread does it within a step)."""
        self.closing = True
        self.engine.wake.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if self.closing:
                self.engine.cancel_all()  # each request reads its "cancelled" as the shutdown
            if self.engine.busy:
                try:
                    self.engine.step()
                except Exception as e:  # a bug in the engine's own bookkeeping: end what runs, keep serving
                    self.log(f"fgpt serve: error in an engine step, its requests ended: {type(e).__name__}: {e}")
                    self.engine.cancel_all("error", f"the engine failed: {type(e).__name__}: {e}")
            else:
                self.engine.wake.wait(0.05)
                self.engine.wake.clear()
        self.engine.cancel_all()

    def check_room(self, prompts: int, n: int) -> None:
        """A request of more completions than the queue can ever hold is a 400, not a 429."""
        if prompts * n > self.engine.max_queue:
            param = "n" if prompts == 1 else "prompt"
            raise APIError(400, f"{param}: {prompts} prompt(s) x n {n} = {prompts * n} completions, more than the "
                                f"server's queue can ever hold (--max_queue {self.engine.max_queue}); send at most "
                                f"{self.engine.max_queue} at once", param, "too_many_completions")

    def requests_for(self, body, prompts: list[list[int]], stops: tuple[str, ...], prompt_logprobs: bool):
        """One engine Request per prompt and per n, or a 400 when a prompt and max_tokens
        overflow the context (OpenAI's wording)."""
        max_tokens, P = body.max_tokens, self.config.n_positions
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                            repetition_penalty=body.repetition_penalty)
        out = []
        for prompt in prompts:
            limit = max_tokens if max_tokens is not None else max(0, P - len(prompt))
            if len(prompt) + limit > P:
                raise APIError(400, f"This model's maximum context length is {P} tokens, however you requested "
                                    f"{len(prompt) + limit} tokens ({len(prompt)} in your prompt; {limit} for the "
                                    f"completion). Please reduce your prompt; or completion length.",
                               "max_tokens", "context_length_exceeded")
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                out.append(Request(tuple(prompt), limit, sampling, seed, stops, getattr(body, "logprobs", None),
                                   prompt_logprobs, body.presence_penalty, body.frequency_penalty))
        return out

    def check_serving(self) -> None:
        """A 503 while the server shuts down or if its engine's loop has stopped."""
        if self.closing:
            raise shutting_down()
        if self.loop is None or self.loop.done():
            raise APIError(503, "the engine has stopped (the server's log says why)", None, None, "server_error")

    def submit_all(self, requests: list[Request]):
        """-> (handles, one asyncio queue of events per request); 503 while closing, 429
        when the queue is full now."""
        self.check_serving()
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in requests]
        handles = []
        try:
            for request, queue in zip(requests, queues):
                handles.append(self.engine.submit(request, lambda e, q=queue: _deliver(loop, q, e)))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            raise APIError(429, f"the server is busy: {e}; try again later", None, "queue_full",
                           "rate_limit_error") from None
        return handles, queues

    def failure(self, done: Done) -> APIError:
        """The error a request that ended without finishing gets."""
        if done.reason == "error":
            return APIError(500, f"the server failed to compute this completion: {done.error}", None,
                            "generation_failed", "server_error")
        return shutting_down() if self.closing else APIError(500, "the completion was cancelled", None, "cancelled",
                                                           "server_error")


def _deliver(loop, queue: asyncio.Queue, event) -> None:
    """Hand an engine event to the event loop (from the engine's thread)."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, event)
    except RuntimeError:  # the loop has closed: the server stopped, nobody waits for the event
        pass


def _logprobs_block(entries, ids: list[int]) -> dict:
    """entries: [(token, log-prob or None, {alt: log-prob} or None)] -> OpenAI's logprobs
    object. ids: the choice's tokens before these (extended with them here), whose text
    gives each token's text_offset."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token, logprob, alts in entries:
        offsets.append(len(decode(ids)))
        ids.append(token)
        tokens.append(token_text(token))
        token_logprobs.append(logprob)
        top.append(None if alts is None else {token_text(a): v for a, v in alts.items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _document(app: FastAPI, config: GPTConfig) -> dict:
    """FastAPI's OpenAPI document of `app`, with the stream chunks' shapes and the model's
    own bounds on token ids and max_tokens."""
    doc = copy.deepcopy(get_openapi(title=app.title, version=app.version, routes=app.routes))  # edited below
    for model in (CompletionChunk, ChatChunk):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        doc["components"]["schemas"] |= schema.pop("$defs", {}) | {model.__name__: schema}
    ids = doc["components"]["schemas"]["CompletionBody"]["properties"]["prompt"]["anyOf"][0]["anyOf"]
    for item in (ids[2]["items"], ids[3]["items"]["items"]):
        item["maximum"] = config.vocab_size - 1
    # the fields that always set the completion's length (chat's max_tokens yields to
    # max_completion_tokens) cannot pass the context
    for body, name in (("CompletionBody", "max_tokens"), ("ChatBody", "max_completion_tokens")):
        doc["components"]["schemas"][body]["properties"][name]["anyOf"][0]["maximum"] = config.n_positions
    return doc


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        if not server.thread.is_alive():
            server.thread.start()
        server.loop = server.thread.submit(server._run)
        yield
        server.stopping.set()
        server.engine.wake.set()
        server.thread.stop(timeout=10)

    app = FastAPI(title="fgpt serve", lifespan=lifespan)
    app.add_middleware(BodyLimit)
    config = server.config

    def openapi() -> dict:  # built once, on first use, as FastAPI's own is
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, config)
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _validation_error(request, exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _http_error(request, exc).response()

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # uvicorn still logs the traceback
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, None, "server_error").response()

    @app.get("/health", response_model=Health, responses=COMMON | error_responses(503))
    async def health():
        server.check_serving()
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList, responses=COMMON)
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "functional-gpt"}]}

    def check_body(body) -> None:
        if body.model is not None and body.model != server.model_name:
            raise APIError(404, f"model: {body.model!r} does not exist; this server has {server.model_name!r}",
                           "model", "model_not_found")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only allowed with \"stream\": true", "stream_options")

    @app.post("/v1/completions", response_model=None,
              responses={200: {"model": CompletionResponse, "content": event_stream(CompletionChunk)}} | GENERATION)
    async def completions(body: CompletionBody, http: HTTPRequest):
        check_body(body)
        server.check_room(len(body.prompt), body.n)
        prompts = await asyncio.to_thread(prompts_of, body.prompt, config)
        requests = server.requests_for(body, prompts, body.stop, body.echo and body.logprobs is not None)
        return await respond(body, http, prompts, requests, chat=False)

    @app.post("/v1/chat/completions", response_model=None,
              responses={200: {"model": ChatResponse, "content": event_stream(ChatChunk)}} | GENERATION)
    async def chat(body: ChatBody, http: HTTPRequest):
        check_body(body)
        server.check_room(1, body.n)
        prompt = (await asyncio.to_thread(prompts_of, [chat_prompt(body.messages)], config, "messages"))[0]
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        body = body.model_copy(update={"max_tokens": limit})
        requests = server.requests_for(body, [prompt], body.stop + (CHAT_STOP,), False)
        return await respond(body, http, [prompt], requests, chat=True)

    async def respond(body, http, prompts, requests, *, chat: bool):
        handles, queues = server.submit_all(requests)
        reply = _Reply(server, body, http, prompts, requests, chat)
        if body.stream:
            return StreamingResponse(reply.events(handles, queues), media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(_collect(q) for q in queues))
        finally:
            for h in handles:
                h.cancel()
        return reply.whole(results)

    return app


async def _collect(queue: asyncio.Queue):
    """-> (the Prompt event or None, [Token], Done) of one request."""
    prompt, tokens = None, []
    while True:
        event = await queue.get()
        if isinstance(event, Done):
            return prompt, tokens, event
        if isinstance(event, Prompt):
            prompt = event
        else:
            tokens.append(event)


class _Reply:
    """One HTTP request's answer in OpenAI's shapes: whole, or as server-sent events."""

    def __init__(self, server: Server, body, http, prompts, requests, chat: bool):
        self.server, self.body, self.http, self.prompts, self.requests, self.chat = \
            server, body, http, prompts, requests, chat
        self.started = time.perf_counter()
        self.ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.echo = getattr(body, "echo", False)
        self.top_wanted = getattr(body, "logprobs", None)
        self.prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, whatever n is (OpenAI's count)

    def log(self, completion_tokens: int, ttft: float, cached: int) -> None:
        elapsed = time.perf_counter() - self.started
        rate = completion_tokens / elapsed if elapsed > 0 else float("nan")
        reused = f", {cached} prompt tokens from the prefix cache" if cached else ""
        self.server.log(f"POST {self.http.url.path}: {len(self.requests)} choice(s), {self.prompt_tokens} prompt + "
                        f"{completion_tokens} new tokens, first token {ttft:.3f} s, {rate:.1f} tok/s{reused}")

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, results) -> dict:
        """The non-streamed answer, or the error of the first choice that failed."""
        failed = next((done for _, _, done in results if done.reason not in ("stop", "length")), None)
        if failed is not None:
            error = self.server.failure(failed)
            self.server.log(f"POST {self.http.url.path}: failed: {error.message}")
            raise error
        choices, completion_tokens = [], 0
        for i, (request, (prompt, tokens, done)) in enumerate(zip(self.requests, results)):
            text = "".join(t.text for t in tokens) + done.text
            completion_tokens += done.new_tokens
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": done.reason, "logprobs": None})
                continue
            logprobs = None
            if self.top_wanted is not None:
                entries = (prompt.logprobs if prompt else []) + [(t.id, t.logprob, t.top) for t in tokens]
                logprobs = _logprobs_block(entries, [])
            full = (decode(list(request.prompt)) if self.echo else "") + text
            choices.append({"text": full, "index": i, "logprobs": logprobs, "finish_reason": done.reason})
        self.log(completion_tokens, min((d.first_token_s for _, _, d in results), default=float("nan")),
                 sum(d.cached_tokens for _, _, d in results))
        return {"id": self.ident, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.server.model_name, "choices": choices,
                "usage": self.usage(completion_tokens)}

    def chunk(self, index: int, text: str, reason=None, logprobs=None) -> str:
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "finish_reason": reason}
        else:
            choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
        return _sse({"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": self.created, "model": self.server.model_name, "choices": [choice]})

    async def events(self, handles, queues):
        """The server-sent events: per choice its pieces, then its finish; a request that
        fails or is cut short ends with an error event instead; then [DONE]."""
        done, completion_tokens, ttft = [False] * len(queues), 0, float("nan")
        ids = [[] for _ in queues]  # each choice's tokens so far, for text_offset
        echo_now = self.echo and not any(r.prompt_logprobs for r in self.requests)  # else with the Prompt event
        pending, failed, cached = {}, False, 0
        try:
            for i, request in enumerate(self.requests):
                if self.chat:
                    yield _sse({"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.server.model_name, "choices": [
                                    {"index": i, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]})
                elif echo_now:
                    yield self.chunk(i, decode(list(request.prompt)))
            pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
            while pending:
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in finished:
                    i, event = pending.pop(fut), fut.result()
                    if isinstance(event, Done):
                        done[i] = True
                        if event.reason not in ("stop", "length"):
                            failed, error = True, self.server.failure(event)
                            self.server.log(f"POST {self.http.url.path}: stream failed: {error.message}")
                            yield _sse(error.body())
                            yield "data: [DONE]\n\n"
                            return
                        ttft = event.first_token_s if ttft != ttft else min(ttft, event.first_token_s)
                        cached += event.cached_tokens
                        yield self.chunk(i, event.text, event.reason)
                        continue
                    if isinstance(event, Prompt):
                        lp = _logprobs_block(event.logprobs, ids[i])
                        yield self.chunk(i, decode(list(self.requests[i].prompt)), logprobs=lp)
                    else:
                        completion_tokens += 1
                        lp = None
                        if self.top_wanted is not None and not self.chat:
                            lp = _logprobs_block([(event.id, event.logprob, event.top)], ids[i])
                        if event.text or lp:
                            yield self.chunk(i, event.text, logprobs=lp)
                    pending[asyncio.ensure_future(queues[i].get())] = i
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield _sse({"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "created": self.created, "model": self.server.model_name, "choices": [],
                            "usage": self.usage(completion_tokens)})
            yield "data: [DONE]\n\n"
            self.log(completion_tokens, ttft, cached)
        finally:
            for fut in pending:
                fut.cancel()
            if not all(done):
                for h in handles:
                    h.cancel()
                self.server.engine.wake.set()
                if not failed:
                    self.server.log(f"POST {self.http.url.path}: the client left after {completion_tokens} new "
                                    f"tokens; its {done.count(False)} row(s) are freed")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a UserError naming --port when something else
    listens there. SO_REUSEADDR, as uvicorn sets it: a port whose last server has gone
    (its connections in TIME_WAIT) is free at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def _http_protocol():
    """uvicorn's HTTP/1.1 protocol (h11, whichever else is installed), its own 400 for a
    request it cannot parse (a bad request line, a header block too large) in OpenAI's
    shape instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(APIError(400, "the request is not valid HTTP/1.1", None, "invalid_http").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


def serve(weights: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          device: str | None = None, quantize: str | None = None, batch_invariant: bool = False,
          prefix_cache_mb: int = 1024, draft: str | None = None, prompt_lookup: int | None = None,
          speculate: int = 4, adapter: str | None = None, err=sys.stderr) -> None:
    """Load the weights (quantized to `quantize`, a scheme, when given), listen (refusing a
    port another server holds), serve until Ctrl-C / SIGTERM, then shut down as the module
    doc says. batch_invariant, prefix_cache_mb: the engine's mode and prefix store; draft
    (weights) or prompt_lookup (n-gram length), speculate (guesses per step): speculative
    decoding (engine.py); adapter: a LoRA adapter directory merged into the weights."""
    import uvicorn

    from ..device import pick_device
    from ..model.checkpoint import load_params
    from ..model.lora_files import with_adapter
    from ..model.quantize import quantize_flag
    from .engine import check_modes, check_sizes
    from .speculative import PromptLookup, proposer_flags

    check_int("--port", port, 0, 65535)
    check_sizes(max_batch, max_queue, flag="--")
    check_int("--prefix_cache_mb", prefix_cache_mb, 0)
    check_int("--speculate", speculate, 1, 64)
    check_modes(batch_invariant, draft is not None or prompt_lookup is not None)
    thread = ComputeThread("fgpt-engine")  # all the torch work, from loading on (compute_thread.py)
    thread.start()

    def load():
        params, config = load_params(weights, device=pick_device(device))
        params = with_adapter(params, adapter)
        proposer = proposer_flags(draft, prompt_lookup, config, device, rows=max_batch)
        engine = Engine(quantize_flag(params, quantize), config, max_batch=max_batch, max_queue=max_queue,
                        batch_invariant=batch_invariant, prefix_cache_mb=prefix_cache_mb, proposer=proposer,
                        speculate=speculate)
        return engine, config

    engine, config = thread.call(load)
    sock = _listen(host, port)
    server = Server(engine, config, model_name=str(weights), log=lambda line: print(line, file=err, flush=True),
                    thread=thread)
    mode = "batch invariant" if batch_invariant else f"busy rows only, prefix cache {prefix_cache_mb} MB"
    if engine.proposer is not None:  # what the engine runs, not what was asked
        mode += (f"; speculative: {engine.speculate} guesses per step from " + (
            f"prompt lookup of {engine.proposer.max_ngram}-grams" if isinstance(engine.proposer, PromptLookup)
            else f"the draft {draft}"))
    print(f"fgpt serve: {weights} on http://{host}:{sock.getsockname()[1]}/v1 (max_batch {max_batch}, max_queue "
          f"{max_queue}; {mode})", file=err, flush=True)

    caught: list[int] = []

    class Uvicorn(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            """uvicorn's, less its re-raise inside the event loop: there asyncio's own
            Ctrl-C handler may see the SIGINT after the loop's task is done and drop it
            (the exit status was then 0, not 130). The signal is acted on below."""
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

        def handle_exit(self, sig, frame):
            caught.append(sig)
            server.begin_shutdown()  # at the first signal, not after uvicorn's graceful wait
            super().handle_exit(sig, frame)

    config_ = uvicorn.Config(create_app(server), http=_http_protocol(), log_level="warning",
                             timeout_graceful_shutdown=2)
    Uvicorn(config_).run(sockets=[sock])
    if caught and caught[-1] == signal.SIGINT:
        raise KeyboardInterrupt  # the command says "interrupted" and exits 130
    if caught:
        signal.raise_signal(caught[-1])  # SIGTERM's own handler: by default the process ends by it

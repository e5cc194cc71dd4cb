"""`fgpt serve`: the OpenAI completions API over the continuous-batching `Engine`.

A thin layer: requests are checked (pydantic models, OpenAI's field names and ranges),
turned into `engine.Request`s (one per prompt and per `n`), and the engine's events are
gathered into OpenAI's response shapes, or streamed as server-sent events ending in
`data: [DONE]`. The engine runs on its own thread; each request waits on an asyncio
queue the engine's events are put on. Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.

Log-probs are the model's own (log-softmax of its logits, before penalties, temperature
and filters), as vLLM reports them. Choice i of a request with `seed` s draws with seed
s + i (as `fgpt generate` does for sample i).

Chat: GPT-2 has no chat format. /v1/chat/completions renders the messages as plain text,
one "Role: content" paragraph each ("System", "User", "Assistant"), then "Assistant:",
and stops at "\nUser:" (besides the request's own stop strings).
"""

import asyncio
import json
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from ..model.config import GPTConfig
from .engine import MAX_LOGPROBS, Done, Engine, QueueFull, Request, Token, token_text
from ..errors import UserError
from .sampling import Sampling
from ..model.tokenizer import ENDOFTEXT_ID, decode, encode

Number = Union[StrictInt, StrictFloat]
CHAT_STOP = "\nUser:"


class GenerationFields(BaseModel):
    """The fields completions and chat share: OpenAI's names and ranges, unknown fields refused."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: dict | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None
    # our extra sampling rules (send them in the openai client's extra_body)
    top_k: StrictInt | None = Field(None, ge=1)
    min_p: Number = Field(0.0, ge=0, lt=1)
    repetition_penalty: Number = Field(1.0, gt=0)


class CompletionBody(GenerationFields):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]] = "<|endoftext|>"
    max_tokens: StrictInt | None = Field(16, ge=0)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=0)
    max_completion_tokens: StrictInt | None = Field(None, ge=0)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status, message, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def chat_prompt(messages: list[Message]) -> str:
    """The documented plain-text rendering of a conversation (module doc)."""
    return "".join(f"{m.role.capitalize()}: {m.content}\n\n" for m in messages) + "Assistant:"


def prompts_of(prompt, config: GPTConfig) -> list[list[int]]:
    """The request's prompt field -> token-id lists (each checked against the vocabulary)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt: empty list", "prompt")
    ids = []
    for p in prompts:
        tokens = (encode(p) if p else []) if isinstance(p, str) else list(p)
        tokens = tokens or [ENDOFTEXT_ID]
        bad = next((t for t in tokens if not 0 <= t < config.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is out of range for vocab_size={config.vocab_size}",
                           "prompt")
        ids.append(tokens)
    return ids


def stops_of(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > 4:
        raise APIError(400, f"stop: at most 4 stop strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop: empty stop string", "stop")
    return stops


class Server:
    """The app's state: the engine, its thread, the model's name."""

    def __init__(self, engine: Engine, config: GPTConfig, model_name: str, log=print):
        self.engine, self.config, self.model_name, self.log = engine, config, model_name, log
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fgpt-engine", daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            if self.engine.busy:
                try:
                    self.engine.step()
                except Exception as e:  # a bug or a device failure: end what runs, keep serving
                    self.log(f"fgpt serve: error in a decode step, its requests ended: {type(e).__name__}: {e}")
                    self.engine.cancel_all(reason="error")
            else:
                self.engine.wake.wait(0.05)
                self.engine.wake.clear()
        self.engine.cancel_all()

    def requests_for(self, body, prompts: list[list[int]], stops, prompt_logprobs: bool) -> list[Request]:
        max_tokens = body.max_tokens
        P = self.config.n_positions
        greedy = body.temperature == 0
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                            repetition_penalty=body.repetition_penalty, greedy=greedy)
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
                                   prompt_logprobs, float(body.presence_penalty), float(body.frequency_penalty)))
        return out

    def submit_all(self, requests: list[Request]):
        """-> (handles, one asyncio queue of events per request)."""
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in requests]
        handles = []
        try:
            for request, queue in zip(requests, queues):
                handles.append(self.engine.submit(request, lambda e, q=queue: loop.call_soon_threadsafe(
                    q.put_nowait, e)))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            raise APIError(429, f"the server is busy: {e}; try again later", None, "queue_full",
                           "rate_limit_error") from None
        return handles, queues


def _logprobs_block(entries, top_wanted: int | None):
    """entries: [(token, log-prob or None, {alt: log-prob} or None)] -> OpenAI's logprobs object."""
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for token, logprob, alts in entries:
        text = token_text(token)
        tokens.append(text)
        token_logprobs.append(logprob)
        top.append(None if alts is None else {token_text(a): v for a, v in alts.items()} if top_wanted else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.thread.start()
        yield
        server.stopping.set()
        server.engine.wake.set()
        server.thread.join(timeout=10)

    app = FastAPI(title="fgpt serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}", None, "invalid_json")
        param = loc[0] if loc else None
        same = [e for e in errors if [str(x) for x in e.get("loc", ()) if x != "body"][:1] == loc[:1]]
        if first.get("type") == "extra_forbidden":
            message = f"{param}: unknown field"
        elif len(same) > 1 or len(loc) > 1 and not loc[1].isdigit():  # a field of several accepted types
            kinds = sorted({str(e["loc"][2]) for e in same if len(e.get("loc", ())) > 2})
            message = f"{param}: {first.get('input')!r} is none of the accepted types ({', '.join(kinds)})"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
        return error_response(400, message, param)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error_response(404, f"{request.method} {request.url.path}: no such endpoint", None, "not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "functional-gpt"}]}

    def check_model(name):
        if name is not None and name != server.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server has {server.model_name!r}", "model",
                           "model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        check_model(body.model)
        prompts = prompts_of(body.prompt, server.config)
        stops = stops_of(body.stop)
        want_prompt_logprobs = body.echo and body.logprobs is not None
        requests = server.requests_for(body, prompts, stops, want_prompt_logprobs)
        return await respond(body, http, prompts, requests, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        check_model(body.model)
        prompt = prompts_of(chat_prompt(body.messages), server.config)[0]
        stops = stops_of(body.stop) + (CHAT_STOP,)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        body = body.model_copy(update={"max_tokens": limit})
        requests = server.requests_for(body, [prompt], stops, False)
        return await respond(body, http, [prompt], requests, chat=True)

    async def respond(body, http, prompts, requests, *, chat: bool):
        started = time.perf_counter()
        handles, queues = server.submit_all(requests)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        echo = getattr(body, "echo", False)
        top_wanted = getattr(body, "logprobs", None)
        per_prompt = body.n

        def log(usage, ttft):
            elapsed = time.perf_counter() - started
            rate = usage["completion_tokens"] / elapsed if elapsed > 0 else float("nan")
            server.log(f"POST {http.url.path}: {len(requests)} choice(s), {usage['prompt_tokens']} prompt + "
                       f"{usage['completion_tokens']} new tokens, first token {ttft:.3f} s, {rate:.1f} tok/s")

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def events():
                done = [False] * len(requests)
                usage = {"prompt_tokens": sum(len(p) for p in prompts) * per_prompt, "completion_tokens": 0}
                ttft = float("nan")
                try:
                    if chat:
                        for i in range(len(requests)):
                            yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                                        "model": server.model_name, "choices": [
                                            {"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
                    if echo and not chat:
                        for i, r in enumerate(requests):
                            yield _sse(_chunk(ident, created, server.model_name, i, decode(list(r.prompt)), None,
                                              None))
                    pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
                    while pending:
                        finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        for fut in finished:
                            i = pending.pop(fut)
                            event = fut.result()
                            if isinstance(event, Token):
                                usage["completion_tokens"] += 1
                                lp = None
                                if top_wanted is not None and not chat:
                                    lp = _logprobs_block([(event.id, event.logprob, event.top)], top_wanted)
                                if event.text or lp:
                                    yield _sse(_chunk(ident, created, server.model_name, i, event.text, None, lp,
                                                      chat))
                                pending[asyncio.ensure_future(queues[i].get())] = i
                            else:
                                done[i] = True
                                ttft = event.first_token_s if ttft != ttft else min(ttft, event.first_token_s)
                                reason = "length" if event.reason == "length" else "stop"
                                yield _sse(_chunk(ident, created, server.model_name, i, event.text, reason, None,
                                                  chat))
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    if include_usage:
                        yield _sse({"id": ident, "object": kind + (".chunk" if chat else ""), "created": created,
                                    "model": server.model_name, "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                    log(usage, ttft)
                finally:
                    if not all(done):
                        for h, d in zip(handles, done):
                            if not d:
                                h.cancel()
                        server.engine.wake.set()
                        server.log(f"POST {http.url.path}: the client left after {usage['completion_tokens']} new "
                                   f"tokens; its {done.count(False)} row(s) are freed")

            return StreamingResponse(events(), media_type="text/event-stream")

        try:
            results = await asyncio.gather(*(_collect(q) for q in queues))
        finally:
            for h in handles:
                h.cancel()
        if any(done.reason == "error" for _, done in results):
            raise APIError(500, "the server failed to compute this completion (its log says why)", None, None,
                           "server_error")
        choices, completion_tokens, ttft = [], 0, float("nan")
        for i, (request, (tokens, done)) in enumerate(zip(requests, results)):
            text = "".join(t.text for t in tokens) + done.text
            completion_tokens += done.new_tokens
            ttft = done.first_token_s if ttft != ttft else min(ttft, done.first_token_s)
            reason = "length" if done.reason == "length" else "stop"
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": reason, "logprobs": None})
                continue
            logprobs = None
            if top_wanted is not None:
                entries = [(t.id, t.logprob, t.top) for t in tokens]
                if echo:
                    entries = [(tok, lp, alts if top_wanted else None) for tok, lp, alts in done.prompt_logprobs] \
                        + entries
                logprobs = _logprobs_block(entries, top_wanted)
            full = (decode(list(request.prompt)) if echo else "") + text
            choices.append({"text": full, "index": i, "logprobs": logprobs, "finish_reason": reason})
        prompt_tokens = sum(len(p) for p in prompts) * per_prompt
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        log(usage, ttft)
        return {"id": ident, "object": kind, "created": created, "model": server.model_name, "choices": choices,
                "usage": usage}

    return app


async def _collect(queue: asyncio.Queue):
    tokens = []
    while True:
        event = await queue.get()
        if isinstance(event, Done):
            return tokens, event
        tokens.append(event)


def _chunk(ident, created, model, index, text, reason, logprobs, chat=False) -> dict:
    if chat:
        delta = {"content": text} if text else {}
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": reason}]}
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}]}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve(weights: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          device: str | None = None, err=sys.stderr) -> None:
    """Load the weights (before binding), check the port is free, serve until Ctrl-C / SIGTERM."""
    import socket

    import uvicorn

    from ..model.checkpoint import load_params
    from ..device import pick_device
    from .engine import check_sizes

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"--port must be an integer in 0..65535, got {port!r}")
    check_sizes(max_batch, max_queue)
    params, config = load_params(weights, device=pick_device(device))
    engine = Engine(params, config, max_batch=max_batch, max_queue=max_queue)
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
    server = Server(engine, config, model_name=str(weights), log=lambda line: print(line, file=err, flush=True))
    print(f"fgpt serve: {weights} on http://{host}:{port}/v1 (max_batch {max_batch}, max_queue {max_queue})",
          file=err, flush=True)
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)

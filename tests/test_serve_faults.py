"""`fgpt serve`'s app on a real uvicorn in this process (a thread, 127.0.0.1, a free
port), so that a test can build the weights it needs and break the engine where it wants:
a generated <|endoftext|> in the log-probs, a failure that belongs to one request, a
failed shared decode step, the error events that end a cut stream. Every request has a
timeout; each server stops at the end of its test."""

import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from functional_gpt import GPTConfig, flatten, forward, init_params, unflatten
from functional_gpt.generation import engine as engine_module
from functional_gpt.generation.engine import Engine
from functional_gpt.generation.server import APIError, Server, create_app
from functional_gpt.model.tokenizer import ENDOFTEXT_ID, decode

from conftest import hf_model, params_of

uvicorn = pytest.importorskip("uvicorn")

CONFIG = GPTConfig(vocab_size=50257, n_positions=128, n_embd=16, n_layer=1, n_head=2)
TIMEOUT = 30
PROMPT = [5, 17, 33, 60, 2]


def eot_params():
    """Weights whose greedy next token is always <|endoftext|>: ln_f outputs its bias, and
    wte[50256] lies along it (as tools/bad_input_census.py's newline fixture)."""
    flat = {k: v.clone() for k, v in flatten(init_params(CONFIG, seed=0)).items()}
    flat["ln_f.weight"].zero_()
    flat["ln_f.bias"].fill_(1.0)
    flat["wte.weight"][ENDOFTEXT_ID] = 0.5
    return unflatten(flat)


TRAINED = params_of(hf_model(CONFIG, seed=4))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(params, *, max_batch=4, max_queue=8, servers=None):
    """-> (port, log lines) of the app serving `params` on a uvicorn thread; stopped after,
    and the engine's thread with it. servers: a list to put the Server in."""
    logs = []
    server = Server(Engine(params, CONFIG, max_batch=max_batch, max_queue=max_queue), CONFIG, "m", log=logs.append)
    if servers is not None:
        servers.append(server)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + TIMEOUT
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield port, logs
    finally:
        uv.should_exit = True
        thread.join(TIMEOUT)
    assert not thread.is_alive() and not server.thread.is_alive(), "the server or its engine's thread still runs"


def post(port: int, body: dict, path="/v1/completions"):
    """-> (status, the JSON reply, or the list of SSE payloads of a stream, "[DONE]" included)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    if reply.getheader("content-type", "").startswith("text/event-stream"):
        events = [line[6:].strip() for line in reply.read().decode().split("\n") if line.startswith("data: ")]
        return reply.status, [e if e == "[DONE]" else json.loads(e) for e in events]
    return reply.status, json.loads(reply.read())


def log_softmax_next(params, tokens) -> torch.Tensor:
    return torch.log_softmax(forward(params, torch.tensor([tokens]), CONFIG)[0, -1].double(), -1)


# --- a generated <|endoftext|> is a token of the log-probs ------------------------------------------


@pytest.fixture(scope="module")
def eot_server():
    with running(eot_params()) as (port, _):
        yield port


def test_a_generated_endoftext_is_in_the_logprobs_as_lm_eval_reads_them(eot_server):
    """echo, max_tokens 1, logprobs 1 on a 5-token prompt: 6 entries (the prompt's and the
    <|endoftext|>'s), so lm-eval's token_logprobs[ctxlen:-1] is the continuation's."""
    status, reply = post(eot_server, {"prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1,
                                      "temperature": 0})
    choice = reply["choices"][0]
    lp = choice["logprobs"]
    assert status == 200 and len(lp["token_logprobs"]) == len(lp["tokens"]) == 6
    assert lp["tokens"][-1] == "<|endoftext|>" and choice["text"] == decode(PROMPT)  # it adds no text
    assert choice["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == 1
    expected = float(log_softmax_next(eot_params(), PROMPT)[ENDOFTEXT_ID])
    assert lp["token_logprobs"][-1] == pytest.approx(expected, abs=1e-5)
    assert lp["text_offset"][-1] == len(decode(PROMPT))
    ctxlen = 3  # lm-eval's slice is the continuation PROMPT[3:], each token given those before
    want = [float(log_softmax_next(eot_params(), PROMPT[:t])[PROMPT[t]]) for t in (3, 4)]
    assert lp["token_logprobs"][ctxlen:-1] == pytest.approx(want, abs=1e-4)


def test_a_streamed_endoftext_has_its_logprobs_and_is_counted(eot_server):
    status, events = post(eot_server, {"prompt": PROMPT, "max_tokens": 5, "logprobs": 0, "temperature": 0,
                                       "stream": True, "stream_options": {"include_usage": True}})
    chunks = [e for e in events[:-1] if e["choices"]]
    assert status == 200 and events[-1] == "[DONE]"
    assert [c["choices"][0]["logprobs"]["tokens"] for c in chunks[:-1]] == [["<|endoftext|>"]]
    assert chunks[0]["choices"][0]["text"] == "" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == 1


def test_a_streamed_echo_carries_the_prompts_logprobs_with_running_offsets(eot_server):
    """The same log-probs and text_offsets, streamed and whole."""
    body = {"prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0}
    whole = post(eot_server, body)[1]["choices"][0]["logprobs"]
    events = post(eot_server, body | {"stream": True})[1]
    streamed = {k: [] for k in whole}
    for e in events[:-1]:
        for k in streamed:
            streamed[k] += (e["choices"][0]["logprobs"] or {}).get(k, [])
    assert streamed == whole and len(whole["tokens"]) == 6


# --- a failure belongs to its request -----------------------------------------------------------


def fail_when(monkeypatch, name: str, broken):
    """Replace engine.<name> by a version that raises RuntimeError("injected") when
    broken(*args, **kwargs) is true, and calls the real one otherwise."""
    real = getattr(engine_module, name)

    def maybe(*args, **kwargs):
        if broken(*args, **kwargs):
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, name, maybe)


LONG = {"prompt": [1, 2, 3], "max_tokens": 120, "temperature": 0.8, "seed": 1, "stream": True}


def stream_text(events) -> str:
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))


def test_one_streams_failing_sampling_ends_it_alone_with_an_error_event(monkeypatch):
    """top_k 7 marks the request whose sampling breaks (as repetition_penalty 1e-300 broke
    before it was refused): it ends with an error event then [DONE], never a
    finish_reason; the stream beside it runs to its length with the text it has alone."""
    fail_when(monkeypatch, "sample", lambda logits, sampling, *rest, **kw: sampling.top_k == 7)
    with running(TRAINED) as (port, logs):
        alone = post(port, LONG)[1]
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(post, port, LONG)
            bad = pool.submit(post, port, LONG | {"top_k": 7})
            (_, good), (status, bad) = good.result(TIMEOUT), bad.result(TIMEOUT)
    assert stream_text(good) == stream_text(alone) and len(stream_text(alone)) > 300
    assert good[-2]["choices"][0]["finish_reason"] == "length"
    assert status == 200 and bad[-1] == "[DONE]" and all(
        c["finish_reason"] is None for e in bad[:-2] for c in e["choices"])
    assert bad[-2]["error"] == {"message": "the server failed to compute this completion: sampling failed: "
                                           "RuntimeError: injected", "type": "server_error", "param": None,
                                "code": "generation_failed"}
    assert any("stream failed: the server failed" in line for line in logs)
    assert not any("the client left" in line for line in logs), logs  # it did not: the stream failed


def test_a_failing_prefill_is_a_500_for_its_request_alone(monkeypatch):
    fail_when(monkeypatch, "forward_cached", lambda params, tokens, *rest, **kw: int(tokens[0, 0]) == 4242)
    with running(TRAINED) as (port, logs):
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(post, port, LONG | {"stream": False})
            bad = pool.submit(post, port, {"prompt": [4242, 1], "max_tokens": 5})
            (status, good), (bad_status, bad) = good.result(TIMEOUT), bad.result(TIMEOUT)
        again = post(port, {"prompt": [1, 2], "max_tokens": 3})[0]
    assert status == 200 and good["choices"][0]["finish_reason"] == "length"
    assert bad_status == 500 and bad["error"]["type"] == "server_error" and \
        "prefill failed: RuntimeError: injected" in bad["error"]["message"]
    assert f"POST /v1/completions: failed: {bad['error']['message']}" in logs
    assert again == 200


def test_a_failing_shared_decode_step_ends_every_stream_it_held_with_an_error(monkeypatch):
    """Only a failure of the batched step itself ends all its rows, each with an error
    event; the next request is served."""
    fail_when(monkeypatch, "decode_step", lambda *args, rows, **kw: sum(rows) == 2)  # once both streams run
    with running(TRAINED) as (port, _):
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda s: post(port, LONG | {"seed": s}), (1, 2)))
        after = post(port, LONG | {"stream": False})
    for _, events in results:
        assert events[-1] == "[DONE]" and "the batched decode step failed: RuntimeError: injected" in \
            events[-2]["error"]["message"]
    assert after[0] == 200 and after[1]["choices"][0]["finish_reason"] == "length"


def test_a_bug_in_an_engine_step_ends_what_runs_and_the_server_goes_on(monkeypatch):
    """An exception out of Engine.step itself (not one request's): the stream it held ends
    with an error event naming it, the log says so in one line, the next request is served."""
    real, calls = Engine.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("bookkeeping")
        return real(self)

    monkeypatch.setattr(Engine, "step", step)
    with running(TRAINED) as (port, logs):
        status, events = post(port, LONG)
        after = post(port, LONG | {"stream": False})
    assert status == 200 and events[-2:] == [{"error": {
        "message": "the server failed to compute this completion: the engine failed: KeyError: 'bookkeeping'",
        "type": "server_error", "param": None, "code": "generation_failed"}}, "[DONE]"]
    assert "fgpt serve: error in an engine step, its requests ended: KeyError: 'bookkeeping'" in logs
    assert after[0] == 200 and after[1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_each_answer_is_logged_in_one_line_with_its_counts_and_rate(stream):
    """n 2 counts the prompt once; the rate is the new tokens over the request's own time,
    which lies inside the client's."""
    with running(TRAINED) as (port, logs):
        t0 = time.perf_counter()
        _, reply = post(port, {"prompt": [1, 2, 3], "max_tokens": 5, "n": 2, "stream": stream,
                               "stream_options": {"include_usage": True} if stream else None})
        took = time.perf_counter() - t0
    new = (reply[-2] if stream else reply)["usage"]["completion_tokens"]
    line = [line for line in logs if line.startswith("POST /v1/completions: ")]
    assert len(line) == 1, logs
    got = re.fullmatch(rf"POST /v1/completions: 2 choice\(s\), 3 prompt \+ {new} new tokens, first token "
                       r"(\d+\.\d{3}) s, (\d+\.\d) tok/s, 2 prompt tokens from the prefix cache", line[0])
    assert got and float(got[1]) <= took and new / took <= float(got[2]) + 0.05, line


def test_the_engine_runs_on_a_daemon_thread_named_for_it():
    """Named for a thread dump (py-spy, faulthandler); a daemon, so a server that was never
    shut down cleanly does not keep its process alive."""
    server = Server(Engine(TRAINED, CONFIG, max_batch=1), CONFIG, "m")
    assert server.thread.name == "fgpt-engine" and server.thread.daemon is True


def test_an_idle_engine_looks_for_work_every_50_ms_even_unwoken(monkeypatch):
    """A wake-up can be lost (set between the thread's wait and its clear): here every one
    is, and each request, sent 0.2 s after the last answer, is still answered at once."""
    class Deaf(threading.Event):
        def set(self):
            pass

    real_init = Engine.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.wake = Deaf()

    monkeypatch.setattr(Engine, "__init__", init)
    with running(TRAINED) as (port, _):
        took = []
        for _ in range(3):
            time.sleep(0.2)
            t0 = time.perf_counter()
            assert post(port, {"prompt": [1], "max_tokens": 1})[0] == 200
            took.append(time.perf_counter() - t0)
    assert max(took) < 0.6, took


def test_an_unexpected_exception_is_a_500_in_openai_shape(monkeypatch):
    """A bug anywhere in a handler still answers with OpenAI's error object."""
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Server, "requests_for", broken)
    with running(TRAINED) as (port, _):
        status, reply = post(port, {"prompt": [1], "max_tokens": 2})
    assert status == 500 and reply == {"error": {"message": "internal error: RuntimeError: a bug",
                                                 "type": "server_error", "param": None, "code": None}}


def test_an_api_error_is_an_exception_that_says_its_message():
    """Caught from prompts_of or check_room by a Python caller, it reads as the answer does."""
    error = APIError(400, "prompt: token id 50257 is out of range for vocab_size=50257", "prompt")
    assert str(error) == error.message == "prompt: token id 50257 is out of range for vocab_size=50257"
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error", "param": "prompt",
                                      "code": None}} and error.status == 400 and error.headers is None


def test_any_other_framework_error_keeps_its_status_and_says_where():
    """FastAPI's 400 for a body it could not read for a reason that is not the JSON's (the
    client gone mid-body: ClientDisconnect), or any other status the framework raises."""
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request

    from functional_gpt.generation.server import _http_error

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
                       "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 80)})
    unread = HTTPException(400, "There was an error parsing the body")
    unread.__cause__ = ClientDisconnect()
    for exc, status, message in [(unread, 400, "POST /v1/completions: There was an error parsing the body"),
                                 (HTTPException(503, "busy"), 503, "POST /v1/completions: busy")]:
        error = _http_error(request, exc)
        assert (error.status, error.body()) == (status, {"error": {
            "message": message, "type": "invalid_request_error", "param": None, "code": None}})


# --- every streamed event has OpenAI's shape ------------------------------------------------------


def _shape_of(events, obj: str) -> tuple[str, int]:
    """Every event but [DONE] is {id, object, created, model, choices[, usage]} with one id and
    created for the stream, `obj` and the model's name -> (id, created)."""
    assert events[-1] == "[DONE]"
    heads = {(e["id"], e["object"], e["created"], e["model"]) for e in events[:-1]}
    assert len(heads) == 1, heads
    ident, object_, created, model = heads.pop()
    assert object_ == obj and model == "m" and isinstance(created, int) and abs(created - time.time()) < 60
    return ident, created


def test_every_streamed_completion_event_has_openais_shape_and_says_the_whole_answer():
    """n 2, echo, usage: per choice its echoed prompt first, then its tokens, then one finish
    of its own index; the usage event last, counting every choice's tokens; each choice's
    text the whole answer's."""
    body = {"prompt": PROMPT, "max_tokens": 6, "n": 2, "echo": True, "temperature": 0.9, "seed": 3}
    with running(TRAINED) as (port, _):
        whole = post(port, body)[1]
        status, events = post(port, body | {"stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    ident, _ = _shape_of(events, "text_completion")
    assert ident.startswith("cmpl-") and all(set(e) == {"id", "object", "created", "model", "choices"}
                                             for e in events[:-2])
    assert set(events[-2]) == {"id", "object", "created", "model", "choices", "usage"} and events[-2]["choices"] == []
    assert events[-2]["usage"] == whole["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    choices = [e["choices"][0] for e in events[:-2]]
    assert all(len(e["choices"]) == 1 and set(c) == {"text", "index", "logprobs", "finish_reason"} and
               c["logprobs"] is None for e, c in zip(events[:-2], choices))
    assert [c["text"] for c in choices[:2]] == [decode(PROMPT)] * 2 and [c["index"] for c in choices[:2]] == [0, 1]
    for i in range(2):
        mine = [c for c in choices if c["index"] == i]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
        assert "".join(c["text"] for c in mine) == whole["choices"][i]["text"]


def test_every_streamed_chat_event_has_openais_shape():
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with running(TRAINED) as (port, _):
        status, events = post(port, body, "/v1/chat/completions")
    assert status == 200
    ident, _ = _shape_of(events, "chat.completion.chunk")
    assert ident.startswith("chatcmpl-")
    assert events[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert all(set(e["choices"][0]) == {"index", "delta", "finish_reason"} and e["choices"][0]["index"] == 0
               for e in events[1:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length" and events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 4


def test_a_streamed_echo_with_logprobs_gives_each_choice_its_prompt_first():
    body = {"prompt": PROMPT, "max_tokens": 2, "n": 2, "echo": True, "logprobs": 1, "temperature": 0.9, "seed": 3,
            "stream": True}
    with running(TRAINED) as (port, _):
        events = post(port, body)[1]
    prompts = [e["choices"][0] for e in events[:-1] if e["choices"][0]["text"] == decode(PROMPT)]
    assert [c["index"] for c in prompts] == [0, 1] and all(len(c["logprobs"]["tokens"]) == 5 for c in prompts)


def test_the_wrong_model_and_stream_options_without_a_stream_are_answered_whole():
    with running(TRAINED) as (port, _):
        wrong = post(port, {"model": "nope", "prompt": "a", "max_tokens": 1})
        unstreamed = post(port, {"prompt": "a", "max_tokens": 1, "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("GET", "/openapi.json")
        title = json.loads(conn.getresponse().read())["info"]["title"]
    assert wrong == (404, {"error": {"message": "model: 'nope' does not exist; this server has 'm'",
                                     "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
    assert unstreamed == (400, {"error": {"message": 'stream_options: only allowed with "stream": true',
                                          "type": "invalid_request_error", "param": "stream_options", "code": None}})
    assert title == "fgpt serve"


def test_a_client_that_leaves_is_logged_with_its_tokens_and_freed_rows():
    with running(TRAINED) as (port, logs):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("POST", "/v1/completions", json.dumps(LONG), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        while b"data:" not in reply.fp.readline():
            pass
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.time() + TIMEOUT
        while not any("the client left" in line for line in logs):
            assert time.time() < deadline, logs
            time.sleep(0.05)
    left = [line for line in logs if "the client left" in line]
    assert len(left) == 1 and re.fullmatch(r"POST /v1/completions: the client left after \d+ new tokens; its 1 "
                                           r"row\(s\) are freed", left[0]), left


def test_a_stream_of_two_choices_failing_is_not_logged_as_a_client_leaving(monkeypatch):
    fail_when(monkeypatch, "sample", lambda logits, sampling, *rest, **kw: sampling.top_k == 7)
    with running(TRAINED) as (port, logs):
        events = post(port, LONG | {"top_k": 7, "n": 2})[1]
    assert "error" in events[-2] and any("stream failed" in line for line in logs)
    assert not any("the client left" in line for line in logs), logs


def test_the_logged_first_token_time_is_the_earliest_choices(monkeypatch):
    """With n 3 the log line's first-token time is the smallest of the choices' own."""
    from functional_gpt.generation import server as server_module
    from functional_gpt.generation.engine import Done

    firsts, real = [], server_module._deliver

    def record(loop, queue, event):
        if isinstance(event, Done):
            firsts.append(event.first_token_s)
        real(loop, queue, event)

    monkeypatch.setattr(server_module, "_deliver", record)
    with running(TRAINED, max_batch=1) as (port, logs):  # one row: the choices' first tokens come one by one
        post(port, {"prompt": PROMPT, "max_tokens": 3, "n": 3, "seed": 1, "stream": True})
    line = next(line for line in logs if "choice(s)" in line)
    assert len(firsts) == 3 and len(set(firsts)) == 3
    assert f"first token {min(firsts):.3f} s" in line, (line, firsts)


def test_each_choice_of_n_draws_with_its_own_seed():
    """Choice j of a request with seed s draws what a request of seed s + j draws."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 10}
    with running(TRAINED) as (port, _):
        three = [c["text"] for c in post(port, body | {"n": 3})[1]["choices"]]
        alone = [post(port, body | {"seed": 10 + j})[1]["choices"][0]["text"] for j in range(3)]
    assert three == alone and len(set(three)) == 3


def test_presence_and_frequency_penalties_each_reach_the_engine():
    """Greedy, long enough to repeat: each penalty alone changes the text."""
    body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0}
    with running(TRAINED) as (port, _):
        texts = [post(port, body | extra)[1]["choices"][0]["text"] for extra in
                 ({}, {"presence_penalty": 1.5}, {"frequency_penalty": 0.5})]
    plain, presence, frequency = texts
    assert presence != plain and frequency != plain, texts


def test_a_request_after_the_engine_stopped_is_a_503_saying_so():
    servers = []
    with running(TRAINED, servers=servers) as (port, _):
        servers[0].stopping.set()
        servers[0].loop.result(TIMEOUT)
        answer = post(port, {"prompt": PROMPT, "max_tokens": 2})
    assert answer == (503, {"error": {"message": "the engine has stopped (the server's log says why)",
                                      "type": "server_error", "param": None, "code": None}})


def test_a_stream_in_flight_when_the_engine_stops_ends_cancelled():
    """Not a shutdown and not a failure: the engine's thread ended (the app stopping), so a
    stream ends with the "cancelled" error event, then [DONE], and a whole answer is that 500."""
    servers = []
    with running(TRAINED, servers=servers) as (port, _):
        with ThreadPoolExecutor(2) as pool:
            stream = pool.submit(post, port, LONG)
            whole = pool.submit(post, port, LONG | {"stream": False})
            deadline = time.time() + TIMEOUT
            while sum(row is not None for row in servers[0].engine.rows) < 2:  # both in their rows
                assert time.time() < deadline
                time.sleep(0.01)
            servers[0].stopping.set()
            (status, events), (whole_status, answer) = stream.result(TIMEOUT), whole.result(TIMEOUT)
    cancelled = {"error": {"message": "the completion was cancelled", "type": "server_error", "param": None,
                           "code": "cancelled"}}
    assert status == 200 and events[-1] == "[DONE]" and events[-2] == cancelled
    assert (whole_status, answer) == (500, cancelled)


def test_a_full_queue_is_a_429_saying_so(monkeypatch):
    """One row, a queue of one: a third request while two are held (each token slowed to
    20 ms) is refused whole."""
    real = engine_module.sample
    monkeypatch.setattr(engine_module, "sample", lambda *args, **kwargs: (time.sleep(0.02), real(*args, **kwargs))[1])
    servers = []
    with running(TRAINED, max_batch=1, max_queue=1, servers=servers) as (port, _):
        engine = servers[0].engine
        deadline = time.time() + TIMEOUT

        def until(condition):
            while not condition():
                assert time.time() < deadline
                time.sleep(0.005)

        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, port, LONG | {"stream": False})]
            until(lambda: engine.busy and not engine.waiting)  # the first in the row
            held.append(pool.submit(post, port, LONG | {"stream": False}))
            until(lambda: len(engine.waiting) == 1)  # the second waiting
            status, answer = post(port, {"prompt": PROMPT, "max_tokens": 1})
            assert [h.result(TIMEOUT)[0] for h in held] == [200, 200]
    assert status == 429 and set(answer) == {"error"}
    error = answer["error"]
    assert (error["type"], error["param"], error["code"]) == ("rate_limit_error", None, "queue_full")
    assert error["message"] == "the server is busy: 1 requests are waiting (--max_queue 1); try again later"


def test_each_choice_streams_as_it_comes_not_in_step_with_the_others():
    """One row, n 2: the second choice starts when the first is done, and the first's
    tokens are sent as they come, not held back until the second has tokens too."""
    with running(TRAINED, max_batch=1) as (port, _):
        events = post(port, {"prompt": PROMPT, "max_tokens": 5, "n": 2, "seed": 1, "stream": True})[1]
    order = [e["choices"][0]["index"] for e in events[:-1]]
    assert order == [0] * 6 + [1] * 6, order  # five tokens, then the finish

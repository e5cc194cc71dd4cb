"""Server census (maintainers): send a hundred-odd hostile and edge-case HTTP requests to
one `fgpt serve` and classify what each one gets.

    python tools/census_server.py [--only SUBSTRING] [--all]

One server process (a tiny random model whose <|endoftext|> row is scaled up, so that
some prompts' greedy next token is <|endoftext|>) on a free 127.0.0.1 port; bodies,
fields, types, ranges, combinations, streams, methods, headers, sizes, clients that leave
mid-stream, concurrent requests of which one fails. Expected answers are computed here
with the library on the same weights. Classes:

- clean: a 4xx with OpenAI's error object, whose message (one line) names the culprit
  (an expected substring) and whose param is the field, when one is due;
- correct: a 2xx with the right answer (a check on it);
- 5xx: any 5xx, or an answer that is no HTTP response at all;
- wrong: a 2xx where an error was due, an error not naming the culprit or not in OpenAI's
  shape, a wrong answer or shape;
- dead: /health stopped answering after the case (the server is restarted for the rest).

Prints the rows that are neither clean nor correct (every row with --all) and the totals;
exits 1 unless every case is clean or correct. Every request has a timeout; the server is
stopped on the way out. About a minute on 2 cores.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import functional_gpt as fg
from bad_input_census import arguments, report
from functional_gpt.generation import Sampling, stream_text
from functional_gpt.model.tokenizer import ENDOFTEXT_ID, decode, encode

CLASSES = ("clean", "correct", "5xx", "wrong", "dead")
CONFIG = fg.GPTConfig(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)
MAX_BATCH, MAX_QUEUE = 4, 8
TIMEOUT = 20
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the server and its weights


def census_params():
    """init_params with the <|endoftext|> row 4 times larger: about 2% of prompts then
    have it as their greedy next token."""
    flat = {k: v.clone() for k, v in fg.flatten(fg.init_params(CONFIG, seed=0)).items()}
    flat["wte.weight"][ENDOFTEXT_ID] *= 4
    return fg.unflatten(flat)


def eot_prompt(params) -> list[int]:
    """A 3-token prompt whose greedy next token is <|endoftext|>."""
    tokens = torch.randint(50000, (1000, 3), generator=torch.Generator().manual_seed(0))
    hits = (fg.forward(params, tokens, CONFIG)[:, -1].argmax(-1) == ENDOFTEXT_ID).nonzero()
    assert len(hits), "no prompt of the census model ends at <|endoftext|>"
    return tokens[int(hits[0, 0])].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `fgpt serve` process: start(), alive(), stop(); its stderr in a file."""

    def __init__(self, weights: Path):
        self.weights, self.port, self.proc = weights, free_port(), None
        self.log = tempfile.TemporaryFile("w+")

    def start(self) -> None:
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "functional_gpt", "serve", "--weights", str(self.weights),
                                      "--port", str(self.port), "--max_batch", str(MAX_BATCH), "--max_queue",
                                      str(MAX_QUEUE)], stdout=subprocess.DEVNULL, stderr=self.log,
                                     start_new_session=True, env=env)
        deadline = time.time() + 60
        while not self.alive():
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"fgpt serve did not start: {self.stderr()[-2000:]}")
            time.sleep(0.1)

    def alive(self) -> bool:
        try:
            return call(self.port, "GET", "/health", timeout=5).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


# ----------------------------------------------------------------------------- requests


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)

    def events(self) -> list:
        """The payloads of a server-sent event stream ("[DONE]" as a string)."""
        lines = [line[6:] for line in self.body.decode().split("\n") if line.startswith("data: ")]
        return [e if e == "[DONE]" else json.loads(e) for e in lines]


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = TIMEOUT, chunked: bool = False) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, headers or {}, encode_chunked=chunked)
        reply = conn.getresponse()
        return Reply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()


JSON = {"Content-Type": "application/json"}


def post(body, path="/v1/completions", headers=None, method="POST"):
    """A sender of one request: a dict is sent as JSON, bytes as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return lambda port: call(port, method, path, data, JSON if headers is None else headers)


def raw_bytes(data: bytes):
    """A sender of bytes that need not be HTTP at all -> the reply, parsed."""
    def send(port):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(data)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        return Reply(int(lines[0].split()[1]), headers, body)
    return send


# ----------------------------------------------------------------------------- expectations


@dataclass
class Case:
    name: str
    send: Callable  # port -> Reply
    expect: Callable  # Reply -> (class, message)
    group: str = ""


@dataclass
class Result:
    case: Case
    cls: str
    message: str
    seconds: float = 0.0


def error_of(reply: Reply):
    """OpenAI's error object of a reply, or None when the body is not exactly one."""
    try:
        body = reply.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return None
    error = body["error"]
    if set(error) != {"message", "type", "param", "code"} or not isinstance(error["message"], str):
        return None
    return error


def E(status: int, culprit: str, param: str | None | type(...) = ...):
    """An error is due: this status, a one-line message naming `culprit`, this param."""
    def expect(reply: Reply):
        if reply.status >= 500:
            return "5xx", f"{reply.status}: {reply.body[:150]!r}"
        error = error_of(reply)
        if reply.status < 400 or error is None:
            return "wrong", f"{reply.status}, not OpenAI's error object: {reply.body[:150]!r}"
        if reply.status != status:
            return "wrong", f"status {reply.status}, expected {status}: {error['message']}"
        if culprit.lower() not in error["message"].lower() or "\n" in error["message"]:
            return "wrong", f"does not name {culprit!r}: {error['message']}"
        if param is not ... and error["param"] != param:
            return "wrong", f"param {error['param']!r}, expected {param!r}: {error['message']}"
        return "clean", error["message"]
    return expect


def OK(check: Callable | None = None, status: int = 200):
    """Success is due, and check(reply) says None (right) or what is wrong."""
    def expect(reply: Reply):
        if reply.status >= 500:
            return "5xx", f"{reply.status}: {reply.body[:150]!r}"
        if reply.status != status:
            return "wrong", f"{reply.status}: {reply.body[:200]!r}"
        try:
            why = check(reply) if check else None
        except Exception as e:  # noqa: BLE001 - a malformed answer is a wrong answer
            why = f"{type(e).__name__}: {e}"
        return ("wrong", why) if why else ("correct", "")
    return expect


def EITHER(error_expect, ok_expect):
    """Either answer is right (e.g. a 200 or a 429 when the queue is full now)."""
    def expect(reply: Reply):
        cls, message = ok_expect(reply)
        return (cls, message) if cls == "correct" else error_expect(reply)
    return expect


def choices(reply: Reply) -> list:
    return reply.json()["choices"]


def text_is(expected: str):
    return lambda r: None if choices(r)[0]["text"] == expected else f"text {choices(r)[0]['text']!r}, " \
                                                                     f"expected {expected!r}"


def stream_ok(expect_text: str | None = None, n: int = 1, usage: bool = False):
    """A well-formed stream: chunks, each choice's finish, [DONE] last; the text joined."""
    def check(r: Reply):
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            return f"content type {r.headers.get('content-type')}"
        events = r.events()
        if events[-1] != "[DONE]":
            return f"last event {events[-1]!r}"
        if any("error" in e for e in events[:-1]):
            return f"an error event: {events[-2]}"
        chunks = [e for e in events[:-1] if e["choices"]]
        finished = [c["index"] for e in chunks for c in e["choices"] if c["finish_reason"]]
        if sorted(finished) != list(range(n)):
            return f"finished choices {finished}, expected {n}"
        text = "".join(c.get("text", c.get("delta", {}).get("content", "")) or "" for e in chunks
                       for c in e["choices"] if c["index"] == 0)
        if expect_text is not None and text != expect_text:
            return f"streamed {text!r}, expected {expect_text!r}"
        if usage and "usage" not in events[-2]:
            return "no usage chunk"
        return None
    return check


# ----------------------------------------------------------------------------- the cases


def cases(params, model_name: str) -> list[Case]:
    out = []
    group = ""

    def add(name, send, expect):
        out.append(Case(name, send, expect, group))

    def greedy(ids, n, stop=()):
        return "".join(stream_text(params, ids, CONFIG, max_new_tokens=n, sampling=Sampling(greedy=True),
                                   stop=stop))

    P = [5, 17, 33, 60, 2]
    G = {"prompt": P, "max_tokens": 6, "temperature": 0}
    want = greedy(P, 6)

    group = "bodies"
    add("truncated JSON", post(b'{"prompt": "a", "max_tokens": '), E(400, "not valid JSON", None))
    add("trailing comma", post(b'{"prompt": "a",}'), E(400, "not valid JSON", None))
    add("single quotes", post(b"{'prompt': 'a'}"), E(400, "not valid JSON", None))
    add("empty body", post(b""), E(400, "body", None))
    add("whitespace body", post(b"   "), E(400, "not valid JSON", None))
    add("null body", post(b"null"), E(400, "expected a JSON object", None))
    add("array body", post(b"[1, 2]"), E(400, "expected a JSON object", None))
    add("number body", post(b"42"), E(400, "expected a JSON object", None))
    add("string body", post(b'"prompt"'), E(400, "expected a JSON object", None))
    add("100,000-deep body", post(b"[" * 100_000 + b"]" * 100_000), E(400, "nested too deeply", None))
    add("500-deep prompt", post(b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}"), E(400, "prompt", "prompt"))
    add("5000-digit integer", post(b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}"),
        E(400, "not valid JSON", None))
    add("not UTF-8", post(b'{"prompt": "caf\xe9"}'), E(400, "not UTF-8", None))
    add("UTF-16 JSON (json reads it)", post(json.dumps(G).encode("utf-16")), OK(text_is(want)))
    add("UTF-8 with a BOM", post(b"\xef\xbb\xbf" + json.dumps(G).encode()), OK(text_is(want)))
    add("a key twice (the last wins)", post(b'{"prompt": [5, 17, 33, 60, 2], "temperature": 0, "max_tokens": 1, '
                                            b'"max_tokens": 6}'), OK(text_is(want)))
    add("NaN temperature", post(b'{"prompt": "a", "temperature": NaN}'), E(400, "temperature", "temperature"))
    add("Infinity repetition_penalty", post(b'{"prompt": "a", "repetition_penalty": Infinity}'),
        E(400, "repetition_penalty", "repetition_penalty"))
    add("-Infinity presence_penalty", post(b'{"prompt": "a", "presence_penalty": -Infinity}'),
        E(400, "presence_penalty", "presence_penalty"))
    add("1e400 top_p (inf)", post(b'{"prompt": "a", "top_p": 1e400}'), E(400, "top_p", "top_p"))

    group = "fields"
    bad = {
        "temperature": [-0.1, 2.5, 1e-30, "hot", True, [1]],
        "top_p": [0, 1.5, -1, "x"],
        "top_k": [0, -1, 2.5, "5", True],
        "min_p": [1, -0.1, "x"],
        "repetition_penalty": [0, -1, 1e-300, 1e7],
        "presence_penalty": [2.5, -3, "x"],
        "frequency_penalty": [2.01],
        "n": [0, 17, 2.0, "2", True],
        "max_tokens": [-1, 1.5, "10", 65],
        "logprobs": [-1, 6, 2.5, True],
        "seed": [-1, 2**63, 1.5, "1"],
        "stop": ["", [""], ["a"] * 5, [1], {}],
        "echo": ["yes", 1],
        "stream": ["yes"],
        "model": [5],
        "user": [5],
    }
    for name, values in bad.items():
        for value in values:
            culprit = "maximum context length" if (name, value) == ("max_tokens", 65) else name
            add(f"{name} {json.dumps(value)[:30]}", post({"prompt": P, name: value}), E(400, culprit, name))
    for name in ("best_of", "logit_bias", "suffix"):
        add(f"unknown field {name}", post({"prompt": P, name: 1}), E(400, f"{name}: unknown field", name))
    add("model another", post({"prompt": P, "model": "gpt-4"}), E(404, "does not exist", "model"))
    add("stream_options without stream", post(G | {"stream_options": {"include_usage": True}}),
        E(400, "stream_options", "stream_options"))
    add("stream_options include_usage 'yes'", post(G | {"stream": True, "stream_options": {"include_usage": "yes"}}),
        E(400, "stream_options.include_usage", "stream_options"))
    add("stream_options unknown key", post(G | {"stream": True, "stream_options": {"x": 1}}),
        E(400, "stream_options.x: unknown field", "stream_options"))
    add("n 16 > --max_queue 8", post({"prompt": P, "n": 16}), E(400, "--max_queue 8", "n"))
    add("9 prompts > --max_queue 8", post({"prompt": [[1]] * 9}), E(400, "--max_queue 8", "prompt"))
    add("1000 prompts", post({"prompt": ["a"] * 1000}), E(400, "--max_queue 8", "prompt"))
    for name, prompt, culprit in [("prompt {}", {}, "prompt"), ("prompt []", [], "prompt"),
                                  ("prompt [\"a\", 1]", ["a", 1], "prompt"), ("prompt [1, -1]", [1, -1], "prompt"),
                                  ("prompt [1, 50257]", [1, 50257], "50257"), ("prompt [[1], [99999]]", [[1], [99999]],
                                                                                "99999"),
                                  ("prompt a lone surrogate", "caf\udce9", "lone surrogate"),
                                  ("prompt 65 tokens, max_tokens null", [1] * 65, "maximum context length"),
                                  ("prompt 64 tokens + max_tokens 1", [1] * 64, "maximum context length")]:
        body = {"prompt": prompt} | ({"max_tokens": None} if "null" in name else {"max_tokens": 1})
        add(name, post(body), E(400, culprit, "max_tokens" if "context" in culprit else "prompt"))

    group = "right answers"
    add("greedy text equals fgpt generate's", post(G), OK(text_is(want)))
    add("temperature null is the default (1)", post({"prompt": P, "max_tokens": 4, "temperature": None, "seed": 3}),
        OK(lambda r: None if choices(r)[0]["finish_reason"] in ("stop", "length") else "no finish"))
    add("top_k 1 at temperature 1 is greedy", post({"prompt": P, "max_tokens": 6, "top_k": 1, "seed": 1}),
        OK(text_is(want)))
    add("top_p 1e-300 is greedy", post({"prompt": P, "max_tokens": 6, "top_p": 1e-300, "seed": 1}), OK(text_is(want)))
    add("top_k 10**30 keeps every token", post(G | {"top_k": 10**30}), OK(text_is(want)))
    add("min_p 0.999 is greedy", post({"prompt": P, "max_tokens": 6, "min_p": 0.999, "seed": 1}), OK(text_is(want)))
    for penalty in (1e-6, 1e6):
        add(f"repetition_penalty {penalty:g}", post(G | {"repetition_penalty": penalty}),
            OK(lambda r: None if len(choices(r)) == 1 else "one choice"))
    add("penalties at +-2", post(G | {"presence_penalty": 2, "frequency_penalty": -2}), OK())
    add("max_tokens 0", post({"prompt": P, "max_tokens": 0}),
        OK(lambda r: None if choices(r)[0]["text"] == "" and choices(r)[0]["finish_reason"] == "length" else r.body))
    add("max_tokens null: up to the context", post({"prompt": P, "max_tokens": None, "temperature": 0}),
        OK(text_is(greedy(P, CONFIG.n_positions - len(P)))))
    add("prompt of exactly the context, max_tokens 0", post({"prompt": [1] * 64, "max_tokens": 0}), OK(text_is("")))
    add("prompt of 63 tokens + max_tokens 1", post({"prompt": [1] * 63, "max_tokens": 1, "temperature": 0}),
        OK(text_is(greedy([1] * 63, 1))))
    add("prompt [[]] is <|endoftext|>", post({"prompt": [[]], "max_tokens": 3, "temperature": 0}),
        OK(text_is(greedy([ENDOFTEXT_ID], 3))))
    add("prompt '' is <|endoftext|>", post({"prompt": "", "max_tokens": 3, "temperature": 0}),
        OK(text_is(greedy([ENDOFTEXT_ID], 3))))
    add("two prompts, n 2: four choices", post({"prompt": [P, [7, 8]], "n": 2, "max_tokens": 3, "temperature": 0}),
        OK(lambda r: None if [c["index"] for c in choices(r)] == [0, 1, 2, 3] and choices(r)[2]["text"] ==
           greedy([7, 8], 3) else r.body[:200]))
    add("seed 2**63-1 with n 2", post({"prompt": P, "n": 2, "max_tokens": 4, "seed": 2**63 - 1}), OK())
    add("the same seed twice gives the same text", lambda port: [post({"prompt": P, "max_tokens": 8, "seed": 7})(port)
                                                                 for _ in range(2)],
        lambda rs: ("correct", "") if choices(rs[0]) == choices(rs[1]) else ("wrong", "texts differ"))
    add("stop '\\n' cuts the text", post(G | {"max_tokens": 30, "stop": "\n"}),
        OK(text_is(greedy(P, 30, ("\n",)))))
    stop = want[2:4] or "x"
    add("a stop string of the greedy text", post(G | {"stop": [stop, "zzz"]}), OK(text_is(greedy(P, 6, (stop,)))))
    add("a 100,000-character stop string", post(G | {"stop": "x" * 100_000}), OK(text_is(want)))
    add("echo with logprobs 0", post({"prompt": P, "max_tokens": 0, "echo": True, "logprobs": 0}),
        OK(lambda r: None if choices(r)[0]["logprobs"]["tokens"] == [decode([t]) for t in P] and
           choices(r)[0]["logprobs"]["top_logprobs"] == [None] * 5 else r.body[:200]))
    logp = torch.log_softmax(fg.forward(params, torch.tensor([P]), CONFIG)[0].double(), -1)
    expected_lp = [None] + [float(logp[t, P[t + 1]]) for t in range(len(P) - 1)]
    add("echoed log-probs equal the model's log-softmax", post({"prompt": P, "max_tokens": 0, "echo": True,
                                                                "logprobs": 1}),
        OK(lambda r: None if all((a is None and b is None) or abs(a - b) < 1e-4 for a, b in zip(
            choices(r)[0]["logprobs"]["token_logprobs"], expected_lp)) else r.body[:300]))
    add("logprobs 5: five alternatives each", post(G | {"logprobs": 5}),
        OK(lambda r: None if all(len(t) == 5 for t in choices(r)[0]["logprobs"]["top_logprobs"]) else "not 5"))
    eot = eot_prompt(params)
    add("a generated <|endoftext|> is in the log-probs (echo)",
        post({"prompt": eot, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}),
        OK(lambda r: None if choices(r)[0]["logprobs"]["tokens"][-1] == "<|endoftext|>" and
           len(choices(r)[0]["logprobs"]["token_logprobs"]) == len(eot) + 1 and choices(r)[0]["text"] ==
           decode(eot) and choices(r)[0]["finish_reason"] == "stop" else r.body[:300]))
    add("a streamed <|endoftext|> has its log-probs and is counted",
        post({"prompt": eot, "max_tokens": 3, "logprobs": 0, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}),
        OK(lambda r: stream_ok("", usage=True)(r) or (
            None if r.events()[-2]["usage"]["completion_tokens"] == 1 and any(
                c["logprobs"] and c["logprobs"]["tokens"] == ["<|endoftext|>"] for e in r.events()[:-2]
                for c in e["choices"]) else r.body[:300])))
    add("model named exactly", post(G | {"model": model_name}), OK(text_is(want)))
    add("user given", post(G | {"user": "someone"}), OK(text_is(want)))
    add("prompt '<|endoftext|>' text", post({"prompt": "<|endoftext|>", "max_tokens": 2, "temperature": 0,
                                             "echo": True, "logprobs": 0}),
        OK(lambda r: None if choices(r)[0]["logprobs"]["tokens"][0] == "<|endoftext|>" else r.body[:200]))

    group = "streams"
    add("a stream's text equals the greedy text", post(G | {"stream": True}), OK(stream_ok(want)))
    add("stream n 3", post(G | {"stream": True, "n": 3}), OK(stream_ok(want, n=3)))
    add("stream with a stop string", post(G | {"stream": True, "stop": stop}), OK(stream_ok(greedy(P, 6, (stop,)))))
    add("stream include_usage", post(G | {"stream": True, "stream_options": {"include_usage": True}}),
        OK(stream_ok(want, usage=True)))
    add("stream echo with logprobs", post({"prompt": P, "max_tokens": 2, "echo": True, "logprobs": 1,
                                           "temperature": 0, "stream": True}),
        OK(lambda r: stream_ok()(r) or (None if r.events()[0]["choices"][0]["logprobs"]["tokens"] ==
                                       [decode([t]) for t in P] else r.body[:200])))
    add("stream max_tokens 0", post({"prompt": P, "max_tokens": 0, "stream": True}), OK(stream_ok("")))

    group = "chat"
    CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
    chat_want = greedy(encode("User: Hi\n\nAssistant:"), 5, ("\nUser:",))
    add("chat greedy follows the documented template", post(CHAT, "/v1/chat/completions"),
        OK(lambda r: None if choices(r)[0]["message"]["content"] == chat_want else r.body[:200]))
    add("chat stream n 2", post(CHAT | {"stream": True, "n": 2}, "/v1/chat/completions"),
        OK(stream_ok(chat_want, n=2)))
    add("chat extra message fields are ignored", post(CHAT | {"messages": [{"role": "user", "content": "Hi",
                                                                            "name": "x"}]}, "/v1/chat/completions"),
        OK(lambda r: None if choices(r)[0]["message"]["content"] == chat_want else r.body[:200]))
    add("chat max_completion_tokens over max_tokens", post(CHAT | {"max_completion_tokens": 2, "max_tokens": 9},
                                                           "/v1/chat/completions"),
        OK(lambda r: None if r.json()["usage"]["completion_tokens"] <= 2 else r.body[:200]))
    for name, body, culprit in [("no messages", {}, "messages"), ("messages []", {"messages": []}, "messages"),
                                ("role tool", {"messages": [{"role": "tool", "content": "a"}]}, "messages"),
                                ("content null", {"messages": [{"role": "user", "content": None}]}, "messages"),
                                ("content a list", {"messages": [{"role": "user", "content": [{"x": 1}]}]},
                                 "messages"),
                                ("content a lone surrogate", {"messages": [{"role": "user", "content": "\ud800"}]},
                                 "messages"),
                                ("logprobs (not supported)", CHAT | {"logprobs": True}, "logprobs"),
                                ("echo (completions only)", CHAT | {"echo": True}, "echo"),
                                ("max_completion_tokens -1", CHAT | {"max_completion_tokens": -1},
                                 "max_completion_tokens"),
                                ("n 9 > --max_queue 8", CHAT | {"n": 9}, "--max_queue")]:
        add(f"chat {name}", post(body, "/v1/chat/completions"),
            E(400, culprit, "n" if culprit == "--max_queue" else culprit))

    group = "methods"
    for method, path in [("GET", "/v1/completions"), ("PUT", "/health"), ("DELETE", "/v1/models"),
                         ("OPTIONS", "/v1/completions"), ("POST", "/health"), ("PATCH", "/v1/chat/completions")]:
        add(f"{method} {path}", post(None, path, {}, method), lambda r: E(405, "method not allowed", None)(r) if
            r.headers.get("allow") else ("wrong", "405 without an Allow header"))
    add("HEAD /health (no body to hold an error)", post(None, "/health", {}, "HEAD"),
        lambda r: ("clean", "405, Allow: GET") if r.status == 405 and r.headers.get("allow") == "GET" and not r.body
        else ("5xx" if r.status >= 500 else "wrong", f"{r.status} {r.headers.get('allow')} {r.body[:100]!r}"))
    add("GET /nope", post(None, "/nope", {}, "GET"), E(404, "no such endpoint", None))
    add("POST /v1/engines", post({}, "/v1/engines"), E(404, "no such endpoint", None))
    add("GET /v1/models", post(None, "/v1/models", {}, "GET"),
        OK(lambda r: None if [m["id"] for m in r.json()["data"]] == [model_name] else r.body))
    add("GET /openapi.json", post(None, "/openapi.json", {}, "GET"),
        OK(lambda r: None if "/v1/completions" in r.json()["paths"] else "no paths"))

    group = "headers"
    body = json.dumps(G).encode()
    add("Content-Type text/plain", post(body, headers={"Content-Type": "text/plain"}), E(415, "Content-Type", None))
    add("no Content-Type", post(body, headers={}), E(415, "Content-Type", None))
    add("form-urlencoded", post(body, headers={"Content-Type": "application/x-www-form-urlencoded"}),
        E(415, "Content-Type", None))
    add("application/json; charset=utf-8", post(body, headers={"Content-Type": "application/json; charset=utf-8"}),
        OK(text_is(want)))
    add("application/vnd.api+json", post(body, headers={"Content-Type": "application/vnd.api+json"}),
        OK(text_is(want)))
    add("Content-Length 10,000,000 on a small body", lambda port: call(
        port, "POST", "/v1/completions", body, JSON | {"Content-Length": "10000000"}, timeout=5),
        E(413, "Content-Length", None))
    add("a 100 KB header", post(None, "/health", {"X-Big": "a" * 100_000}, "GET"),
        EITHER(E(400, "not valid HTTP", None), OK()))
    add("bytes that are no HTTP", raw_bytes(b"GARBAGE\r\n\r\n"), E(400, "not valid HTTP", None))
    add("a bad Content-Length", raw_bytes(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
        E(400, "not valid HTTP", None))

    group = "sizes"
    add("a 5 MB body", post(b" " * (5 * 2**20)), E(413, "body", None))
    add("a chunked body over the limit", lambda port: call(port, "POST", "/v1/completions",
                                                            (b" " * 2**20 for _ in range(5)), JSON, chunked=True),
        E(413, "body", None))
    letters = (97 + torch.randint(26, (2_000_000,), generator=torch.Generator().manual_seed(0))).to(torch.uint8)
    add("a 2 MB one-word prompt", post({"prompt": letters.numpy().tobytes().decode(), "max_tokens": 1}),
        E(400, "maximum context length", "max_tokens"))

    group = "disconnects and concurrency"
    add("a client leaves mid-stream, the next request is served", leave_then_ask(G, want), lambda r: r)
    add("a client sends half its body and leaves", half_body_then_ask(G, want), lambda r: r)
    add("four streams and a bad request at once", crowd(G, want), lambda r: r)
    add("twelve requests at once: each served or a 429", flood(G, want), lambda r: r)
    return out


def _served_text(port, body) -> str:
    return call(port, "POST", "/v1/completions", json.dumps(body).encode(), JSON).json()["choices"][0]["text"]


def leave_then_ask(body, want):
    def send(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("POST", "/v1/completions", json.dumps(body | {"max_tokens": 50, "stream": True}), JSON)
        reply = conn.getresponse()
        reply.readline()
        conn.close()  # gone after the first event
        got = _served_text(port, body)
        return ("correct", "") if got == want else ("wrong", f"then {got!r}, expected {want!r}")
    return send


def half_body_then_ask(body, want):
    def send(port):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        time.sleep(0.2)
        got = _served_text(port, body)
        return ("correct", "") if got == want else ("wrong", f"then {got!r}, expected {want!r}")
    return send


def crowd(body, want):
    """Four streams beside a request that fails (a 400): each stream has its text alone."""
    def send(port):
        with ThreadPoolExecutor(5) as pool:
            streams = [pool.submit(post(body | {"stream": True}), port) for _ in range(4)]
            failing = pool.submit(post(body | {"repetition_penalty": 1e-300, "stream": True}), port)
            why = [stream_ok(want)(s.result(TIMEOUT)) for s in streams]
            refused = E(400, "repetition_penalty", "repetition_penalty")(failing.result(TIMEOUT))
        wrong = [w for w in why if w] + ([refused[1]] if refused[0] != "clean" else [])
        return ("wrong", "; ".join(wrong)) if wrong else ("correct", "")
    return send


def flood(body, want):
    """Twelve at once on 4 rows and 8 places: each gets its text, or a 429 (busy now)."""
    def send(port):
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: post(body | {"max_tokens": 6})(port), range(12)))
        for r in replies:
            if r.status == 429 and (error_of(r) or {}).get("type") == "rate_limit_error":
                continue
            if r.status != 200 or choices(r)[0]["text"] != want:
                return ("5xx" if r.status >= 500 else "wrong"), f"{r.status}: {r.body[:150]!r}"
        return "correct", ""
    return send


# ----------------------------------------------------------------------------- running


def run(case: Case, served: Served) -> Result:
    t0 = time.perf_counter()
    try:
        cls, message = case.expect(case.send(served.port))
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
        cls, message = ("5xx" if isinstance(e, (OSError, http.client.HTTPException)) else "wrong",
                        f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    if not served.alive():
        cls, message = "dead", f"/health stopped answering ({message})"
        served.stop()
        served.start()
    return Result(case, cls, message, seconds)


def main(argv=None) -> int:
    args = arguments(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fgpt_census_server_") as tmp:
        weights = Path(tmp) / "census.safetensors"
        params = census_params()
        fg.save_params(weights, params, CONFIG)
        served = Served(weights)
        try:
            served.start()
            todo = [c for c in cases(params, str(weights)) if not args.only or args.only in c.name]
            results = [run(case, served) for case in todo]
        finally:
            served.stop()
        if "Traceback" in served.stderr():
            print("the server's log holds a traceback:\n" + served.stderr()[-3000:])
    print(report(results, args.all, classes=CLASSES, column=("group", 28, lambda r: r.case.group)))
    print(f"{time.time() - t0:.0f} s")
    return 0 if all(r.cls in ("clean", "correct") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

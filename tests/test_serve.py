"""`fgpt serve` as a real server process on 127.0.0.1 (a free port), spoken to with the
official `openai` client (and raw HTTP for what the client will not send), against
`fgpt generate` and transformers on the same weights. Every request has a timeout and
the servers are stopped (SIGTERM) at the end of the module."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from functional_gpt import GPTConfig, save_params
from functional_gpt.generation.decoding import print_samples
from functional_gpt.generation.sampling import Sampling
from functional_gpt.model.tokenizer import decode

from conftest import hf_model, params_of

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
SERVE = GPTConfig(vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=4)
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: Path, *flags: str):
    """-> (process, base URL) once /health answers."""
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "functional_gpt", "serve", "--weights", str(weights),
                             "--port", str(port), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the server did not answer /health in time")


def stop_server(proc) -> str:
    """SIGTERM, then the stderr it wrote (killed if it does not end in time)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the server did not stop within 20 s of SIGTERM") from None


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(weights file, params, transformers model): trained-like weights of SERVE."""
    hf = hf_model(SERVE, seed=3)
    params = params_of(hf)
    weights = tmp_path_factory.mktemp("serve") / "model.safetensors"
    save_params(weights, params, SERVE)
    return weights, params, hf


@pytest.fixture(scope="module")
def server(model):
    proc, base = start_server(model[0], "--max_batch", "8")
    yield base
    log = stop_server(proc)
    assert "POST /v1/completions" in log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def post(base: str, path: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def still_serving(client) -> None:
    assert client.completions.create(model=None, prompt=[1, 2, 3], max_tokens=2, temperature=0).choices[0].text \
        is not None


PROMPT = [5, 17, 33, 60, 2, 9, 71, 40]


def transformers_greedy(hf, prompt, n) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def generate_text(params, prompt_text, n, **kwargs) -> str:
    class Out(list):
        def write(self, s):
            self.append(s)

        def flush(self):
            pass

    out, err = Out(), Out()
    print_samples(params, prompt_text, SERVE, max_new_tokens=n, out=out, err=err, **kwargs)
    return "".join(out)[:-1]  # print_samples ends each sample with a newline


# --- equal to fgpt generate and to transformers --------------------------------------------


def test_greedy_completions_equal_transformers_and_fgpt_generate(client, model):
    _, params, hf = model
    got = client.completions.create(model=None, prompt=PROMPT, max_tokens=40, temperature=0, logprobs=0)
    choice = got.choices[0]
    expected = transformers_greedy(hf, PROMPT, 40)
    assert choice.text == decode(expected) and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [decode([t]) for t in expected]
    assert got.usage.prompt_tokens == 8 and got.usage.completion_tokens == 40
    text_prompt = decode(PROMPT)
    ours = generate_text(params, text_prompt, 40, sampling=Sampling(greedy=True))
    assert client.completions.create(prompt=text_prompt, max_tokens=40, temperature=0, model=None).choices[0].text \
        == ours


def test_streamed_text_equals_the_text_at_once(client):
    whole = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=0.8, seed=5)
    pieces = list(client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=0.8, seed=5,
                                            stream=True))
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_echoed_prompt_logprobs_equal_transformers_log_softmax(client, model):
    _, _, hf = model
    got = client.completions.create(model=None, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    lp = got.choices[0].logprobs
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].double(), -1)
    theirs = expected[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(PROMPT)
    ours = torch.tensor(lp.token_logprobs[1:], dtype=torch.float64)
    assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max())
    assert got.choices[0].text == decode(PROMPT)
    assert lp.text_offset == [len(decode(PROMPT[:i])) for i in range(len(PROMPT))]
    assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])


def test_n_samples_with_a_seed_are_three_and_the_same_on_a_second_call(client):
    first, second = (client.completions.create(model=None, prompt=PROMPT, max_tokens=20, n=3, seed=11,
                                               temperature=1.0) for _ in range(2))
    texts = [c.text for c in first.choices]
    assert len(texts) == 3 and len(set(texts)) == 3
    assert [c.text for c in second.choices] == texts and [c.index for c in first.choices] == [0, 1, 2]


def test_stop_strings_cut_where_fgpt_generate_cuts(client, model):
    _, params, _ = model
    prompt = decode(PROMPT)
    full = generate_text(params, prompt, 40, sampling=Sampling(greedy=True))
    stop = full[10:12]
    expected = generate_text(params, prompt, 40, sampling=Sampling(greedy=True), stop=(stop,))
    got = client.completions.create(model=None, prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert got.choices[0].text == expected == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_chat_completions_follow_the_documented_template(client, model):
    _, params, _ = model
    got = client.chat.completions.create(model=str(model[0]), messages=[{"role": "user", "content": "a"}],
                                         max_tokens=10, temperature=0)
    expected = generate_text(params, "User: a\n\nAssistant:", 10, sampling=Sampling(greedy=True), stop=("\nUser:",))
    assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"


def test_our_extra_rules_arrive_through_extra_body(client):
    """top_k 1 at temperature 1 is greedy; a repetition penalty changes a greedy text."""
    greedy = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    top1 = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=3,
                                     extra_body={"top_k": 1}).choices[0].text
    penalised = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=0,
                                          extra_body={"repetition_penalty": 5.0}).choices[0].text
    assert top1 == greedy != penalised


def test_models_lists_the_one_model(client, model):
    assert [m.id for m in client.models.list().data] == [str(model[0])]


# --- batch invariance ---------------------------------------------------------------------


def test_sixteen_concurrent_requests_each_return_what_they_return_alone(client):
    """Mixed prompt lengths (1 to 60 tokens), greedy and seeded sampling, 16 at once on
    8 rows: each returns exactly its text alone (tokens compared through the logprobs)."""
    gen = torch.Generator().manual_seed(0)
    asks = []
    for i in range(16):
        length = 1 + int(torch.randint(60, (1,), generator=gen))
        prompt = torch.randint(50000, (length,), generator=gen).tolist()
        sampled = dict(temperature=0.9, seed=100 + i, top_k=None) if i % 2 else dict(temperature=0)
        asks.append(dict(prompt=prompt, max_tokens=10 + i * 3, logprobs=0, **sampled))

    def ask(kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("top_k", None)
        c = client.completions.create(model=None, **kwargs).choices[0]
        return c.text, c.logprobs.tokens, c.logprobs.token_logprobs

    alone = [ask(a) for a in asks]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, asks))
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a == b, f"request {i} differs when sent with 15 others"
    assert len({a[0] for a in alone}) > 8


# --- faults: each a clean OpenAI-style error, and the server keeps serving -----------------


@pytest.mark.parametrize(
    "body, param, words",
    [
        (b'{"prompt": "a", "max_tokens": ', None, "not valid JSON"),
        ({"prompt": "a", "max_tokens": "ten"}, "max_tokens", "integer"),
        ({"prompt": "a", "temperature": "hot"}, "temperature", "'hot' is none of the accepted types (float, int)"),
        ({"prompt": {"text": "a"}}, "prompt", "none of the accepted types"),
        ({"prompt": "a", "max_tokenz": 3}, "max_tokenz", "unknown field"),
        ({"prompt": [1, 2], "max_tokens": 300}, "max_tokens", "maximum context length is 256 tokens"),
        ({"prompt": [1] * 300, "max_tokens": None}, "max_tokens", "requested 300 tokens (300 in your prompt; 0 for"),
        ({"prompt": "a", "logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"prompt": [1, 50257]}, "prompt", "token id 50257 is out of range for vocab_size=50257"),
        ({"prompt": "a", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "a", "model": "gpt-4"}, "model", "does not exist"),
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, client, body, param, words):
    status, reply = post(server, "/v1/completions", body)
    error = reply["error"]
    assert status == (404 if param == "model" else 400) and words in error["message"], reply
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    still_serving(client)


def test_an_unknown_path_is_a_404_in_openai_shape(server, client):
    status, reply = post(server, "/v1/edits", {"prompt": "a"})
    assert status == 404 and "no such endpoint" in reply["error"]["message"]
    still_serving(client)


def test_a_client_that_leaves_mid_stream_frees_its_row_and_the_others_finish(server, client):
    others = ThreadPoolExecutor(2).map(lambda s: client.completions.create(
        model=None, prompt=PROMPT, max_tokens=200, temperature=0.7, seed=s).choices[0].finish_reason, (1, 2))
    stream = client.completions.create(model=None, prompt=PROMPT, max_tokens=240, temperature=0.7, seed=3,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert list(others) == ["length", "length"]
    still_serving(client)


def test_a_client_that_leaves_frees_its_only_row_and_sigterm_ends_a_stream_in_flight(model):
    """On one row: a stream left after 5 chunks is cancelled (logged) and the next request
    gets the row; SIGTERM during a stream ends the server within the timeout, the stream
    finished or cut off (uvicorn finishes a response in flight for up to 5 s)."""
    proc, base = start_server(model[0], "--max_batch", "1")
    c = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
    stream = c.completions.create(model=None, prompt=[1], max_tokens=250, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert c.completions.create(model=None, prompt=[2], max_tokens=3, temperature=0).choices[0].finish_reason \
        == "length"
    stream = c.completions.create(model=None, prompt=[1], max_tokens=250, temperature=0, stream=True)
    next(iter(stream))
    log = stop_server(proc)  # fails unless the server ends within 20 s of SIGTERM
    try:
        rest = len(list(stream))
    except Exception:  # cut off as the server stopped (the client's transport error)
        rest = None
    assert proc.returncode is not None and rest in (None, 250)  # cut off, or all 250 tokens and the final chunk
    assert "the client left after" in log and "its 1 row(s) are freed" in log


def test_a_full_queue_is_a_429_and_the_server_recovers(model):
    proc, base = start_server(model[0], "--max_batch", "1", "--max_queue", "1")
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        long = dict(model=None, prompt=[1], max_tokens=250, temperature=0)
        pool = ThreadPoolExecutor(2)
        running = pool.submit(c.completions.create, **long)
        time.sleep(0.3)
        waiting = pool.submit(c.completions.create, **long)
        time.sleep(0.3)
        status, reply = post(base, "/v1/completions", long)
        assert status == 429 and reply["error"]["type"] == "rate_limit_error", reply
        assert running.result().choices[0].finish_reason == waiting.result().choices[0].finish_reason == "length"
        still_serving(c)
    finally:
        stop_server(proc)


# --- the command line's bad input ----------------------------------------------------------


def _serve_cli(*flags) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "functional_gpt", "serve", *flags], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def test_a_port_in_use_is_one_line_naming_it(model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve_cli("--weights", str(model[0]), "--port", str(port))
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        f"fgpt serve: error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"]


@pytest.mark.parametrize("flags, words", [(["--weights", "/nonexistent.safetensors"], "/nonexistent.safetensors"),
                                          (["--max_batch", "0"], "--max_batch must be an integer >= 1, got 0")])
def test_bad_serve_flags_are_one_line(model, flags, words):
    flags = flags if flags[0] == "--weights" else ["--weights", str(model[0]), *flags]
    done = _serve_cli(*flags, "--port", str(free_port()))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and words in lines[0], done.stderr

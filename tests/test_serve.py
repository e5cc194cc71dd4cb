"""`fgpt serve` as a real server process on 127.0.0.1 (a free port), spoken to with the
official `openai` client (and raw HTTP for what the client will not send), against
`fgpt generate` and transformers on the same weights. Every request has a timeout and
the servers are stopped (SIGTERM) at the end of the module."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from functional_gpt import GPTConfig, init_params, save_params
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
    """-> (process, base URL) once /health answers at the URL its first line announces (on
    a free port unless flags name one). Its stderr goes to a file (a pipe nobody reads
    would fill and block the server)."""
    flags = flags if "--port" in flags else (*flags, "--port", str(free_port()))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "functional_gpt", "serve", "--weights", str(weights), *flags],
                            stdout=subprocess.DEVNULL, stderr=log, text=True, env=env, start_new_session=True)
    proc.log = log
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {ended(proc)[-2000:]}")
        announced = re.search(r" on (http://127\.0\.0\.1:\d+)/v1 ", os.pread(log.fileno(), 2**16, 0).decode())
        try:
            if announced:
                with urllib.request.urlopen(announced[1] + "/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, announced[1]
        except OSError:
            pass
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the server did not answer /health in time")


def ended(proc, timeout: float = 20) -> str:
    """The stderr of a server once it has ended (killed if it does not end in time)."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the server did not end within {timeout} s") from None
    proc.log.seek(0)
    return proc.log.read()


def stop_server(proc) -> str:
    """SIGTERM, then the stderr it wrote."""
    proc.send_signal(signal.SIGTERM)
    return ended(proc)


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
    assert "Traceback" not in log, log


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


def test_a_stop_given_as_one_string_is_that_whole_string(client, model):
    """stop: "xyz" (not a list) stops at the first "xyz", not at the first "x"."""
    _, params, _ = model
    prompt = decode(PROMPT)
    full = generate_text(params, prompt, 40, sampling=Sampling(greedy=True))
    stop = next(full[i:i + 3] for i in range(1, len(full) - 3)
                if full.index(full[i:i + 3]) == i and full[i] in full[:i] and "\ufffd" not in full[i:i + 3])
    got = client.completions.create(model=None, prompt=prompt, max_tokens=40, temperature=0, stop=stop)
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"


def test_n_choices_count_the_prompt_once_as_openai_does(client):
    got = client.completions.create(model=None, prompt=PROMPT, max_tokens=5, n=3, seed=2, temperature=1.0)
    assert got.usage.prompt_tokens == len(PROMPT) and got.usage.completion_tokens == 15
    assert got.usage.total_tokens == len(PROMPT) + 15


WORDS = "The quick brown fox jumps over the lazy dog"  # tokens of several characters each


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_zero_gives_every_token_its_text_offset_and_no_alternatives(client, stream):
    """echo + logprobs 0: one entry per prompt and generated token, the first None; each
    text_offset is the length of the text before its token; the prompt is echoed once."""
    args = dict(model=None, prompt=WORDS, max_tokens=6, temperature=0, echo=True, logprobs=0)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(**args, stream=True)]
        text = "".join(c.text for c in chunks)
        parts = [c.logprobs for c in chunks if c.logprobs is not None]
        lp = {k: sum((getattr(part, k) for part in parts), []) for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                        "text_offset")}
    else:
        choice = client.completions.create(**args).choices[0]
        text, lp = choice.text, vars(choice.logprobs)
    plain = client.completions.create(model=None, prompt=WORDS, max_tokens=6, temperature=0).choices[0].text
    assert text == WORDS + plain and "".join(lp["tokens"]) == text
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 9 + 6
    assert lp["token_logprobs"][0] is None and all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    assert lp["top_logprobs"] == [None] * len(lp["tokens"])


def test_chat_completions_follow_the_documented_template(client, model):
    _, params, _ = model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    got = client.chat.completions.create(model=str(model[0]), messages=messages, max_tokens=10, temperature=0)
    expected = generate_text(params, "System: Be brief.\n\nUser: a\n\nAssistant: b\n\nUser: c\n\nAssistant:", 10,
                             sampling=Sampling(greedy=True), stop=("\nUser:",))
    assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"


def test_our_extra_rules_arrive_through_extra_body(client):
    """top_k 1 at temperature 1 is greedy; a repetition penalty changes a greedy text."""
    greedy = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    top1 = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=3,
                                     extra_body={"top_k": 1}).choices[0].text
    penalised = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=0,
                                          extra_body={"repetition_penalty": 5.0}).choices[0].text
    assert top1 == greedy != penalised


@pytest.mark.parametrize("rule, temperature", [({"top_p": 0.5}, 1.0), ({"top_k": 40}, 1.0), ({"min_p": 0.5}, 1.0),
                                               ({"repetition_penalty": 3.0}, 0)])  # greedy: it changes the argmax
def test_each_sampling_rule_draws_what_fgpt_generate_draws_with_it(client, model, rule, temperature):
    """The same seed and rule: the server's sample is `fgpt generate`'s, and not the
    sample without the rule (so the rule reached the sampler)."""
    got = client.completions.create(model=None, prompt="Once upon a time", max_tokens=20, temperature=temperature,
                                    seed=5, extra_body=rule).choices[0].text
    with_rule, without = (generate_text(model[1], "Once upon a time", 20, seed=5,
                                        sampling=Sampling(temperature=temperature, **r)) for r in (rule, {}))
    assert got == with_rule != without


@pytest.mark.parametrize("path, prefix, whole, chunk", [
    ("/v1/completions", "cmpl-", "text_completion", "text_completion"),
    ("/v1/chat/completions", "chatcmpl-", "chat.completion", "chat.completion.chunk")])
def test_answers_are_named_as_openais_are(server, model, path, prefix, whole, chunk):
    """An id of the endpoint's prefix and 24 hex digits, the same in every chunk of a
    stream, a new one per request; `created` the second it was made; the model's name;
    each choice its index."""
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    body |= {"max_tokens": 3, "n": 2}
    t0 = int(time.time())
    _, answer = post(server, path, body)
    conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=TIMEOUT)
    conn.request("POST", path, json.dumps(body | {"stream": True, "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    chunks = sse(conn.getresponse())[:-1]
    t1 = int(time.time())
    assert len(chunks) >= 3
    for named, kind in [(answer, whole)] + [(c, chunk) for c in chunks]:
        assert re.fullmatch(re.escape(prefix) + "[0-9a-f]{24}", named["id"]) and named["object"] == kind, named
        assert type(named["created"]) is int and t0 <= named["created"] <= t1 and named["model"] == str(model[0])
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"] != answer["id"]
    assert [c["index"] for c in answer["choices"]] == [0, 1] and {c["index"] for e in chunks for c in e["choices"]} \
        == {0, 1}
    keys = {"text", "index", "logprobs", "finish_reason"} if prefix == "cmpl-" else \
        {"index", "message", "logprobs", "finish_reason"}
    assert all(set(c) == keys and c["finish_reason"] in ("stop", "length") and c["logprobs"] is None
               for c in answer["choices"]), answer


def test_models_lists_the_one_model(client, model):
    assert [m.id for m in client.models.list().data] == [str(model[0])]


# --- batch invariance ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def invariant_client(model):
    proc, base = start_server(model[0], "--max_batch", "8", "--batch_invariant")
    yield openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
    log = stop_server(proc)
    assert "Traceback" not in log and "(max_batch 8, max_queue 64; batch invariant)" in log, log


@pytest.mark.parametrize("mode", ["default", "batch_invariant"])
def test_sixteen_concurrent_requests_each_return_what_they_return_alone(client, invariant_client, mode):
    """Mixed prompt lengths (1 to 60 tokens), greedy and seeded sampling, 16 at once on
    8 rows: each returns its text alone (tokens compared through the logprobs); with
    --batch_invariant its log-probs bit for bit, by default to float32 rounding."""
    client = invariant_client if mode == "batch_invariant" else client
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
        if mode == "batch_invariant":
            assert a == b, f"request {i} differs when sent with 15 others"
        else:
            assert a[:2] == b[:2] and max(abs(x - y) for x, y in zip(a[2], b[2])) < 1e-4, i
    assert len({a[0] for a in alone}) > 8


# --- speculative decoding --------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_weights(tmp_path_factory) -> Path:
    config = GPTConfig(vocab_size=50257, n_positions=256, n_embd=16, n_layer=1, n_head=2)
    path = tmp_path_factory.mktemp("draft") / "draft.safetensors"
    save_params(path, params_of(hf_model(config, seed=4)), config)
    return path


def test_with_a_draft_concurrent_greedy_completions_are_transformers(model, draft_weights):
    """`--draft W --speculate 3` on 4 rows, 6 greedy requests at once (prompts of 1 to 40
    tokens): each is transformers' greedy continuation, its log-probs transformers'."""
    _, _, hf = model
    proc, base = start_server(model[0], "--max_batch", "4", "--draft", str(draft_weights), "--speculate", "3")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(50000, (n,), generator=gen).tolist() for n in (1, 8, 40, 3, 17, 25)]

        def ask(prompt):
            return client.completions.create(model=None, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                             echo=True).choices[0].logprobs

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(ask, prompts))
        for prompt, logprobs in zip(prompts, got):
            expected = transformers_greedy(hf, prompt, 12)
            assert logprobs.tokens == [decode([t]) for t in prompt + expected]
            with torch.no_grad():
                want = torch.log_softmax(hf(torch.tensor([prompt + expected])).logits[0].double(), -1)
            want = [float(want[t, x]) for t, x in enumerate((prompt + expected)[1:])]
            assert max(abs(a - b) for a, b in zip(logprobs.token_logprobs[1:], want)) < 1e-4
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log and f"speculative: 3 guesses per step from the draft {draft_weights}" in log, log


@pytest.mark.parametrize("flags, words", [
    (["--prompt_lookup", "2", "--batch_invariant"], "--batch_invariant and speculative decoding (--draft, "
                                                    "--prompt_lookup) cannot both hold"),
    (["--prompt_lookup", "2", "--speculate", "0"], "--speculate: expected an integer in 1..64, got 0"),
    (["--prompt_lookup", "0"], "--prompt_lookup: expected an integer in 1..64, got 0"),
    (["--prompt_lookup", "2", "--draft", "D"], "--draft and --prompt_lookup: give one proposer, not both"),
    (["--draft", "OTHER"], "--draft: the draft's n_positions is 16, the model's 256; a draft must share"),
])
def test_bad_speculative_flags_are_one_line_naming_the_flag(model, tmp_path, flags, words):
    other = GPTConfig(vocab_size=50257, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    save_params(tmp_path / "other.safetensors", init_params(other, seed=0), other)
    flags = [{"OTHER": str(tmp_path / "other.safetensors"), "D": str(model[0])}.get(f, f) for f in flags]
    done = subprocess.run([sys.executable, "-m", "functional_gpt", "serve", "--weights", str(model[0]), "--port",
                           str(free_port()), *flags], capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr


# --- faults: each a clean OpenAI-style error, and the server keeps serving -----------------

ROOM = {"prompt": [1, 2], "max_tokens": 2}
LIMITS = "expected a finite number in"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "a", "temperature": "hot"}, "temperature",
         "temperature: expected 0 (greedy) or a finite number >= 1e-06, got 'hot' (a str)"),
        ({"prompt": {"text": "a"}}, "prompt", "prompt: expected a string, a list of strings, a list of token ids"),
        ({"prompt": [1, 2], "max_tokens": 300}, "max_tokens", "maximum context length is 256 tokens"),
        ({"prompt": [1] * 300, "max_tokens": None}, "max_tokens", "requested 300 tokens (300 in your prompt; 0 for"),
        ({"prompt": "a", "logprobs": 6}, "logprobs", "logprobs: expected an integer in 0..5, got 6"),
        ({"prompt": [1, 50257]}, "prompt", "prompt: token id 50257 is out of range for vocab_size=50257"),
        ({"prompt": "a", "n": 0}, "n", "n: expected an integer in 1..16, got 0"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 non-empty strings"),
        ({"prompt": "a", "model": "gpt-4"}, "model", "does not exist"),
        # what the request model once let through and Sampling refused (a 500 in plain text)
        (ROOM | {"temperature": 1e-30}, "temperature", "temperature: expected 0 (greedy) or a finite number >= 1e-06"),
        (b'{"prompt": [1], "repetition_penalty": Infinity}', "repetition_penalty",
         f"repetition_penalty: {LIMITS} [1e-06, 1e+06], got inf (a float)"),
        (ROOM | {"repetition_penalty": 1e-300}, "repetition_penalty", f"repetition_penalty: {LIMITS} [1e-06, 1e+06]"),
        (b'{"prompt": [1], "temperature": NaN}', "temperature", "got nan (a float)"),
        (b'{"prompt": [1], "presence_penalty": -Infinity}', "presence_penalty", f"presence_penalty: {LIMITS} [-2, 2]"),
        (ROOM | {"temperature": 2.5}, "temperature", "temperature: expected a finite number in [0, 2], got 2.5"),
        (ROOM | {"top_p": 0}, "top_p", f"top_p: {LIMITS} (0, 1], got 0 (an int)"),
        (ROOM | {"min_p": 1}, "min_p", f"min_p: {LIMITS} [0, 1), got 1 (an int)"),
        (ROOM | {"top_k": 0}, "top_k", "top_k: expected an integer >= 1, got 0"),
        (ROOM | {"top_k": 2.0}, "top_k", "top_k: expected an integer >= 1, got 2.0 (a float)"),
        (ROOM | {"seed": 2**63}, "seed", "seed: expected an integer in 0..9223372036854775807"),
        (ROOM | {"seed": -1}, "seed", "seed: expected an integer in 0..9223372036854775807, got -1"),
        (ROOM | {"max_tokens": 10**400}, "max_tokens", "maximum context length"),
        (ROOM | {"temperature": 10**400}, "temperature", "got an int of 1329 bits"),  # beyond float range
        (ROOM | {"max_tokens": 2.0}, "max_tokens", "max_tokens: expected an integer >= 0, got 2.0 (a float)"),
        (ROOM | {"stop": ""}, "stop", "stop: expected a non-empty string or a list"),
        (ROOM | {"stop": [""]}, "stop", "stop: expected a non-empty string or a list"),
        (ROOM | {"stop": [1]}, "stop", "stop: expected a non-empty string or a list"),
        (ROOM | {"echo": "yes"}, "echo", "echo: expected True or False, got 'yes' (a str)"),
        (ROOM | {"stream": 1}, "stream", "stream: expected True or False, got 1 (an int)"),
        (ROOM | {"stream_options": {"include_usage": True}}, "stream_options", "only allowed with \"stream\": true"),
        ({"prompt": []}, "prompt", "prompt: expected a string"),
        ({"prompt": ["a", 1]}, "prompt", "prompt: expected a string"),
        ({"prompt": [1, -1]}, "prompt", "prompt: expected a string"),
        ({"prompt": [1, True]}, "prompt", "prompt: expected a string"),
        ({"prompt": "caf\udce9"}, "prompt", "prompt: not valid Unicode (U+DCE9, a lone surrogate, at character 3)"),
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, client, body, param, words):
    status, reply = post(server, "/v1/completions", body)
    error = reply["error"]
    assert status == (404 if param == "model" else 400) and words in error["message"], reply
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    still_serving(client)


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"prompt": "a", "max_tokens": ', "body: not valid JSON (Expecting value at character 30)"),
        (b'{"prompt": [1,]}', "body: not valid JSON (Expecting value at character 14)"),
        (b'{"a" 1}', "body: not valid JSON (Expecting ':' delimiter at character 5)"),
        (b'{"prompt": "caf\xe9"}', "body: not UTF-8 (invalid continuation byte at byte 15)"),
        (b"[" * 100_000 + b"]" * 100_000, "body: JSON nested too deeply"),
        (b'{"prompt": 1' + b"0" * 5000 + b"}", "body: not valid JSON (Exceeds the limit (4300 digits) for integer "
         "string conversion: value has 5001 digits; use sys.set_int_max_str_digits() to increase the limit)"),
    ],
)
def test_a_body_that_is_not_json_gets_the_reason_and_where(server, client, body, message):
    assert post(server, "/v1/completions", body) == (400, {"error": {
        "message": message, "type": "invalid_request_error", "param": None, "code": "invalid_json"}})
    still_serving(client)


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.mark.parametrize(
    "path, body, param, message, code",
    [
        (COMPLETIONS, {"prompt": "a", "max_tokens": "ten"}, "max_tokens",  # our own check's words
         "max_tokens: expected an integer >= 0, got 'ten' (a str)", None),
        (COMPLETIONS, {"prompt": "a", "max_tokenz": 3}, "max_tokenz", "max_tokenz: unknown field", None),
        (CHAT, {}, "messages", "messages: required", None),
        (COMPLETIONS, ROOM | {"stream": True, "stream_options": {"include_usage": 1}}, "stream_options",
         "stream_options.include_usage: Input should be a valid boolean, got 1 (an int)", None),  # pydantic's words
        (CHAT, {"messages": [{"role": "tool", "content": "a"}]}, "messages",
         "messages.0.role: Input should be 'system', 'user' or 'assistant', got 'tool' (a str)", None),
        (COMPLETIONS, [1, 2], None, "body: expected a JSON object, got a list of 2", None),
        (COMPLETIONS, b'"text"', None, "body: expected a JSON object, got 'text' (a str)", None),
        (CHAT, b"", None, "body: missing", None),
        (COMPLETIONS, {"prompt": [1, 2], "max_tokens": 300}, "max_tokens",  # OpenAI's words and code
         "This model's maximum context length is 256 tokens, however you requested 302 tokens (2 in your prompt; "
         "300 for the completion). Please reduce your prompt; or completion length.", "context_length_exceeded"),
    ],
)
def test_each_kind_of_complaint_is_answered_whole(server, path, body, param, message, code):
    assert post(server, path, body) == (400, {"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": code}})


def test_a_streamed_chat_says_in_its_deltas_what_the_whole_answer_says(client):
    """The role first, then the content in pieces, then the finish with an empty delta."""
    ask = dict(model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**ask).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True)]
    assert chunks[0].delta.role == "assistant" and chunks[0].delta.content == ""
    assert all(c.delta.content for c in chunks[1:-1]) and chunks[-1].delta.content is None
    assert "".join(c.delta.content for c in chunks[:-1]) == whole.message.content and len(whole.message.content) > 5
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [whole.finish_reason]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"messages": []}, "messages", "messages: List should have at least 1 item"),
        ({"messages": [{"role": "user", "content": None}]}, "messages", "messages.0.content: Input should be a valid"),
        ({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -1}, "max_completion_tokens",
         "max_completion_tokens: expected an integer >= 0, got -1"),
        ({"messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs", "logprobs: unknown field"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages", "messages: not valid Unicode (U+D800"),
    ],
)
def test_bad_chat_requests_name_the_field(server, body, param, words):
    status, reply = post(server, "/v1/chat/completions", body)
    assert status == 400 and words in reply["error"]["message"] and reply["error"]["param"] == param, reply


def raw(base: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request as given (any method, body and headers; a header given as None is not
    sent) -> (status, JSON reply, the reply's Allow header or None)."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=TIMEOUT)
    headers = {k: v for k, v in ({"Content-Type": "application/json"} | (headers or {})).items() if v is not None}
    conn.request(method, path, body, headers)
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read()), reply.getheader("Allow")


LIMIT = "is more than the 4194304 bytes this server reads"


@pytest.mark.parametrize(
    "method, path, body, headers, status, allow, message, code",
    [
        ("GET", "/v1/completions", b"", None, 405, "POST", "GET /v1/completions: method not allowed (allowed: POST)",
         "method_not_allowed"),
        ("DELETE", "/health", b"", None, 405, "GET", "DELETE /health: method not allowed (allowed: GET)",
         "method_not_allowed"),
        ("POST", "/v1/edits", b"{}", None, 404, None, "POST /v1/edits: no such endpoint", "not_found"),
        ("POST", "/v1/completions", b'{"prompt": "a"}', {"Content-Type": "text/plain"}, 415, None,
         "Content-Type: expected application/json, got 'text/plain'", "unsupported_media_type"),
        ("POST", "/v1/chat/completions", b'{"prompt": "a"}', {"Content-Type": None}, 415, None,
         "Content-Type: expected application/json, got 'none'", "unsupported_media_type"),
        ("POST", "/v1/completions", b"x" * (5 * 2**20), None, 413, None,
         f"body: a Content-Length of 5242880 bytes {LIMIT}", "body_too_large"),
        ("POST", "/v1/completions", b"{}", {"Content-Length": "10000000"}, 413, None,  # bytes that never come
         f"body: a Content-Length of 10000000 bytes {LIMIT}", "body_too_large"),
    ],
)
def test_the_frameworks_own_errors_are_openai_errors(server, client, method, path, body, headers, status, allow,
                                                      message, code):
    """Whole, and a 405 says in its Allow header what is allowed (RFC 9110)."""
    assert raw(server, method, path, body, headers) == (status, {"error": {
        "message": message, "type": "invalid_request_error", "param": None, "code": code}}, allow)
    still_serving(client)


def test_a_request_that_is_not_http_gets_an_openai_error(server, client):
    """uvicorn's own 400, for bytes that are no HTTP request, in OpenAI's shape too."""
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=TIMEOUT) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    status, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert status == "HTTP/1.1 400 Bad Request" and headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body)) and headers["connection"] == "close"
    assert json.loads(body) == {"error": {
        "message": "the request is not valid HTTP/1.1", "type": "invalid_request_error", "param": None,
        "code": "invalid_http"}}
    still_serving(client)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_far_over_the_limit_is_a_413_the_client_reads(server, client, chunked):
    """20 MiB, far more than the socket buffers hold, by Content-Length or chunked: what
    the client is still sending is read and dropped, so it finishes and reads the 413."""
    body = (b" " * 2**20 for _ in range(20)) if chunked else b" " * (20 * 2**20)
    conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"}, encode_chunked=chunked)
    reply = conn.getresponse()
    words = "body: a body of at least" if chunked else "body: a Content-Length of 20971520 bytes"
    assert reply.status == 413 and words in json.loads(reply.read())["error"]["message"]
    still_serving(client)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_the_limit_exactly_is_served_and_one_byte_more_is_a_413(server, chunked):
    """4 MiB (MAX_BODY_BYTES) of a request padded with spaces, by its Content-Length or
    in chunks whose total only the server counts."""
    request = b'{"prompt": [1, 2], "max_tokens": 1}'
    for size, status in ((4 * 2**20, 200), (4 * 2**20 + 1, 413)):
        body = request + b" " * (size - len(request))
        conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=TIMEOUT)
        parts = (body[i:i + 2**20] for i in range(0, size, 2**20)) if chunked else body
        conn.request("POST", "/v1/completions", parts, {"Content-Type": "application/json"}, encode_chunked=chunked)
        reply = conn.getresponse()
        answer = json.loads(reply.read())
        assert reply.status == status and ("choices" if status == 200 else "error") in answer, (size, answer)


@pytest.mark.parametrize(
    "body, check",
    [
        ({"prompt": [1] * 256, "max_tokens": 0}, lambda c: c["text"] == "" and c["finish_reason"] == "length"),
        ({"prompt": [1] * 255, "max_tokens": 1, "temperature": 0}, lambda c: c["finish_reason"] in ("stop", "length")),
        ({"prompt": [1] * 256, "max_tokens": None}, lambda c: c["text"] == "" and c["finish_reason"] == "length"),
        ({"prompt": [[]], "max_tokens": 1, "temperature": 0, "echo": True},
         lambda c: c["text"].startswith("<|endoftext|>")),
        ({"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0},
         lambda c: c["logprobs"]["tokens"] == [decode([t]) for t in PROMPT] and c["logprobs"]["top_logprobs"] ==
         [None] * len(PROMPT)),
        ({"prompt": PROMPT, "max_tokens": 3, "seed": 2**63 - 1, "n": 2}, lambda c: c["finish_reason"] == "length"),
        ({"prompt": "a", "max_tokens": 5, "stop": "\n", "temperature": 0}, lambda c: "\n" not in c["text"]),
        ({"prompt": "a", "max_tokens": 5, "stop": "x" * 100_000, "temperature": 0},
         lambda c: c["finish_reason"] == "length"),
        ({"prompt": "a", "max_tokens": 3, "top_k": 10**30, "min_p": 0.5, "top_p": 1e-300, "temperature": 1e-6},
         lambda c: c["finish_reason"] == "length"),
        ({"prompt": "a", "max_tokens": 3, "repetition_penalty": 1e6, "frequency_penalty": -2, "presence_penalty": 2},
         lambda c: c["finish_reason"] == "length"),
        ({"prompt": PROMPT, "max_tokens": 2, "temperature": None, "top_p": None, "n": None, "stop": None,
          "presence_penalty": None, "echo": None, "stream": None, "logprobs": None, "seed": None, "min_p": None},
         lambda c: c["finish_reason"] == "length" and c["logprobs"] is None),  # null: OpenAI's default
    ],
)
def test_edges_of_every_range_get_the_right_answer(server, body, check):
    status, reply = post(server, "/v1/completions", body)
    assert status == 200 and all(check(c) for c in reply["choices"]), reply
    assert len(reply["choices"]) == (body.get("n") or 1) * (len(body["prompt"]) if isinstance(body["prompt"][0], list)
                                                        else 1)


def test_a_prompt_being_tokenized_leaves_health_answering(server):
    """2 MB of letters without a space: one word of a second or more of byte-pair merges,
    run on a worker thread while the event loop answers /health at once."""
    letters = torch.randint(26, (2_000_000,), generator=torch.Generator().manual_seed(0))
    prompt = (97 + letters).to(torch.uint8).numpy().tobytes().decode()
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(post, server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        waits = []
        while not big.done():
            t0 = time.perf_counter()
            with urllib.request.urlopen(server + "/health", timeout=TIMEOUT) as r:
                assert r.status == 200
            waits.append(time.perf_counter() - t0)
            time.sleep(0.05)
        status, reply = big.result()
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert len(waits) > 5 and max(waits) < 0.5, waits


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


def test_a_request_that_can_never_fit_the_queue_is_a_400_and_a_full_queue_a_429(model):
    """--max_queue 1 on one row (on --port 0, a free port its first line names): n = 2 or
    2 prompts can never be queued (400 naming --max_queue, even with the server idle); a
    third request while one runs and one waits is a 429, and both others finish."""
    proc, base = start_server(model[0], "--max_batch", "1", "--max_queue", "1", "--port", "0")
    try:
        for body, param, count in [({"prompt": [1], "n": 2}, "n", "1 prompt(s) x n 2 = 2"),
                                   ({"prompt": [[1], [2]]}, "prompt", "2 prompt(s) x n 1 = 2")]:
            assert post(base, "/v1/completions", body) == (400, {"error": {
                "message": f"{param}: {count} completions, more than the server's queue can ever hold (--max_queue 1); "
                           "send at most 1 at once", "type": "invalid_request_error", "param": param,
                "code": "too_many_completions"}})
        status, reply = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 2})
        assert status == 400 and reply["error"]["param"] == "n"
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
        log = stop_server(proc)
    assert log.splitlines()[0] == f"fgpt serve: {model[0]} on {base}/v1 (max_batch 1, max_queue 1; busy rows only, prefix cache 1024 MB)", log
    assert all(line.startswith(("fgpt serve: ", "POST /v1/")) for line in log.splitlines()), log  # no uvicorn INFO
    assert base != "http://127.0.0.1:0"


# --- shutdown and restart -------------------------------------------------------------------

LONG = GPTConfig(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """Weights with a context of 1024: a greedy stream of 1000 tokens runs for a second or two."""
    weights = tmp_path_factory.mktemp("long") / "long.safetensors"
    save_params(weights, init_params(LONG, seed=0), LONG)
    return weights


def sse(reply) -> list:
    """The payloads of a server-sent event stream, read to its end."""
    lines = [line[6:].strip() for line in reply.read().decode().split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in lines]


def in_flight(base: str):
    """-> (a stream of 1000 tokens whose first chunk has come, a thread whose request waits
    in the queue behind it, that thread's result)."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [1], "max_tokens": 1000, "temperature": 0,
                                                        "stream": True}), {"Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.readline().startswith(b"data: ")
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(reply=post(base, "/v1/completions",
                                                                      {"prompt": [2], "max_tokens": 5})))
    waiter.start()
    time.sleep(0.3)
    return stream, waiter, queued


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signal_ends_streams_with_an_error_event_and_the_port_is_free_at_once(long_model, sig, code):
    """One row: a client that leaves frees it for the next request. Then a stream in
    flight, a request waiting and an idle keep-alive client: the signal ends the stream
    with an error event then [DONE], the waiting request with a 503, the server within 2 s
    and without a traceback; a server started on the same port at once serves."""
    proc, base = start_server(long_model, "--max_batch", "1")
    port = int(base.rsplit(":", 1)[1])
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        left = c.completions.create(model=None, prompt=[1], max_tokens=900, temperature=0, stream=True)
        for i, _ in enumerate(left):
            if i == 5:
                break
        left.close()
        assert c.completions.create(model=None, prompt=[2], max_tokens=3).choices[0].finish_reason == "length"
        stream, waiter, queued = in_flight(base)
        t0 = time.perf_counter()
        proc.send_signal(sig)
        events = sse(stream)
        waiter.join(TIMEOUT)
        err = ended(proc)
        took = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert events[-2:] == [{"error": {"message": "the server is shutting down", "type": "server_error",
                                      "param": None, "code": "shutting_down"}}, "[DONE]"]
    assert all(c["finish_reason"] is None for e in events[:-2] for c in e["choices"])
    assert queued["reply"] == (503, {"error": {"message": "the server is shutting down", "type": "server_error",
                                               "param": None, "code": "shutting_down"}})
    assert proc.returncode == code and took < 2.0 and "Traceback" not in err and "Error" not in err, err
    assert "the client left after" in err and "its 1 row(s) are freed" in err
    again, _ = start_server(long_model, "--port", str(port))
    stop_server(again)


@pytest.mark.slow
def test_a_server_killed_with_a_client_connected_can_restart_on_its_port_at_once(long_model):
    proc, base = start_server(long_model)
    port = int(base.rsplit(":", 1)[1])
    keep = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    keep.request("GET", "/health")
    assert keep.getresponse().read() == b'{"status":"ok"}'
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again, _ = start_server(long_model, "--port", str(port))
    stop_server(again)
    keep.close()


def test_the_python_serve_writes_each_log_line_to_its_stream_as_it_happens(model, tmp_path):
    """serve(err=f) with f a block-buffered file: the announcement and each request's line
    are in it while the server runs, not when it exits."""
    log, port = tmp_path / "serve.log", free_port()
    code = (f"from functional_gpt.generation.server import serve\n"
            f"serve({str(model[0])!r}, port={port}, err=open({str(log)!r}, 'w', buffering=65536))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def logged(words: str) -> None:
        deadline = time.time() + TIMEOUT
        while not (log.exists() and words in log.read_text()):
            assert proc.poll() is None and time.time() < deadline, f"{words!r} was not logged as it happened"
            time.sleep(0.1)

    try:
        logged(f"on http://127.0.0.1:{port}/v1 (max_batch 8")
        assert post(f"http://127.0.0.1:{port}", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200
        logged("POST /v1/completions: 1 choice(s)")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_client_that_never_finishes_its_body_does_not_keep_the_server_from_exiting(model):
    """uvicorn waits for open requests at shutdown; ours bounds that wait (2 s)."""
    proc, base = start_server(model[0])
    try:
        stuck = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=TIMEOUT)
        stuck.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.5)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        ended(proc, timeout=15)
        assert time.perf_counter() - t0 < 10
        stuck.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


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
                                          (["--max_batch", "0"], "--max_batch: expected an integer >= 1, got 0"),
                                          (["--max_queue", "0"], "--max_queue: expected an integer >= 1, got 0"),
                                          (["--port", "65536"], "--port: expected an integer in 0..65535, got 65536"),
                                          (["--port", "-1"], "--port: expected an integer in 0..65535, got -1"),
                                          (["--quantize", "int4"],
                                           "--quantize: unknown quantization scheme 'int4'; known: int8"),
                                          (["--host", "no.such.host.invalid"],  # glibc and macOS word the reason apart
                                           "fgpt serve: error: --host no.such.host.invalid: cannot resolve it (")])
def test_bad_serve_flags_are_one_line(model, flags, words):
    flags = flags if flags[0] == "--weights" else ["--weights", str(model[0]), *flags]
    done = _serve_cli(*flags) if "--port" in flags else _serve_cli(*flags, "--port", str(free_port()))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and words in lines[0], done.stderr


def test_serve_loads_the_weights_on_the_device_it_is_given(tmp_path, monkeypatch):
    """--device cpu holds on a machine that has CUDA (it is told it has: the best device
    would be CUDA), and the weights are loaded there, quantized when asked."""
    import functional_gpt.model.checkpoint as checkpoint
    from functional_gpt.generation import server as server_module

    tiny = GPTConfig(vocab_size=50257, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    save_params(tmp_path / "w.safetensors", init_params(tiny, seed=0), tiny)
    loaded, load = {}, checkpoint.load_params

    class Loaded(Exception):
        pass

    def engine(params, config, **sizes):
        loaded["int8"] = params["wte"]["weight"].dtype == torch.int8
        raise Loaded

    def load_params(path, **kwargs):
        loaded.update(kwargs)
        return load(path)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint, "load_params", load_params)
    monkeypatch.setattr(server_module, "Engine", engine)
    with pytest.raises(Loaded):
        server_module.serve(str(tmp_path / "w.safetensors"), device="cpu", quantize="int8")
    assert loaded == {"device": torch.device("cpu"), "int8": True}


def test_the_python_serve_takes_the_commands_defaults(tmp_path, monkeypatch):
    """`serve(weights)` from Python listens where `fgpt serve --weights W` does (this
    machine only), with as many rows and as long a queue: seen where serve passes them on."""
    from functional_gpt.cli import build_parser
    from functional_gpt.generation import server as server_module

    tiny = GPTConfig(vocab_size=50257, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    save_params(tmp_path / "w.safetensors", init_params(tiny, seed=0), tiny)
    seen = {}

    class Listened(Exception):
        pass

    def listen(host, port):
        seen.update(host=host, port=port)
        raise Listened

    monkeypatch.setattr(server_module, "Engine", lambda params, config, **sizes: seen.update(sizes))
    monkeypatch.setattr(server_module, "_listen", listen)
    with pytest.raises(Listened):
        server_module.serve(str(tmp_path / "w.safetensors"))
    args = build_parser().parse_args(["serve", "--weights", "w.safetensors"])
    assert seen.pop("proposer") is None and args.draft is None and args.prompt_lookup is None
    assert seen == {"host": "127.0.0.1", "port": 8000, "max_batch": 8, "max_queue": 64, "batch_invariant": False,
                    "prefix_cache_mb": 1024, "speculate": 4} == \
        {name: getattr(args, name) for name in seen}

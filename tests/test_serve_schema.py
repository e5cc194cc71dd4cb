"""Schemathesis over `fgpt serve`'s own OpenAPI document, against a real server process
(a tiny model, 127.0.0.1, a free port, stopped at the end of the module).

Every operation gets generated requests, valid and invalid, and each answer must: not be
a 5xx, have a status and a content type the document lists, match the document's schema
(OpenAI's error object for every error), and refuse what the document refuses
(negative_data_rejection). Left out: positive_data_acceptance, since no schema can say
that a prompt and max_tokens must fit the context together or that token ids must be
below the vocabulary's size in each prompt of a list: those valid-looking requests get a
400 naming the field. After the run the server must still answer /health and give the
same greedy text as before.

CI's budget is bounded and derandomized (conftest's "ci" profile: at most 60 generated
cases per operation and phase, the same every run); SCHEMATHESIS_MAX_EXAMPLES=N sets the
number per operation for a deeper run (README, maintainers)."""

import json
import os
import urllib.request

import pytest
from hypothesis import settings

from functional_gpt import GPTConfig, init_params, save_params

from test_serve import TIMEOUT, start_server, stop_server

schemathesis = pytest.importorskip("schemathesis")
jsonschema_rs = pytest.importorskip("jsonschema_rs")  # Schemathesis's own validator

TINY = GPTConfig(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2)
CHECKS_OFF = ("positive_data_acceptance",)
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "0")) or None
GREEDY = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
CALLS = {}  # "METHOD /path": cases sent


def greedy(base: str) -> str:
    request = urllib.request.Request(base + "/v1/completions", data=json.dumps(GREEDY).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
        return json.loads(reply.read())["choices"][0]["text"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, the greedy text before any generated request)."""
    weights = tmp_path_factory.mktemp("schema") / "tiny.safetensors"
    save_params(weights, init_params(TINY, seed=1), TINY)
    proc, base = start_server(weights, "--max_batch", "4", "--max_queue", "32")
    try:  # stopped even when the first request fails (a server left running otherwise)
        yield base, greedy(base)
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log, log[-3000:]


def document() -> dict:
    """The OpenAPI document a server of TINY serves (the same function builds it in the
    process; a test below checks that the process serves this very document)."""
    from functional_gpt.generation.engine import Engine
    from functional_gpt.generation.server import Server, create_app

    params = init_params(TINY, seed=1)
    return create_app(Server(Engine(params, TINY, max_batch=1), TINY, model_name="tiny")).openapi()


# Built at import, as Schemathesis parametrizes at collection: its lazy from_fixture loader
# fails on this pytest (it sets Function._nodeid, which pytest 9 no longer has).
schema = schemathesis.openapi.from_dict(document())
schema.config.checks.update(excluded_check_names=list(CHECKS_OFF))


def test_the_server_serves_the_document_the_cases_come_from(served):
    with urllib.request.urlopen(served[0] + "/openapi.json", timeout=TIMEOUT) as reply:
        assert json.loads(reply.read()) == document()


@schema.parametrize()
@(settings(max_examples=MAX_EXAMPLES) if MAX_EXAMPLES else (lambda test: test))
def test_every_answer_conforms_to_the_document_and_none_is_a_5xx(case, served):
    CALLS[f"{case.method} {case.path}"] = CALLS.get(f"{case.method} {case.path}", 0) + 1
    case.call_and_validate(base_url=served[0], timeout=TIMEOUT)


def test_after_the_generated_requests_the_server_serves_the_same_greedy_text(served):
    """Also: every POST operation got its share of generated requests (counted above)."""
    print("Schemathesis cases sent:", CALLS)
    assert all(CALLS.get(f"POST {path}", 0) >= 50 for path in ("/v1/completions", "/v1/chat/completions")), CALLS
    base, before = served
    with urllib.request.urlopen(base + "/health", timeout=TIMEOUT) as reply:
        assert json.loads(reply.read()) == {"status": "ok"}
    assert greedy(base) == before


def _objects(node) -> list[dict]:
    """Every JSON object in `node`, itself first, depth first."""
    if isinstance(node, dict):
        return [node] + [o for v in node.values() for o in _objects(v)]
    return [o for v in node for o in _objects(v)] if isinstance(node, list) else []


def _refs(node) -> list[str]:
    return [o["$ref"] for o in _objects(node) if "$ref" in o]


def test_the_document_says_what_the_streams_and_errors_are(served):
    """Schemathesis reads JSON answers only: here each event of a real stream is checked
    against the event schema the document gives for it (its data: a chunk, an error
    object or [DONE]), every $ref of the document resolves, and every error status of a
    generation endpoint is OpenAI's error object."""
    doc = document()
    assert {ref for ref in _refs(doc) if ref.removeprefix("#/components/schemas/") not in doc["components"]["schemas"]} \
        == set()
    error = {"error": {"message": "m", "type": "server_error", "param": None, "code": None}}
    for path, chunk, body in (("/v1/completions", "CompletionChunk", {"prompt": "Once", "max_tokens": 3}),
                              ("/v1/chat/completions", "ChatChunk", {"messages": [{"role": "user", "content": "Hi"}],
                                                                     "max_tokens": 3})):
        responses = doc["paths"][path]["post"]["responses"]
        for status in ("400", "404", "405", "413", "415", "429", "500", "503"):
            assert responses[status] == {"description": "OpenAI's error object", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}, (path, status)
        event = responses["200"]["content"]["text/event-stream"]["schema"]
        data = event["properties"]["data"]["anyOf"]
        assert data[1]["type"] == "string" and data[1]["contentMediaType"] == "application/json"
        content = jsonschema_rs.validator_for(data[1]["contentSchema"] | {"components": doc["components"]})
        events = jsonschema_rs.validator_for(event)
        request = urllib.request.Request(served[0] + path, data=json.dumps(body | {"stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            sent = [line[len("data: "):] for line in reply.read().decode().splitlines() if line.startswith("data: ")]
        assert len(sent) >= 3 and sent[-1] == "[DONE]", sent
        assert all(events.is_valid({"data": s}) for s in sent), sent
        assert all(content.is_valid(json.loads(s)) for s in sent[:-1]), sent
        assert content.is_valid(error) and not content.is_valid({"bogus": 1})
        assert not content.is_valid(json.loads(sent[0]) | {"object": "bogus"})
        assert not events.is_valid({"data": 5}) and not events.is_valid({}) and not events.is_valid([])
        assert data[1]["contentSchema"]["anyOf"][0] == {"$ref": f"#/components/schemas/{chunk}"}


def _integers(node) -> list[dict]:
    return [o for o in _objects(node) if o.get("type") == "integer"]


def test_the_document_bounds_token_ids_and_lengths_by_the_model():
    """The bounds a schema can state, from TINY itself: a token id (in one list of ids or
    a list of lists) is at most vocab_size - 1; max_tokens, and chat's
    max_completion_tokens, at most n_positions; chat's max_tokens, which yields to
    max_completion_tokens, has no bound of its own."""
    schemas = document()["components"]["schemas"]
    token_ids = _integers(schemas["CompletionBody"]["properties"]["prompt"])
    assert token_ids == [{"type": "integer", "minimum": 0, "maximum": TINY.vocab_size - 1}] * 2, token_ids
    for body, name in (("CompletionBody", "max_tokens"), ("ChatBody", "max_completion_tokens")):
        assert _integers(schemas[body]["properties"][name]) == [
            {"type": "integer", "minimum": 0, "maximum": TINY.n_positions}], (body, name)
    assert _integers(schemas["ChatBody"]["properties"]["max_tokens"]) == [{"type": "integer", "minimum": 0}]

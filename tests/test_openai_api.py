"""The request bodies of `fgpt serve` (generation/openai_api.py), in process: what each
field takes, its default, and the one-line refusal the server sends, word for word."""

import pytest
from pydantic import ValidationError

from functional_gpt import UserError
from functional_gpt.generation.openai_api import (ChatBody, CompletionBody, api_temperature, check_prompt,
                                                  check_stop)

STOP_WORDS = "stop: expected a non-empty string or a list of at most 4 non-empty strings, got"
PROMPT_WORDS = ("prompt: expected a string, a list of strings, a list of token ids (integers >= 0) or a list of "
                "token-id lists, got")


def _refusal(value, check, name):
    with pytest.raises(UserError) as e:
        check(name, value)
    return str(e.value)


@pytest.mark.parametrize("value, stops", [
    (None, ()), ("ab", ("ab",)), ("\n\n", ("\n\n",)), (["a", "bc"], ("a", "bc")), (["1", "2", "3", "4"], ("1", "2", "3", "4")),
    (("x",), ("x",)),
])
def test_stop_takes_a_string_or_up_to_four(value, stops):
    assert check_stop("stop", value) == stops


@pytest.mark.parametrize("value, given", [
    ("", "'' (a str)"), ([""], "a list of 1"), (["a", 1], "a list of 2"),
    (["1", "2", "3", "4", "5"], "a list of 5"), ({"a": 1}, "a dict"),
    (3, "3 (an int)"),
])
def test_a_bad_stop_is_named_with_what_was_given(value, given):
    assert _refusal(value, check_stop, "stop") == f"{STOP_WORDS} {given}"


@pytest.mark.parametrize("value, prompts", [
    ("a", ["a"]), (["a", "b"], ["a", "b"]), ([0, 5], [[0, 5]]), ([0], [[0]]), ([[0, 1], [2]], [[0, 1], [2]]),
    ([[0]], [[0]]), ([""], [""]),
])
def test_prompt_takes_text_or_token_ids_and_id_zero_is_a_token(value, prompts):
    assert check_prompt("prompt", value) == prompts


@pytest.mark.parametrize("value, given", [
    ([], "a list of 0"), ([1, -1], "a list of 2"), ([[0], [-1]], "a list of 2"),
    ([[0], "a"], "a list of 2"), ([True], "a list of 1"), (None, "None"),
    ([[0, 1.0]], "a list of 1"),
])
def test_a_bad_prompt_is_named_with_what_was_given(value, given):
    assert _refusal(value, check_prompt, "prompt") == f"{PROMPT_WORDS} {given}"


def test_temperature_is_sampling_rule_within_openais_range():
    assert api_temperature("temperature", 0) == 0.0 and api_temperature("temperature", 2) == 2.0
    assert _refusal(2.5, api_temperature, "temp") == "temp: expected a finite number in [0, 2], got 2.5 (a float)"
    assert _refusal("hot", api_temperature, "temp") == \
        "temp: expected 0 (greedy) or a finite number >= 1e-06, got 'hot' (a str)"
    assert _refusal(-1, api_temperature, "temp") == "temp: expected 0 (greedy) or a finite number >= 1e-06, got -1 (an int)"


def test_defaults_and_null_mean_openais_defaults():
    body = CompletionBody.model_validate({})
    assert (body.prompt, body.max_tokens, body.temperature, body.top_p, body.n, body.stop, body.logprobs,
            body.echo, body.stream, body.seed, body.top_k, body.min_p, body.repetition_penalty) == \
        (["<|endoftext|>"], 16, 1.0, 1.0, 1, (), None, False, False, None, None, 0.0, 1.0)
    nulls = CompletionBody.model_validate({k: None for k in ("prompt", "temperature", "stop", "n", "echo", "top_p")})
    assert (nulls.prompt, nulls.temperature, nulls.stop, nulls.n, nulls.echo, nulls.top_p) == \
        (["<|endoftext|>"], 1.0, (), 1, False, 1.0)
    assert CompletionBody.model_validate({"max_tokens": None}).max_tokens is None  # null: up to the context
    assert CompletionBody.model_validate({"stop": "ab", "prompt": [0]}).stop == ("ab",)
    chat = ChatBody.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert (chat.max_tokens, chat.max_completion_tokens, chat.temperature) == (None, None, 1.0)
    schema = CompletionBody.model_json_schema()["properties"]
    assert (schema["max_tokens"]["default"], schema["temperature"]["default"], schema["stop"]["default"]) == (16, 1.0, [])


@pytest.mark.parametrize("body, field, message", [
    ({"temperature": 3}, "temperature", "temperature: expected a finite number in [0, 2], got 3.0 (a float)"),
    ({"stop": ""}, "stop", f"{STOP_WORDS} '' (a str)"),
    ({"n": 17}, "n", "n: expected an integer in 1..16, got 17 (an int)"),
    ({"max_tokens": -1}, "max_tokens", "max_tokens: expected an integer >= 0, got -1 (an int)"),
    ({"top_k": 0}, "top_k", "top_k: expected an integer >= 1, got 0 (an int)"),
])
def test_a_checked_field_refuses_with_its_own_name_and_the_rules_words(body, field, message):
    with pytest.raises(ValidationError) as e:
        CompletionBody.model_validate(body)
    first = e.value.errors()[0]
    assert (first["type"], first["loc"], first["msg"]) == ("checked", (field,), message)

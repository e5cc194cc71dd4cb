"""OpenAI's API as `fgpt serve` takes and answers it: the request bodies, each field
checked by the library's own rule (`sampling.RULES`, the engine's `Request` rules, through
checks.py, so what the server accepts the engine accepts and a refusal names the field in
the words `Sampling(...)` and `fgpt generate` use), and the response and error shapes that
/openapi.json describes (and Schemathesis checks the answers against)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, WithJsonSchema
from pydantic_core import PydanticCustomError

from ..checks import check_bool, check_int, check_number, describe
from ..errors import UserError
from .engine import MAX_LOGPROBS, MAX_PENALTY, check_logprobs, check_penalty
from .sampling import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, MIN_TEMPERATURE, RULES

MAX_N, MAX_STOPS = 16, 4  # OpenAI's
MAX_TEMPERATURE = 2.0  # OpenAI's range; the sampling rule alone allows more
MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64 (the engine takes 0..2**64-1)
NULL = {"type": "null"}


# ----------------------------------------------------------------------------- request bodies


def checked(check, schema: dict, default, *, null=...):
    """The type of a request field checked by `check(name, value)` (a library rule,
    through checks.py): a UserError becomes a 400 naming the field in the rule's words.
    `default` when absent; JSON null, which OpenAI allows for its fields, means the
    default too (or `null` when given). `schema`, and null, say the same in /openapi.json."""
    null = default if null is ... else null

    def validate(value, info):
        value = null if value is None else value
        if value is None:
            return None
        try:
            return check(info.field_name, value)
        except UserError as e:
            raise PydanticCustomError("checked", "{message}", {"message": str(e)}) from None

    return Annotated[Any, Field(default), BeforeValidator(validate), WithJsonSchema({"anyOf": [schema, NULL]})]


def api_temperature(name: str, value) -> float:
    """Sampling's temperature rule, within OpenAI's range [0, 2]."""
    return check_number(name, RULES["temperature"](name, value), 0.0, MAX_TEMPERATURE)


def check_stop(name: str, value) -> tuple[str, ...]:
    """None, a non-empty string or a list of at most 4 of them -> a tuple of stop strings."""
    stops = () if value is None else (value,) if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS or \
            not all(isinstance(s, str) and s for s in stops):
        raise UserError(f"{name}: expected a non-empty string or a list of at most {MAX_STOPS} non-empty strings, "
                        f"got {describe(value)}")
    return tuple(stops)


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def check_prompt(name: str, value) -> list:
    """A string, a list of strings, token ids or lists of them -> a list of prompts (each
    a string or a list of ids; the ids' range is the model's, checked in `prompts_of`)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        if all(_is_id(t) for t in value):
            return [value]
        if all(isinstance(p, list) and all(_is_id(t) for t in p) for p in value):
            return value
    raise UserError(f"{name}: expected a string, a list of strings, a list of token ids (integers >= 0) or a list "
                    f"of token-id lists, got {describe(value)}")


IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
PENALTY = {"type": "number", "minimum": -MAX_PENALTY, "maximum": MAX_PENALTY}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class GenerationFields(BaseModel):
    """The fields completions and chat share: OpenAI's names, the library's rules,
    unknown fields refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    model: str | None = None
    temperature: checked(api_temperature, {"anyOf": [{"type": "number", "const": 0}, {
        "type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE}]}, 1.0)
    top_p: checked(RULES["top_p"], {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, 1.0)
    n: checked(lambda name, v: check_int(name, v, 1, MAX_N), {"type": "integer", "minimum": 1, "maximum": MAX_N}, 1)
    stream: checked(check_bool, {"type": "boolean"}, False)
    stream_options: StreamOptions | None = None
    stop: checked(check_stop, {"anyOf": [{"type": "string", "minLength": 1}, {
        "type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOPS}]}, ())
    presence_penalty: checked(check_penalty, PENALTY, 0.0)
    frequency_penalty: checked(check_penalty, PENALTY, 0.0)
    seed: checked(lambda name, v: check_int(name, v, 0, MAX_SEED), {"type": "integer", "minimum": 0,
                                                                    "maximum": MAX_SEED}, None)
    user: str | None = None
    # our extra sampling rules (send them in the openai client's extra_body)
    top_k: checked(RULES["top_k"], {"type": "integer", "minimum": 1}, None)
    min_p: checked(RULES["min_p"], {"type": "number", "minimum": 0, "exclusiveMaximum": 1}, 0.0)
    repetition_penalty: checked(RULES["repetition_penalty"], {
        "type": "number", "minimum": MIN_REPETITION_PENALTY, "maximum": MAX_REPETITION_PENALTY}, 1.0)


LENGTH = {"type": "integer", "minimum": 0}


class CompletionBody(GenerationFields):
    prompt: checked(check_prompt, {"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}, IDS | {"minItems": 1},
        {"type": "array", "items": IDS, "minItems": 1}]}, "<|endoftext|>")
    # absent: 16; null: up to the context
    max_tokens: checked(lambda name, v: check_int(name, v, 0), LENGTH, 16, null=None)
    logprobs: checked(check_logprobs, {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}, None)
    echo: checked(check_bool, {"type": "boolean"}, False)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: checked(lambda name, v: check_int(name, v, 0), LENGTH, None)
    max_completion_tokens: checked(lambda name, v: check_int(name, v, 0), LENGTH, None)


# ----------------------------------------------------------------------------- response shapes (for /openapi.json)


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorObject


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None  # the last chunk's, with stream_options.include_usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok"]


def error_responses(*statuses: int) -> dict:
    return {status: {"model": ErrorBody, "description": "OpenAI's error object"} for status in statuses}


def event_stream(chunk: type[BaseModel]) -> dict:
    """The server-sent events of a stream ("stream": true), as OpenAPI 3.1 describes one
    event: its data a JSON chunk, a JSON error object (a stream cut short) or [DONE]."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                         {"$ref": "#/components/schemas/ErrorBody"}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}
    return {"text/event-stream": {"schema": event}}


# The framework's own errors can meet any path; 415 and 413 any body.
COMMON = error_responses(400, 404, 405, 413, 415)
GENERATION = COMMON | error_responses(429, 500, 503)

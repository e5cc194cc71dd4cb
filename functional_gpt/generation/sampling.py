"""Choosing the next token: small pure functions over next-token logits [B, V].

`process_logits` composes the rules in transformers' order (its GenerationMixin puts
the repetition penalty among the processors, then the warpers temperature, top-k,
top-p, min-p):

    repetition penalty -> temperature -> top-k -> top-p -> min-p

A rule at its neutral value (penalty 1, temperature 1, top_k None, top_p 1, min_p 0) is
skipped. Filtered-out tokens get -inf. `sample` then draws from the softmax, or takes
the argmax of the penalised logits when greedy (as transformers does, greedy ignores
temperature and the filters).
"""

import math
from dataclasses import dataclass

import torch

from ..errors import UserError

MIN_TEMPERATURE = 1e-6  # logits / 1e-6 stays finite for any |logit| < 3e32


@dataclass(frozen=True)
class Sampling:
    """How to pick each token. temperature 0 means greedy, like greedy=True; a positive
    temperature must be at least MIN_TEMPERATURE (below it the float32 division of the
    logits overflows to inf, and the draw is greedy in all but name: use 0)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"--{name} must be a finite number, got {value!r}")
        if not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):
            raise UserError(f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise UserError(f"--top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise UserError(f"--min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL's penalty on tokens already in the sequence: positive logits divided by
    `penalty`, negative ones multiplied. seen: bool [B, V], True for such tokens."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits, temperature: float):  # temperature > 0
    return logits / temperature


def top_k_filter(logits, k: int):
    """Keep the k highest logits of each row (and any tied with the k-th)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p: float):
    """Nucleus: keep the most probable tokens until their mass reaches p, that is each
    token whose more probable tokens have mass < p (so the top token always stays)."""
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits, min_p: float):
    """Drop tokens less probable than min_p times the top token's probability."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def process_logits(logits, sampling: Sampling, seen=None):
    """logits: float [B, V] -> filtered logits [B, V], the rules in the module's order.
    seen: bool [B, V] (tokens already in each row), needed for the repetition penalty."""
    if sampling.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.is_greedy:
        return logits
    if sampling.temperature != 1.0:
        logits = apply_temperature(logits, sampling.temperature)
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    if sampling.min_p > 0.0:
        logits = min_p_filter(logits, sampling.min_p)
    return logits


def sample(logits, sampling: Sampling, seen=None, generator: torch.Generator | None = None):
    """logits: float [B, V] -> token ids int64 [B]: argmax when greedy, else a draw from
    the processed distribution using `generator` (seeded for reproducible runs)."""
    logits = process_logits(logits.float(), sampling, seen)
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def sample_rows(logits, sampling: Sampling, seen=None, generators=None):
    """`sample` row by row, row b drawing from generators[b] (None: torch's global RNG):
    logits float [B, V] -> int64 [B]. A row's token depends only on its own logits and
    generator, never on the other rows (greedy rows take the argmax all at once)."""
    if sampling.is_greedy:
        return sample(logits, sampling, seen)
    generators = generators or [None] * logits.shape[0]
    return torch.cat([sample(logits[b : b + 1], sampling, None if seen is None else seen[b : b + 1], generators[b])
                      for b in range(logits.shape[0])])

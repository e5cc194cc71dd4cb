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

from dataclasses import dataclass

import torch

from ..checks import check_bool, check_int, check_number, check_tensor, describe
from ..errors import UserError

MIN_TEMPERATURE = 1e-6  # logits / 1e-6 stays finite for any |logit| < 3e32
# The penalty divides positive logits and multiplies negative ones: within these bounds
# both stay finite for any |logit| < 3e32, as with MIN_TEMPERATURE.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-6, 1e6


def check_temperature(name: str, value) -> float:
    """0 (greedy) or a finite number >= MIN_TEMPERATURE (below it the float32 division of
    the logits overflows to inf, and the draw is greedy in all but name: use 0)."""
    try:
        plain = check_number(name, value, 0)
    except UserError:
        plain = None
    if plain is None or 0 < plain < MIN_TEMPERATURE:
        raise UserError(f"{name}: expected 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                        f"got {describe(value)}")
    return plain


# The one statement of each setting's rule: rule(name, value) -> the plain value, or a
# UserError naming `name`. Sampling checks its fields with them; the CLI calls them with
# its flags' names and the server's request model with its fields' names, so every door
# accepts the same values and words its refusals alike.
RULES = {
    "temperature": check_temperature,
    "top_k": lambda name, value: None if value is None else check_int(name, value, 1),
    "top_p": lambda name, value: check_number(name, value, 0, 1, low_open=True),
    "min_p": lambda name, value: check_number(name, value, 0, 1, high_open=True),
    "repetition_penalty": lambda name, value: check_number(name, value, MIN_REPETITION_PENALTY,
                                                           MAX_REPETITION_PENALTY),
    "greedy": check_bool,
}


@dataclass(frozen=True)
class Sampling:
    """How to pick each token (each field checked by its entry in RULES, and kept in its
    plain form: an int, a float, a bool). temperature 0 means greedy, like greedy=True."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        for name, rule in RULES.items():
            object.__setattr__(self, name, rule(name, getattr(self, name)))  # frozen: set once, here

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
    drop_sorted[..., 0] = False  # also when p rounds to 0 in the logits' dtype (p < 1.4e-45 in float32)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits, min_p: float):
    """Drop tokens less probable than min_p times the top token's probability."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def process_logits(logits, sampling: Sampling, seen=None):
    """logits: float [B, V] -> filtered logits [B, V], the rules in the module's order (a
    new tensor; `logits` is never written). seen: bool [B, V] (tokens already in each
    row), needed for the repetition penalty."""
    _check_inputs(logits, sampling, seen)
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
    the processed distribution using `generator` (seeded for reproducible runs). Each row
    must hold a distribution: finite logits or -inf (a token ruled out), one finite at
    least, also once the rules are applied (they keep |logit| < 3e32 finite)."""
    _check_inputs(logits, sampling, seen)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise UserError(f"generator: expected a torch.Generator or None, got {describe(generator)}")
    processed = process_logits(logits.float(), sampling, seen)
    finite = torch.isfinite(processed)
    if not bool((finite | (processed == float("-inf"))).all() & finite.any(-1).all()):  # one host sync
        raise UserError(f"logits: expected finite values or -inf (a token ruled out), a finite one in every "
                        f"row, also after the sampling rules; got {_non_finite(processed)}")
    if sampling.is_greedy:
        return processed.argmax(dim=-1)
    if generator is not None and generator.device != processed.device:
        raise UserError(f"generator: is on {generator.device}, the logits on {processed.device}")
    return torch.multinomial(processed.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def sample_rows(logits, sampling: Sampling, seen=None, generators=None):
    """`sample` row by row, row b drawing from generators[b] (None: torch's global RNG):
    logits float [B, V] -> int64 [B]. A row's token depends only on its own logits and
    generator, never on the other rows (greedy rows take the argmax all at once)."""
    _check_inputs(logits, sampling, seen)
    if sampling.is_greedy:
        return sample(logits, sampling, seen)
    if generators is not None and (not isinstance(generators, (list, tuple)) or len(generators) != len(logits)):
        raise UserError(f"generators: expected a list of {len(logits)} (one per row of the logits), "
                        f"got {describe(generators)}")
    generators = generators or [None] * logits.shape[0]
    return torch.cat([sample(logits[b : b + 1], sampling, None if seen is None else seen[b : b + 1], generators[b])
                      for b in range(logits.shape[0])])


def _check_inputs(logits, sampling, seen) -> None:
    check_tensor("logits", logits, dims="B V", kind="float")
    if not isinstance(sampling, Sampling):
        raise UserError(f"sampling: expected a Sampling, got {describe(sampling)}")
    if seen is not None:
        check_tensor("seen", seen, dims="B V", kind="bool", shape=tuple(logits.shape))
        if seen.device != logits.device:
            raise UserError(f"seen: is on {seen.device}, the logits on {logits.device}")


def _non_finite(logits) -> str:
    """What keeps these logits from being a distribution, in a few words: "2 NaN, 1 +inf"."""
    nan, inf = int(torch.isnan(logits).sum()), int((logits == float("inf")).sum())
    empty = int((~torch.isfinite(logits).any(-1)).sum())
    found = [(nan, "NaN"), (inf, "+inf"), (empty, "row(s) with no finite value")]
    return ", ".join(f"{n} {what}" for n, what in found if n)

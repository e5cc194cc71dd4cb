"""Each sampling rule against transformers' own logits processor on the same logits,
and the composed order against transformers' GenerationMixin list."""

import math
import re

import pytest
import torch

from functional_gpt import UserError
from functional_gpt.checks import describe
from functional_gpt.generation.sampling import (
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    Sampling,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)

lp = pytest.importorskip("transformers.generation.logits_process")

B, V = 4, 300


@pytest.fixture
def logits():
    # Rows of different sharpness, so each filter keeps a different number of tokens.
    scale = torch.tensor([0.5, 1.0, 3.0, 8.0])[:, None]
    return torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * scale


@pytest.fixture
def history():
    return torch.randint(V, (B, 12), generator=torch.Generator().manual_seed(1))


def seen_of(history):
    return torch.zeros(B, V, dtype=torch.bool).scatter(1, history, True)


def assert_same(ours, theirs):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(theirs)
    assert 0 < kept.sum() < kept.numel()  # the rule did something and kept something
    torch.testing.assert_close(ours[kept], theirs[kept])


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_temperature(logits, history, t):
    theirs = lp.TemperatureLogitsWarper(t)(history, logits)
    torch.testing.assert_close(apply_temperature(logits, t), theirs)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k(logits, history, k):
    ours = top_k_filter(logits, k)
    assert_same(ours, lp.TopKLogitsWarper(k)(history, logits))
    assert (~torch.isinf(ours)).sum(-1).tolist() == [k] * B


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p(logits, history, p):
    assert_same(top_p_filter(logits, p), lp.TopPLogitsWarper(p)(history, logits))


@pytest.mark.parametrize("p", [0.05, 0.2, 0.7])
def test_min_p(logits, history, p):
    assert_same(min_p_filter(logits, p), lp.MinPLogitsWarper(p)(history, logits))


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty(logits, history, penalty):
    theirs = lp.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    ours = apply_repetition_penalty(logits, seen_of(history), penalty)
    torch.testing.assert_close(ours, theirs)
    assert not torch.equal(ours, logits)


def test_composed_order_matches_transformers(logits, history):
    s = Sampling(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    chain = lp.LogitsProcessorList([
        lp.RepetitionPenaltyLogitsProcessor(1.2),
        lp.TemperatureLogitsWarper(0.8),
        lp.TopKLogitsWarper(40),
        lp.TopPLogitsWarper(0.9),
        lp.MinPLogitsWarper(0.05),
    ])
    assert_same(process_logits(logits, s, seen_of(history)), chain(history, logits.clone()))


def test_greedy_is_argmax_of_penalised_logits(logits, history):
    seen = seen_of(history)
    s = Sampling(greedy=True, repetition_penalty=1.5, top_k=3, temperature=0.5)
    expected = apply_repetition_penalty(logits, seen, 1.5).argmax(-1)
    assert torch.equal(sample(logits, s, seen), expected)
    assert torch.equal(sample(logits, Sampling(temperature=0)), logits.argmax(-1))


def test_sampling_is_seeded_and_stays_in_the_filtered_set(logits):
    s = Sampling(top_k=5)
    draw = lambda seed: torch.stack(
        [sample(logits, s, generator=g) for g in [torch.Generator().manual_seed(seed)] for _ in range(50)]
    )
    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    top5 = logits.topk(5).indices
    assert all(bool((top5[i] == a[:, i, None]).any(-1).all()) for i in range(B))
    assert len(set(a[:, 0].tolist())) > 1  # it samples, not argmax


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits.expand(1000, 4), Sampling(temperature=2.0), generator=g) for _ in range(10)])
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, (logits[0] / 2.0).softmax(-1), atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_settings_name_the_field(kwargs, flag):
    with pytest.raises(UserError, match=f"^{flag}: expected"):
        Sampling(**kwargs)


# Boundaries and neutral values, on logits whose softmax is exact in float32, so that
# "<" against "<=" and "skipped" against "applied at the neutral value" show.


def test_top_p_drops_a_token_once_the_more_probable_ones_reach_p_exactly():
    """Four equal logits: probabilities exactly 1/4, masses before each token 0, 1/4, 1/2,
    3/4. At p = 1/2 the third token's predecessors have reached p, so two stay; a hair
    above 1/2, three stay (transformers' TopPLogitsWarper keeps the same counts)."""
    logits = torch.zeros(1, 4)
    assert (~torch.isinf(top_p_filter(logits, 0.5))).sum() == 2
    assert (~torch.isinf(top_p_filter(logits, 0.5 + 1e-6))).sum() == 3
    theirs = lp.TopPLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    assert (~torch.isinf(theirs)).sum() == 2


def test_min_p_keeps_a_token_at_exactly_min_p_times_the_top():
    """Probabilities exactly 1/2, 1/4, 1/4: at min_p = 1/2 the 1/4 tokens sit on the
    threshold and stay ("less probable than" is strict); just above it they go."""
    logits = torch.tensor([[0.0, -math.log(2), -math.log(2)]])
    assert torch.equal(logits.softmax(-1), torch.tensor([[0.5, 0.25, 0.25]]))
    assert not torch.isinf(min_p_filter(logits, 0.5)).any()
    assert torch.isinf(min_p_filter(logits, 0.5 + 1e-6)).tolist() == [[False, True, True]]


def test_neutral_settings_leave_the_logits_bit_identical():
    """Default Sampling skips every rule: even a token so improbable that float32 puts the
    mass before it at exactly 1.0 (a top-p of 1 applied anyway would drop it) stays. A
    repetition penalty with no `seen` tokens given changes nothing either."""
    logits = torch.tensor([[0.0, -30.0, 5.0, -60.0], [1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(process_logits(logits, Sampling()), logits)
    assert torch.equal(process_logits(logits, Sampling(repetition_penalty=1.3)), logits)


@pytest.mark.parametrize(
    "sampling, processor",
    [
        (Sampling(repetition_penalty=2.0), lp.RepetitionPenaltyLogitsProcessor(2.0)),
        (Sampling(temperature=2.0), lp.TemperatureLogitsWarper(2.0)),
        (Sampling(top_k=1), lp.TopKLogitsWarper(1)),
        (Sampling(top_p=0.5), lp.TopPLogitsWarper(0.5)),
        (Sampling(min_p=0.1), lp.MinPLogitsWarper(0.1)),
    ],
)
def test_each_rule_alone_takes_effect_through_process_logits(logits, history, sampling, processor):
    """Each setting away from its neutral value (at the round values 2.0, 1, 0.5, 0.1)
    is applied by process_logits, as transformers' processor alone would."""
    ours = process_logits(logits, sampling, seen_of(history))
    theirs = processor(history, logits.clone())
    assert not torch.equal(ours, logits)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_top_k_larger_than_the_vocabulary_keeps_everything(logits):
    assert torch.equal(top_k_filter(logits, V + 5), logits)
    assert torch.equal(sample(logits, Sampling(top_k=V + 5, greedy=True)), logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=0.0), dict(temperature=MIN_TEMPERATURE), dict(temperature=1e-3), dict(top_k=1), dict(top_p=1e-3), dict(top_p=1.0),
     dict(min_p=0.0), dict(min_p=0.999), dict(repetition_penalty=1e-3)],
)
def test_settings_at_the_edge_of_their_range_are_accepted(kwargs):
    Sampling(**kwargs)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1", True, None])
def test_a_setting_that_is_not_a_finite_number_is_named(name, value):
    """bool is refused although it is an int: Sampling(temperature=True) is a mistake."""
    with pytest.raises(UserError, match=f"^{name}: expected (0 .greedy. or )?a finite number.*, got "
                                        f"{re.escape(describe(value))}$"):
        Sampling(**{name: value})


@pytest.mark.parametrize("value", [True, 2.5, "3"])
def test_top_k_must_be_an_integer(value):
    with pytest.raises(UserError, match=f"^top_k: expected an integer >= 1, got {re.escape(describe(value))}$"):
        Sampling(top_k=value)


def test_temperature_just_below_the_minimum_is_refused():
    with pytest.raises(UserError, match="^temperature: expected 0 .greedy. or a finite number >= 1e-06, got 5e-07"):
        Sampling(temperature=MIN_TEMPERATURE / 2)


@pytest.mark.parametrize("p", [1e-300, 5e-324, 1e-46])
def test_a_top_p_that_rounds_to_zero_in_float32_still_keeps_the_top_token(logits, p):
    """p below float32's smallest positive becomes 0 against the float32 masses, and every
    mass-before (0 for the top token) reached it: the top token must stay all the same."""
    kept = ~torch.isinf(top_p_filter(logits, p))
    assert torch.equal(kept, torch.nn.functional.one_hot(logits.argmax(-1), V).bool())
    assert torch.equal(sample(logits, Sampling(top_p=p), generator=torch.Generator().manual_seed(0)),
                       logits.argmax(-1))


@pytest.mark.parametrize("kwargs", [dict(repetition_penalty=1e-300), dict(repetition_penalty=1e7),
                                    dict(repetition_penalty=float("inf")), dict(temperature=1e-30)])
def test_settings_whose_arithmetic_overflows_are_refused(kwargs):
    """repetition_penalty 1e-300 once passed and made inf logits inside a decode step."""
    with pytest.raises(UserError, match=f"^{next(iter(kwargs))}: expected"):
        Sampling(**kwargs)


def test_the_repetition_penalty_at_its_bounds_keeps_logits_finite():
    logits, seen = torch.tensor([[3e32, -3e32, 1.0]]), torch.tensor([[True, True, False]])
    for penalty in (MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY):
        assert torch.isfinite(process_logits(logits, Sampling(repetition_penalty=penalty), seen)).all()

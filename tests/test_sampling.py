"""Each sampling rule against transformers' own logits processor on the same logits,
and the composed order against transformers' GenerationMixin list."""

import pytest
import torch

from functional_gpt import UserError
from functional_gpt.sampling import (
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
        (dict(temperature=-0.1), "--temperature"),
        (dict(top_k=0), "--top_k"),
        (dict(top_p=0.0), "--top_p"),
        (dict(top_p=1.5), "--top_p"),
        (dict(min_p=1.0), "--min_p"),
        (dict(min_p=-0.1), "--min_p"),
        (dict(repetition_penalty=0.0), "--repetition_penalty"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        Sampling(**kwargs)

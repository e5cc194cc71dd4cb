"""Inference's fast paths against transformers' GPT2LMHeadModel, on trained-like weights
(random biases and layer-norm gains, conftest.hf_model): `prefill` and `decode_step`,
`forward_cached` in chunks, left-padded batches, greedy `generate` (batched, with the
repetition penalty, past the context window) and the sampling rules' distributions.

Transformers is the reference in every test here, never our own `forward`: a bug shared by
the slow and the fast path (a wrong GELU, a layer-norm mix-up) shows as well.
"""

import pytest
import torch

from conftest import TINY, assert_rel_close, hf_model, params_of
from functional_gpt import GPTConfig, decode_step, forward_cached, new_cache
from functional_gpt.generation.decoding import generate, prefill
from functional_gpt.generation.sampling import Sampling, process_logits, sample

transformers = pytest.importorskip("transformers")

# n_positions 16, so that generation runs past the context; 3 heads of 16 (TINY: 4 of 8).
SHORT = GPTConfig(vocab_size=64, n_positions=16, n_embd=48, n_layer=3, n_head=3)
# 12 tokens: a sampled distribution is estimated closely from a few thousand draws.
SMALL_VOCAB = GPTConfig(vocab_size=12, n_positions=8, n_embd=32, n_layer=2, n_head=4)


def _pair(config, seed):
    model = hf_model(config, seed)
    return model, params_of(model), config


@pytest.fixture(scope="module", params=[TINY, SHORT], ids=["tiny", "short"])
def pair(request):
    """(transformers model, the same weights as our params, config)."""
    return _pair(request.param, seed=1)


@pytest.fixture(scope="module")
def tiny():
    return _pair(TINY, seed=1)


@pytest.fixture(scope="module")
def short():
    return _pair(SHORT, seed=1)


def _tokens(config, B, T, seed):
    return torch.randint(config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens, **kwargs):  # int64 [B, T] -> transformers' logits [B, T, V]
    with torch.inference_mode():
        return model(tokens, **kwargs).logits


# --- prefill, decode steps, chunks -------------------------------------------------------


def test_prefill_then_decode_steps_match_transformers_at_every_position(pair):
    model, params, config = pair
    P, n = config.n_positions, 5
    tokens = _tokens(config, 2, P, seed=0)
    last, cache = prefill(params, tokens[:, :n], config)
    steps = [last]
    for t in range(n, P):  # fills the cache to n_positions
        step, cache = decode_step(params, tokens[:, t], cache, config)
        steps.append(step)
    ours = torch.stack(steps, 1)  # the logits at positions n-1 .. P-1
    assert_rel_close(ours, _logits(model, tokens)[:, n - 1 :], 1e-5, "decode_step vs transformers' forward")

    with torch.inference_mode():  # transformers' own KV cache, one token at a time
        out = model(tokens[:, :n], use_cache=True)
        theirs = [out.logits[:, -1]]
        for t in range(n, P):  # out[1] is the cache (named `cache` in transformers 5, `past_key_values` before)
            out = model(tokens[:, t : t + 1], out[1], use_cache=True)
            theirs.append(out.logits[:, -1])
    assert_rel_close(ours, torch.stack(theirs, 1), 1e-5, "decode_step vs transformers' cached steps")


def test_cached_chunks_match_transformers(pair):
    model, params, config = pair
    P = config.n_positions
    tokens = _tokens(config, 2, P, seed=1)
    cache, pieces = new_cache(config, 2), []
    for a, b in [(0, P // 3), (P // 3, P // 2), (P // 2, P // 2 + 1), (P // 2 + 1, P)]:  # chunks after a prefix
        logits, cache = forward_cached(params, tokens[:, a:b], cache, config)
        pieces.append(logits)
    assert_rel_close(torch.cat(pieces, 1), _logits(model, tokens), 1e-5, "forward_cached chunks")


def test_rows_of_different_lengths_match_transformers_row_by_row(pair):
    """Prompts of 1, 4 and P/2 tokens right-padded into one prefill (counts), then decode
    steps, each row at its own position, until the longest fills the cache: each row
    equals transformers on that row alone, and transformers on the same rows left-padded
    into one batch with its attention_mask and position ids."""
    model, params, config = pair
    P = config.n_positions
    lengths = [1, 4, P // 2]
    T = max(lengths)
    seqs = _tokens(config, 3, P, seed=2)  # row i: prompt seqs[i, :L_i], then decoded seqs[i, L_i:]
    prompts = torch.stack([torch.cat([s[:L], torch.zeros(T - L, dtype=torch.long)]) for s, L in zip(seqs, lengths)])
    logits, cache = forward_cached(params, prompts, new_cache(config, 3), config, counts=tuple(lengths))
    steps = []
    for k in range(P - T):
        step, cache = decode_step(params, seqs[torch.arange(3), torch.tensor(lengths) + k], cache, config)
        steps.append(step)
    assert cache.lengths == tuple(L + P - T for L in lengths)
    steps = torch.stack(steps, 1)  # [3, P - T, V]: row i at its positions L_i .. L_i + P - T - 1
    ours = [torch.cat([logits[i, :L], steps[i]]) for i, L in enumerate(lengths)]
    for i, L in enumerate(lengths):
        alone = _logits(model, seqs[i : i + 1, : L + P - T])[0]
        assert_rel_close(ours[i], alone, 1e-5, f"row {i} ({L}-token prompt) vs that row alone")

    pads = [T - L for L in lengths]  # transformers' batch: the same rows, left-padded to one length
    batch = torch.stack([torch.cat([torch.zeros(n, dtype=torch.long), seqs[i, : P - n]]) for i, n in enumerate(pads)])
    mask = torch.arange(P) >= torch.tensor(pads)[:, None]
    theirs = _logits(model, batch, attention_mask=mask.long(), position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    for i, n in enumerate(pads):
        assert_rel_close(ours[i], theirs[i, n:], 1e-5, f"row {i} vs transformers' padded batch")


# --- greedy generation -------------------------------------------------------------------


def _generate(params, config, prompts, n, **kwargs):  # -> one list of n new tokens per prompt
    return torch.stack(list(generate(params, prompts, config, max_new_tokens=n, **kwargs)), 1).tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3, 2.0])
def test_batched_greedy_generate_matches_transformers_generate_per_prompt(tiny, penalty):
    model, params, config = tiny
    prompts = [[7], [3, 1, 4, 1, 5], list(range(40, 52))]
    n = 16  # 12 + 16 < n_positions: transformers' generate cannot go past the context
    ours = _generate(params, config, prompts, n, sampling=Sampling(greedy=True, repetition_penalty=penalty))
    for prompt, row in zip(prompts, ours):
        with torch.inference_mode():
            theirs = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=n, do_sample=False, repetition_penalty=penalty,
                                    eos_token_id=None, pad_token_id=0)
        assert row == theirs[0, len(prompt) :].tolist(), f"prompt {prompt}"
    assert len({tuple(r) for r in ours}) == 3 and len({t for r in ours for t in r}) > 5  # distinct, varied rows


def _greedy_over_windows(model, config, prompt, n, window, penalty):
    """decoding.py's definition of the window, on transformers: before each token, if the
    context (tokens since `start`) is longer than n_positions, start = len - window; the
    next token is the argmax of transformers' logits over seq[start:], penalised (as
    transformers' generate does) for every token of the whole sequence."""
    P = config.n_positions
    seq, start = list(prompt), max(0, len(prompt) - P)
    penalise = transformers.RepetitionPenaltyLogitsProcessor(penalty)
    for _ in range(n):
        if len(seq) - start > P:
            start = len(seq) - window
        logits = _logits(model, torch.tensor([seq[start:]]))[:, -1]
        seq.append(int(penalise(torch.tensor([seq]), logits).argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("window, penalty", [(None, 1.0), (5, 1.3), (16, 1.0)])
def test_greedy_past_the_context_matches_transformers_on_each_window(short, window, penalty):
    model, params, config = short
    prompts = [[5, 9, 2], _tokens(config, 1, 20, seed=3)[0].tolist(), _tokens(config, 1, 10, seed=4)[0].tolist()]
    n = 30  # the 3-token prompt reaches 33 tokens: two restarts of the 16-position context or more
    ours = _generate(params, config, prompts, n, window=window,
                     sampling=Sampling(greedy=True, repetition_penalty=penalty))
    for prompt, row in zip(prompts, ours):
        assert row == _greedy_over_windows(model, config, prompt, n, window or 8, penalty), f"prompt {prompt}"
    assert len({tuple(r) for r in ours}) == 3 and len({t for r in ours for t in r}) > 5


# --- sampling ----------------------------------------------------------------------------

# Logits of two rows, shuffled so that a filter must map its sorted order back to token ids.
# Sorted probabilities: row 0 .36 .24 .14 .10 .07 ..., row 1 .34 .22 .14 .09 .07 ...; a top-p
# of 0.65 keeps 3 tokens of each (0.60 < 0.65 <= 0.74; 0.56 < 0.65 <= 0.70), so keeping one
# token too many or too few moves about 0.1 of the mass.
LOGITS = torch.tensor([
    [0.3, 2.0, -0.6, 1.1, -2.5, 1.6, -1.0, 0.7, -0.2, -1.5],
    [-1.0, 0.2, 0.9, -0.4, 1.8, 0.5, -2.0, 1.4, 0.0, -0.8],
])
# The tokens already in each row's sequence, for the repetition penalty: row 0's top token
# (a positive logit) and two negative ones, row 1's top token and two others.
SEEN_IDS = torch.tensor([[1, 6, 8], [4, 2, 9]])
SEEN = torch.zeros(2, 10, dtype=torch.bool).scatter(1, SEEN_IDS, True)

CASES = [
    dict(temperature=0.6),
    dict(temperature=1.8),
    dict(top_k=4),
    dict(top_p=0.65),
    dict(top_p=0.45),
    dict(min_p=0.3),
    dict(repetition_penalty=1.8),
    dict(temperature=2.0, top_p=0.6),  # temperature before top-p: the order matters
    dict(temperature=0.5, min_p=0.2),
    dict(top_p=0.8, min_p=0.25),  # min-p after top-p: 4 tokens each; before it, top-p would keep 3
    dict(repetition_penalty=1.5, temperature=1.7, top_k=7, top_p=0.8, min_p=0.1),
]


def _transformers_probs(kwargs):
    """softmax of transformers' processors on LOGITS, in the order of its GenerationMixin
    (the repetition penalty among the processors, then the warpers)."""
    s = Sampling(**kwargs)
    steps = [
        (s.repetition_penalty != 1.0, lambda: transformers.RepetitionPenaltyLogitsProcessor(s.repetition_penalty)),
        (s.temperature != 1.0, lambda: transformers.TemperatureLogitsWarper(s.temperature)),
        (s.top_k is not None, lambda: transformers.TopKLogitsWarper(s.top_k)),
        (s.top_p < 1.0, lambda: transformers.TopPLogitsWarper(s.top_p)),
        (s.min_p > 0.0, lambda: transformers.MinPLogitsWarper(s.min_p)),
    ]
    processors = transformers.LogitsProcessorList([make() for used, make in steps if used])
    return processors(SEEN_IDS, LOGITS.clone()).softmax(-1)


def _case(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def _total_variation(draws, probs):  # draws int64 [N, B], probs [B, V] -> the largest of the B rows
    counts = torch.stack([torch.bincount(draws[:, b], minlength=probs.shape[1]) for b in range(probs.shape[0])])
    return (counts / draws.shape[0] - probs).abs().sum(-1).max().item() / 2


@pytest.mark.parametrize("kwargs", CASES, ids=_case)
def test_processed_logits_equal_transformers_processors(kwargs):
    ours = process_logits(LOGITS, Sampling(**kwargs), SEEN).softmax(-1)
    theirs = _transformers_probs(kwargs)
    assert torch.equal(ours == 0, theirs == 0), "the kept tokens differ"
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


N_DRAWS = 20_000  # a total-variation distance's sampling error is about 0.9 / sqrt(N) = 0.006 here


@pytest.mark.parametrize("kwargs", CASES, ids=_case)
def test_sample_frequencies_match_transformers_distribution(kwargs):
    expected = _transformers_probs(kwargs)
    generator = torch.Generator().manual_seed(0)
    draws = sample(LOGITS.repeat(N_DRAWS, 1), Sampling(**kwargs), SEEN.repeat(N_DRAWS, 1), generator).view(N_DRAWS, 2)
    assert _total_variation(draws, expected) < 0.02
    assert not draws[expected[torch.arange(2), draws] == 0].any(), "a filtered token was drawn"


@pytest.mark.parametrize("kwargs", [
    dict(repetition_penalty=1.6, top_k=5),
    dict(repetition_penalty=1.4, temperature=0.8, top_p=0.8, min_p=0.2),
], ids=_case)
def test_generate_first_token_frequencies_match_transformers_sampling(kwargs):
    """The first sampled token of `generate` for two prompts (the shorter left-padded),
    each repeated over many rows, against the distribution transformers' own sampling
    `generate` draws from (its processed scores, its order of the rules)."""
    model, params, config = _pair(SMALL_VOCAB, seed=3)
    prompts, rows = [[3, 5, 1, 7, 3], [10, 2]], 3_000
    expected = []
    for prompt in prompts:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=True, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                                 eos_token_id=None, pad_token_id=0, **kwargs)
        expected.append(out.scores[0][0].softmax(-1))
    expected = torch.stack(expected)
    first = next(generate(params, [p for p in prompts for _ in range(rows)], config, max_new_tokens=1,
                          sampling=Sampling(**kwargs), generator=torch.Generator().manual_seed(0)))
    draws = first.view(2, rows).T
    assert _total_variation(draws, expected) < 0.05  # the sampling error at 3000 draws is about 0.02
    assert (expected == 0).any(-1).all() and ((expected > 0).sum(-1) > 3).all()  # filtered, not degenerate

"""The continuous-batching engine, driven step by step (no HTTP): admission into free
rows, retirement, cancellation, OpenAI's penalties against their closed form, idle rows."""

import torch

from functional_gpt import decode_step, forward, forward_cached, new_cache
from functional_gpt.generation.engine import Done, Engine, Request, Token
from functional_gpt.generation.decoding import generate
from functional_gpt.generation.sampling import Sampling

from conftest import TINY, hf_model, params_of

GREEDY = Sampling(greedy=True)
PARAMS = params_of(hf_model(TINY, seed=2))


def run(requests, *, max_batch=2, on_step=None):
    """-> ([token ids per request], [Done per request]) after stepping the engine to idle."""
    engine = Engine(PARAMS, TINY, max_batch=max_batch)
    tokens, done = [[] for _ in requests], [None] * len(requests)
    for i, r in enumerate(requests):
        engine.submit(r, lambda e, i=i: tokens[i].append(e.id) if isinstance(e, Token) else done.__setitem__(i, e))
    steps = 0
    while engine.busy:
        engine.step()
        steps += 1
        if on_step:
            on_step(engine, steps)
        assert steps < 1000
    return tokens, done


def test_rows_free_at_once_for_waiting_requests_and_each_gets_its_greedy_tokens():
    """Three requests on two rows: the third is admitted the step after the shortest ends,
    and every request's tokens are generate's for its prompt alone."""
    requests = [Request((1, 2, 3), 3, GREEDY), Request((4, 5), 8, GREEDY), Request((6,), 5, GREEDY)]
    busy = []
    tokens, done = run(requests, on_step=lambda e, s: busy.append(tuple(r is not None for r in e.rows)))
    for r, got in zip(requests, tokens):
        assert got == [int(t[0]) for t in generate(PARAMS, [list(r.prompt)], TINY, max_new_tokens=r.max_tokens)]
    assert [d.reason for d in done] == ["length"] * 3 and [d.new_tokens for d in done] == [3, 8, 5]
    assert busy[:3] == [(True, True)] * 2 + [(False, True)]  # request 0 ends at step 3: its row is free
    assert busy[3] == (True, True)  # and request 2 is in it at step 4


def test_a_cancelled_request_frees_its_row_for_the_next():
    engine = Engine(PARAMS, TINY, max_batch=1)
    events = [[], []]
    first = engine.submit(Request((1,), 20, GREEDY), events[0].append)
    engine.submit(Request((2,), 4, GREEDY), events[1].append)
    for _ in range(3):
        engine.step()
    first.cancel()
    while engine.busy:
        engine.step()
    assert isinstance(events[0][-1], Done) and events[0][-1].reason == "cancelled"
    assert events[1][-1].reason == "length" and events[1][-1].new_tokens == 4


def test_presence_and_frequency_penalties_follow_openais_definition():
    """Greedy with penalties: each token is the argmax of the logits of the whole sequence
    minus frequency_penalty x count + presence_penalty x (count > 0), counts over the
    tokens generated so far (the prompt is not counted)."""
    prompt, fp, pp = [7, 7, 9], 0.7, 1.3
    tokens, _ = run([Request(tuple(prompt), 12, GREEDY, presence_penalty=pp, frequency_penalty=fp)])
    seq, counts = list(prompt), torch.zeros(TINY.vocab_size)
    for _ in range(12):
        logits = forward(PARAMS, torch.tensor([seq]), TINY)[0, -1]
        token = int((logits - fp * counts - pp * (counts > 0)).argmax())
        seq.append(token)
        counts[token] += 1
    assert tokens[0] == seq[len(prompt):]
    plain, _ = run([Request(tuple(prompt), 12, GREEDY)])
    assert plain[0] != tokens[0]  # the penalties changed the text


def test_a_seeded_sample_does_not_depend_on_its_neighbours_or_its_row():
    sampled = Request((3, 1, 4), 10, Sampling(temperature=1.0), seed=5)
    alone, _ = run([sampled], max_batch=3)
    crowded, _ = run([Request((9,), 10, GREEDY), Request((2, 2), 10, Sampling(), seed=1), sampled], max_batch=3)
    assert alone[0] == crowded[2]


def test_idle_rows_of_a_decode_step_keep_their_length_and_their_cache():
    tokens = torch.randint(TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = forward_cached(PARAMS, tokens, new_cache(TINY, 2), TINY)
    before = cache.k[:, 1].clone()
    logits, cache = decode_step(PARAMS, torch.tensor([5, 5]), cache, TINY, rows=(True, False))
    assert cache.lengths == (7, 6) and torch.equal(cache.k[:, 1], before)
    expected = forward(PARAMS, torch.cat([tokens[:1], torch.tensor([[5]])], 1), TINY)[0, -1]
    assert torch.allclose(logits[0], expected, atol=1e-5)

"""The engine's two modes, driven step by step: the default one (the decode step multiplies
only the busy rows, prompts reuse a shared prefix's keys and values) against transformers'
GPT2LMHeadModel on the same weights, and `batch_invariant` (all rows every step, every
prompt prefilled whole) against each request run alone. Also: each row's first token is
sent as soon as its own prefill yields it."""

from dataclasses import replace

import pytest
import torch

from functional_gpt import decode_step, forward_cached, new_cache
from functional_gpt.generation import engine as engine_module
from functional_gpt.generation.engine import Done, Engine, Prompt, Request, Token
from functional_gpt.generation.sampling import Sampling

from conftest import TINY, hf_model, params_of

GREEDY = Sampling(greedy=True)
HF = hf_model(TINY, seed=2)
PARAMS = params_of(HF)
CONTEXT = (7, 3, 99, 41, 8, 120, 64, 2, 17, 30)  # shared by the prompts below, as lm-eval's choices share theirs


def reference_logprobs(tokens) -> torch.Tensor:
    """log-softmax of transformers' logits [T, V] for one sequence, in float64."""
    with torch.no_grad():
        return torch.log_softmax(HF(torch.tensor([list(tokens)])).logits[0].double(), -1)


def drive(engine: Engine, requests, max_steps: int = 500) -> list[list]:
    """Submit every request, step the engine to idle (within max_steps) -> each request's events."""
    events = [[] for _ in requests]
    for i, r in enumerate(requests):
        engine.submit(r, events[i].append)
    steps = 0
    while engine.busy:
        engine.step()
        steps += 1
        assert steps < max_steps
    return events


def untimed(events: list) -> list:
    """The events with the time to the first token left out (it is a measurement)."""
    return [replace(e, first_token_s=0.0) if isinstance(e, Done) else e for e in events]


def check_against_reference(request: Request, events: list, rtol: float = 1e-5) -> None:
    """Every log-prob the request got (prompt and generated) is transformers' on the
    sequence it makes, to rtol of the largest magnitude."""
    tokens = [e.id for e in events if isinstance(e, Token)]
    expected = reference_logprobs(request.prompt + tuple(tokens))
    scale = float(expected.abs().max())
    n = len(request.prompt)
    for t, event in enumerate(e for e in events if isinstance(e, Token)):
        assert event.id == int(expected[n - 1 + t].argmax()) or request.sampling != GREEDY
        assert abs(event.logprob - float(expected[n - 1 + t, event.id])) <= rtol * scale, (t, event)
    prompt = next((e for e in events if isinstance(e, Prompt)), None)
    if prompt is not None:
        assert [p[0] for p in prompt.logprobs] == list(request.prompt) and prompt.logprobs[0][1:] == (None, None)
        for t, (token, logprob, alts) in enumerate(prompt.logprobs[1:]):
            assert abs(logprob - float(expected[t, token])) <= rtol * scale, (t, logprob, float(expected[t, token]))
            if alts is not None:
                best = expected[t].topk(len(alts))
                assert list(alts) == best.indices.tolist()
                assert max(abs(a - float(b)) for a, b in zip(alts.values(), best.values)) <= rtol * scale


# --- the decode step over busy rows only --------------------------------------------------------


def test_a_decode_step_of_the_busy_rows_only_is_a_one_row_caches_step_exactly_and_the_references():
    """Rows 0 and 2 of 3 busy at different lengths: each gets transformers' logits, the idle
    row's are NaN and its cache stays; with row 2 busy alone, its logits are bit for bit a
    1-row cache's."""
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(TINY.vocab_size, (1, n), generator=gen) for n in (5, 9, 7)]
    cache = new_cache(TINY, 3)
    for b in (0, 2):
        _, row = forward_cached(PARAMS, seqs[b], cache.row(b), TINY)
        cache = cache.with_length(b, row.lengths[0])
    idle = cache.k[:, 1].clone()
    new = torch.tensor([11, 0, 13])
    logits, after = decode_step(PARAMS, new, cache, TINY, rows=(True, False, True), fixed_shape=False)
    assert after.lengths == (6, 0, 8) and torch.equal(after.k[:, 1], idle) and logits[1].isnan().all()
    for b in (0, 2):
        with torch.no_grad():
            expected = HF(torch.cat([seqs[b], new[b : b + 1, None]], 1)).logits[0, -1]
        assert torch.allclose(logits[b], expected, rtol=0, atol=1e-5 * float(expected.abs().max())), b
    alone = new_cache(TINY, 1)
    _, alone = forward_cached(PARAMS, seqs[2], alone, TINY)
    one, _ = decode_step(PARAMS, new[2:], alone, TINY)
    busy_one = cache.with_length(0, 0)
    only, _ = decode_step(PARAMS, new, busy_one, TINY, rows=(False, False, True), fixed_shape=False)
    assert torch.equal(only[2], one[0])  # one busy row: the shapes of a 1-row cache, the same numbers


def test_fixed_shape_must_be_a_bool():
    with pytest.raises(Exception, match="fixed_shape: expected True or False"):
        decode_step(PARAMS, torch.tensor([1]), new_cache(TINY, 1), TINY, fixed_shape="no")


# --- each row's first token as soon as its own prefill yields it ------------------------------


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_each_rows_first_token_is_sent_before_the_next_prompts_prefill(monkeypatch, batch_invariant):
    calls, seen = [], []
    real = engine_module.forward_cached
    monkeypatch.setattr(engine_module, "forward_cached", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = Engine(PARAMS, TINY, max_batch=3, batch_invariant=batch_invariant)
    for i in range(3):
        engine.submit(Request((5 + i, 9), 2, GREEDY), lambda e, i=i: seen.append((i, type(e).__name__, len(calls))))
    engine.step()
    assert [s for s in seen if s[1] == "Token"] == [(0, "Token", 1), (1, "Token", 2), (2, "Token", 3)]


# --- prefix caching -----------------------------------------------------------------------------


def test_a_prompt_sharing_a_finished_ones_prefix_reuses_it_and_gets_the_references_numbers():
    engine = Engine(PARAMS, TINY, max_batch=2)
    first = Request(CONTEXT + (5, 6), 4, GREEDY, logprobs=2)
    second = Request(CONTEXT + (50, 60, 70), 6, GREEDY, logprobs=3)
    (a,) = drive(engine, [first])
    (b,) = drive(engine, [second])
    assert a[-1].cached_tokens == 0 and b[-1].cached_tokens == len(CONTEXT)
    check_against_reference(first, a)
    check_against_reference(second, b)
    same = Request(CONTEXT + (50, 60, 70), 6, GREEDY, logprobs=3)  # the whole prompt held: its last token runs
    (c,) = drive(engine, [same])
    assert c[-1].cached_tokens == len(same.prompt) - 1 and [e.id for e in c[:-1]] == [e.id for e in b[:-1]]
    check_against_reference(same, c)


def test_prompts_arriving_together_copy_the_prefix_from_the_busy_row():
    requests = [Request(CONTEXT + (c,), 5, GREEDY, logprobs=1) for c in (5, 6, 7, 8)]
    events = drive(Engine(PARAMS, TINY, max_batch=4), requests)
    assert [e[-1].cached_tokens for e in events] == [0] + [len(CONTEXT)] * 3
    for r, e in zip(requests, events):
        check_against_reference(r, e)


def test_prompt_logprobs_reuse_only_what_was_scored_and_run_the_last_shared_token():
    """lm-eval's loglikelihood requests (echo, logprobs, max_tokens 0): the second reuses all
    but the last shared token and its prompt log-probs are the reference's at every position;
    a prefix left by a request without prompt log-probs is not reused for one with them."""
    engine = Engine(PARAMS, TINY, max_batch=2)
    scored = [Request(CONTEXT + tail, 0, GREEDY, logprobs=k, prompt_logprobs=True)
              for tail, k in (((5, 6), 1), ((9, 4, 1), 5), ((9, 4, 2), 0))]
    events = [drive(engine, [r])[0] for r in scored]
    assert [e[-1].cached_tokens for e in events] == [0, len(CONTEXT) - 1, len(CONTEXT) + 1]
    for r, e in zip(scored, events):
        check_against_reference(r, e)
        assert isinstance(e[0], Prompt) and isinstance(e[-1], Done) and len(e) == 2
    fresh = Engine(PARAMS, TINY, max_batch=1)
    drive(fresh, [Request(CONTEXT + (5,), 1, GREEDY)])
    late = Request(CONTEXT + (6,), 0, GREEDY, logprobs=1, prompt_logprobs=True)
    (e,) = drive(fresh, [late])
    assert e[-1].cached_tokens == 0
    check_against_reference(late, e)


def test_the_prefix_store_keeps_the_most_recently_used_within_its_budget():
    """Room for 40 tokens (TINY's keys and values take 512 bytes a token); max_tokens 1, so
    a row holds its prompt. Reusing a prefix makes it the most recent; a new one pushes out
    the least recently used; a prompt that extends a stored one replaces it."""
    engine = Engine(PARAMS, TINY, max_batch=1, prefix_cache_mb=1)
    engine.prefix_budget = 40 * 2 * TINY.n_layer * TINY.n_embd * 4
    p0, p1, p2 = (tuple(range(1 + 20 * j, 13 + 20 * j)) for j in range(3))  # 12 tokens each
    q, r = p0[:11] + (7,), p2 + (5,)

    def run(prompt):
        return drive(engine, [Request(prompt, 1, GREEDY)])[0][-1].cached_tokens

    assert [run(p) for p in (p0, p1, q)] == [0, 0, 11]  # q reused p0: p0 is now more recent than p1
    assert run(p2) == 0 and [tuple(p.tokens) for p in engine.prefixes] == [p0, q, p2]  # 48 tokens: p1 went
    assert run(r) == 12 and [tuple(p.tokens) for p in engine.prefixes] == [p0, q, r]  # r covers p2
    assert run(p1 + (9, 9)) == 0


def test_no_store_with_prefix_cache_mb_0_and_a_prefix_larger_than_the_store_is_not_kept():
    for mb in (0, 1):
        engine = Engine(PARAMS, TINY, max_batch=1, prefix_cache_mb=mb)
        engine.prefix_budget = min(engine.prefix_budget, 4 * 2 * TINY.n_layer * TINY.n_embd * 4)  # 4 tokens
        drive(engine, [Request(CONTEXT, 2, GREEDY)])
        assert engine.prefixes == []


def test_a_failed_prefill_leaves_no_prefix_behind(monkeypatch):
    engine = Engine(PARAMS, TINY, max_batch=1)
    real = engine_module.forward_cached

    def fails_once(*a, **k):
        monkeypatch.setattr(engine_module, "forward_cached", real)
        raise RuntimeError("injected")

    monkeypatch.setattr(engine_module, "forward_cached", fails_once)
    (failed,) = drive(engine, [Request(CONTEXT + (2,), 1, GREEDY)])
    assert failed[-1].reason == "error" and "prefill failed" in failed[-1].error
    request = Request(CONTEXT + (3,), 3, GREEDY, logprobs=0)
    (e,) = drive(engine, [request])
    assert e[-1].cached_tokens == 0
    check_against_reference(request, e)


# --- batch invariance -----------------------------------------------------------------------------


def test_batch_invariant_requests_return_exactly_what_they_return_alone_and_reuse_nothing():
    gen = torch.Generator().manual_seed(4)
    requests = []
    for i in range(6):
        prompt = CONTEXT[: 3 + i] + tuple(torch.randint(TINY.vocab_size, (1 + i % 3,), generator=gen).tolist())
        sampling = GREEDY if i % 2 else Sampling(temperature=0.8)
        requests.append(Request(prompt, 4 + i, sampling, seed=i, logprobs=2, prompt_logprobs=i == 3))
    alone = [untimed(drive(Engine(PARAMS, TINY, max_batch=4, batch_invariant=True), [r])[0]) for r in requests]
    together = [untimed(e) for e in drive(Engine(PARAMS, TINY, max_batch=4, batch_invariant=True), requests)]
    assert together == alone and all(e[-1].cached_tokens == 0 for e in together)
    default = drive(Engine(PARAMS, TINY, max_batch=4), requests)
    assert sum(e[-1].cached_tokens for e in default) > 0  # the same requests reuse prefixes by default
    for r, e, a in zip(requests, default, alone):
        assert [x.id for x in e if isinstance(x, Token)] == [x.id for x in a if isinstance(x, Token)]
        check_against_reference(r, e)


def test_batch_invariant_must_be_a_bool():
    with pytest.raises(Exception, match="batch_invariant: expected True or False"):
        Engine(PARAMS, TINY, batch_invariant=1)


def test_a_prompt_continuing_a_finished_completion_reuses_its_generated_tokens_too():
    """A chat's next turn: the prompt is the last prompt, its completion and more. The
    completion's tokens that were run (all but the last sampled) come from the cache."""
    engine = Engine(PARAMS, TINY, max_batch=2)
    (a,) = drive(engine, [Request(CONTEXT, 5, GREEDY)])
    completion = tuple(e.id for e in a if isinstance(e, Token))
    turn = Request(CONTEXT + completion + (4, 4), 3, GREEDY, logprobs=0)
    (b,) = drive(engine, [turn])
    assert b[-1].cached_tokens == len(CONTEXT) + len(completion) - 1
    check_against_reference(turn, b)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_the_decode_step_multiplies_the_busy_rows_only_unless_batch_invariant(monkeypatch, batch_invariant):
    shapes = []
    real = engine_module.decode_step
    monkeypatch.setattr(engine_module, "decode_step",
                        lambda *a, **k: shapes.append(k["fixed_shape"]) or real(*a, **k))
    drive(Engine(PARAMS, TINY, max_batch=4, batch_invariant=batch_invariant), [Request((1, 2), 3, GREEDY)])
    assert shapes == [batch_invariant] * 2


def test_serve_names_a_bad_prefix_cache_size(capsys):
    from functional_gpt.cli import main

    assert main(["serve", "--weights", "nowhere.safetensors", "--prefix_cache_mb", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fgpt serve: error: --prefix_cache_mb: expected an integer >= 0, got -1 (an int)"]

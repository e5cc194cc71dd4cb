"""The continuous-batching engine, driven step by step (no HTTP): admission into free
rows, retirement, cancellation, OpenAI's penalties against their closed form, idle rows,
a generated <|endoftext|>, failures that belong to one request, checked fields."""

import re
import time

import numpy as np
import pytest
import torch

from functional_gpt import (GPTConfig, UserError, decode_step, flatten, forward, forward_cached, init_params, new_cache,
                            unflatten)
from functional_gpt.generation import engine as engine_module
from functional_gpt.generation.engine import Done, Engine, QueueFull, Request, Token, check_sizes
from functional_gpt.model.tokenizer import ENDOFTEXT_ID
from functional_gpt.generation.decoding import generate
from functional_gpt.generation.sampling import Sampling

from conftest import TINY, hf_model, params_of

GREEDY = Sampling(greedy=True)
PARAMS = params_of(hf_model(TINY, seed=2))


def _greedy(prompt, n):
    return [int(t[0]) for t in generate(PARAMS, [list(prompt)], TINY, max_new_tokens=n)]


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
        assert got == _greedy(r.prompt, r.max_tokens)
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


def penalised_greedy(prompt, n, fp, pp, counted=lambda c: c):
    """OpenAI's penalties in closed form: each token is the argmax of the whole sequence's
    last logits minus fp x count + pp x (count > 0), counts over the generated tokens only.
    `counted` rewrites the counts (a wrong rule, to show the test can tell it apart)."""
    seq, counts = list(prompt), torch.zeros(TINY.vocab_size)
    for _ in range(n):
        logits = forward(PARAMS, torch.tensor([seq]), TINY)[0, -1]
        c = counted(counts)
        token = int((logits - fp * c - pp * (c > 0)).argmax())
        seq.append(token)
        counts[token] += 1
    return seq[len(prompt):]


@pytest.mark.parametrize("fp, pp", [(0.0, -1.5), (0.7, 0.0), (0.4, -0.9)])
def test_presence_and_frequency_penalties_follow_openais_definition(fp, pp):
    """Each penalty alone and both together (one negative) give the closed form's tokens,
    which differ from plain greedy's, from the penalties swapped and from counts of 0/1."""
    prompt, n = (7, 7, 9), 29
    tokens, _ = run([Request(prompt, n, GREEDY, presence_penalty=pp, frequency_penalty=fp)])
    assert tokens[0] == penalised_greedy(prompt, n, fp, pp)
    assert tokens[0] != penalised_greedy(prompt, n, 0.0, 0.0)
    assert tokens[0] != penalised_greedy(prompt, n, pp, fp)
    if fp:
        assert tokens[0] != penalised_greedy(prompt, n, fp, pp, counted=lambda c: (c > 0).float())


@pytest.mark.parametrize("penalty", [1.8, 0.6, 2.0])
def test_a_repetition_penalty_counts_the_prompt_as_transformers_does(penalty):
    """repetition_penalty divides (or multiplies) the logits of every token seen so far,
    the prompt's included: greedy with it equals transformers' generate on the same weights."""
    prompt, n = [7, 7, 9, 3, 3, 3, 50], 20
    with torch.no_grad():
        expected = hf_model(TINY, seed=2).generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, repetition_penalty=penalty,
            pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    tokens, _ = run([Request(tuple(prompt), n, Sampling(greedy=True, repetition_penalty=penalty))])
    assert tokens[0] == expected
    prompt_unseen, _ = run([Request(tuple(prompt[-1:]), n, Sampling(greedy=True, repetition_penalty=penalty))])
    assert prompt_unseen[0] != expected[: n]  # the prompt's tokens mattered


def events_of(request):
    """-> ([Token], Done) of one request run alone."""
    engine, events = Engine(PARAMS, TINY, max_batch=1), []
    engine.submit(request, events.append)
    while engine.busy:
        engine.step()
    return events[:-1], events[-1]


def text_of(tokens, done) -> str:
    return "".join(t.text for t in tokens) + done.text


@pytest.mark.parametrize("first", [True, False])
def test_any_of_several_stop_strings_ends_the_text_before_it(first):
    text = text_of(*events_of(Request((1, 2, 3), 20, GREEDY)))
    stop = text[6:8]
    stops = (stop, "\x00never") if first else ("\x00never", stop)
    tokens, done = events_of(Request((1, 2, 3), 20, GREEDY, stop=stops))
    assert text_of(tokens, done) == text[: text.index(stop)] and done.reason == "stop"


def test_text_held_back_for_a_stop_string_arrives_when_the_length_ends_the_row():
    """A stop string that the text's end begins is held back; at max_tokens it is sent."""
    text = text_of(*events_of(Request((1, 2, 3), 12, GREEDY)))
    tokens, done = events_of(Request((1, 2, 3), 12, GREEDY, stop=(text[-1] + "\x00",)))
    assert done.reason == "length" and done.text.endswith(text[-1])
    assert text_of(tokens, done) == text


def test_a_seeded_sample_does_not_depend_on_its_neighbours_or_its_row():
    sampled = Request((3, 1, 4), 10, Sampling(temperature=1.0), seed=5)
    alone, _ = run([sampled], max_batch=3)
    crowded, _ = run([Request((9,), 10, GREEDY), Request((2, 2), 10, Sampling(), seed=1), sampled], max_batch=3)
    assert alone[0] == crowded[2]


def test_a_row_after_one_cancelled_mid_run_decodes_on_unchanged():
    engine, got = Engine(PARAMS, TINY, max_batch=2), [[], []]
    first = engine.submit(Request((1, 2), 12, GREEDY), lambda e: got[0].append(e))
    engine.submit(Request((3, 4), 12, GREEDY), lambda e: got[1].append(e))
    for _ in range(4):
        engine.step()
    first.cancel()
    while engine.busy:
        engine.step()
    assert got[0][-1].reason == "cancelled" and len(got[0]) == 5
    assert [e.id for e in got[1][:-1]] == _greedy((3, 4), 12) and got[1][-1].reason == "length"


def test_an_idle_row_never_grows_however_long_the_busy_one_runs():
    """One row busy for three requests in turn (45 steps) beside an idle one of a
    32-position context: the idle row's cache stays empty."""
    engine = Engine(PARAMS, TINY, max_batch=2)
    for prompt in ((1,), (2,), (3,)):
        got = []
        engine.submit(Request(prompt, 15, GREEDY), got.append)
        while engine.busy:
            engine.step()
        assert [e.id for e in got[:-1]] == _greedy(prompt, 15) and got[-1].reason == "length"
        assert engine.cache.lengths[1] == 0


def test_a_seeded_request_draws_what_generate_draws_with_that_seed():
    sampling = Sampling(temperature=1.5)
    tokens, done = run([Request((3, 1, 4), 10, sampling, seed=5)])
    want = [int(t[0]) for t in generate(PARAMS, [[3, 1, 4]], TINY, max_new_tokens=10, sampling=sampling,
                                         generator=torch.Generator().manual_seed(5))]
    assert tokens[0] == want and done[0].reason == "length"


def test_the_cache_takes_the_params_dtype():
    half = unflatten({k: v.bfloat16() for k, v in flatten(PARAMS).items()})
    assert Engine(half, TINY, max_batch=1).cache.k.dtype == torch.bfloat16


def test_the_defaults_are_eight_rows_and_sixty_four_waiting():
    engine = Engine(PARAMS, TINY)
    assert len(engine.rows) == 8 and engine.max_queue == 64 and engine.cache.k.dtype == PARAMS["wte"]["weight"].dtype


def test_a_token_without_logprobs_asked_has_none():
    tokens, _ = events_of(Request((1, 2), 3, GREEDY))
    assert all(t.logprob is None and t.top is None for t in tokens)


@pytest.mark.parametrize("args, reason, error", [((), "cancelled", None), (("error", "the engine failed"), "error",
                                                                          "the engine failed")])
def test_cancel_all_ends_every_waiting_and_running_request_and_frees_every_row(args, reason, error):
    engine, got = Engine(PARAMS, TINY, max_batch=2), [[] for _ in range(3)]
    for i in range(3):
        engine.submit(Request((1 + i,), 10, GREEDY), got[i].append)
    engine.step()
    engine.step()
    engine.cancel_all(*args)
    assert not engine.busy and engine.cache.lengths == (0, 0)
    for i, events in enumerate(got):
        done = events[-1]
        assert (done.reason, done.error, done.new_tokens) == (reason, error, 2 if i < 2 else 0)
        assert [e.id for e in events[:-1]] == _greedy((1 + i,), 10)[:done.new_tokens]


def test_idle_rows_of_a_decode_step_keep_their_length_and_their_cache():
    tokens = torch.randint(TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = forward_cached(PARAMS, tokens, new_cache(TINY, 2), TINY)
    before = cache.k[:, 1].clone()
    logits, cache = decode_step(PARAMS, torch.tensor([5, 5]), cache, TINY, rows=(True, False))
    assert cache.lengths == (7, 6) and torch.equal(cache.k[:, 1], before)
    expected = forward(PARAMS, torch.cat([tokens[:1], torch.tensor([[5]])], 1), TINY)[0, -1]
    assert torch.allclose(logits[0], expected, atol=1e-5)


# --- a generated <|endoftext|>, a failure that belongs to its request, checked fields --------------


def test_a_generated_endoftext_is_a_token_event_with_its_logprob_then_the_row_stops():
    """<|endoftext|> is sent as a Token like any other (lm-eval needs its log-prob), with
    the text it made final, and ends the row: Done "stop" counting it."""
    config = GPTConfig(vocab_size=50257, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    flat = {k: v.clone() for k, v in flatten(init_params(config, seed=0)).items()}
    flat["ln_f.weight"].zero_()
    flat["ln_f.bias"].fill_(1.0)
    flat["wte.weight"][ENDOFTEXT_ID] = 0.5  # along ln_f's output: greedy always picks it
    params = unflatten(flat)
    engine = Engine(params, config, max_batch=1)
    events = []
    engine.submit(Request((5, 6), 4, GREEDY, logprobs=1), events.append)
    while engine.busy:
        engine.step()
    token, done = events
    expected = torch.log_softmax(forward(params, torch.tensor([[5, 6]]), config)[0, -1], -1)[ENDOFTEXT_ID]
    assert isinstance(token, Token) and token.id == ENDOFTEXT_ID and token.text == ""
    assert abs(token.logprob - float(expected)) < 1e-5 and list(token.top) == [ENDOFTEXT_ID]
    assert done.reason == "stop" and done.new_tokens == 1


def breaking(monkeypatch, name, broken):
    """engine.<name> raises RuntimeError("boom") when broken(*args, **kwargs), else works."""
    real = getattr(engine_module, name)

    def maybe(*args, **kwargs):
        if broken(*args, **kwargs):
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, name, maybe)


def test_a_row_whose_sampling_fails_retires_alone_and_the_others_get_their_tokens(monkeypatch):
    marked = Sampling(top_k=3)  # the request whose sampling breaks
    breaking(monkeypatch, "sample", lambda logits, sampling, *rest: sampling is marked)
    requests = [Request((1, 2), 6, GREEDY), Request((3,), 6, marked), Request((4, 5), 6, GREEDY)]
    tokens, done = run(requests, max_batch=3)
    alone, _ = run([requests[0], requests[2]], max_batch=3)
    assert [d.reason for d in done] == ["length", "error", "length"] and [tokens[0], tokens[2]] == alone
    assert done[1].error == "sampling failed: RuntimeError: boom" and done[1].new_tokens == 0


def test_a_failed_prefill_ends_its_request_and_frees_its_row(monkeypatch):
    breaking(monkeypatch, "forward_cached", lambda params, tokens, *rest, **kw: int(tokens[0, 0]) == 9)
    tokens, done = run([Request((9, 9), 4, GREEDY), Request((1,), 4, GREEDY)], max_batch=1)
    assert done[0].reason == "error" and done[0].error == "prefill failed: RuntimeError: boom"
    assert done[1].reason == "length" and len(tokens[1]) == 4


def test_a_failed_shared_decode_step_ends_every_row_it_held_and_the_engine_goes_on(monkeypatch):
    steps = []
    breaking(monkeypatch, "decode_step", lambda *args, **kw: steps.append(1) or len(steps) == 2)
    engine = Engine(PARAMS, TINY, max_batch=2)
    events = [[], [], []]
    for i in range(2):
        engine.submit(Request((1 + i,), 5, GREEDY), events[i].append)
    for _ in range(3):
        engine.step()
    engine.submit(Request((7,), 3, GREEDY), events[2].append)
    while engine.busy:
        engine.step()
    assert [e[-1].reason for e in events] == ["error", "error", "length"]
    assert events[0][-1].error == "the batched decode step failed: RuntimeError: boom"


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=()), "prompt: expected a non-empty tuple of token ids, got a tuple of 0"),
    (dict(prompt=(1, -2)), "prompt: expected an integer >= 0, got -2 (an int)"),
    (dict(max_tokens=-1), "max_tokens: expected an integer >= 0, got -1 (an int)"),
    (dict(seed=2**64), "seed: expected an integer in 0..18446744073709551615, got 18446744073709551616 (an int)"),
    (dict(logprobs=6), "logprobs: expected an integer in 0..5, got 6 (an int)"),
    (dict(stop=("a", "")), "stop: expected a tuple of non-empty strings, got a tuple of 2"),
    (dict(presence_penalty=float("nan")), "presence_penalty: expected a finite number in [-2, 2], got nan (a float)"),
    (dict(frequency_penalty=2.5), "frequency_penalty: expected a finite number in [-2, 2], got 2.5 (a float)"),
    (dict(sampling={"temperature": 0}), "sampling: expected a Sampling, got a dict"),
    (dict(prompt="ab"), "prompt: expected a non-empty tuple of token ids, got 'ab' (a str)"),
    (dict(prompt=(1.0,)), "prompt: expected an integer >= 0, got 1.0 (a float)"),
    (dict(max_tokens=True), "max_tokens: expected an integer >= 0, got True (a bool)"),
    (dict(seed=-1), "seed: expected an integer in 0..18446744073709551615, got -1 (an int)"),
    (dict(logprobs=-1), "logprobs: expected an integer in 0..5, got -1 (an int)"),
    (dict(prompt_logprobs=1), "prompt_logprobs: expected True or False, got 1 (an int)"),
    (dict(stop=(3,)), "stop: expected a tuple of non-empty strings, got a tuple of 1"),
    (dict(stop="ab"), "stop: expected a tuple of non-empty strings, got 'ab' (a str)"),
    (dict(presence_penalty=-2.5), "presence_penalty: expected a finite number in [-2, 2], got -2.5 (a float)"),
])
def test_a_request_names_the_field_it_refuses(kwargs, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        Request(**({"prompt": (1,), "max_tokens": 2} | kwargs))


def test_a_request_keeps_its_fields_in_plain_form_and_takes_every_bound():
    edges = Request([0, 5], 0, GREEDY, seed=0, stop=["x", "y"], logprobs=np.int64(0), prompt_logprobs=True,
                    presence_penalty=-2, frequency_penalty=2)
    assert (edges.prompt, edges.max_tokens, edges.seed, edges.stop, edges.logprobs, edges.prompt_logprobs,
            edges.presence_penalty, edges.frequency_penalty) == ((0, 5), 0, 0, ("x", "y"), 0, True, -2.0, 2.0)
    assert type(edges.logprobs) is int and type(edges.presence_penalty) is float
    typed = Request((1,), np.int64(2), GREEDY, seed=np.int64(3), frequency_penalty=1)
    assert type(typed.max_tokens) is int and type(typed.seed) is int and type(typed.frequency_penalty) is float
    top = Request((1,), 2, GREEDY, seed=2**64 - 1, logprobs=5, presence_penalty=2, frequency_penalty=-2)
    assert (top.seed, top.logprobs, top.presence_penalty, top.frequency_penalty) == (2**64 - 1, 5, 2.0, -2.0)
    plain = Request((1,), 2)
    assert (plain.seed, plain.stop, plain.logprobs, plain.prompt_logprobs, plain.presence_penalty,
            plain.frequency_penalty, plain.sampling) == (None, (), None, False, 0.0, 0.0, Sampling())


def test_the_queue_holds_max_queue_requests_and_the_edges_of_the_model_fit():
    engine = Engine(PARAMS, TINY, max_batch=3, max_queue=2)
    assert len(engine.rows) == 3 and engine.cache.k.shape[1] == 3 and not engine.busy
    engine.submit(Request((TINY.vocab_size - 1,), 2), print)  # the last id
    assert engine.busy
    engine.submit(Request((1,) * 30, 2), print)  # the whole context
    with pytest.raises(QueueFull, match=r"^2 requests are waiting \(--max_queue 2\)$"):
        engine.submit(Request((1,), 2), print)


@pytest.mark.parametrize("call, message", [
    (lambda: Engine(PARAMS, TINY, max_batch=0), "max_batch: expected an integer >= 1, got 0 (an int)"),
    (lambda: check_sizes(0, 1, flag="--"), "--max_batch: expected an integer >= 1, got 0 (an int)"),
    (lambda: check_sizes(1, 0, flag="--"), "--max_queue: expected an integer >= 1, got 0 (an int)"),
    (lambda: Engine(PARAMS, TINY).submit("hi", print), "request: expected a Request, got 'hi' (a str)"),
    (lambda: Engine(PARAMS, TINY).submit(Request((1,), 2), 3), "sink: expected a function, got 3 (an int)"),
])
def test_the_engine_names_a_bad_size_request_or_sink(call, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        call()


def test_submit_checks_the_prompt_against_the_model_and_the_sizes():
    engine = Engine(PARAMS, TINY, max_batch=1, max_queue=1)
    with pytest.raises(UserError, match="^prompt: token id 128 is out of range for vocab_size=128$"):
        engine.submit(Request((1, 128), 2), print)
    with pytest.raises(UserError, match="^max_tokens: a prompt of 30 tokens and max_tokens 3 exceed the context of 32"):
        engine.submit(Request((1,) * 30, 3), print)
    with pytest.raises(UserError, match="^max_queue: expected an integer >= 1, got 0"):
        Engine(PARAMS, TINY, max_queue=0)


def test_a_failure_is_one_line_of_at_most_200_characters_of_its_first_line():
    from functional_gpt.generation.engine import _failure
    assert _failure("prefill", RuntimeError("x" * 300 + "\nsecond")) == "prefill failed: RuntimeError: " + "x" * 200
    assert _failure("sampling", RuntimeError()) == "sampling failed: RuntimeError"


def test_a_row_after_a_free_one_still_decodes_and_a_late_request_takes_the_free_row():
    engine = Engine(PARAMS, TINY, max_batch=3)
    events = [[], [], []]
    engine.submit(Request((1, 2), 2, GREEDY), events[0].append)  # row 0, ends first
    engine.submit(Request((3,), 7, GREEDY), events[1].append)  # row 1, decodes on after row 0 is free
    engine.step()
    engine.submit(Request((4, 4), 3, GREEDY), events[2].append)  # admitted at once beside the others
    engine.step()
    assert engine.rows[1] is not None and engine.rows[2] is not None
    while engine.busy:
        engine.step()
    for request, got in zip(((1, 2), (3,), (4, 4)), events):
        n = got[-1].new_tokens
        expected = _greedy(request, n)
        assert [e.id for e in got if isinstance(e, Token)] == expected and got[-1].reason == "length"
    assert [e[-1].new_tokens for e in events] == [2, 7, 3]


def test_a_request_cancelled_while_waiting_ends_at_once_and_the_next_takes_its_place():
    engine = Engine(PARAMS, TINY, max_batch=1)
    events = [[], []]
    engine.submit(Request((1,), 3, GREEDY), events[0].append).cancel()
    engine.submit(Request((2,), 3, GREEDY), events[1].append)
    engine.step()
    assert [(e.reason, e.new_tokens) for e in events[0]] == [("cancelled", 0)] and engine.rows[0] is not None
    assert engine.rows[0].handle.request.prompt == (2,)


def test_prompt_logprobs_are_the_log_softmax_of_every_prompt_position_and_max_tokens_zero_ends_there():
    prompt = (5, 9, 2, 77, 31)
    engine, events = Engine(PARAMS, TINY, max_batch=1), []
    engine.submit(Request(prompt, 0, GREEDY, logprobs=2, prompt_logprobs=True), events.append)
    while engine.busy:
        engine.step()
    scored, done = events
    expected = torch.log_softmax(forward(PARAMS, torch.tensor([prompt]), TINY)[0].double(), -1)
    assert scored.logprobs[0] == (5, None, None) and [e[0] for e in scored.logprobs] == list(prompt)
    for t, (token, logprob, alts) in enumerate(scored.logprobs[1:]):
        assert abs(logprob - float(expected[t, token])) < 1e-5
        top = expected[t].topk(2)
        assert list(alts) == top.indices.tolist() and max(abs(a - b) for a, b in zip(alts.values(), top.values)) < 1e-5
    assert (done.reason, done.new_tokens) == ("length", 0)
    one, done = events_of(Request(prompt, 1, GREEDY))
    assert len(one) == 1 and done.reason == "length" and done.new_tokens == 1


@pytest.mark.parametrize("prompt, logprobs", [((5,), 2), ((5, 9, 2), None), ((5, 9, 2), 0)])
def test_prompt_logprobs_of_one_token_and_without_alternatives(prompt, logprobs):
    """One prompt token has no log-prob; logprobs None or 0 asks for no alternatives."""
    engine, events = Engine(PARAMS, TINY, max_batch=1), []
    engine.submit(Request(prompt, 0, GREEDY, logprobs=logprobs, prompt_logprobs=True), events.append)
    while engine.busy:
        engine.step()
    expected = torch.log_softmax(forward(PARAMS, torch.tensor([prompt]), TINY)[0].double(), -1)
    scored = events[0].logprobs
    assert scored[0] == (5, None, None) and len(scored) == len(prompt)
    for t, (token, logprob, alts) in enumerate(scored[1:]):
        assert abs(logprob - float(expected[t, token])) < 1e-5 and alts is None
    assert (events[-1].reason, len(events)) == ("length", 2)


def test_the_time_to_the_first_token_is_measured_at_the_first_token():
    """A sink that takes 50 ms per token: the first token's time is its own, not a later one's."""
    engine, seen = Engine(PARAMS, TINY, max_batch=1), []

    def slow_sink(event):
        seen.append((time.perf_counter(), event))
        if isinstance(event, Token):
            time.sleep(0.05)

    submitted = time.perf_counter()
    engine.submit(Request((1, 2), 3, GREEDY), slow_sink)
    while engine.busy:
        engine.step()
    first_at, done = seen[0][0], seen[-1][1]
    assert 0 <= done.first_token_s <= first_at - submitted + 0.01 and done.first_token_s < 0.04


def test_a_failed_prefill_counts_no_tokens_and_its_row_takes_the_next_request_at_once(monkeypatch):
    breaking(monkeypatch, "forward_cached", lambda params, tokens, *rest, **kw: int(tokens[0, 0]) == 9)
    engine, events = Engine(PARAMS, TINY, max_batch=1), [[], [], []]
    for i, prompt in enumerate([(9,), (5,), (6,)]):
        engine.submit(Request(prompt, 0 if i == 1 else 4, GREEDY), events[i].append)
    engine.step()
    done = events[0][-1]
    assert (done.reason, done.new_tokens, done.error) == ("error", 0, "prefill failed: RuntimeError: boom")
    assert [(e.reason, e.new_tokens) for e in events[1]] == [("length", 0)]  # max_tokens 0: done at admission
    assert engine.rows[0] is not None and engine.rows[0].handle.request.prompt == (6,)

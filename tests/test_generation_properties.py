"""Hypothesis over the generation face (`Sampling`, `process_logits`, `sample`,
`sample_rows`, `generate`, `prefill`, `stream_text`, `Engine` / `Request`): random
shapes, dtypes, values and wrong types. The property everywhere: the right answer, or a
UserError whose message starts with the argument's name; never another exception, never
an input tensor changed. CI runs conftest's bounded "ci" profile; HYPOTHESIS_PROFILE=deep
digs further (README, maintainers)."""

import math
import re

import pytest
import torch
from hypothesis import assume, given, strategies as st

from functional_gpt import UserError, init_params
from functional_gpt.generation import (Done, Engine, Prompt, Request, Sampling, Token, generate, prefill,
                                       process_logits, sample, sample_rows, stream_text)
from functional_gpt.generation.sampling import MIN_REPETITION_PENALTY, MIN_TEMPERATURE, RULES
from functional_gpt.generation.speculative import DraftModel, PromptLookup

from conftest import TINY

PARAMS = init_params(TINY, seed=0)
V = TINY.vocab_size

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(), st.text(max_size=3),
                 st.lists(st.integers(-3, 3), max_size=3), st.just(torch.zeros(2)), st.just({"a": 1}))


def setting(name: str):
    """Values for a Sampling field: mostly near its range, sometimes junk."""
    numbers = st.one_of(st.floats(-1, 3), st.floats(0, 1e-5), st.sampled_from([0, 1, 0.0, 1.0, 1e-300, 1e6, 1e7]),
                        st.floats(allow_nan=True, allow_infinity=True))
    near = {"top_k": st.one_of(st.none(), st.integers(-2, 200)), "greedy": st.booleans()}.get(name, numbers)
    return st.one_of(near, near, junk)


IN_RANGE = {"temperature": st.one_of(st.just(0.0), st.floats(MIN_TEMPERATURE, 2)),
            "top_k": st.one_of(st.none(), st.integers(1, 50)),
            "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1e-45])),
            "min_p": st.floats(0, 1, exclude_max=True), "repetition_penalty": st.floats(MIN_REPETITION_PENALTY, 10),
            "greedy": st.booleans()}
samplings = st.one_of(st.fixed_dictionaries({}, optional=IN_RANGE),
                      st.fixed_dictionaries({}, optional={name: setting(name) for name in RULES}))


def refused_naming(error: UserError, *names: str) -> bool:
    """One line that starts with one of the names ("top_k: expected ...", "window must ...")."""
    return re.match(rf"({'|'.join(map(re.escape, names))})[: [(]", str(error)) is not None and "\n" not in str(error)


def good_sampling(kwargs) -> Sampling:
    try:
        return Sampling(**kwargs)
    except UserError as e:
        assert refused_naming(e, *kwargs), e
        assume(False)


@given(samplings)
def test_sampling_is_built_in_plain_form_or_refused_naming_the_field(kwargs):
    try:
        s = Sampling(**kwargs)
    except UserError as e:
        assert refused_naming(e, *kwargs), e
        return
    assert type(s.temperature) is float and (s.temperature == 0 or MIN_TEMPERATURE <= s.temperature < math.inf)
    assert s.top_k is None or type(s.top_k) is int and s.top_k >= 1
    assert 0 < s.top_p <= 1 and 0 <= s.min_p < 1 and type(s.greedy) is bool
    assert all(RULES[name](name, getattr(s, name)) == getattr(s, name) for name in RULES)  # the rules accept it again


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool])


@st.composite
def logits_and_seen(draw):
    B, W = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    dtype = draw(DTYPES)
    special = st.sampled_from([-math.inf, math.inf, math.nan, 1e38, -1e38, 0.0])
    value = st.floats(-30, 30) if draw(st.booleans()) else st.one_of(st.floats(-30, 30), special)
    values = draw(st.lists(value, min_size=B * W, max_size=B * W))
    logits = torch.tensor(values, dtype=torch.float64).view(B, W).to(dtype)
    shape = draw(st.sampled_from(["match", "1-D", "other"]))
    if shape == "1-D":
        logits = logits[0]
    seen = draw(st.one_of(st.none(), st.just("match"), st.just("wrong dtype"), st.just("wrong shape"), junk))
    if seen == "match":
        seen = torch.rand(B, W, generator=torch.Generator().manual_seed(B * W)) < 0.3
    elif seen == "wrong dtype":
        seen = torch.zeros(B, W)
    elif seen == "wrong shape":
        seen = torch.zeros(B, W + 1, dtype=torch.bool)
    return logits, seen


def well_formed(logits, seen) -> bool:
    """Finite float logits [B, V] of moderate size (every rule keeps them finite) and a
    bool `seen` of their shape or None: what sample must always accept."""
    return (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.is_floating_point()
            and bool(torch.isfinite(logits).all()) and float(logits.abs().max()) <= 1e4
            and (seen is None or isinstance(seen, torch.Tensor) and seen.dtype == torch.bool
                 and seen.shape == logits.shape))


def unchanged(before, after) -> bool:
    if not isinstance(before, torch.Tensor):
        return True
    if before.is_floating_point():
        return torch.equal(before.isnan(), after.isnan()) and torch.equal(before.nan_to_num(0), after.nan_to_num(0))
    return torch.equal(before, after)


@given(logits_and_seen(), samplings)
def test_process_logits_returns_the_shape_it_was_given_or_names_the_culprit(pair, kwargs):
    logits, seen = pair
    sampling = good_sampling(kwargs)
    copies = [x.clone() if isinstance(x, torch.Tensor) else x for x in (logits, seen)]
    try:
        out = process_logits(logits, sampling, seen)
    except UserError as e:
        assert refused_naming(e, "logits", "seen"), e
    else:
        assert out.shape == logits.shape and logits.dim() == 2 and logits.is_floating_point()
    assert all(unchanged(c, x) for c, x in zip(copies, (logits, seen)))


@given(logits_and_seen(), samplings, st.integers(0, 2**32), st.booleans())
def test_sample_draws_a_token_the_rules_keep_or_names_the_culprit(pair, kwargs, seed, by_rows):
    logits, seen = pair
    sampling = good_sampling(kwargs)
    copies = [x.clone() if isinstance(x, torch.Tensor) else x for x in (logits, seen)]
    try:
        if by_rows:
            rows = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else 1
            tokens = sample_rows(logits, sampling, seen, [torch.Generator().manual_seed(seed + b) for b in range(rows)])
        else:
            tokens = sample(logits, sampling, seen, torch.Generator().manual_seed(seed))
    except UserError as e:
        assert refused_naming(e, "logits", "seen", "generators", "generator"), e
        assert not well_formed(logits, seen), f"refused a well-formed input: {e}"
    else:
        kept = process_logits(logits.float(), sampling, seen)
        assert tokens.dtype == torch.int64 and tokens.shape == (logits.shape[0],)
        assert torch.isfinite(kept.gather(1, tokens[:, None])).all()  # never a token the rules ruled out
        if sampling.is_greedy:
            assert torch.equal(tokens, kept.argmax(-1))
    assert all(unchanged(c, x) for c, x in zip(copies, (logits, seen)))


def test_sample_refuses_logits_that_overflow_under_the_rules():
    """|logit| < 3e32 stays finite under the smallest temperature; 1e38 does not, and is named."""
    fine = sample(torch.tensor([[3e32, 0.0]]), Sampling(temperature=MIN_TEMPERATURE), generator=torch.Generator())
    assert fine.tolist() == [0]
    with pytest.raises(UserError, match=r"^logits: expected finite values .* got 1 \+inf$"):
        sample(torch.tensor([[1e38, 0.0]]), Sampling(temperature=MIN_TEMPERATURE))


@given(st.lists(st.lists(st.one_of(st.integers(-2, V + 2), junk), max_size=5), max_size=3),
       st.one_of(st.integers(-1, 6), junk), samplings, st.one_of(st.none(), st.integers(1, 40), junk),
       st.sampled_from(["none", "one", "per row", "junk"]),
       st.one_of(st.lists(st.integers(0, V - 1), max_size=3).map(tuple), junk), st.sampled_from([None, "junk"]))
def test_generate_yields_tokens_of_the_vocabulary_or_names_the_culprit(prompts, n, kwargs, window, gens, stops, tap):
    sampling = good_sampling(kwargs)
    extra = {"generator": torch.Generator().manual_seed(0)} if gens == "one" else \
        {"generators": [torch.Generator().manual_seed(i) for i in range(len(prompts))]} if gens == "per row" else \
        {"generator": "seed"} if gens == "junk" else {}
    extra |= {} if tap is None else {"tap": tap}
    try:
        steps = list(generate(PARAMS, prompts, TINY, max_new_tokens=n, sampling=sampling, window=window,
                              stop_tokens=stops, **extra))
    except UserError as e:
        assert refused_naming(e, "prompt", "prompts", "--max_new_tokens", "window", "generator", "generators",
                              "sampling", "logits", "stop_tokens", "tap"), e
        return
    assert len(steps) <= n and all(s.shape == (len(prompts),) and 0 <= int(s.min()) <= int(s.max()) < V
                                   for s in steps)
    assert len(steps) == n or all(int(t) in stops for t in steps[-1])  # fewer only when every row stopped


@given(st.integers(1, 3), st.integers(0, 40), st.sampled_from([torch.int64, torch.int32, torch.float32]),
       st.one_of(st.none(), st.lists(st.integers(-1, 41), min_size=1, max_size=3)), st.integers(-2, V + 2))
def test_prefill_gives_last_logits_per_row_or_names_the_culprit(B, T, dtype, counts, fill):
    tokens = torch.full((B, T), fill, dtype=dtype)
    before = tokens.clone()
    try:
        logits, cache = prefill(PARAMS, tokens, TINY, counts=None if counts is None else tuple(counts))
    except UserError as e:
        assert refused_naming(e, "tokens", "counts", "sequence of", "token id", "cache"), e
    else:
        assert logits.shape == (B, V) and torch.isfinite(logits).all()
        assert cache.lengths == (tuple(counts) if counts is not None else (T,) * B)
    assert torch.equal(tokens, before)


@given(st.lists(st.integers(0, V - 1), min_size=1, max_size=6), st.integers(0, 8),
       st.one_of(st.lists(st.text(min_size=1, max_size=3), max_size=2), st.lists(st.just(""), min_size=1,
                                                                                  max_size=1)))
def test_stream_text_gives_pieces_within_the_decoded_tokens_or_names_the_stop(prompt, n, stop):
    stats = {}
    try:
        pieces = list(stream_text(PARAMS, prompt, TINY, max_new_tokens=n, sampling=Sampling(greedy=True),
                                  stop=tuple(stop), stats=stats))
    except UserError as e:
        assert refused_naming(e, "--stop"), e
        return
    assert all(isinstance(p, str) for p in pieces) and stats["new_tokens"] <= n
    assert not any(s in "".join(pieces) for s in stop)  # the text stops before any stop string


requests = st.fixed_dictionaries(
    {"prompt": st.one_of(st.lists(st.integers(0, V + 1), max_size=6), st.lists(st.integers(0, 5), max_size=3)
                         .map(tuple), junk),
     "max_tokens": st.one_of(st.integers(-1, 8), junk)},
    optional={"seed": st.one_of(st.none(), st.integers(-1, 2**64), junk), "stop": st.one_of(
        st.lists(st.text(max_size=2), max_size=2), junk), "logprobs": st.one_of(st.none(), st.integers(-1, 6), junk),
        "prompt_logprobs": st.one_of(st.booleans(), junk), "presence_penalty": st.one_of(st.floats(-3, 3), junk),
        "frequency_penalty": st.one_of(st.floats(-3, 3), junk), "sampling": st.one_of(st.just(Sampling()), junk)})


@given(st.lists(requests, min_size=1, max_size=3), st.integers(1, 2), st.sampled_from([None, "lookup", "draft"]))
def test_the_engine_finishes_each_request_it_takes_or_names_the_field(bodies, max_batch, speculative):
    """A request is made (its fields checked) and submitted (its prompt against the model),
    or refused naming the field; each one taken gets its tokens then one Done, plainly
    decoded or speculatively (a prompt lookup, or the model as its own draft)."""
    proposer = {None: None, "lookup": PromptLookup(2), "draft": DraftModel(PARAMS, TINY, TINY, rows=max_batch)}
    engine = Engine(PARAMS, TINY, max_batch=max_batch, max_queue=4, proposer=proposer[speculative])
    taken = []
    for body in bodies:
        try:
            request = Request(**body)
            events = []
            engine.submit(request, events.append)
        except UserError as e:
            assert refused_naming(e, *body, "request"), e
            continue
        taken.append((request, events))
    for _ in range(100):
        if not engine.busy:
            break
        engine.step()
    assert not engine.busy
    for request, events in taken:
        tokens = [e for e in events if isinstance(e, Token)]
        assert isinstance(events[-1], Done) and events[-1].reason in ("stop", "length") and events[-1].error is None
        assert len(tokens) == events[-1].new_tokens <= request.max_tokens and all(0 <= t.id < V for t in tokens)
        assert (request.logprobs is None) == all(t.logprob is None for t in tokens)
        assert isinstance(events[0], Prompt) == request.prompt_logprobs

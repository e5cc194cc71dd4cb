"""Speculative decoding in the engine (a server's rows): each busy row's guesses verified in
one forward over the busy rows, each row keeping its own number. Greedy rows get
transformers' greedy tokens and log-probs (and plain decoding's with penalties); sampled
rows the target's distribution, by a chi-square test on a vocabulary of 8, several rows
sampled together; a failing row fails alone; refusals name the flag."""

import pytest
import torch

from conftest import TINY, hf_model, params_of
from functional_gpt import GPTConfig, UserError
from functional_gpt.generation import engine as engine_module
from functional_gpt.generation.decoding import generate
from functional_gpt.generation.engine import Engine, Request, Token
from functional_gpt.generation.sampling import Sampling, process_logits
from functional_gpt.generation.speculative import DraftModel, PromptLookup

from test_engine_modes import PARAMS, check_against_reference, drive
from test_speculative import chi2_quantile

GREEDY = Sampling(greedy=True)
DRAFT = params_of(hf_model(GPTConfig(vocab_size=TINY.vocab_size, n_positions=TINY.n_positions, n_embd=16,
                                     n_layer=1, n_head=2), seed=5))


def proposer(which: str, rows: int = 4):
    return {"lookup": PromptLookup(2), "small draft": DraftModel(DRAFT, DRAFT.config, TINY, rows=rows),
            "the model itself": DraftModel(PARAMS, TINY, TINY, rows=rows)}[which]


def tokens_of(events) -> list[int]:
    return [e.id for e in events if isinstance(e, Token)]


def greedy_requests() -> list[Request]:
    """Prompts of 1 to 12 tokens, some repetitive (the lookup finds matches), one filling
    the context of 32 to its end, and as many new tokens as leave 0 to 3 guesses at the end."""
    gen = torch.Generator().manual_seed(3)
    prompts = [(4, 9, 4, 9, 4), (17,), tuple(torch.randint(TINY.vocab_size, (12,), generator=gen).tolist()),
               (30, 31, 32, 30, 31), (8, 8, 8), (100, 5, 6, 7, 100, 5)]
    return [Request(p, max_tokens=n, sampling=GREEDY, logprobs=2) for p, n in zip(prompts, (20, 7, 20, 1, 16, 9))]


@pytest.mark.parametrize("which", ["lookup", "small draft", "the model itself"])
def test_greedy_rows_verified_together_get_transformers_tokens_and_logprobs(which, monkeypatch):
    """Six requests on four rows: each gets transformers' greedy tokens and log-probs; the
    model as its own draft keeps every guess (its rows restarted for each new request)."""
    forwards = []
    real = engine_module.forward_cached
    monkeypatch.setattr(engine_module, "forward_cached", lambda *a, **k: forwards.append(k) or real(*a, **k))
    requests = greedy_requests()
    events = drive(Engine(PARAMS, TINY, max_batch=4, proposer=proposer(which), speculate=3), requests)
    for request, got in zip(requests, events):
        check_against_reference(request, got)
        assert len(tokens_of(got)) == request.max_tokens and got[-1].reason == "length"
    verifying = [k for k in forwards if "cache_rows" in k]
    assert any(len(k["cache_rows"]) > 1 and len(set(k["counts"])) > 1 for k in verifying)  # rows of their own
    if which == "the model itself":  # 4 tokens a row per forward: each row's first comes from its prefill
        rows_verified = sum(len(k["cache_rows"]) for k in verifying)
        assert rows_verified == sum(-(-(r.max_tokens - 1) // 4) for r in requests), rows_verified


def test_a_forward_over_some_cache_rows_gives_each_its_own_logits_and_leaves_the_others():
    """cache_rows (2, 0) of 3, at lengths 7 and 4, with 3 and 1 new tokens (right padding):
    every real position's logits are transformers' on that row's sequence (5e-6 of the
    largest), the lengths move by the counts, row 1's buffers and length stay."""
    from functional_gpt import forward_cached, new_cache
    from test_engine_modes import HF

    gen = torch.Generator().manual_seed(4)
    seqs = {0: torch.randint(TINY.vocab_size, (1, 4), generator=gen), 1: torch.randint(TINY.vocab_size, (1, 5),
            generator=gen), 2: torch.randint(TINY.vocab_size, (1, 7), generator=gen)}
    cache = new_cache(TINY, 3)
    for b, seq in seqs.items():
        _, row = forward_cached(PARAMS, seq, cache.row(b), TINY)
        cache = cache.with_length(b, row.lengths[0])
    idle = cache.k[:, 1].clone()
    new = torch.tensor([[9, 8, 7], [5, 0, 0]])
    logits, after = forward_cached(PARAMS, new, cache, TINY, cache_rows=(2, 0), counts=(3, 1))
    assert after.lengths == (5, 5, 10) and torch.equal(after.k[:, 1], idle)
    for b, (row, n) in enumerate(((2, 3), (0, 1))):
        with torch.no_grad():
            expected = HF(torch.cat([seqs[row], new[b : b + 1, :n]], 1)).logits[0, -n:]
        assert torch.allclose(logits[b, :n], expected, rtol=0, atol=5e-6 * float(expected.abs().max())), row
    with pytest.raises(UserError, match=r"^cache_rows: expected distinct rows, got \[0, 0\]$"):
        forward_cached(PARAMS, new, cache, TINY, cache_rows=(0, 0), counts=(3, 1))
    with pytest.raises(UserError, match=r"^cache_rows\[1\]: expected an integer in 0..2, got 3"):
        forward_cached(PARAMS, new, cache, TINY, cache_rows=(0, 3), counts=(3, 1))


def test_a_draft_of_several_rows_guesses_each_rows_own_greedy_continuation():
    """Rows asked in changing sets, at their own lengths, some guesses kept and a new token
    after them: each row's guesses are plain greedy decoding of the draft on that row's
    context alone."""
    draft = DraftModel(DRAFT, DRAFT.config, TINY, rows=3)
    gen = torch.Generator().manual_seed(0)
    contexts = {0: [4, 9, 4], 1: [17], 2: torch.randint(TINY.vocab_size, (9,), generator=gen).tolist()}
    for rows in ([0, 2], [1], [0, 1, 2], [2], [0, 2], [0, 1, 2], [1, 2]):
        drawn = draft.draw_rows(rows, [contexts[r] for r in rows], 3, [GREEDY] * len(rows), [None] * len(rows))
        for r, (guesses, q) in zip(rows, drawn):
            plain = [int(t[0]) for t in generate(DRAFT, [contexts[r]], DRAFT.config, max_new_tokens=3)]
            assert guesses == plain and q is None, (rows, r)
            kept = int(torch.randint(4, (1,), generator=gen))
            contexts[r] = contexts[r] + guesses[:kept] + [int(torch.randint(TINY.vocab_size, (1,), generator=gen))]


@pytest.mark.parametrize("which", ["lookup", "the model itself"])
def test_penalties_and_stops_give_plain_decodings_tokens(which):
    """Frequency, presence and repetition penalties (applied per guessed position) and a
    stop string: the tokens and texts of the engine without a proposer."""
    penalised = [Request((4, 9, 4, 9, 4), max_tokens=25, sampling=GREEDY, frequency_penalty=1.5, logprobs=0),
                 Request((8, 8, 8), max_tokens=25, sampling=GREEDY, presence_penalty=2.0),
                 Request((30, 31, 32, 30, 31), max_tokens=25, sampling=Sampling(greedy=True, repetition_penalty=3.0)),
                 Request((4, 9, 4, 9, 4), max_tokens=25, sampling=GREEDY, stop=("e",))]
    plain = drive(Engine(PARAMS, TINY, max_batch=4), penalised)
    fast = drive(Engine(PARAMS, TINY, max_batch=4, proposer=proposer(which), speculate=4), penalised)
    for a, b in zip(plain, fast):
        assert tokens_of(a) == tokens_of(b)
        assert [e.text for e in a if isinstance(e, Token)] == [e.text for e in b if isinstance(e, Token)]
        assert (a[-1].reason, a[-1].text) == (b[-1].reason, b[-1].text)
        for x, y in zip(a, b):
            if isinstance(x, Token) and x.logprob is not None:
                assert abs(x.logprob - y.logprob) < 1e-4
    assert tokens_of(plain[0]) != tokens_of(drive(Engine(PARAMS, TINY), [Request(penalised[0].prompt, 25, sampling=GREEDY)])[0])


SMALL = GPTConfig(vocab_size=8, n_positions=16, n_embd=16, n_layer=1, n_head=2)


def exact_pairs(hf, prompt, sampling: Sampling, frequency_penalty: float) -> torch.Tensor:
    """The target's distribution of its 2nd and 3rd new tokens [V, V] (summed over the
    1st) under `sampling` and a frequency penalty, from transformers' logits."""
    V = SMALL.vocab_size

    def dist(new):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + new])).logits[0, -1:].double()
        counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=V).double()
        seen = torch.zeros(1, V, dtype=torch.bool)
        seen[0, prompt + new] = True
        return process_logits(logits - frequency_penalty * counts, sampling, seen).softmax(-1)[0]

    first = dist([])
    return sum(first[a] * torch.stack([dist([a])[b] * dist([a, b]) for b in range(V)]) for a in range(V))


@pytest.mark.parametrize("which, sampling, frequency_penalty", [
    ("small draft", dict(temperature=0.8, top_k=6), 0.0),
    ("lookup", dict(temperature=1.3), 1.0),
    ("small draft", dict(temperature=1.0, repetition_penalty=4.0), 0.5),
])
def test_sampled_rows_verified_together_follow_the_targets_distribution(which, sampling, frequency_penalty):
    """2,400 requests of 4 new tokens, 8 at a time on 8 rows with 2 guesses per step: a
    chi-square test of the 2nd and 3rd tokens' pairs against the target's exact
    distribution (p = 1e-6), and no draw where it is 0."""
    hf = hf_model(SMALL, seed=11)
    target = params_of(hf)
    draft = params_of(hf_model(SMALL, seed=12))
    prompt = [3, 1, 3, 1, 3, 1, 3]
    sampling = Sampling(**sampling)
    expected = exact_pairs(hf, prompt, sampling, frequency_penalty)
    guesser = DraftModel(draft, SMALL, SMALL, rows=8) if which == "small draft" else PromptLookup(2)
    engine = Engine(target, SMALL, max_batch=8, max_queue=2400, proposer=guesser, speculate=2)
    N, V = 2400, SMALL.vocab_size
    requests = [Request(tuple(prompt), 4, sampling=sampling, seed=s, frequency_penalty=frequency_penalty)
                for s in range(N)]
    counts = torch.zeros(V, V)
    for got in drive(engine, requests, max_steps=N):
        tokens = tokens_of(got)
        counts[tokens[1], tokens[2]] += 1
    e = expected[expected > 0] * N
    chi2 = float(((counts[expected > 0] - e) ** 2 / e).sum())
    assert counts[expected == 0].sum() == 0 and chi2 < chi2_quantile(len(e) - 1, z=4.753), chi2


def test_a_row_whose_verification_fails_ends_alone_and_the_others_get_their_tokens(monkeypatch):
    real = engine_module.verify

    def verify(logits, guesses, q, sampling, seen, generator):
        if sampling.top_k == 7:
            raise RuntimeError("boom")
        return real(logits, guesses, q, sampling, seen, generator)

    monkeypatch.setattr(engine_module, "verify", verify)
    requests = greedy_requests()[:3]
    requests.insert(1, Request((1, 2, 3), 10, sampling=Sampling(top_k=7), seed=1))
    events = drive(Engine(PARAMS, TINY, max_batch=4, proposer=proposer("the model itself")), requests)
    assert events[1][-1].reason == "error" and events[1][-1].error == "sampling failed: RuntimeError: boom"
    assert len(tokens_of(events[1])) == 1  # its first token came from its prefill
    for request, got in zip(requests[:1] + requests[2:], events[:1] + events[2:]):
        check_against_reference(request, got)


def test_a_failing_verifying_forward_ends_the_rows_it_held_and_the_engine_serves_on(monkeypatch):
    real, calls = engine_module.forward_cached, []

    def forward_cached(*args, **kwargs):
        calls.append(kwargs)
        if "cache_rows" in kwargs and len(calls) < 8:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "forward_cached", forward_cached)
    engine = Engine(PARAMS, TINY, max_batch=4, proposer=proposer("lookup"))
    first = drive(engine, greedy_requests()[:2])
    assert [e[-1].error for e in first] == ["the speculative step failed: RuntimeError: out of memory"] * 2
    request = greedy_requests()[2]
    check_against_reference(request, drive(engine, [request])[0])


def test_refusals_name_what_is_wrong():
    with pytest.raises(UserError, match="^draw_rows: expected rows, contexts, samplings and generators of one "
                                        "length, got a list of 2, a list of 1"):
        proposer("small draft").draw_rows([0, 1], [[1, 2]], 2, [GREEDY], [None])
    with pytest.raises(UserError, match=r"^--batch_invariant and speculative decoding \(--draft, --prompt_lookup\) "
                                        "cannot both hold"):
        Engine(PARAMS, TINY, batch_invariant=True, proposer=PromptLookup(2))
    with pytest.raises(UserError, match=r"^proposer: a DraftModel of 4 rows for max_batch 8 "
                                        r"\(DraftModel\(\.\.\., rows=8\)\)$"):
        Engine(PARAMS, TINY, max_batch=8, proposer=proposer("small draft", rows=4))
    with pytest.raises(UserError, match="^proposer: expected a DraftModel, a PromptLookup or None, got 3"):
        Engine(PARAMS, TINY, proposer=3)
    with pytest.raises(UserError, match="^speculate: expected an integer in 1..64, got 0"):
        Engine(PARAMS, TINY, proposer=PromptLookup(2), speculate=0)

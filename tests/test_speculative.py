"""Speculative greedy decoding (generation/speculative.py): token for token what plain
greedy decoding yields (itself checked against transformers' generate), with each
proposer, any number of guesses, across window restarts and at stop tokens; and against
transformers' own greedy generate directly, within the context."""

import pytest
import torch

from conftest import hf_model, params_of
from functional_gpt import GPTConfig, UserError, save_params
from functional_gpt.cli import main
from functional_gpt.generation.decoding import generate
from functional_gpt.generation.speculative import DraftModel, PromptLookup, speculative_generate

CONFIG = GPTConfig(vocab_size=300, n_positions=48, n_embd=64, n_layer=2, n_head=4)
PROMPT = [5, 9, 11, 5, 9, 11, 7]


@pytest.fixture(scope="module")
def models():
    target = params_of(hf_model(CONFIG, seed=1))
    draft = params_of(hf_model(GPTConfig(vocab_size=300, n_positions=48, n_embd=32, n_layer=1, n_head=2), seed=2))
    return target, draft


def plain(params, prompt, n, **kwargs):
    return [int(t[0]) for t in generate(params, [prompt], params.config, max_new_tokens=n, **kwargs)]


def speculative(params, prompt, n, proposer, k, **kwargs):
    return [int(t[0]) for t in speculative_generate(params, prompt, params.config, max_new_tokens=n,
                                                    proposer=proposer, k=k, **kwargs)]


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("which", ["lookup", "small draft", "the model itself"])
def test_every_proposer_yields_exactly_the_plain_greedy_tokens_across_window_restarts(models, which, k):
    """100 new tokens after 7 in a context of 48: the window restarts three times."""
    target, draft = models
    proposer = {"lookup": PromptLookup(3), "small draft": DraftModel(draft, draft.config, CONFIG),
                "the model itself": DraftModel(target, CONFIG, CONFIG)}[which]
    want = plain(target, PROMPT, 100)
    assert speculative(target, PROMPT, 100, proposer, k) == want
    assert speculative(target, PROMPT[:3], 30, proposer, k) == plain(target, PROMPT[:3], 30)  # a proposer reused


def test_within_the_context_it_is_transformers_greedy_generate(models):
    target, _ = models
    hf = hf_model(CONFIG, seed=1)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             max_new_tokens=40, do_sample=False)[0, len(PROMPT):].tolist()
    for proposer in (PromptLookup(2), DraftModel(target, CONFIG, CONFIG)):
        assert speculative(target, PROMPT, 40, proposer, 4) == theirs


def test_a_stop_token_ends_it_where_plain_greedy_stops(models):
    target, draft = models
    stream = plain(target, PROMPT, 60)
    stop = stream[25]  # a token greedy produces: the output ends at its first occurrence
    want = stream[:stream.index(stop) + 1]
    for proposer in (PromptLookup(3), DraftModel(draft, draft.config, CONFIG)):
        assert speculative(target, PROMPT, 60, proposer, 5, stop_tokens=(stop,)) == want


def test_the_lookup_guesses_what_followed_the_latest_match_of_the_longest_n_gram():
    lookup = PromptLookup(3)
    assert lookup.propose([1, 2, 3, 9, 1, 2, 3, 8, 7, 1, 2, 3], 2) == [8, 7]  # the latest 3-gram match
    assert lookup.propose([4, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]  # no 3-gram: the 2-gram (2, 3)
    assert lookup.propose([5, 6, 7], 4) == []
    assert PromptLookup(1).propose([1, 2, 1], 5) == [2, 1]


def test_generate_takes_a_draft_or_prompt_lookup_and_writes_the_same_text(models, tmp_path, capsys):
    config = GPTConfig(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    target, draft = tmp_path / "t.safetensors", tmp_path / "d.safetensors"
    draft_config = GPTConfig(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    save_params(target, params_of(hf_model(config, seed=3)), config)
    save_params(draft, params_of(hf_model(draft_config, seed=4)), draft_config)
    G = ["generate", "--weights", str(target), "--prompt", "To be, or not to be", "--greedy", "--max_new_tokens", "90"]
    texts = []
    for extra in ([], ["--prompt_lookup", "2"], ["--draft", str(draft), "--speculate", "3"]):
        assert main(G + extra) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) > 50
    S = G[:-3] + ["--temperature", "0.9", "--seed", "7", "--max_new_tokens", "40", "--draft", str(draft)]
    sampled = []
    for _ in range(2):
        assert main(S) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and sampled[0] != texts[0][: len(sampled[0])]  # seeded: reproducible


@pytest.mark.parametrize("which", ["lookup", "small draft"])
def test_greedy_with_a_repetition_penalty_is_plain_greedys_with_it(models, which):
    from functional_gpt.generation.sampling import Sampling

    target, draft = models
    sampling = Sampling(greedy=True, repetition_penalty=1.7)
    proposer = PromptLookup(3) if which == "lookup" else DraftModel(draft, draft.config, CONFIG)
    expected = plain(target, PROMPT, 30, sampling=sampling)
    assert speculative(target, PROMPT, 30, proposer, 4, sampling=sampling) == expected
    assert expected != plain(target, PROMPT, 30)


@pytest.mark.parametrize("extra, words", [
    (["--draft", "D", "--prompt_lookup", "2"], "--draft and --prompt_lookup: give one proposer, not both"),
    (["--prompt_lookup", "0"], "--prompt_lookup: expected an integer in 1..64, got 0"),
    (["--prompt_lookup", "2", "--greedy", "--speculate", "0"], "--speculate: expected an integer in 1..64, got 0"),
    (["--prompt_lookup", "2", "--num_samples", "2"], "--draft / --prompt_lookup: speculative decoding here runs "
                                                     "one sample (--num_samples 1)"),
    (["--draft", "OTHER", "--greedy"], "--draft: the draft's vocab_size is 300, the model's 50257; a draft must "
                                       "share the tokenizer and the context"),
])
def test_bad_speculative_flags_are_one_line_naming_the_flag(models, tmp_path, capsys, extra, words):
    config = GPTConfig(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    weights, other = tmp_path / "t.safetensors", tmp_path / "o.safetensors"
    save_params(weights, params_of(hf_model(config, seed=3)), config)
    save_params(other, models[1], models[1].config)
    extra = [{"D": str(weights), "OTHER": str(other)}.get(x, x) for x in extra]
    assert main(["generate", "--weights", str(weights), "--prompt", "Hi", "--max_new_tokens", "3", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_bad_python_arguments_are_user_errors(models):
    target, draft = models
    with pytest.raises(UserError, match="proposer: expected a PromptLookup or a DraftModel"):
        list(speculative_generate(target, PROMPT, CONFIG, max_new_tokens=3, proposer=3))
    with pytest.raises(UserError, match="n_positions is 64, the model's 48"):
        DraftModel(params_of(hf_model(GPTConfig(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2))),
                   None, CONFIG)
    with pytest.raises(UserError, match="prompt: expected a non-empty list"):
        list(speculative_generate(target, [], CONFIG, max_new_tokens=3, proposer=PromptLookup()))


# --- sampling: the rejection rule keeps the target's distribution -------------------------------

SMALL = GPTConfig(vocab_size=8, n_positions=16, n_embd=16, n_layer=1, n_head=2)


def exact_pairs(prompt, sampling) -> torch.Tensor:
    """The target's distribution of its 2nd and 3rd new tokens under `sampling`, [V, V]
    (summed over the 1st), from transformers' logits and each rule's own function."""
    from functional_gpt.generation.sampling import process_logits

    hf = hf_model(SMALL, seed=11)

    def dist(seq):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, -1:]
        seen = torch.zeros(1, SMALL.vocab_size, dtype=torch.bool)
        seen[0, seq] = True
        return process_logits(logits, sampling, seen).double().softmax(-1)[0]

    V, first = SMALL.vocab_size, dist(prompt)
    return sum(first[a] * torch.stack([dist(prompt + [a])[b] * dist(prompt + [a, b]) for b in range(V)])
               for a in range(V))


@pytest.mark.parametrize("which, sampling", [
    ("small draft", dict(temperature=0.8, top_k=6)),
    ("lookup", dict(temperature=1.3)),
    ("small draft", dict(temperature=1.0, repetition_penalty=4.0)),
])
def test_sampled_speculative_tokens_follow_the_targets_distribution(which, sampling):
    """3,000 draws of 4 new tokens on a vocabulary of 8, k = 2: the 2nd and 3rd are the
    guesses of one verifying forward (kept, rejected and redrawn, or the one drawn after
    them). A chi-square test of their pairs against the target's exact distribution (64
    cells) at p = 1e-6, no draw where it is 0 (top-k), and the draft's own pairs fail it."""
    from functional_gpt.generation.sampling import Sampling

    target = params_of(hf_model(SMALL, seed=11))
    draft = params_of(hf_model(SMALL, seed=12))
    prompt = [3, 1, 3, 1, 3, 1, 3]  # the lookup guesses what followed "1 3" (or "3") before; 6 tokens unseen
    sampling = Sampling(**sampling)
    expected = exact_pairs(prompt, sampling)
    proposer = DraftModel(draft, SMALL, SMALL) if which == "small draft" else PromptLookup(2)
    gen = torch.Generator().manual_seed(0)
    N, V = 3000, SMALL.vocab_size
    counts, drafts = torch.zeros(V, V), torch.zeros(V, V)
    for _ in range(N):
        tokens = speculative(target, prompt, 4, proposer, 2, sampling=sampling, generator=gen)
        counts[tokens[1], tokens[2]] += 1
        if which == "small draft":
            first = tokens[0]
            a, b = DraftModel(draft, SMALL, SMALL).draw(prompt + [first], 2, sampling, gen)[0]
            drafts[a, b] += 1
    e = expected[expected > 0] * N
    critical = chi2_quantile(len(e) - 1, z=4.753)  # p = 1e-6

    def chi2(observed):
        return float(((observed[expected > 0] - e) ** 2 / e).sum())

    assert counts[expected == 0].sum() == 0 and chi2(counts) < critical, (chi2(counts), critical)
    if which == "small draft":
        assert chi2(drafts) > critical


def chi2_quantile(df: int, z: float) -> float:
    """Wilson and Hilferty's chi-square quantile for the standard normal quantile z."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3

"""Tests of model.py and generate.py written to kill mutants that the module tests let
survive (`mutmut run`, README's maintainers' section): each names the behaviour it pins.
Layer-level ones are in test_layers.py.
"""

import io
import time

import pytest
import torch

import functional_gpt.generate as generate_module
from conftest import TINY, hf_model, params_of
from functional_gpt import UserError, config_of
from functional_gpt.generate import MAX_SEED, _summary, encode_prompt, print_samples, stream_text
from functional_gpt.sampling import Sampling
from functional_gpt.tokenizer import ENDOFTEXT_ID, decode, encode


@pytest.mark.parametrize("params", [{}, {"wte": {"weight": None}}, {"wte": {}, "wpe": {}, "h": []}])
def test_config_of_params_without_the_needed_shapes_says_what_is_needed(params):
    with pytest.raises(UserError, match=r"^params: cannot read the config off the shapes \(wte\.weight, "
                                        r"wpe\.weight and h are needed\); pass the config$"):
        config_of(params)


# --- generate.print_samples (`fgpt generate`), stream_text, encode_prompt, the summary --


class Recording(io.StringIO):
    """A text stream that logs its writes and flushes, in order."""

    def __init__(self):
        super().__init__()
        self.events = []

    def write(self, s):
        self.events.append(("write", s))
        return super().write(s)

    def flush(self):
        self.events.append(("flush",))
        super().flush()


@pytest.fixture(scope="module")
def trained_params():
    """Trained-like tiny weights (conftest): sampled continuations differ from seed to seed."""
    return params_of(hf_model(TINY, seed=2))


def _print(params, prompt="a", **kwargs):  # "a": one token, id 64, inside the tiny vocab
    out, err = Recording(), Recording()
    kwargs = dict(max_new_tokens=6, sampling=Sampling(), out=out, err=err) | kwargs
    print_samples(params, prompt, TINY, **kwargs)
    return out, err


def _sample_text(params, seed, prompt="a", **kwargs):
    """One continuation drawn with torch.Generator().manual_seed(seed): what sample i of
    print_samples must print when it draws with seed + i."""
    generator = torch.Generator().manual_seed(seed)
    return "".join(stream_text(params, encode(prompt), TINY, max_new_tokens=6, sampling=Sampling(),
                               generator=generator, **kwargs))


def test_print_samples_prints_sample_i_drawn_with_seed_plus_i(trained_params):
    out, err = _print(trained_params, num_samples=3, seed=10)
    texts = [_sample_text(trained_params, 10 + i) for i in range(3)]
    assert len(set(texts)) == 3  # the seeds matter
    assert out.getvalue() == "".join(f"--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts))
    assert err.getvalue().count("[prompt 1 tokens, 6 new tokens; prefill ") == 3


def test_print_samples_one_sample_by_default_without_a_header(trained_params):
    out, _ = _print(trained_params, seed=4)
    assert out.getvalue() == _sample_text(trained_params, 4) + "\n"


def test_print_samples_flushes_the_header_and_each_summary(trained_params):
    """Streaming: the header reaches the terminal before the sample is computed, and
    each summary line as soon as its sample ends."""
    out, err = _print(trained_params, num_samples=2, seed=1)
    header_end = out.events.index(("write", "\n"))  # print's newline after "--- sample 1 ---"
    assert out.events[header_end - 1] == ("write", "--- sample 1 ---")
    assert out.events[header_end + 1] == ("flush",)
    summaries = [i for i, e in enumerate(err.events) if e[0] == "write" and e[1].startswith("[prompt")]
    assert len(summaries) == 2 and all(err.events[i + 2] == ("flush",) for i in summaries)


def test_print_samples_passes_the_stop_strings_on(trained_params):
    full = _sample_text(trained_params, 7)
    stop = full[2:4]
    out, _ = _print(trained_params, seed=7, stop=(stop,))
    assert out.getvalue() == full[: full.index(stop)] + "\n"


def test_print_samples_notes_a_cropped_prompt_on_err(trained_params):
    out, err = _print(trained_params, prompt="a!" * 20, max_new_tokens=1, seed=0)  # 40 tokens, ids < 128
    assert err.getvalue().startswith("note: prompt of 40 tokens is longer than the context; "
                                     "cropped from the left to its last 32\n")
    assert "note" not in out.getvalue()


@pytest.mark.parametrize("n", [0, 1])
def test_print_samples_accepts_the_smallest_settings(trained_params, n):
    out, err = _print(trained_params, max_new_tokens=n, num_samples=1, seed=0)
    assert out.getvalue().count("\n") == 1 and f"{n} new tokens" in err.getvalue()


@pytest.mark.parametrize("num_samples", [1, 3])
def test_print_samples_accepts_seeds_from_0_to_the_last_that_fits(trained_params, num_samples):
    for seed in (0, MAX_SEED - (num_samples - 1)):
        out, _ = _print(trained_params, max_new_tokens=1, num_samples=num_samples, seed=seed)
        assert out.getvalue()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), r"--max_new_tokens must be an integer >= 0, got -1"),
        (dict(max_new_tokens=1.5), r"--max_new_tokens must be an integer >= 0, got 1\.5"),
        (dict(num_samples=0), r"--num_samples must be an integer >= 1, got 0"),
        (dict(num_samples=1.0), r"--num_samples must be an integer >= 1, got 1\.0"),
        (dict(seed=-1), rf"--seed must be an integer in 0\.\.{MAX_SEED - 1} \(torch's seeds are 0\.\.2\*\*64-1 "
                        r"and sample i uses seed \+ i\), got -1"),
        (dict(seed=1.5), r"--seed must be an integer in .* got 1\.5"),
        (dict(seed=MAX_SEED), rf"--seed must be an integer in 0\.\.{MAX_SEED - 1} .* got {MAX_SEED}"),
        (dict(seed=MAX_SEED - 1, num_samples=3), rf"--seed must be an integer in 0\.\.{MAX_SEED - 2} .* got {MAX_SEED - 1}"),
        (dict(seed=MAX_SEED + 1, num_samples=1), rf"--seed must be an integer in 0\.\.{MAX_SEED} .* got {MAX_SEED + 1}"),
    ],
)
def test_print_samples_bad_settings_fail_before_any_output(trained_params, kwargs, message):
    out, err = Recording(), Recording()
    kwargs = dict(max_new_tokens=2, sampling=Sampling(), num_samples=2) | kwargs  # 2: a header would print first
    with pytest.raises(UserError, match=f"^{message}$"):
        print_samples(trained_params, "a", TINY, out=out, err=err, **kwargs)
    assert out.getvalue() == err.getvalue() == ""


def test_stream_text_refuses_an_empty_stop_string(trained_params):
    with pytest.raises(UserError, match="^--stop: empty stop string$"):
        next(stream_text(trained_params, [1], TINY, max_new_tokens=2, stop=("x", "")))


def test_stream_text_stats_with_no_new_token(trained_params):
    stats = {}
    assert list(stream_text(trained_params, [1, 2], TINY, max_new_tokens=0, stats=stats)) == []
    assert stats == dict(prompt_tokens=2, new_tokens=0, prefill_s=0.0, decode_s=0.0)


def test_a_prompt_of_exactly_n_positions_tokens_needs_no_notice():
    ids, notice = encode_prompt(" word" * TINY.n_positions, TINY)
    assert len(ids) == TINY.n_positions and notice is None


@pytest.mark.parametrize(
    "stats, line",
    [
        (dict(prompt_tokens=4, new_tokens=5, prefill_s=0.5, decode_s=2.0),
         "[prompt 4 tokens, 5 new tokens; prefill 8.0 tok/s, decode 2.0 tok/s]"),
        (dict(prompt_tokens=3, new_tokens=2, prefill_s=2.0, decode_s=0.25),
         "[prompt 3 tokens, 2 new tokens; prefill 1.5 tok/s, decode 4.0 tok/s]"),
        (dict(prompt_tokens=3, new_tokens=1, prefill_s=0.0, decode_s=0.5),
         "[prompt 3 tokens, 1 new tokens; prefill nan tok/s, decode nan tok/s]"),
        (dict(prompt_tokens=3, new_tokens=4, prefill_s=1.0, decode_s=0.0),
         "[prompt 3 tokens, 4 new tokens; prefill 3.0 tok/s, decode nan tok/s]"),
    ],
)
def test_summary_line_in_closed_form(stats, line):
    """prefill rate = prompt tokens / prefill_s; decode rate = (new tokens - 1) / decode_s
    (the first new token comes out of the prefill); nan where a rate has no time or no steps."""
    assert _summary(stats) == line


# stream_text's text logic against a scripted token source (generate replaced), so each
# case is exact: which piece comes out after which token.


def _scripted(monkeypatch, tokens):
    """Replace stream_text's generate with one that yields `tokens` one by one and counts
    how many were pulled; returns the counter (a one-element list)."""
    pulled = [0]

    def fake_generate(params, prompts, config, *, max_new_tokens, sampling, generator, stop_tokens):
        for t in tokens[:max_new_tokens]:
            pulled[0] += 1
            yield torch.tensor([t])

    monkeypatch.setattr(generate_module, "generate", fake_generate)
    return pulled


def _pieces(monkeypatch, tokens, stop=(), stats=None):
    """[(tokens pulled when the piece came out, piece), ...]."""
    pulled = _scripted(monkeypatch, tokens)
    return [(pulled[0], p) for p in stream_text(None, [1], TINY, max_new_tokens=len(tokens), stop=stop,
                                                stats=stats)]


A, B, C, X, Y, AA = 64, 65, 66, 87, 88, 7252  # "a", "b", "c", "x", "y", "aa"
E_1, E_2 = 127, 102  # the two byte tokens of "é" (0xc3, 0xa9)


def test_stream_text_yields_each_piece_as_soon_as_its_token_decodes(monkeypatch):
    assert _pieces(monkeypatch, [A, B, C]) == [(1, "a"), (2, "b"), (3, "c")]


def test_stream_text_holds_an_unfinished_utf8_character_back_without_empty_pieces(monkeypatch):
    assert _pieces(monkeypatch, [A, E_1, E_2, B]) == [(1, "a"), (3, "é"), (4, "b")]


def test_stream_text_stops_at_the_first_stop_string_even_inside_one_token(monkeypatch):
    assert "".join(p for _, p in _pieces(monkeypatch, [X, AA, B], stop=("a",))) == "x"


def test_stream_text_stops_at_a_stop_string_at_the_very_start(monkeypatch):
    assert _pieces(monkeypatch, [A, B], stop=("a",)) == [(1, "")]


def test_stream_text_at_endoftext_yields_the_held_back_text_and_pulls_no_more(monkeypatch):
    """"xy" is held back (it might begin the stop "xyz"); <|endoftext|> ends the stream,
    and what was held back comes out then."""
    stats = {}
    assert _pieces(monkeypatch, [A, X, Y, ENDOFTEXT_ID, B], stop=("xyz",), stats=stats) == [(1, "a"), (4, "xy")]
    assert stats["new_tokens"] == 4


def test_stream_text_samples_with_the_sampling_it_is_given(trained_params):
    """The text is the decoded tokens that generate draws with the same sampling and seed."""
    sampling = Sampling(top_k=5, temperature=1.5)
    text = "".join(stream_text(trained_params, [A], TINY, max_new_tokens=8, sampling=sampling,
                               generator=torch.Generator().manual_seed(5)))
    steps = generate_module.generate(trained_params, [[A]], TINY, max_new_tokens=8, sampling=sampling,
                                     generator=torch.Generator().manual_seed(5))
    assert text == decode([int(t[0]) for t in steps])
    greedy = "".join(stream_text(trained_params, [A], TINY, max_new_tokens=8, sampling=Sampling(greedy=True)))
    assert text != greedy


def test_stream_text_times_the_prefill_and_the_decode_apart(trained_params):
    """prefill_s: prompt to first new token; decode_s: first to last; both positive for
    several tokens, and they add up to the time the whole stream took."""
    stats = {}
    start = time.perf_counter()
    list(stream_text(trained_params, [A, B], TINY, max_new_tokens=6, sampling=Sampling(greedy=True), stats=stats))
    total = time.perf_counter() - start
    assert stats["new_tokens"] == 6 and stats["prefill_s"] > 0 and stats["decode_s"] > 0
    assert stats["prefill_s"] + stats["decode_s"] <= total

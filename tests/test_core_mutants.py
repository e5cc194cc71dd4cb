"""Tests of model/transformer.py and generation/decoding.py (and a few of layers.py and perplexity.py) written to
kill mutants that the module tests let survive (`mutmut run`, README's maintainers'
section): each names the behaviour it pins. Most layer-level ones are in test_layers.py.
"""

import io
import re
import time
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import functional_gpt.generation.decoding as generate_module
from conftest import TINY, assert_rel_close, hf_model, params_of
from test_generate import greedy_without_cache
from functional_gpt import (UserError, config_of, decode_step, flatten, forward, forward_cached, init_params,
                            new_cache, no_tap, recorder, unflatten)
from functional_gpt.reference.perplexity import evaluate
from functional_gpt.generation.decoding import MAX_SEED, _summary, encode_prompt, generate, prefill, print_samples, stream_text
from functional_gpt.model.layers import CacheRows, self_attention, transformer_block
from functional_gpt.generation.sampling import Sampling
from functional_gpt.model.tokenizer import ENDOFTEXT_ID, decode, encode


@pytest.mark.parametrize("params", [{}, {"wte": {"weight": None}}, unflatten(flatten(init_params(TINY)))])
def test_config_of_params_that_do_not_carry_it_says_what_to_do(params):
    """The head count is never read off shapes: a plain dict gets this whole message."""
    with pytest.raises(UserError, match=r"^config: these params do not carry their config \(a dict\), and n_head "
                                        r"and layer_norm_epsilon cannot be read off shapes; pass config=, or make "
                                        r"them with init_params / load_params / with_config\(params, config\)$"):
        config_of(params)


def test_config_of_params_that_carry_it_is_theirs():
    assert config_of(init_params(TINY)) is TINY


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


def test_print_samples_runs_its_samples_as_one_batch_and_writes_them_in_order(monkeypatch):
    """One generate call of N rows, each row with its own generator; sample 2's text,
    produced while sample 1 still runs, is written after sample 1 ends; a row that ended
    ignores its later tokens."""
    calls = []

    def fake_generate(params, prompts, config, *, max_new_tokens, sampling, generators, stop_tokens):
        calls.append((len(prompts), len({id(g) for g in generators})))
        yield from (torch.tensor(row) for row in [[A, B], [X, ENDOFTEXT_ID], [ENDOFTEXT_ID, C], [C, C]])

    monkeypatch.setattr(generate_module, "generate", fake_generate)
    out, err = Recording(), Recording()
    print_samples({"wte": {"weight": torch.zeros(1)}}, "a", TINY, max_new_tokens=4, sampling=Sampling(),
                  num_samples=2, seed=0, out=out, err=err)
    assert calls == [(2, 2)]
    assert out.getvalue() == "--- sample 1 ---\nax\n--- sample 2 ---\nb\n"
    assert [line.split(";")[0] for line in err.getvalue().splitlines()] == ["[prompt 1 tokens, 3 new tokens",
                                                                             "[prompt 1 tokens, 2 new tokens"]


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


# --- model/transformer.py: the entry points' checks (each message whole), the cache, the devices ----


def _ids(B, T, seed=0):
    return torch.randint(TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_a_config_that_is_not_a_gptconfig_is_named(tiny_params):
    with pytest.raises(UserError, match=r"^config: expected a GPTConfig, got dict$"):
        forward(tiny_params, _ids(1, 2), TINY.to_dict())


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([[1, 2]], r"tokens: expected an integer tensor \[B, T\], got a list of 1"),
        (torch.tensor(5), r"tokens: expected an integer tensor \[B, T\], got an int64 tensor \[\]"),
        (torch.zeros(0, 3, dtype=torch.long), r"tokens: empty batch or sequence \(shape \[0, 3\]\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"tokens: empty batch or sequence \(shape \[2, 0\]\)"),
        (torch.tensor([[0, 128]]), r"token id 128 is out of range for vocab_size=128"),  # the high one, not 0
    ],
)
def test_bad_tokens_get_their_whole_message(tiny_params, tokens, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        forward(tiny_params, tokens, TINY)


def test_tokens_on_another_device_than_the_params_are_named(tiny_params):
    class Elsewhere(torch.Tensor):  # a CPU tensor reporting another device: the check reads .device alone
        @property
        def device(self):
            return torch.device("cuda:0")

    on_gpu = torch.zeros(1, 2, dtype=torch.long).as_subclass(Elsewhere)
    with pytest.raises(UserError, match="^tokens are on cuda:0, the params on cpu; move one of them$"):
        forward(tiny_params, on_gpu, TINY)


def test_params_on_the_meta_device_are_named(tiny_params):
    on_meta = unflatten({k: v.to("meta") for k, v in flatten(tiny_params).items()})
    with pytest.raises(UserError, match="^params: the tensors are on the meta device, which holds no values"):
        forward(on_meta, _ids(1, 2), TINY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_len=0), "max_len: expected an integer in 1..32, got 0 (an int)"),
        (dict(max_len=33), "max_len: expected an integer in 1..32, got 33 (an int)"),
        (dict(max_len=2.5), "max_len: expected an integer in 1..32, got 2.5 (a float)"),
        (dict(max_len=True), "max_len: expected an integer in 1..32, got True (a bool)"),
        (dict(batch_size=0), "batch_size: expected an integer >= 1, got 0 (an int)"),
        (dict(batch_size=1.5), "batch_size: expected an integer >= 1, got 1.5 (a float)"),
        (dict(batch_size=True), "batch_size: expected an integer >= 1, got True (a bool)"),
    ],
)
def test_bad_cache_sizes_are_named(kwargs, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        new_cache(TINY, **(dict(batch_size=1) | kwargs))


def test_a_cache_of_one_row_and_one_position_runs(tiny_params):
    logits, cache = forward_cached(tiny_params, _ids(1, 1), new_cache(TINY, 1, max_len=1), TINY)
    assert logits.shape == (1, 1, TINY.vocab_size) and cache.lengths == (1,)


def test_a_cache_that_is_not_a_kvcache_is_named(tiny_params):
    with pytest.raises(UserError, match=r"^cache: expected a KVCache \(new_cache\), got a dict$"):
        forward_cached(tiny_params, _ids(1, 3), {}, TINY)


def test_a_cache_for_another_batch_size_is_named(tiny_params):
    with pytest.raises(UserError, match=r"^tokens: 1 rows for a cache of 2 rows \(new_cache\(config, 1\)\)$"):
        forward_cached(tiny_params, _ids(1, 3), new_cache(TINY, 2), TINY)


def test_a_cache_whose_buffers_do_not_fit_the_params_is_named(tiny_params):
    cache = new_cache(replace(TINY, n_layer=3), 1)
    with pytest.raises(UserError, match=r"^cache: k/v of shape \[3, 1, 4, 32, 8\], but these params and 1 rows "
                                        r"need \[2, 1, 4, 32, 8\] \(new_cache\(config, batch_size\)\)$"):
        forward_cached(tiny_params, _ids(1, 3), cache, TINY)


@pytest.mark.parametrize("counts, message", [
    ((1, 2), "counts: expected 1 values, one per token row, got a tuple of 2"),
    ((0,), "counts[0]: expected an integer in 1..3, got 0 (an int)"),
    ((4,), "counts[0]: expected an integer in 1..3, got 4 (an int)"),
    ((1.0,), "counts[0]: expected an integer in 1..3, got 1.0 (a float)"),
    ((True,), "counts[0]: expected an integer in 1..3, got True (a bool)"),
    (3, "counts: expected 1 values, one per token row, got 3 (an int)"),
])
def test_bad_counts_are_named(tiny_params, counts, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        forward_cached(tiny_params, _ids(1, 3), new_cache(TINY, 1), TINY, counts=counts)


@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(2, 1, dtype=torch.long), "tokens: expected an integer tensor [B], got an int64 tensor [2, 1]"),
    (torch.zeros(3, dtype=torch.long), "tokens: 3 rows for a cache of 2 rows (new_cache(config, 3))"),
])
def test_decode_step_names_tokens_that_are_not_one_per_cache_row(tiny_params, tokens, message):
    """B=2 rows (n_head is 4): the message gives the cache's rows and the tokens' shape."""
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        decode_step(tiny_params, tokens, new_cache(TINY, 2), TINY)


def test_two_tokens_after_one_cached_token_equal_one_forward(trained_params):
    """The smallest case that needs the causal mask aligned to the end of the keys
    (start 1, T 2): SDPA's is_causal aligns it to the upper left."""
    tokens = _ids(2, 3)
    first, cache = forward_cached(trained_params, tokens[:, :1], new_cache(TINY, 2), TINY)
    rest, _ = forward_cached(trained_params, tokens[:, 1:], cache, TINY)
    assert_rel_close(torch.cat([first, rest], 1), forward(trained_params, tokens, TINY))


def _chunks(params, tokens, counts):  # four tokens, then three at once: the end-aligned mask
    _, cache = forward_cached(params, tokens[:, :4], new_cache(TINY, 2), TINY)
    return forward_cached(params, tokens[:, 4:7], cache, TINY)[0]


@pytest.mark.parametrize(
    "run",
    [
        lambda params, tokens, counts: forward(params, tokens, TINY),
        _chunks,
        lambda params, tokens, counts: forward_cached(params, tokens, new_cache(TINY, 2), TINY, counts=counts)[0],
        lambda params, tokens, counts: prefill(params, tokens, TINY)[0],
    ],
    ids=["forward", "cached-chunks", "padded", "prefill"],
)
def test_what_the_model_creates_follows_the_tokens_not_torchs_default_device(trained_params, run):
    """Positions, masks and caches go on the tokens' (or the asked) device: with torch's
    default device set to meta (a stand-in for a GPU that CPU tensors cannot mix with),
    CPU params and tokens compute on the CPU exactly as without it."""
    tokens = _ids(2, 7)
    expected = run(trained_params, tokens, (7, 4))
    with torch.device("meta"):
        got = run(trained_params, tokens, (7, 4))
    assert got.device == tokens.device and torch.equal(got, expected)


def test_new_cache_is_on_the_cpu_unless_asked_and_of_the_dtype_asked():
    with torch.device("meta"):
        cache = new_cache(TINY, 2)
        wide = new_cache(TINY, 2, dtype=torch.float64)
    assert cache.k.device == cache.v.device == torch.device("cpu")
    assert wide.k.dtype == wide.v.dtype == torch.float64


def test_bfloat16_params_prefill_and_decode_with_a_bfloat16_cache(trained_params):
    half = unflatten({k: v.to(torch.bfloat16) for k, v in flatten(trained_params).items()})
    logits, cache = prefill(half, _ids(1, 5), TINY)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    step, cache = decode_step(half, logits.argmax(-1), cache, TINY)
    assert step.dtype == torch.bfloat16 and cache.lengths == (6,)


def test_prefill_computes_the_lm_head_for_the_last_position_only(trained_params):
    """The head (the only plain mm: the blocks' linears are addmm) costs 2 B C V flops."""
    with FlopCounterMode(display=False) as flops:
        prefill(trained_params, _ids(2, 10), TINY)
    assert flops.get_flop_counts()["Global"][torch.ops.aten.mm] == 2 * 2 * TINY.n_embd * TINY.vocab_size


@pytest.fixture(scope="module")
def wide_epsilon():
    """(config, transformers model, params) with a layer-norm epsilon of 0.1, far from the
    default 1e-5 (the activations' variance is about 0.02)."""
    config = replace(TINY, layer_norm_epsilon=0.1)
    model = hf_model(config, seed=4)
    return config, model, params_of(model)


def test_every_layer_norm_uses_the_configs_epsilon_in_forward_and_in_decode_steps(wide_epsilon):
    config, model, params = wide_epsilon
    tokens = _ids(1, 10)
    with torch.no_grad():
        expected = model(tokens).logits
    assert_rel_close(forward(params, tokens, config), expected)
    logits, cache = prefill(params, tokens[:, :5], config)
    steps = [logits]
    for t in range(5, 10):
        step, cache = decode_step(params, tokens[:, t], cache, config)
        steps.append(step)
    assert_rel_close(torch.stack(steps, 1), expected[:, 4:])


def test_embedding_dropout_zeroes_at_its_rate_and_scales_the_rest(tiny_params):
    config = replace(TINY, embd_pdrop=0.25, attn_pdrop=0.0, resid_pdrop=0.0)
    seen = {}
    torch.manual_seed(0)
    forward(tiny_params, _ids(4, 32), config, dropout=True, tap=recorder(seen))
    embed, summed = seen["embed"], seen["wte"] + seen["wpe"]
    kept = embed != 0
    assert 0.2 < 1 - kept.float().mean() < 0.3  # 4096 values: 0.25 +- 0.007
    assert_rel_close(embed[kept], summed[kept] / 0.75)


@pytest.mark.parametrize("rate", ["attn_pdrop", "resid_pdrop"])
def test_each_block_dropout_rate_takes_effect_in_forward(tiny_params, rate):
    config = replace(TINY, **(dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0) | {rate: 0.5}))
    tokens = _ids(2, 8)
    assert not torch.allclose(forward(tiny_params, tokens, config, dropout=True), forward(tiny_params, tokens, config))


@pytest.mark.parametrize("layer", ["self_attention", "transformer_block"])
def test_an_empty_cache_is_filled_from_position_0(trained_params, layer):
    p, x = trained_params["h"][0], torch.randn(1, 3, TINY.n_embd, generator=torch.Generator().manual_seed(0))
    k_buf, v_buf = (torch.zeros(1, TINY.n_head, 8, TINY.head_dim) for _ in range(2))
    if layer == "self_attention":
        run = lambda **kw: self_attention(x, **p["attn"], n_head=TINY.n_head, **kw)
    else:
        run = lambda **kw: transformer_block(x, **p, n_head=TINY.n_head, eps=1e-5, name="h.0", tap=no_tap, **kw)
    assert_rel_close(run(cache=CacheRows(k_buf, v_buf, (0,), (3,))), run())
    assert k_buf[:, :, :3].ne(0).all() and k_buf[:, :, 3:].eq(0).all()


# --- generation/decoding.py: the checks of generate, its window, its decode steps --------------------


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([[1]], dict(sampling={}), "sampling: expected a Sampling, got dict"),
        ([1, 2], {}, "prompts: expected a list of token-id lists, e.g. [encode(text)]"),
        ([], {}, "prompt: empty (give at least one token)"),
        ([[1], []], {}, "prompt: empty (give at least one token)"),
        ([[1, 128]], {}, "prompt: token id 128 is out of range for vocab_size=128"),
        ([[1, -1]], {}, "prompt: token id -1 is out of range for vocab_size=128"),
        ([[1, True]], {}, "prompt: token id True is out of range for vocab_size=128"),
        ([[1]], dict(window=0), "window must be an integer in 1..n_positions=32, got 0"),
        ([[1]], dict(window=33), "window must be an integer in 1..n_positions=32, got 33"),
        ([[1]], dict(window=2.0), "window must be an integer in 1..n_positions=32, got 2.0"),
    ],
)
def test_bad_generate_input_gets_its_whole_message(tiny_params, prompts, kwargs, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        next(generate(tiny_params, prompts, TINY, max_new_tokens=2, **kwargs))


@pytest.mark.parametrize("window", [1, TINY.n_positions])
def test_generate_takes_the_smallest_and_the_largest_window(trained_params, window):
    prompt = [3, 14, 15]
    steps = generate(trained_params, [prompt], TINY, max_new_tokens=40, window=window)
    assert [int(t[0]) for t in steps] == greedy_without_cache(trained_params, TINY, prompt, 40, window)


def test_generate_makes_n_tokens_with_one_prefill_per_row_and_n_minus_1_decode_steps(trained_params, monkeypatch):
    """The first token comes out of each row's own prefill, each later one out of one
    decode step of all rows, and nothing runs after the last token."""
    calls = []

    def recording(name, run):
        def recorded(*args, **kwargs):
            calls.append(name)
            return run(*args, **kwargs)
        return recorded

    monkeypatch.setattr(generate_module, "decode_step", recording("decode", generate_module.decode_step))
    monkeypatch.setattr(generate_module, "forward_cached", recording("prefill", generate_module.forward_cached))
    assert len(list(generate(trained_params, [[1, 2], [3]], TINY, max_new_tokens=4))) == 4
    assert calls == ["prefill"] * 2 + ["decode"] * 3


# --- reference/perplexity.py -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts, message",
    [
        ([torch.arange(5.0)], "texts: expected a list of 1-D integer token tensors [N]"),
        ([torch.tensor([5]), torch.tensor([], dtype=torch.long)], "nothing to evaluate: need at least 2 tokens"),
    ],
)
def test_bad_eval_texts_get_their_whole_message(tiny_params, texts, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        evaluate(tiny_params, texts, TINY, show_progress=False)


def test_the_eval_progress_bar_is_labelled_eval(tiny_params, capsys):
    evaluate(tiny_params, [torch.arange(20)], TINY)
    assert re.search(r"(^|\r)eval: 100%\|", capsys.readouterr().err)

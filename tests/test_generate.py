"""Generation: the KV-cache path against the definition without a cache (sliding window),
batches against rows alone, stop tokens, streaming text and the CLI. The same paths
against transformers (greedy generate, the window, sampled distributions) are in
test_reference.py."""

import time

import pytest
import torch

from functional_gpt import UserError, forward, forward_cached, init_params, load_params, new_cache, preset, save_params
from functional_gpt.cli import main
from functional_gpt.generation.decoding import TextStream, encode_prompt, generate, prefill, stream_text
from functional_gpt.generation.sampling import Sampling
from functional_gpt.model.tokenizer import ENDOFTEXT_ID, decode, encode

from conftest import TINY, assert_rel_close, hf_model, params_of


@pytest.fixture(scope="module")
def trained_params():
    """The tiny model with trained-like weights (random biases and layer-norm gains; see
    conftest): varied greedy continuations (GPT-2's init repeats one token), so a wrong
    context changes the tokens. Generation never modifies params, so tests share them."""
    return params_of(hf_model(TINY, seed=2))


def greedy_without_cache(params, config, prompt, n, window):
    """The module doc's definition: forward over the row's current context each step."""
    seq, start, out = list(prompt), max(0, len(prompt) - config.n_positions), []
    for _ in range(n):
        if len(seq) - start > config.n_positions:
            start = len(seq) - window
        token = int(forward(params, torch.tensor([seq[start:]]), config)[0, -1].argmax())
        seq.append(token)
        out.append(token)
    return out


def run(params, config, prompts, n, **kwargs):
    steps = list(generate(params, prompts, config, max_new_tokens=n, **kwargs))
    return torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]


@pytest.mark.parametrize("window", [None, 31, 5])
def test_cached_greedy_equals_uncached_across_the_context_boundary(trained_params, tiny_config, window):
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    ours = run(trained_params, tiny_config, [prompt], 200, window=window)[0]
    assert len(ours) == 200 and len(set(ours)) > 5
    assert ours == greedy_without_cache(trained_params, tiny_config, prompt, 200, window or 16)


def test_prompt_longer_than_the_context_is_cropped_from_the_left(trained_params, tiny_config):
    prompt = torch.randint(128, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = run(trained_params, tiny_config, [prompt], 40)[0]
    assert ours == greedy_without_cache(trained_params, tiny_config, prompt, 40, 16)
    assert ours == run(trained_params, tiny_config, [prompt[-32:]], 40)[0]


def test_batch_equals_each_prompt_alone(trained_params, tiny_config):
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [99, 98, 97], list(range(30, 60))]
    batched = run(trained_params, tiny_config, prompts, 200)
    alone = [run(trained_params, tiny_config, [p], 200)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(r) for r in alone}) == len(prompts)  # the rows really differ


def test_a_right_padded_prefill_computes_what_each_row_computes_alone(trained_params, tiny_config):
    a, b = [5, 6, 7, 8, 9], [40, 41]
    tokens = torch.tensor([a, b + [0, 0, 0]])
    logits, cache = prefill(trained_params, tokens, tiny_config, counts=(5, 2))
    for row, seq in enumerate((a, b)):
        assert_rel_close(logits[row], forward(trained_params, torch.tensor([seq]), tiny_config)[0, -1])
    step, _ = forward_cached(trained_params, torch.tensor([[11], [12]]), cache, tiny_config)
    assert_rel_close(step[1, -1], forward(trained_params, torch.tensor([b + [12]]), tiny_config)[0, -1])


def test_last_only_logits_equal_the_full_logits_last_position(trained_params, tiny_config):
    tokens = torch.randint(128, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = new_cache(tiny_config, 2)
    last, _ = forward_cached(trained_params, tokens, cache, tiny_config, last_only=True)
    assert last.shape == (2, 1, 128)
    assert_rel_close(last[:, 0], forward(trained_params, tokens, tiny_config)[:, -1])


def test_rows_stop_at_stop_tokens(trained_params, tiny_config):
    prompts = [[1, 2], [3, 4]]
    free = run(trained_params, tiny_config, prompts, 40)
    first = lambda t: [r.index(t) if t in r else len(r) for r in free]  # the step each row first gives t
    stop = next(t for t in free[0] if all(0 < i < 39 for i in first(t)) and len(set(first(t))) == 2)

    def stopped(row):  # up to the first stop token, which then repeats
        return row[: row.index(stop) + 1] + [stop] * (len(row) - row.index(stop) - 1) if stop in row else row

    steps = max(r.index(stop) + 1 if stop in r else 40 for r in free)
    assert 1 < steps < 40  # rows stop at different steps; the run ends when both have
    assert run(trained_params, tiny_config, prompts, 40, stop_tokens=(stop,)) == [stopped(r)[:steps] for r in free]


def test_sampling_is_reproducible_with_a_seed(trained_params, tiny_config):
    s = Sampling(temperature=1.5, top_k=20)
    draw = lambda seed: run(trained_params, tiny_config, [[1, 2, 3]], 60, sampling=s,
                            generator=torch.Generator().manual_seed(seed))
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_stream_text_pieces_join_to_the_decoded_tokens_and_stop_at_a_stop_string(trained_params, tiny_config):
    prompt = [30, 31, 32]
    tokens = [t for t in run(trained_params, tiny_config, [prompt], 60)[0]]
    full = decode(tokens)
    stats = {}
    pieces = list(stream_text(trained_params, prompt, tiny_config, max_new_tokens=60,
                              sampling=Sampling(greedy=True), stats=stats))
    assert "".join(pieces) == full and len(pieces) > 1
    assert stats["prompt_tokens"] == 3 and stats["new_tokens"] == 60
    stop = full[20:23]
    text = "".join(stream_text(trained_params, prompt, tiny_config, max_new_tokens=60,
                               sampling=Sampling(greedy=True), stop=(stop, "never appears")))
    assert text == full[: full.index(stop)]


def test_encode_prompt_empty_and_too_long(tiny_config):
    assert encode_prompt("", tiny_config) == ([ENDOFTEXT_ID], None)
    ids, notice = encode_prompt(" word" * 40, tiny_config)
    assert len(ids) == 40 and "cropped from the left to its last 32" in notice


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([[1]], dict(max_new_tokens=-1), "--max_new_tokens"),
        ([[]], dict(max_new_tokens=5), "empty"),
        ([[1, 500]], dict(max_new_tokens=5), "token id 500"),
        ([[1]], dict(max_new_tokens=5, window=33), "window"),
    ],
)
def test_bad_input_is_a_user_error(tiny_params, tiny_config, prompts, kwargs, message):
    with pytest.raises(UserError, match=message):
        next(generate(tiny_params, prompts, tiny_config, **kwargs))


@pytest.fixture
def checkpoint(tmp_path):
    config = preset("cpu-tiny")
    save_params(tmp_path / "m.safetensors", init_params(config, seed=0), config)
    return str(tmp_path / "m.safetensors")


def test_cli_streams_text_and_a_summary(checkpoint, capsys):
    args = ["generate", "--weights", checkpoint, "--prompt", "Hello", "--max_new_tokens", "12", "--greedy"]
    assert main(args + ["--num_samples", "2"]) == 0
    out, err = capsys.readouterr()
    params, config = load_params(checkpoint)
    expected = decode(run(params, config, [encode("Hello")], 12)[0])
    assert out == f"--- sample 1 ---\n{expected}\n--- sample 2 ---\n{expected}\n"
    assert err.count("[prompt 1 tokens, 12 new tokens; prefill") == 2 and "decode" in err


def test_cli_seeded_samples_repeat(checkpoint, capsys):
    args = ["generate", "--weights", checkpoint, "--max_new_tokens", "10", "--top_p", "0.9", "--seed", "3"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top_p", "0"], "--top_p"),
        (["--top_k", "0"], "--top_k"),
        (["--min_p", "1"], "--min_p"),
        (["--max_new_tokens", "-2"], "--max_new_tokens"),
        (["--weights", "/nonexistent/x"], "/nonexistent/x"),
    ],
)
def test_cli_bad_input_is_one_line(checkpoint, capsys, flags, message):
    assert main(["generate", "--weights", checkpoint, "--prompt", "a", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_directory_without_checkpoint(tmp_path, capsys):
    assert main(["generate", "--weights", str(tmp_path), "--prompt", "a"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_a_stop_string_far_longer_than_the_text_costs_no_more_than_a_short_one():
    """The held-back tail is looked for only within the text not yet given: a 100,000-
    character stop string once cost O(its length squared) per token (a server hung on it)."""
    tokens = encode("hello world, this is a test. " * 10)
    text = TextStream(("x" * 100_000, "test."))
    t0 = time.perf_counter()
    pieces = [text.push(t) for t in tokens]
    assert time.perf_counter() - t0 < 1.0
    assert "".join(pieces) == "hello world, this is a " and text.stopped


def test_a_prompt_holding_none_is_named(tiny_params, tiny_config):
    with pytest.raises(UserError, match="^prompt: token id None is out of range"):
        next(generate(tiny_params, [[1, None]], tiny_config, max_new_tokens=2))

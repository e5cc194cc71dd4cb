"""Bad-input census (maintainers): try a few hundred bad inputs across every `fgpt`
subcommand and the Python API (tools/census_api.py holds the faces' cases; the server's
and data-parallel runs' are tools/census_server.py and tools/census_distributed.py), and
classify what each one gets.

    python tools/bad_input_census.py [--only SUBSTRING] [--all]

Each case runs in-process (`functional_gpt.cli.main(argv)` with stdout and stderr
captured, or a direct call) in a fresh temp directory, beside small read-only fixtures (a
tiny checkpoint written by save_params, a prepared data dir, a two-step training run).
Classes:

- clean: exit 2 / UserError, one line, naming the culprit (an expected substring);
- correct: the input is fine and the behaviour is right (a check on the result);
- traceback: any other exception (or a hang, stopped after the case's timeout);
- wrong: exit 0 where an error was due, an error that does not name the culprit or is
  not one line, or a fine input refused or answered wrongly;
- data loss: a file that existed before is changed or gone after a failed command (or a
  fixture changed at all); every file is hashed before and after.

Prints a table (the non-clean/correct rows; every row with --all) and the totals; exits 1
if any case is neither clean nor correct. About a minute on 2 cores.
"""

import argparse
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

os.environ["HF_HUB_OFFLINE"] = "1"  # `fgpt download` fails at once instead of retrying a network
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import functional_gpt as fg  # noqa: E402
from functional_gpt.cli import main  # noqa: E402
from functional_gpt.errors import UserError  # noqa: E402

CLASSES = ("clean", "correct", "traceback", "wrong", "data loss")
TINY = fg.GPTConfig(vocab_size=50257, n_positions=32, n_embd=8, n_layer=1, n_head=2,
                    embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
META_KEY = "functional_gpt.config"
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EACCES = PermissionError(errno.EACCES, "Permission denied")
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; "
        "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. ") * 3
THREE_TEXTS = {f"in__{n}.txt": f"{n.upper()}. {TEXT}" for n in "abc"}  # three texts, none a copy of another


# ----------------------------------------------------------------------------- expectations


@dataclass
class Expect:
    error: str | None = None  # an error is due, naming this (case-insensitive); None: success due
    check: Callable | None = None  # (ws, out, result) -> None if right, else the reason
    code: int = 0  # the exit status of a right CLI run


def E(culprit: str) -> Expect:
    return Expect(error=culprit)


def OK(check=None, code: int = 0) -> Expect:
    return Expect(check=check or (lambda ws, out, value: None), code=code)


def EITHER(culprit: str, check=None) -> Expect:
    return Expect(error=culprit, check=check or (lambda ws, out, r: None))


@dataclass
class Case:
    name: str
    action: list | Callable  # argv for main (with {F} and {W} placeholders), or fn(ws) for the API
    expect: Expect
    setup: Callable | None = None  # fn(ws) before the run
    patch: Callable | None = None  # -> a context manager around the run (e.g. a simulated disk full)
    stdin: bytes | None = None
    timeout: float = 30.0
    owner: str = ""  # the file whose check it is, for the report


@dataclass
class Result:
    case: Case
    cls: str
    message: str
    seconds: float = 0.0


class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so no library `except Exception` swallows it."""


# ----------------------------------------------------------------------------- fixtures


def raw_safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    """A safetensors file with exactly this header (no checks: for broken files)."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def tensors_file(path: Path, tensors: dict, config: dict | None = None, prefix: str = "") -> None:
    """A safetensors file of these tensors, the config (if any) in its metadata, written
    by safetensors itself (no checks of ours: the file may hold what save_params refuses)."""
    metadata = {"format": "pt"} | ({META_KEY: json.dumps(config)} if config is not None else {})
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def tiny_flat(seed: int = 0) -> dict:
    return fg.flatten(fg.init_params(TINY, seed=seed))


def make_fixtures(F: Path) -> None:
    F.mkdir(parents=True)
    flat = tiny_flat()
    fg.save_params(F / "tiny.safetensors", fg.unflatten(flat), TINY)
    bad = dict(flat, **{"wte.weight": flat["wte.weight"].clone()})
    bad["wte.weight"][3, 1] = float("nan")
    tensors_file(F / "nan.safetensors", bad, TINY.to_dict())
    # Greedy always picks "\n" (id 198): ln_f outputs its bias, and wte[198] lies along it.
    nl = {k: v.clone() for k, v in flat.items()}
    nl["ln_f.weight"].zero_()
    nl["ln_f.bias"].fill_(1.0)
    nl["wte.weight"][198] = 10.0
    fg.save_params(F / "newline.safetensors", fg.unflatten(nl), TINY)
    hf = F / "hf"
    hf.mkdir()
    tensors_file(hf / "model.safetensors", flat, prefix="transformer.")
    fg.write_hf_config(TINY, hf / "config.json")
    texts = F / "texts"
    texts.mkdir()
    for i, name in enumerate(("a.txt", "b.txt", "c.txt")):
        (texts / name).write_text(f"File {i}. " + TEXT, encoding="utf-8")
    from functional_gpt.training.data import prepare

    prepare([texts], F / "data", progress=False)
    _quiet(main, TRAIN_ARGS(F, F / "run"))
    assert (F / "run" / "state.json").is_file(), "fixture run failed"
    _quiet(main, ["dump", "--weights", str(F / "tiny.safetensors"), "--prompt", "Hi there", "--out", str(F / "ours.safetensors")])
    _quiet(main, ["dump", "--weights", str(F / "tiny.safetensors"), "--prompt", "Hi there", "--out", str(F / "ref.safetensors"),
                  "--reference", "transformers"])
    _quiet(main, ["dump", "--weights", str(F / "tiny.safetensors"), "--prompt", "Other words", "--out", str(F / "other.safetensors")])
    (F / "pickled").mkdir()
    (F / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def TRAIN_ARGS(F: Path, out) -> list[str]:
    return ["train", "--init", str(F / "tiny.safetensors"), "--data", str(F / "data"), "--out", str(out),
            "--max_steps", "2", "--batch_size", "2", "--context_length", "16", "--eval_interval", "1",
            "--eval_windows", "2", "--sample_tokens", "0", "--warmup_steps", "1"]


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


# ----------------------------------------------------------------------------- running


def fingerprint(root: Path, full: bool) -> dict:
    """{relative path: sha256 (full) or (size, mtime_ns, inode)} of every file below root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest() if full
                                             else (st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def lost(before: dict, after: dict) -> list[str]:
    return [k for k, v in before.items() if after.get(k) != v]


def fill(value, F: Path, W: Path):
    return value.replace("{F}", str(F)).replace("{W}", str(W)) if isinstance(value, str) else value


def run_case(case: Case, F: Path, W: Path) -> Result:
    W.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(W)
    try:
        if case.setup:
            case.setup(W)
        before_w, before_f = fingerprint(W, True), fingerprint(F, False)
        t0 = time.perf_counter()
        outcome = _execute(case, F, W)
        seconds = time.perf_counter() - t0
        after_w, after_f = fingerprint(W, True), fingerprint(F, False)
    finally:
        os.chdir(cwd)
    failed = outcome[0] != "ok" or (isinstance(case.action, list) and outcome[1] != 0)
    gone = [f"fixture {k}" for k in lost(before_f, after_f)] + (lost(before_w, after_w) if failed else [])
    if gone:
        return Result(case, "data loss", f"changed or gone: {', '.join(gone[:4])} | {outcome_text(outcome)}", seconds)
    cls, message = classify(case, outcome, F, W)
    return Result(case, cls, message, seconds)


def _execute(case: Case, F: Path, W: Path):
    """-> ("ok", exit code or return value, stdout, stderr) | ("user", message, stdout, stderr)
    | ("exc", text, where) | ("hang", seconds)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if case.stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(case.stdin), encoding="utf-8")

    def alarm(signum, frame):
        raise _Hang()

    old_handler = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, case.timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                (case.patch() if case.patch else contextlib.nullcontext()):
            try:
                if isinstance(case.action, list):
                    value = main([fill(a, F, W) for a in case.action])
                else:
                    value = case.action(W)
                return ("ok", value, out.getvalue(), err.getvalue())
            except SystemExit as e:  # argparse
                return ("ok", e.code, out.getvalue(), err.getvalue())
            except UserError as e:
                return ("user", str(e), out.getvalue(), err.getvalue())
    except _Hang:
        return ("hang", case.timeout)
    except Exception as e:  # noqa: BLE001 - the census classifies every exception
        return ("exc", f"{type(e).__name__}: {first_line(str(e))}", where(e))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        sys.stdin = old_stdin


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:160]


def where(e: BaseException) -> str:
    """The deepest frame inside functional_gpt (the file to fix), else the deepest one."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "functional_gpt" in f.filename]
    f = (ours or frames)[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


def outcome_text(outcome) -> str:
    kind = outcome[0]
    if kind == "hang":
        return f"hung: no answer in {outcome[1]:g} s"
    if kind == "exc":
        return f"{outcome[1]} (at {outcome[2]})"
    if kind == "user":
        return f"UserError: {outcome[1]}"
    value, err = outcome[1], outcome[3]
    if not isinstance(value, (int, type(None))):
        return f"returned {type(value).__name__}"
    return f"exit {value}: {first_line(err.strip().splitlines()[-1]) if err.strip() else '(no stderr)'}"


def error_line(outcome, cli: bool) -> tuple[str | None, str]:
    """The error message of a failed run and why it is not clean ('' if it is one line)."""
    kind = outcome[0]
    if kind == "user":
        return outcome[1], ("not one line" if "\n" in outcome[1].strip() else "")
    value, err = outcome[1], outcome[3]
    if not cli or value != 2:
        return None, ""
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.strip()]
    errors = [line for line in lines if ": error:" in line]
    if "Traceback" in err:
        return err, "traceback printed"
    if len(errors) != 1 or lines[-1] != errors[0]:
        return err.strip(), "not one error line"
    return errors[0], ""


def classify(case: Case, outcome, F: Path, W: Path) -> tuple[str, str]:
    exp = case.expect
    kind = outcome[0]
    if kind in ("exc", "hang"):
        return "traceback", outcome_text(outcome)
    message, problem = error_line(outcome, isinstance(case.action, list))
    if message is not None and exp.error is not None:
        culprit = fill(exp.error, F, W)
        if problem:
            return "wrong", f"{problem}: {first_line(message)}"
        if culprit.lower() not in message.lower():
            return "wrong", f"does not name {culprit!r}: {message}"
        return "clean", message
    if message is not None:
        return "wrong", f"refused a fine input: {first_line(message)}"
    if exp.check is None:  # an error was due
        return "wrong", f"accepted, expected an error naming {fill(exp.error, F, W)!r}: {outcome_text(outcome)}"
    value = outcome[1]
    if isinstance(case.action, list) and value != exp.code:
        return "wrong", f"exit {value}, expected {exp.code}: {outcome_text(outcome)}"
    try:
        reason = exp.check(W, outcome[2], value)
    except Exception as e:  # noqa: BLE001
        reason = f"check raised {type(e).__name__}: {first_line(str(e))}"
    if reason:
        return "wrong", str(reason)
    return "correct", "as expected"


# ----------------------------------------------------------------------------- checks


def exists(*names):
    def check(ws, out, value):
        missing = [n for n in names if not (ws / n).exists()]
        return f"missing {missing}" if missing else None
    return check


def says(text):
    def check(ws, out, value):
        return None if text in out else f"stdout lacks {text!r}: {out[-200:]!r}"
    return check


def stdout_is(text):
    def check(ws, out, value):
        return None if out == text else f"stdout {out[:80]!r}, expected {text!r}"
    return check


def state_step(run, step):
    def check(ws, out, value):
        got = json.loads((ws / run / "state.json").read_text())["step"]
        return None if got == step else f"state.json step {got}, expected {step}"
    return check


def png(name):
    def check(ws, out, value):
        return None if (ws / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" else f"{name} is not a PNG"
    return check


def same_params(directory, F_name="tiny.safetensors"):
    def check(ws, out, value):
        got, config = fg.load_params(ws / directory)
        want = fg.flatten(fg.load_params(ws.parent.parent / "fixtures" / F_name)[0])
        if config != TINY or any(not torch.equal(v, want[k]) for k, v in fg.flatten(got).items()):
            return "exported params differ"
        return None
    return check


def perplexity_finite(ws, out, value):
    return None if "perplexity" in out and "nan" not in out else f"no finite perplexity: {out!r}"


def returned(pred, what):
    def check(ws, out, value):
        return None if pred(value) else f"returned {value!r}, expected {what}"
    return check


# ----------------------------------------------------------------------------- setups


def files(**contents):
    """setup: write files (str: UTF-8 text, bytes: raw) under the case's directory."""
    def setup(ws):
        for name, content in contents.items():
            path = ws / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def copy(*names, then=None):
    """setup: copy fixtures (files or directories) into the case's directory, then `then(ws)`."""
    def setup(ws):
        F = ws.parent.parent / "fixtures"
        for name in names:
            src, dst = F / name, ws / Path(name).name
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
        if then:
            then(ws)
    return setup


def chain(*setups):
    def setup(ws):
        for s in setups:
            s(ws)
    return setup


def edit_state(**changes):
    def then(ws):
        path = ws / "run" / "state.json"
        state = json.loads(path.read_text())
        for key, value in changes.items():
            if value is _DROP:
                state.pop(key)
            else:
                state[key] = value
        path.write_text(json.dumps(state))
    return then


_DROP = object()


def write(rel, content):
    def then(ws):
        (ws / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    return then


def patch_fsync(exc=ENOSPC):
    return lambda: mock.patch("os.fsync", side_effect=exc)


def patch_replace(exc=EACCES):
    return lambda: mock.patch("os.replace", side_effect=exc)


def tokens_bin(ids) -> bytes:
    return np.asarray(ids, dtype="<u2").tobytes()


# ----------------------------------------------------------------------------- the cases


def cli_cases() -> list[Case]:
    cases = []

    def add(name, argv, expect, owner="", **kw):
        cases.append(Case(name, argv, expect, owner=owner, **kw))

    tiny, run = "{F}/tiny.safetensors", "{F}/run"

    # info
    add("info --preset gpt5", ["info", "--preset", "gpt5"], E("gpt5"), "config.py")
    add("info --preset ''", ["info", "--preset", ""], E("preset"), "config.py")
    add("info --weights missing", ["info", "--weights", "{W}/none"], E("none"), "checkpoint.py")
    add("info --weights dir without checkpoint", ["info", "--weights", "{F}/texts"], E("texts"), "checkpoint.py")
    add("info --weights a text file", ["info", "--weights", "{F}/texts/a.txt"], E("a.txt"), "checkpoint.py")
    add("info --weights NaN weights", ["info", "--weights", "{F}/nan.safetensors"], E("wte.weight"), "checkpoint.py")
    add("info --weights pickled-only dir", ["info", "--weights", "{F}/pickled"], E("pickle"), "checkpoint.py")
    add("info --device xpu", ["info", "--preset", "cpu-tiny", "--device", "xpu"], E("xpu"), "device.py")
    add("info --device meta", ["info", "--weights", tiny, "--device", "meta"], E("meta"), "device.py")
    add("info --device cuda:99", ["info", "--weights", tiny, "--device", "cuda:99"], E("cuda:99"), "device.py")
    add("info --device ''", ["info", "--weights", tiny, "--device", ""], E("--device"), "device.py")
    add("info --device cpu:7", ["info", "--weights", tiny, "--device", "cpu:7"], EITHER("cpu:7", says("n_embd=8")), "device.py")
    add("info --device 'cuda x'", ["info", "--weights", tiny, "--device", "cuda x"], E("cuda x"), "device.py")
    add("info --preset and --weights", ["info", "--preset", "gpt2", "--weights", tiny], E("--weights"), "cli.py")
    add("info --weights HF dir, garbled config.json", ["info", "--weights", "{W}/hf"],
        E("config.json"), "config.py", setup=copy("hf", then=write("hf/config.json", "{not json")))
    add("info --weights HF dir, config.json a list", ["info", "--weights", "{W}/hf"],
        E("config.json"), "config.py", setup=copy("hf", then=write("hf/config.json", "[1, 2]")))
    add("info --weights HF dir, n_head a string", ["info", "--weights", "{W}/hf"],
        E("n_head"), "config.py", setup=copy("hf", then=write("hf/config.json", json.dumps(TINY.to_dict() | {"n_head": "2"}))))
    add("info --preset cpu-tiny", ["info", "--preset", "cpu-tiny"], OK(says("parameters")))
    add("info --weights tiny", ["info", "--weights", tiny], OK(says("n_embd=8")))
    add("info --weights run dir", ["info", "--weights", run], OK(says("n_embd=8")))
    add("info --weights HF dir", ["info", "--weights", "{F}/hf"], OK(says("n_embd=8")))

    # prepare
    three = files(**THREE_TEXTS)
    old_data = copy("data")
    add("prepare missing input", ["prepare", "{W}/none.txt", "--out", "{W}/d"], E("none.txt"), "data.py")
    add("prepare empty dir", ["prepare", "{W}/empty", "--out", "{W}/d"], E("empty"), "data.py",
        setup=lambda ws: (ws / "empty").mkdir())
    add("prepare dir of .bin only", ["prepare", "{W}/bins", "--out", "{W}/d"], E("bins"), "data.py",
        setup=files(**{"bins__x.bin": b"\0\0"}))
    add("prepare non-UTF-8 file", ["prepare", "{W}/a.txt", "{W}/bad.txt", "--out", "{W}/d"], E("bad.txt"), "data.py",
        setup=files(**{"a.txt": TEXT, "bad.txt": b"caf\xe9"}))
    add("prepare non-UTF-8 val file into an existing data dir", ["prepare", "{W}/in", "--out", "{W}/data"],
        E("zz_bad.txt"), "data.py",
        setup=chain(old_data, files(**{"in__a.txt": TEXT, "in__b.txt": TEXT, "in__zz_bad.txt": b"\xff\xfe" * 9})))
    add("prepare non-UTF-8 .md in a dir", ["prepare", "{W}/in", "--out", "{W}/d"], E("x.md"), "data.py",
        setup=files(**{"in__a.txt": TEXT, "in__x.md": b"# \xc3\x28"}))
    add("prepare empty file into an existing data dir", ["prepare", "{W}/in", "--out", "{W}/data"],
        E("empty.txt"), "data.py", setup=chain(old_data, files(**{"in__a.txt": TEXT, "in__b.txt": TEXT, "in__empty.txt": ""})))
    add("prepare blank file", ["prepare", "{W}/a.txt", "{W}/blank.txt", "--out", "{W}/d"], E("blank.txt"), "data.py",
        setup=files(**{"a.txt": TEXT, "blank.txt": " \n\t\n"}))
    add("prepare one-token file into an existing data dir (val split empty)", ["prepare", "{W}/one.txt", "--out", "{W}/data"],
        E("split"), "data.py", setup=chain(old_data, files(**{"one.txt": "a"})))
    add("prepare --val_files 0", ["prepare", "{W}/in", "--out", "{W}/d", "--val_files", "0"], E("--val_files"), "data.py",
        setup=three)
    add("prepare --val_files -1", ["prepare", "{W}/in", "--out", "{W}/d", "--val_files", "-1"], E("--val_files"), "data.py",
        setup=three)
    add("prepare --val_files 3 of 3", ["prepare", "{W}/in", "--out", "{W}/d", "--val_files", "3"], E("--val_files"), "data.py",
        setup=three)
    add("prepare --val_files x", ["prepare", "{W}/in", "--out", "{W}/d", "--val_files", "x"], E("--val_files"), "cli.py",
        setup=three)
    add("prepare --val_files 2 of one file", ["prepare", "{W}/in/a.txt", "--out", "{W}/d", "--val_files", "2"],
        E("--val_files"), "data.py", setup=three)
    add("prepare --out an existing file", ["prepare", "{W}/in", "--out", "{W}/in/a.txt"], E("a.txt"), "data.py",
        setup=three)
    add("prepare --out under a file", ["prepare", "{W}/in", "--out", "{W}/in/a.txt/sub"], E("a.txt"), "data.py",
        setup=three)
    add("prepare --out ''", ["prepare", "{W}/in", "--out", ""], E("--out"), "data.py", setup=three)
    add("prepare --out read-only place", ["prepare", "{W}/in", "--out", "/sys/fgpt_census_data"],
        E("/sys/fgpt_census_data"), "data.py", setup=three)
    add("prepare disk full, existing data dir", ["prepare", "{W}/in", "--out", "{W}/data"], E("{W}/data"), "data.py",
        setup=chain(old_data, three), patch=patch_fsync())
    add("prepare permission denied on rename, existing data dir", ["prepare", "{W}/in", "--out", "{W}/data"],
        E("{W}/data"), "data.py", setup=chain(old_data, three), patch=patch_replace())
    add("prepare three files", ["prepare", "{W}/in", "--out", "{W}/d"],
        OK(exists("d/train.bin", "d/val.bin", "d/meta.json")), setup=three)
    add("prepare over an existing data dir", ["prepare", "{W}/in", "--out", "{W}/data"],
        OK(lambda ws, out, v: None if "in/c.txt" in (ws / "data/meta.json").read_text() else "meta.json not replaced"),
        setup=chain(old_data, three))
    add("prepare one file (tail split)", ["prepare", "{W}/in/a.txt", "--out", "{W}/d"],
        OK(lambda ws, out, v: None if json.loads((ws / "d/meta.json").read_text())["val_tokens"] > 0 else "no val"),
        setup=three)

    # train (the checks live in train.py / runs.py / optim.py)
    T = TRAIN_ARGS(Path("{F}"), "{W}/run")
    for flag, value in [("--beta1", "2"), ("--beta1", "-1"), ("--beta1", "1"), ("--beta1", "nan"), ("--beta2", "1.5"),
                        ("--beta2", "-0.1"), ("--beta2", "nan"), ("--grad_clip", "nan"), ("--grad_clip", "-1"),
                        ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--lr", "0"), ("--min_lr", "nan"),
                        ("--min_lr", "-1"), ("--weight_decay", "nan"), ("--weight_decay", "-1"),
                        ("--batch_size", "0"), ("--batch_size", "-1"), ("--grad_accum", "0"), ("--max_steps", "0"),
                        ("--max_steps", "-1"), ("--context_length", "0"), ("--context_length", "64"),
                        ("--stride", "0"), ("--stride", "-1"), ("--dropout", "1"), ("--dropout", "nan"),
                        ("--dropout", "-0.1"), ("--warmup_steps", "-1"), ("--eval_interval", "0"),
                        ("--eval_windows", "-1"), ("--sample_tokens", "-1"), ("--decay_steps", "0"),
                        ("--seed", str(2**70)), ("--lr", "abc"), ("--max_steps", "2.5"), ("--device", "xpu"),
                        ("--device", "meta"), ("--dtype", "float64"), ("--dtype", "bf16"), ("--dtype", ""),
                        ("--dtype", "float16")]:
        add(f"train {flag} {value}", T + [flag, value], E(flag if flag != "--device" else value), "train.py")
    add("train --dtype bfloat16", T + ["--dtype", "bfloat16"], OK(state_step("run", 2)), "train.py")
    TB = [a for i, a in enumerate(T) if "--max_steps" not in T[max(0, i - 1) : i + 1]]  # T without its --max_steps
    for value in ("0", "0s", "-5m", "10x", "600", "soon", "1e400s", "", "nan"):
        add(f"train --time_budget {value!r}", TB + ["--time_budget", value], E("--time_budget"), "budget.py")
    add("train --time_budget 10m --max_steps 2", T + ["--time_budget", "10m"], E("--time_budget"), "settings.py")
    add("train --time_budget 10m --decay_steps 5", TB + ["--time_budget", "10m", "--decay_steps", "5"],
        E("--decay_steps"), "settings.py")
    for flag, value in (("--optimizer", "sgd"), ("--optimizer", "Muon"), ("--optimizer", ""), ("--schedule", "linear"),
                        ("--cooldown", "0"), ("--cooldown", "1"), ("--cooldown", "nan"), ("--cooldown", "-0.5")):
        add(f"train {flag} {value!r}", T + [flag, value], E(flag), "settings.py")
    add("train --time_budget 3s", TB + ["--time_budget", "3s"],
        OK(lambda ws, out, v: None if json.loads((ws / "run/state.json").read_text())["planned_steps"] else
           "no planned_steps"), "budget.py")
    add("train --compile=yes", T + ["--compile=yes"], E("--compile"), "cli.py")
    add("train --config compile = \"yes\"", [*T, "--config", "{W}/c.toml"], E("--compile: expected true or false"),
        "train.py", setup=files(**{"c.toml": 'compile = "yes"'}))
    add("train --checkpoint_activations", T + ["--checkpoint_activations"], OK(state_step("run", 2)), "train.py")
    add("train WORLD_SIZE=2 without MASTER_ADDR", T, E("MASTER_ADDR"), "distributed.py",
        patch=lambda: mock.patch.dict(os.environ, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}))

    # bench (the checks live in bench.py; none of these reaches a measurement)
    for flags, culprit in [(["--seq", "0"], "--seq"), (["--seq", "129"], "--seq"), (["--batch", "0"], "--batch"),
                           (["--rounds", "-1"], "--rounds"), (["--steps", "0"], "--steps"),
                           (["--contenders", "nanogpt"], "--contenders"), (["--preset", "gpt5"], "gpt5"),
                           (["--seq", "x"], "--seq")]:
        preset_flags = [] if "--preset" in flags else ["--preset", "cpu-tiny"]
        add(f"bench {' '.join(flags)}", ["bench", *preset_flags, *flags], E(culprit), "bench.py")
    add("train --seed -1", T + ["--seed", "-1"], EITHER("--seed", state_step("run", 2)), "train.py")
    add("train --lr 1e30 (diverges)", T + ["--lr", "1e30", "--max_steps", "3"], E("--lr"), "train.py")
    add("train --preset nope", ["train", "--preset", "nope", "--data", "{F}/data", "--out", "{W}/run"], E("nope"), "config.py")
    add("train --init missing", [*T, "--init", "{W}/none"], E("none"), "checkpoint.py")
    add("train --init NaN weights", [*T, "--init", "{F}/nan.safetensors"], E("wte.weight"), "checkpoint.py")
    add("train --data missing", [*T, "--data", "{W}/none"], E("none"), "data.py")
    add("train --data without train.bin", [*T, "--data", "{F}/texts"], E("train.bin"), "data.py")
    add("train --data too short", [*T, "--data", "{W}/d"], E("train.bin"), "data.py",
        setup=files(**{"d__train.bin": tokens_bin(range(5)), "d__val.bin": tokens_bin(range(40))}))
    add("train --data odd-sized train.bin", [*T, "--data", "{W}/d"], E("train.bin"), "data.py",
        setup=files(**{"d__train.bin": b"\0" * 81, "d__val.bin": tokens_bin(range(40))}))
    add("train --data ids beyond the vocabulary", [*T, "--data", "{W}/d"], E("60000"), "train.py",
        setup=files(**{"d__train.bin": tokens_bin([60000] * 60), "d__val.bin": tokens_bin(range(40))}))
    add("train --out an existing file", [*T, "--out", "{W}/f"], E("{W}/f"), "train.py", setup=files(f="x"))
    add("train --out read-only place", [*T, "--out", "/sys/fgpt_census_run"], E("/sys/fgpt_census_run"), "train.py")
    add("train --out a run", T, E("already holds a run"), "train.py", setup=copy("run"))
    add("train disk full", T, E("{W}/run"), "train.py", patch=patch_fsync())
    add("train --config missing", [*T, "--config", "{W}/none.json"], E("none.json"), "train.py")
    add("train --config garbled JSON", [*T, "--config", "{W}/c.json"], E("c.json"), "train.py", setup=files(**{"c.json": "{"}))
    add("train --config garbled TOML", [*T, "--config", "{W}/c.toml"], E("c.toml"), "train.py",
        setup=files(**{"c.toml": "lr = = 1"}))
    add("train --config a list", [*T, "--config", "{W}/c.json"], E("c.json"), "train.py", setup=files(**{"c.json": "[1]"}))
    add("train --config unknown key", [*T, "--config", "{W}/c.json"], E("bogus"), "train.py",
        setup=files(**{"c.json": '{"bogus": 1}'}))
    add("train --config lr a string", [*T, "--config", "{W}/c.json"], E("lr"), "train.py",
        setup=files(**{"c.json": '{"lr": "fast"}'}))
    add("train --config batch_size 2.5", [*T[:9], *T[11:], "--config", "{W}/c.json"], E("batch_size"), "train.py",
        setup=files(**{"c.json": '{"batch_size": 2.5}'}))
    add("train --config lr NaN", [*T, "--config", "{W}/c.json"], E("lr"), "train.py",
        setup=files(**{"c.json": '{"warmup_steps": 1, "lr": NaN}'}))
    add("train --config not UTF-8", [*T, "--config", "{W}/c.json"], E("c.json"), "train.py",
        setup=files(**{"c.json": b'{"lr": "\xff"}'}))
    add("train a tiny run", T, OK(state_step("run", 2)))

    R = ["train", "--resume", "{W}/run"]
    add("resume missing dir", R, E("{W}/run"), "train.py")
    add("resume empty dir", R, E("state.json"), "runs.py", setup=lambda ws: (ws / "run").mkdir())
    add("resume --max_steps already reached", R, E("--max_steps"), "train.py", setup=copy("run"))
    add("resume --lr changed", R + ["--max_steps", "3", "--lr", "1"], E("--lr"), "train.py", setup=copy("run"))
    R3 = R + ["--max_steps", "3"]
    add("resume one more step", R3, OK(state_step("run", 3)), setup=copy("run"))
    add("resume state.json truncated", R3, E("state.json"), "runs.py",
        setup=copy("run", then=lambda ws: (ws / "run/state.json").write_text((ws / "run/state.json").read_text()[:50])))
    add("resume state.json a list", R3, E("state.json"), "runs.py", setup=copy("run", then=write("run/state.json", "[]")))
    add("resume state.json without rng", R3, E("rng"), "runs.py", setup=copy("run", then=edit_state(rng=_DROP)))
    add("resume state.json step a string", R3, E("step"), "runs.py", setup=copy("run", then=edit_state(step="two")))
    add("resume state.json config a list", R3, E("config"), "runs.py", setup=copy("run", then=edit_state(config=[1])))
    add("resume data_position past the epoch", R3, E("data_position"), "runs.py", timeout=5,
        setup=copy("run", then=edit_state(data_position={"epoch": 0, "index": 10**6})))
    add("resume data_position negative", R3, E("data_position"), "runs.py", timeout=5,
        setup=copy("run", then=edit_state(data_position={"epoch": 0, "index": -1})))
    add("resume data_position wrong keys", R3, E("data_position"), "runs.py",
        setup=copy("run", then=edit_state(data_position={"epoch": 0, "offset": 1})))
    add("resume metrics.jsonl garbled", R3, E("metrics.jsonl"), "train.py",
        setup=copy("run", then=write("run/metrics.jsonl", '{"step": 1, "loss": 1.0}\n{"step": 2, "lo')))
    add("resume optimizer truncated", R3, E("optimizer.safetensors"), "runs.py",
        setup=copy("run", then=lambda ws: (ws / "run/optimizer.safetensors").write_bytes(
            (ws / "run/optimizer.safetensors").read_bytes()[:1000])))
    add("resume optimizer missing", R3, E("optimizer.safetensors"), "runs.py",
        setup=copy("run", then=lambda ws: (ws / "run/optimizer.safetensors").unlink()))
    add("resume optimizer without adam_step", R3, E("optimizer.safetensors"), "runs.py",
        setup=copy("run", then=lambda ws: tensors_file(ws / "run/optimizer.safetensors", {
            f"{kind}.{k}": torch.zeros_like(v) for kind in ("exp_avg", "exp_avg_sq") for k, v in tiny_flat().items()})))
    add("resume optimizer NaN moments", R3, E("optimizer.safetensors"), "runs.py",
        setup=copy("run", then=lambda ws: save_file({
            f"{kind}.{k}": torch.full_like(v, float("nan")) for kind in ("exp_avg", "exp_avg_sq")
            for k, v in tiny_flat().items()}, str(ws / "run/optimizer.safetensors"), metadata={"adam_step": "2"})))
    add("resume model.safetensors garbled", R3, E("model.safetensors"), "checkpoint.py",
        setup=copy("run", then=write("run/model.safetensors", b"\x08\0\0\0\0\0\0\0{}garbage")))
    add("resume data changed since the checkpoint", R3, E("train.bin"), "train.py", setup=copy("run", "data", then=lambda ws: (
        edit_state(data_dir=str(ws / "data"))(ws), (ws / "data/train.bin").write_bytes(tokens_bin(range(100))))))
    add("resume disk full", R3, E("{W}/run"), "train.py", setup=copy("run"), patch=patch_fsync())

    # generate
    G = ["generate", "--weights", tiny, "--max_new_tokens", "3", "--prompt", "Hi", "--seed", "0"]
    for flag, value in [("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"),
                        ("--temperature", "1e-40"), ("--top_k", "0"), ("--top_k", "-1"), ("--top_k", "abc"),
                        ("--top_p", "0"), ("--top_p", "1.5"), ("--top_p", "nan"), ("--top_p", "-0.5"),
                        ("--min_p", "1"), ("--min_p", "-0.1"), ("--min_p", "nan"), ("--repetition_penalty", "0"),
                        ("--repetition_penalty", "-1"), ("--repetition_penalty", "nan"),
                        ("--repetition_penalty", "inf"), ("--seed", "99999999999999999999999"), ("--seed", "-1"),
                        ("--num_samples", "0"), ("--num_samples", "-1"), ("--max_new_tokens", "-1"),
                        ("--stop", ""), ("--max_new_tokens", "1.5")]:
        add(f"generate {flag} {value!r}", G + [flag, value], E(flag), "sampling.py" if flag not in
            ("--seed", "--num_samples", "--max_new_tokens", "--stop") else "generate.py")
    add("generate --seed 2**64-1 with 2 samples", G + ["--seed", str(2**64 - 1), "--num_samples", "2"], E("--seed"),
        "generate.py")
    for device in ("xpu", "meta", "cuda:99", "bogus"):
        add(f"generate --device {device}", G + ["--device", device], E(device), "device.py")
    for value in ("int4", "", "INT8"):
        add(f"generate --quantize {value!r}", G + ["--quantize", value], E("--quantize"), "quantize.py")
    add("generate --quantize int8 of n_embd 8", G + ["--quantize", "int8"], E("n_embd=8"), "quantize.py")
    for flags, culprit in ((["--prompt_lookup", "0", "--greedy"], "--prompt_lookup"),
                           (["--prompt_lookup", "2", "--greedy", "--speculate", "-1"], "--speculate"),
                           (["--prompt_lookup", "2"], "--prompt_lookup"),
                           (["--prompt_lookup", "2", "--draft", tiny, "--greedy"], "--draft"),
                           (["--draft", "{W}/none", "--greedy"], "none")):
        add(f"generate {' '.join(flags)}", G + flags, E(culprit), "speculative.py")
    add("generate --prompt_lookup 2 --greedy", G + ["--prompt_lookup", "2", "--greedy"], OK())
    add("generate --weights missing", [*G, "--weights", "{W}/none"], E("none"), "checkpoint.py")
    add("generate --weights NaN weights", [*G, "--weights", "{F}/nan.safetensors"], E("wte.weight"), "checkpoint.py")
    add("generate --prompt - not UTF-8", [*G, "--prompt", "-"], E("--prompt"), "cli.py", stdin=b"caf\xe9")
    add("generate --prompt lone surrogate", [*G, "--prompt", "caf\udce9"], E("--prompt"), "generate.py")
    add("generate --seed 2**64-1", G + ["--seed", str(2**64 - 1)], OK())
    add("generate --temperature 1e-3", G + ["--temperature", "1e-3"], OK())
    add("generate --top_k 10**9", G + ["--top_k", str(10**9)], OK())
    add("generate --prompt '<|endoftext|>'", [*G, "--prompt", "<|endoftext|>"], OK())
    add("generate --prompt - empty stdin", [*G, "--prompt", "-"], OK(), stdin=b"")
    add("generate a prompt longer than the context", [*G, "--prompt", "word " * 60], OK())
    add("generate --max_new_tokens 0", G + ["--max_new_tokens", "0"], OK(stdout_is("\n")))
    add("generate --temperature 0", G + ["--temperature", "0"], OK())
    add("generate --num_samples 2", G + ["--num_samples", "2"], OK(says("--- sample 2 ---")))
    NL = ["generate", "--weights", "{F}/newline.safetensors", "--prompt", "Hi", "--greedy", "--max_new_tokens", "8"]
    add("generate --stop '\\n\\n' (README) stops at a blank line", NL + ["--stop", "\\n\\n"], OK(stdout_is("\n")),
        "generate.py")
    add("generate --stop '\\n' stops at a newline", NL + ["--stop", "\\n"], OK(stdout_is("\n")), "generate.py")
    add("generate --stop '\\\\n' is a backslash and n", NL + ["--stop", "\\\\n"], OK(stdout_is("\n" * 9)), "generate.py")
    add("generate --stop with a bad escape", NL + ["--stop", "\\q"], E("--stop"), "generate.py")
    add("generate newline model without --stop", NL, OK(stdout_is("\n" * 9)))

    # eval
    EV = ["eval", "--weights", tiny, "--data", "{F}/texts/a.txt"]
    for flag, value in [("--max_length", "0"), ("--max_length", "1"), ("--max_length", "-1"), ("--max_length", "33"),
                        ("--stride", "0"), ("--stride", "-1"), ("--stride", "32"), ("--batch_size", "0"),
                        ("--batch_size", "-1"), ("--max_length", "x")]:
        add(f"eval {flag} {value}", EV + [flag, value], E(flag), "evaluate.py")
    add("eval --data missing", [*EV, "--data", "{W}/none"], E("none"), "evaluate.py")
    add("eval --quantize int3", [*EV, "--quantize", "int3"], E("--quantize"), "quantize.py")
    add("eval --data empty file", [*EV, "--data", "{W}/e.txt"], E("e.txt"), "evaluate.py", setup=files(**{"e.txt": ""}))
    add("eval --data not UTF-8", [*EV, "--data", "{W}/b.txt"], E("b.txt"), "evaluate.py", setup=files(**{"b.txt": b"\xff"}))
    add("eval --data odd-sized .bin", [*EV, "--data", "{W}/o.bin"], E("o.bin"), "evaluate.py", setup=files(**{"o.bin": b"\0" * 7}))
    add("eval --data empty .bin", [*EV, "--data", "{W}/o.bin"], E("o.bin"), "evaluate.py", setup=files(**{"o.bin": b""}))
    add("eval --data ids beyond the vocabulary", [*EV, "--data", "{W}/o.bin"], E("60000"), "evaluate.py",
        setup=files(**{"o.bin": tokens_bin([1, 60000, 2])}))
    add("eval --data empty dir", [*EV, "--data", "{W}/e"], E("{W}/e"), "evaluate.py", setup=lambda ws: (ws / "e").mkdir())
    add("eval --data dir of hidden files", [*EV, "--data", "{W}/e"], E("{W}/e"), "evaluate.py",
        setup=files(**{"e__.hidden.txt": TEXT}))
    add("eval --data one token", [*EV, "--data", "{W}/one.txt"], E("2 tokens"), "evaluate.py", setup=files(**{"one.txt": "a"}))
    add("eval --data dir with a bad file", [*EV, "--data", "{W}/e"], E("bad.txt"), "evaluate.py",
        setup=files(**{"e__a.txt": TEXT, "e__bad.txt": b"\xc3"}))
    add("eval no --data, weights a file", ["eval", "--weights", tiny], E("--data"), "evaluate.py")
    add("eval no --data, run state.json garbled", ["eval", "--weights", "{W}/run"], E("state.json"), "evaluate.py",
        setup=copy("run", then=write("run/state.json", "{")))
    add("eval no --data, run data gone", ["eval", "--weights", "{W}/run"], E("val.bin"), "evaluate.py",
        setup=copy("run", then=edit_state(data_dir="/nonexistent/data")))
    add("eval no --data, data_dir a number", ["eval", "--weights", "{W}/run"], E("data_dir"), "evaluate.py",
        setup=copy("run", then=edit_state(data_dir=7)))
    add("eval --device meta", EV + ["--device", "meta"], E("meta"), "device.py")
    add("eval a text file", EV, OK(perplexity_finite))
    add("eval --json", EV + ["--json"], OK(lambda ws, out, v: None if math.isfinite(json.loads(out)["perplexity"]) else "nan"))
    add("eval a run dir (its val.bin)", ["eval", "--weights", run], OK(perplexity_finite))
    add("eval a data dir", [*EV, "--data", "{F}/data"], OK(perplexity_finite))
    add("eval a .bin", [*EV, "--data", "{F}/data/val.bin"], OK(perplexity_finite))
    add("eval a dir of texts", [*EV, "--data", "{F}/texts"], OK(perplexity_finite))
    add("eval --max_length 2 --stride 1", EV + ["--max_length", "2", "--stride", "1"], OK(perplexity_finite))

    # attention
    A = ["attention", "--weights", tiny, "--prompt", "To be"]
    add("attention --out a directory", [*A, "--out", "{W}"], E("{W}"), "attention_map.py")
    add("attention --out a directory named .png", [*A, "--out", "{W}/d.png"], E("d.png"), "attention_map.py",
        setup=lambda ws: (ws / "d.png").mkdir())
    add("attention --out .jpg", [*A, "--out", "{W}/a.jpg"], E("a.jpg"), "attention_map.py")
    add("attention --out ''", [*A, "--out", ""], E("--out"), "attention_map.py")
    add("attention --out under a file", [*A, "--out", "{W}/f/a.png"], E("{W}/f"), "attention_map.py", setup=files(f="x"))
    add("attention --out read-only place", [*A, "--out", "/sys/fgpt_census.png"], E("/sys/fgpt_census.png"), "attention_map.py")
    add("attention disk full over an existing PNG", [*A, "--out", "{W}/a.png"], E("a.png"), "attention_map.py",
        setup=files(**{"a.png": b"\x89PNG old"}), patch=patch_fsync())
    add("attention permission denied", [*A, "--out", "{W}/a.png"], E("a.png"), "attention_map.py",
        setup=files(**{"a.png": b"\x89PNG old"}), patch=patch_replace())
    add("attention --prompt ''", [*A[:-2], "--prompt", "", "--out", "{W}/a.png"], E("--prompt"), "attention_map.py")
    add("attention --prompt too long", [*A[:-2], "--prompt", "word " * 40, "--out", "{W}/a.png"], E("--prompt"),
        "attention_map.py")
    add("attention --device xpu", [*A, "--out", "{W}/a.png", "--device", "xpu"], E("xpu"), "device.py")
    add("attention --weights missing", [*A, "--weights", "{W}/none", "--out", "{W}/a.png"], E("none"), "checkpoint.py")
    add("attention a PNG", [*A, "--out", "{W}/a.png"], OK(png("a.png")))
    add("attention --out .PNG", [*A, "--out", "{W}/a.PNG"], OK(png("a.PNG")))

    # dump
    D = ["dump", "--weights", tiny, "--prompt", "Hi there"]
    add("dump --out a directory", [*D, "--out", "{W}"], E("{W}"), "compare.py")
    add("dump --out under a file", [*D, "--out", "{W}/f/x.safetensors"], E("{W}/f"), "compare.py", setup=files(f="x"))
    add("dump --out read-only place", [*D, "--out", "/sys/fgpt_census.safetensors"], E("/sys/fgpt_census"), "compare.py")
    add("dump disk full over an existing dump", [*D, "--out", "{W}/ours.safetensors"], E("ours.safetensors"),
        "compare.py", setup=copy("ours.safetensors"), patch=patch_fsync())
    add("dump --prompt ''", [*D, "--prompt", "", "--out", "{W}/x.safetensors"], E("--prompt"), "compare.py")
    add("dump --prompt too long", [*D, "--prompt", "word " * 40, "--out", "{W}/x.safetensors"], E("--prompt"), "compare.py")
    add("dump --grads on one token", [*D, "--prompt", "Hi", "--grads", "--out", "{W}/x.safetensors"], E("--prompt"),
        "compare.py")
    add("dump --dtype float64", [*D, "--dtype", "float64", "--out", "{W}/x.safetensors"], E("--dtype"), "cli.py")
    add("dump --device meta", [*D, "--device", "meta", "--out", "{W}/x.safetensors"], E("meta"), "device.py")
    add("dump --weights missing", [*D, "--weights", "{W}/none", "--out", "{W}/x.safetensors"], E("none"), "checkpoint.py")
    add("dump a dump", [*D, "--out", "{W}/x.safetensors"], OK(exists("x.safetensors")))
    add("dump --grads --reference transformers", [*D, "--grads", "--reference", "transformers", "--out", "{W}/x.safetensors"],
        OK(exists("x.safetensors")))

    # diff
    ours, ref, other = "{F}/ours.safetensors", "{F}/ref.safetensors", "{F}/other.safetensors"
    for flag, value in [("--atol", "-1"), ("--atol", "nan"), ("--atol", "inf"), ("--rtol", "-1"), ("--rtol", "nan"),
                        ("--rtol", "inf"), ("--atol", "x")]:
        add(f"diff {flag} {value}", ["diff", ours, ours, flag, value], E(flag), "compare.py")
    add("diff A missing", ["diff", "{W}/none", ours], E("none"), "compare.py")
    add("diff A a text file", ["diff", "{F}/texts/a.txt", ours], E("a.txt"), "compare.py")
    add("diff A a directory", ["diff", "{F}/texts", ours], E("texts"), "compare.py")
    add("diff B truncated", ["diff", ours, "{W}/t.safetensors"], E("t.safetensors"), "compare.py",
        setup=copy("ours.safetensors", then=lambda ws: (ws / "t.safetensors").write_bytes(
            (ws / "ours.safetensors").read_bytes()[:300])))
    add("diff A with itself", ["diff", ours, ours], OK(says("overall okay")))
    add("diff ours and transformers", ["diff", ours, ref], OK(says("overall okay")))
    add("diff two prompts", ["diff", ours, other], OK(says("overall DIFFERENT"), code=1))
    add("diff a dump and a checkpoint", ["diff", ours, tiny], OK(says("MISSING"), code=1))
    add("diff a NaN file with itself", ["diff", "{F}/nan.safetensors", "{F}/nan.safetensors"], OK(says("DIFF"), code=1))

    # compare
    C = ["compare", "--weights", tiny, "--prompt", "Hi there"]
    for flag, value in [("--atol", "-1"), ("--atol", "nan"), ("--rtol", "-1"), ("--rtol", "nan")]:
        add(f"compare {flag} {value}", C + [flag, value], E(flag), "compare.py")
    add("compare --prompt ''", [*C, "--prompt", ""], E("--prompt"), "compare.py")
    add("compare --device meta", C + ["--device", "meta"], E("meta"), "device.py")
    add("compare --weights missing", [*C, "--weights", "{W}/none"], E("none"), "checkpoint.py")
    add("compare --weights NaN weights", [*C, "--weights", "{F}/nan.safetensors"], E("wte.weight"), "checkpoint.py")
    add("compare agrees", C, OK(says("overall okay")))
    add("compare --grads agrees", C + ["--grads"], OK(says("overall okay")))

    # export
    X = ["export", "--weights", tiny, "--out"]
    add("export into a training run", X + ["{W}/run"], E("{W}/run"), "export.py", setup=copy("run"))
    add("export into a run's best/", X + ["{W}/run/best"], E("best"), "export.py", setup=copy("run"))
    add("export into a dir holding optimizer.safetensors", X + ["{W}/o"], E("{W}/o"), "export.py",
        setup=files(**{"o__optimizer.safetensors": b"x"}))
    add("export --out an existing file", X + ["{W}/f"], E("{W}/f"), "export.py", setup=files(f="x"))
    add("export --out under a file", X + ["{W}/f/sub"], E("{W}/f"), "export.py", setup=files(f="x"))
    add("export --out ''", X + [""], E("--out"), "export.py")
    add("export --out read-only place", X + ["/sys/fgpt_census_export"], E("/sys/fgpt_census_export"), "export.py")
    add("export disk full over an existing export", X + ["{W}/hf"], E("{W}/hf"), "export.py", setup=copy("hf"),
        patch=patch_fsync())
    add("export permission denied over an existing export", X + ["{W}/hf"], E("{W}/hf"), "export.py", setup=copy("hf"),
        patch=patch_replace())
    add("export --weights missing", ["export", "--weights", "{W}/none", "--out", "{W}/x"], E("none"), "checkpoint.py")
    add("export --weights NaN weights", ["export", "--weights", "{F}/nan.safetensors", "--out", "{W}/x"], E("wte.weight"),
        "checkpoint.py")
    add("export --dtype float64", X + ["{W}/x", "--dtype", "float64"], E("--dtype"), "cli.py")
    add("export a checkpoint", X + ["{W}/x"], OK(same_params("x")))
    add("export over an existing export", X + ["{W}/hf"], OK(same_params("hf")), setup=copy("hf"))
    add("export a run dir", ["export", "--weights", run, "--out", "{W}/x"], OK(exists("x/config.json", "x/model.safetensors")))

    # download
    add("download gpt5", ["download", "gpt5"], E("gpt5"), "cli.py")
    add("download gpt2 offline", ["download", "gpt2", "--out", "{W}/g"], E("{W}/g"), "export.py")
    add("download gpt2 --out a file", ["download", "gpt2", "--out", "{W}/f"], E("{W}/f"), "export.py", setup=files(f="x"))
    return cases


# ----------------------------------------------------------------------------- the Python API


def api_cases() -> list[Case]:
    from functional_gpt.training.data import Position, load_tokens, next_batch, prepare
    from functional_gpt.reference.perplexity import evaluate
    from functional_gpt.generation.decoding import generate
    from functional_gpt.info import info_report
    from functional_gpt.generation.sampling import Sampling
    from functional_gpt.training.settings import make_config

    cases = []

    def add(name, fn, expect, owner="", **kw):
        cases.append(Case(name, fn, expect, owner=owner, **kw))

    def P():
        return fg.init_params(TINY, seed=0)

    def fwd(tokens, config=TINY, params=None):
        return lambda ws: fg.forward(params if params is not None else P(), tokens, config)

    ids = torch.tensor([[1, 2, 3]])
    add("forward tokens a list", fwd([[1, 2, 3]]), E("tokens"), "model.py")
    add("forward float tokens", fwd(ids.float()), E("tokens"), "model.py")
    add("forward 1-D tokens", fwd(ids[0]), E("tokens"), "model.py")
    add("forward id == vocab_size", fwd(torch.tensor([[1, 50257]])), E("50257"), "model.py")
    add("forward id -1", fwd(torch.tensor([[1, -1]])), E("-1"), "model.py")
    add("forward T > n_positions", fwd(torch.ones(1, 33, dtype=torch.long)), E("33"), "model.py")
    add("forward T == 0", fwd(torch.ones(1, 0, dtype=torch.long)), E("empty"), "model.py")
    add("forward config n_embd mismatch", fwd(ids, fg.GPTConfig(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1,
                                                                 n_head=2)), E("wte.weight"), "model.py")
    add("forward config n_layer mismatch", fwd(ids, fg.GPTConfig(vocab_size=50257, n_positions=32, n_embd=8, n_layer=2,
                                                                  n_head=2)), E("h.1"), "model.py")
    add("forward params missing ln_f", lambda ws: fg.forward({k: v for k, v in P().items() if k != "ln_f"}, ids, TINY),
        E("ln_f"), "model.py")
    add("forward wte a list", lambda ws: fg.forward(P() | {"wte": {"weight": P()["wte"]["weight"].tolist()}}, ids, TINY),
        E("wte"), "model.py")
    add("forward config a dict", lambda ws: fg.forward(P(), ids, TINY.to_dict()), E("config"), "model.py")
    add("forward NaN params", lambda ws: fg.forward(fg.unflatten(dict(tiny_flat(), **{"ln_f.bias": torch.full((8,), math.nan)})),
                                                    ids, TINY), EITHER("ln_f.bias", lambda ws, o, v: None), "model.py")
    add("forward with the config the params carry", lambda ws: fg.forward(P(), ids),
        OK(returned(lambda v: v.shape == (1, 3, 50257), "logits [1, 3, V]")), "model.py")
    add("forward_cached batch mismatch", lambda ws: fg.forward_cached(P(), ids, fg.new_cache(TINY, 2), TINY),
        E("cache"), "model.py")
    add("forward_cached overflows the cache", lambda ws: fg.forward_cached(P(), torch.ones(1, 5, dtype=torch.long),
                                                                          fg.new_cache(TINY, 1, max_len=4), TINY),
        E("4"), "model.py")
    add("new_cache max_len 0", lambda ws: fg.new_cache(TINY, 1, max_len=0), E("0"), "model.py")
    add("new_cache batch 0", lambda ws: fg.new_cache(TINY, 0), E("batch"), "model.py")

    def decode_past_end(ws):
        params = P()
        _, cache = fg.forward_cached(params, torch.ones(1, 4, dtype=torch.long), fg.new_cache(TINY, 1, max_len=4), TINY)
        return fg.decode_step(params, torch.tensor([1]), cache, TINY)
    add("decode_step past the cache", decode_past_end, E("4"), "model.py")
    add("decode_step 2-D tokens", lambda ws: fg.decode_step(P(), ids, fg.new_cache(TINY, 1), TINY), E("tokens"), "model.py")

    def gen(prompts, **kw):
        return lambda ws: list(generate(P(), prompts, TINY, **({"max_new_tokens": 2} | kw)))
    add("generate no prompts", gen([]), E("prompt"), "generate.py")
    add("generate an empty prompt", gen([[]]), E("prompt"), "generate.py")
    add("generate id 60000", gen([[60000]]), E("60000"), "generate.py")
    add("generate id -3", gen([[-3]]), E("-3"), "generate.py")
    add("generate max_new_tokens -1", gen([[1]], max_new_tokens=-1), E("max_new_tokens"), "generate.py")
    add("generate window 0", gen([[1]], window=0), E("window"), "generate.py")
    add("generate window 33", gen([[1]], window=33), E("window"), "generate.py")
    add("generate a prompt as a string", gen(["hello"]), E("prompt"), "generate.py")
    add("generate a tensor prompt row", gen([torch.tensor([1, 2])]),
        EITHER("prompt", returned(lambda v: len(v) == 2, "2 steps")), "generate.py")
    add("generate sampling a dict", gen([[1]], sampling={"temperature": 1.0}), E("sampling"), "generate.py")
    add("generate two steps", gen([[1, 2], [3]]), OK(returned(lambda v: len(v) == 2 and v[0].shape == (2,), "2 x [2]")))
    for kw, flag in [(dict(temperature=math.nan), "temperature"), (dict(temperature=1e-40), "temperature"),
                     (dict(temperature=math.inf), "temperature"), (dict(top_k=2.5), "top_k"), (dict(top_k=0), "top_k"),
                     (dict(top_p=math.nan), "top_p"), (dict(min_p=math.nan), "min_p"),
                     (dict(repetition_penalty=math.inf), "repetition_penalty"), (dict(top_k=True), "top_k"),
                     (dict(temperature="hot"), "temperature")]:
        add(f"Sampling({kw})", lambda ws, kw=kw: Sampling(**kw), E(flag), "sampling.py")

    # load_params: the safetensors reader and the config in the file (checkpoint.py, config.py)
    flat = tiny_flat()
    good_header, blob, offset = {}, b"", 0
    for k, v in flat.items():
        data = v.numpy().tobytes()
        good_header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(data)]}
        blob, offset = blob + data, offset + len(data)
    meta = {"format": "pt", META_KEY: json.dumps(TINY.to_dict())}

    def header_case(name, edit, culprit, owner="checkpoint.py", data=None):
        def setup(ws):
            header = json.loads(json.dumps(good_header)) | {"__metadata__": dict(meta)}
            edit(header)
            raw_safetensors(ws / "m.safetensors", header, blob if data is None else data)
        add(f"load_params {name}", lambda ws: fg.load_params(ws / "m.safetensors"), E(culprit), owner, setup=setup)

    def set_entry(key, field_name, value):
        return lambda h: h[key].__setitem__(field_name, value)
    header_case("shape a string", set_entry("wpe.weight", "shape", "32,8"), "wpe.weight")
    header_case("shape with a negative dim", set_entry("wpe.weight", "shape", [-32, -8]), "wpe.weight")
    header_case("shape with a float dim", set_entry("wpe.weight", "shape", [32.0, 8]), "wpe.weight")
    header_case("dtype a list", set_entry("wpe.weight", "dtype", ["F32"]), "wpe.weight")
    header_case("dtype unknown", set_entry("wpe.weight", "dtype", "F8_E4M3"), "wpe.weight")
    header_case("data_offsets strings", set_entry("wpe.weight", "data_offsets", ["0", "1024"]), "wpe.weight")
    header_case("data_offsets overlapping", set_entry("wpe.weight", "data_offsets", good_header["wte.weight"]["data_offsets"][:1]
                                                      + [good_header["wte.weight"]["data_offsets"][0] + 1024]), "wpe.weight")
    header_case("data_offsets negative", set_entry("wpe.weight", "data_offsets", [-4, 1020]), "wpe.weight")
    header_case("entry a list", lambda h: h.__setitem__("wpe.weight", [1, 2]), "wpe.weight")
    header_case("metadata an int", lambda h: h.__setitem__("__metadata__", 7), "metadata")
    header_case("metadata value a number", lambda h: h["__metadata__"].__setitem__("format", 1), "metadata")
    header_case("truncated data", lambda h: None, "m.safetensors", data=blob[:-100])

    def int8(h):
        h["ln_f.bias"] = {"dtype": "I8", "shape": [8], "data_offsets": [offset, offset + 8]}
    header_case("an int8 tensor", int8, "ln_f.bias", data=blob + b"\x01" * 8)
    header_case("both wte.weight and transformer.wte.weight",
                lambda h: h.__setitem__("transformer.wte.weight", dict(h["wte.weight"])), "wte.weight")

    def config_case(name, config_text, culprit, owner="config.py"):
        def setup(ws):
            tensors_file(ws / "m.safetensors", flat)
            path = ws / "m.safetensors"
            raw = path.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + n])
            header["__metadata__"][META_KEY] = config_text
            raw_safetensors(path, header, raw[8 + n:])
        add(f"load_params config {name}", lambda ws: fg.load_params(ws / "m.safetensors"), E(culprit), owner, setup=setup)

    base = TINY.to_dict()
    config_case("epsilon NaN", json.dumps(base | {"layer_norm_epsilon": math.nan}), "layer_norm_epsilon")
    config_case("epsilon Infinity", json.dumps(base | {"layer_norm_epsilon": math.inf}), "layer_norm_epsilon")
    config_case("epsilon negative", json.dumps(base | {"layer_norm_epsilon": -1e-5}), "layer_norm_epsilon")
    config_case("epsilon zero", json.dumps(base | {"layer_norm_epsilon": 0.0}), "layer_norm_epsilon")
    config_case("dropout NaN", json.dumps(base | {"embd_pdrop": math.nan}), "embd_pdrop")
    config_case("n_embd 8.9", json.dumps(base | {"n_embd": 8.9}), "n_embd")
    add("load_params config n_layer 1.0 (integral)", lambda ws: fg.load_params(ws / "m.safetensors"),
        EITHER("n_layer", returned(lambda v: v[1] == TINY, "the tiny config")), "config.py", setup=lambda ws: (
            tensors_file(ws / "m.safetensors", flat, base | {"n_layer": 1.0})))
    config_case("vocab_size Infinity", json.dumps(base | {"vocab_size": math.inf}), "vocab_size")
    config_case("n_head true", json.dumps(base | {"n_head": True}), "n_head")
    config_case("a list", json.dumps([base]), "config")
    config_case("not JSON", "{n_embd: 8", "config")
    config_case("n_head mismatch (3)", json.dumps(base | {"n_head": 3}), "n_head")
    config_case("n_embd mismatch", json.dumps(base | {"n_embd": 16, "n_head": 2}), "wte.weight", owner="checkpoint.py")

    def file_case(name, setup, culprit, owner="checkpoint.py"):
        add(f"load_params {name}", lambda ws: fg.load_params(ws / "m.safetensors"), E(culprit), owner, setup=setup)

    file_case("empty file", files(**{"m.safetensors": b""}), "m.safetensors")
    file_case("header length only", files(**{"m.safetensors": struct.pack("<Q", 10)}), "m.safetensors")
    file_case("header length past the end", files(**{"m.safetensors": struct.pack("<Q", 10**6) + b"{}"}), "m.safetensors")
    file_case("header not JSON", files(**{"m.safetensors": struct.pack("<Q", 4) + b"{{{{"}), "m.safetensors")
    file_case("header a list", files(**{"m.safetensors": struct.pack("<Q", 2) + b"[]"}), "m.safetensors")
    file_case("header not UTF-8", files(**{"m.safetensors": struct.pack("<Q", 4) + b'{"\xff"'}), "m.safetensors")
    file_case("a NaN tensor", lambda ws: tensors_file(ws / "m.safetensors", dict(flat, **{"h.0.mlp.c_fc.bias": torch.full(
        (32,), math.nan)}), base), "h.0.mlp.c_fc.bias")
    file_case("an infinite tensor", lambda ws: tensors_file(ws / "m.safetensors", dict(flat, **{"wpe.weight": torch.full(
        (32, 8), math.inf)}), base), "wpe.weight")
    file_case("a missing key", lambda ws: tensors_file(ws / "m.safetensors", {k: v for k, v in flat.items()
                                                                               if k != "h.0.ln_2.bias"}, base), "h.0.ln_2.bias")
    file_case("an extra key", lambda ws: tensors_file(ws / "m.safetensors", dict(flat, extra=torch.zeros(1)), base), "extra")
    file_case("a shape mismatch", lambda ws: tensors_file(ws / "m.safetensors", dict(flat, **{"ln_f.bias": torch.zeros(9)}),
                                                          base), "ln_f.bias")
    file_case("lm_head differs from wte", lambda ws: tensors_file(ws / "m.safetensors", dict(flat, **{
        "lm_head.weight": torch.zeros(50257, 8)}), base), "lm_head.weight")
    file_case("no config, no config.json", lambda ws: tensors_file(ws / "m.safetensors", flat), "n_head")
    add("load_params sharded index garbled", lambda ws: fg.load_params(ws / "hf"), E("index"), "checkpoint.py",
        setup=files(**{"hf__model.safetensors.index.json": "{"}))
    add("load_params index naming a missing shard", lambda ws: fg.load_params(ws / "hf"), E("shard.safetensors"),
        "checkpoint.py", setup=files(**{"hf__model.safetensors.index.json": '{"weight_map": {"wte.weight": "shard.safetensors"}}'}))
    add("load_params a directory", lambda ws: fg.load_params(ws), E(str("{W}")), "checkpoint.py")
    add("load_params dtype int8", lambda ws: fg.load_params(ws.parent.parent / "fixtures/tiny.safetensors", dtype=torch.int8),
        E("dtype"), "checkpoint.py")
    add("load_params a good HF dir", lambda ws: fg.load_params(ws.parent.parent / "fixtures/hf"),
        OK(returned(lambda v: v[1] == TINY,
                    "the tiny config")))

    # save_params
    def save(params, path="m.safetensors", config=TINY):
        return lambda ws: fg.save_params(ws / path, params() if callable(params) else params, config)
    add("save_params NaN params", save(lambda: fg.unflatten(dict(tiny_flat(), **{"h.0.ln_1.weight": torch.full((8,), math.nan)}))),
        E("h.0.ln_1.weight"), "checkpoint.py")
    add("save_params a list tensor", save(lambda: P() | {"ln_f": {"weight": [1.0] * 8, "bias": torch.zeros(8)}}),
        E("ln_f.weight"), "checkpoint.py")
    add("save_params params not matching the config", save(P, config=fg.GPTConfig(vocab_size=50257, n_positions=32,
                                                                                   n_embd=16, n_layer=1, n_head=2)),
        E("wte.weight"), "checkpoint.py")
    add("save_params to a directory", save(P, path="d"), E("d"), "checkpoint.py", setup=lambda ws: (ws / "d").mkdir())
    add("save_params under a file", save(P, path="f/m.safetensors"), E("f"), "checkpoint.py", setup=files(f="x"))
    add("save_params disk full over an old file", save(P, path="tiny.safetensors"), E("tiny.safetensors"),
        "checkpoint.py", setup=copy("tiny.safetensors"), patch=patch_fsync())
    add("save_params into a read-only place", lambda ws: fg.save_params("/sys/fgpt_census.safetensors", P(), TINY),
        E("/sys/fgpt_census.safetensors"), "checkpoint.py")
    add("save_params config a dict", save(P, config=TINY.to_dict()), E("config"), "checkpoint.py")
    add("save_params round trip", lambda ws: (fg.save_params(ws / "m.safetensors", P(), TINY), fg.load_params(ws / "m.safetensors"))[1],
        OK(returned(lambda v: v[1] == TINY, "the config back")))

    # GPTConfig and the training config
    for kw, culprit in [(dict(n_embd=0), "n_embd"), (dict(n_head=5), "n_head"), (dict(layer_norm_epsilon=-1.0), "layer_norm_epsilon"),
                        (dict(layer_norm_epsilon=math.nan), "layer_norm_epsilon"), (dict(layer_norm_epsilon=math.inf), "layer_norm_epsilon"),
                        (dict(embd_pdrop=math.nan), "embd_pdrop"), (dict(attn_pdrop=1.0), "attn_pdrop"),
                        (dict(n_layer=2.5), "n_layer"), (dict(vocab_size="50257"), "vocab_size"),
                        (dict(n_positions=True), "n_positions"), (dict(n_head=0), "n_head"), (dict(resid_pdrop=-0.1), "resid_pdrop"),
                        (dict(n_embd=None), "n_embd"), (dict(vocab_size=math.inf), "vocab_size")]:
        add(f"GPTConfig({kw})", lambda ws, kw=kw: fg.GPTConfig(**kw), E(culprit), "config.py")
    for d, culprit in [({"n_embd": 128.9}, "n_embd"), ({"layer_norm_epsilon": math.nan}, "layer_norm_epsilon"),
                       ({"n_head": [12]}, "n_head"), ({"n_layer": "12"}, "n_layer")]:
        add(f"GPTConfig.from_dict({d})", lambda ws, d=d: fg.GPTConfig.from_dict(d), E(culprit), "config.py")
    add("GPTConfig.from_dict a list", lambda ws: fg.GPTConfig.from_dict([1]), E("config"), "config.py")
    add("preset 7", lambda ws: fg.preset(7), E("7"), "config.py")
    for values, culprit in [({"lr": "x"}, "lr"), ({"bogus": 1}, "bogus"), ({"batch_size": 0}, "batch_size"),
                            ({"beta1": 2.0}, "beta1"), ({"lr": math.nan}, "lr"), ({"grad_clip": math.nan}, "grad_clip"),
                            ({"seed": 1.5}, "seed"), ({"preset": 3}, "preset"), ({"max_steps": True}, "max_steps"),
                            ({"dropout": math.nan}, "dropout"), ({"beta2": math.nan}, "beta2"),
                            ({"weight_decay": math.inf}, "weight_decay"), ({"seed": -(2**70)}, "seed"),
                            ({"eval_windows": 1.5}, "eval_windows"), ({"data": None}, "data")]:
        add(f"make_config({values})", lambda ws, v=values: make_config(v), E(culprit), "train.py")
    add("make_config a list", lambda ws: make_config([("lr", 1)]), E("settings"), "train.py")
    add("make_config defaults", lambda ws: make_config({}), OK(returned(lambda v: v.lr > 0, "a TrainConfig")))

    # prepare, evaluate, next_batch, load_tokens, info_report
    add("prepare([missing])", lambda ws: prepare([ws / "none.txt"], ws / "d", progress=False), E("none.txt"), "data.py")
    add("prepare(val_files=0) of 3", lambda ws: prepare([ws / "in"], ws / "d", val_files=0, progress=False), E("val_files"),
        "data.py", setup=files(**THREE_TEXTS))
    add("prepare(val_files=1.5)", lambda ws: prepare([ws / "in"], ws / "d", val_files=1.5, progress=False), E("val_files"),
        "data.py", setup=files(**THREE_TEXTS))
    add("prepare(a string, not a list)", lambda ws: prepare(str(ws / "in"), ws / "d", progress=False), E("inputs"),
        "data.py", setup=files(**THREE_TEXTS))
    text = torch.tensor(fg.encode(TEXT))
    add("evaluate no texts", lambda ws: evaluate(P(), [], TINY, show_progress=False), E("2 tokens"), "evaluate.py")
    add("evaluate max_length 0", lambda ws: evaluate(P(), [text], TINY, max_length=0, show_progress=False), E("max_length"),
        "evaluate.py")
    add("evaluate stride 0", lambda ws: evaluate(P(), [text], TINY, stride=0, show_progress=False), E("stride"), "evaluate.py")
    add("evaluate batch_size 0", lambda ws: evaluate(P(), [text], TINY, batch_size=0, show_progress=False), E("batch_size"),
        "evaluate.py")
    add("evaluate a list text", lambda ws: evaluate(P(), [text.tolist()], TINY, show_progress=False), E("text"), "evaluate.py")
    add("evaluate ids out of range", lambda ws: evaluate(P(), [torch.tensor([1, 50300])], TINY, show_progress=False),
        E("50300"), "evaluate.py")
    add("evaluate a text", lambda ws: evaluate(P(), [text], TINY, show_progress=False),
        OK(returned(lambda v: v.tokens == len(text) - 1 and math.isfinite(v.nats), "every token scored once")))
    stream = np.arange(100, dtype="<u2")

    def batch(position, **kw):
        args = dict(batch_size=2, context_length=8, stride=8, seed=0) | kw
        return lambda ws: next_batch(stream if "tokens" not in kw else kw.pop("tokens"), position, **args)
    add("next_batch index past the epoch", batch(Position(0, 10**6)), E("position"), "data.py", timeout=3)
    add("next_batch index negative", batch(Position(0, -1)), E("position"), "data.py", timeout=3)
    add("next_batch epoch negative", batch(Position(-1, 0)), EITHER("position", lambda ws, o, v: None), "data.py", timeout=3)
    add("next_batch tokens shorter than a window", lambda ws: next_batch(stream[:5], Position(), batch_size=2,
                                                                         context_length=8, stride=8, seed=0),
        E("context_length"), "data.py", timeout=3)
    add("next_batch batch_size 0", batch(Position(), batch_size=0), E("batch_size"), "data.py", timeout=3)
    add("next_batch stride 0", batch(Position(), stride=0), E("stride"), "data.py", timeout=3)
    add("next_batch context_length 0", batch(Position(), context_length=0), E("context_length"), "data.py", timeout=3)
    add("next_batch the last window of the epoch", batch(Position(0, 11)),
        OK(returned(lambda v: v[2] == Position(1, 1) and v[0].shape == (2, 8), "Position(1, 1)")))
    add("load_tokens odd-sized", lambda ws: load_tokens(ws / "d", "train"), E("train.bin"), "data.py",
        setup=files(**{"d__train.bin": b"\0" * 9}))
    add("load_tokens a directory named train.bin", lambda ws: load_tokens(ws / "d", "train"), E("train.bin"), "data.py",
        setup=lambda ws: (ws / "d/train.bin").mkdir(parents=True))
    add("info_report(preset_name='x')", lambda ws: info_report(preset_name="x"), E("'x'"), "info.py")
    add("info_report(weights=missing)", lambda ws: info_report(weights=str(ws / "none")), E("none"), "info.py")
    add("info_report(device='meta')", lambda ws: info_report(preset_name="cpu-tiny", device="meta"), E("meta"), "device.py")
    add("read_hf_config garbled", lambda ws: fg.read_hf_config(ws / "c.json"), E("c.json"), "config.py",
        setup=files(**{"c.json": "{"}))
    add("read_hf_config not UTF-8", lambda ws: fg.read_hf_config(ws / "c.json"), E("c.json"), "config.py",
        setup=files(**{"c.json": b"\xff"}))
    add("write_hf_config under a file", lambda ws: fg.write_hf_config(TINY, ws / "f/config.json"), E("f"), "config.py",
        setup=files(f="x"))
    return cases


# ----------------------------------------------------------------------------- main


def run_census(only: str | None = None) -> list[Result]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = Path(tempfile.mkdtemp(prefix="fgpt_census_"))
    try:
        F = root / "fixtures"
        make_fixtures(F)
        from census_api import face_cases  # the faces' cases (it imports this module's Case and checks)

        cases = cli_cases() + api_cases() + face_cases()
        if only:
            cases = [c for c in cases if only in c.name]
        return [run_case(case, F, root / "cases" / f"{i:03d}") for i, case in enumerate(cases)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(results: list, show_all: bool, *, classes=CLASSES, column=("owner", 16, lambda r: r.case.owner)) -> str:
    """The census's table (the rows not clean or correct; every row with show_all), its
    totals in `classes` and its slowest cases. column: (header, width, row -> text), the
    table's third column. The censuses of the server and of data-parallel runs print theirs
    with it too."""
    header, size, cell = column
    width = min(62, max((len(r.case.name) for r in results), default=4))
    lines = [f"{'case':<{width}}  {'class':<9}  {header:<{size}}  message"]
    for r in results:
        if show_all or r.cls not in ("clean", "correct"):
            lines.append(f"{r.case.name[:width]:<{width}}  {r.cls:<9}  {str(cell(r))[:size]:<{size}}  "
                         f"{first_line(r.message)[:150]}")
    counts = {c: sum(r.cls == c for r in results) for c in classes}
    lines += ["", f"{len(results)} cases: " + ", ".join(f"{n} {c}" for c, n in counts.items())]
    slow = sorted(results, key=lambda r: -r.seconds)[:3]
    lines.append("slowest: " + ", ".join(f"{r.case.name} {r.seconds:.1f}s" for r in slow))
    return "\n".join(lines)


def arguments(argv=None) -> argparse.Namespace:
    """The censuses' flags: --only SUBSTRING, --all."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--all", action="store_true", help="print every row, not only the failures")
    return parser.parse_args(argv)


def main_cli(argv=None) -> int:
    args = arguments(argv)
    t0 = time.time()
    results = run_census(args.only)
    print(report(results, args.all))
    print(f"{time.time() - t0:.0f} s")
    return 0 if all(r.cls in ("clean", "correct") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main_cli())

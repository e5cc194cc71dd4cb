"""Data-parallel census (maintainers): run hostile 2-rank torchrun jobs, each rank given
its own flags, environment and files, and classify what each job gets.

    python tools/census_distributed.py [--only SUBSTRING] [--all]

Each case is one `torchrun --nproc_per_node 2` job on 127.0.0.1 (gloo on the loopback, one
thread per rank) in a fresh temp directory, beside read-only fixtures: a tiny model's
weights and variants of them, prepared data and variants, a 2-rank checkpoint at step 2,
and the reference (the same 2-rank job run to step 3). Rank r runs `fgpt train` with its
own argv and environment changes (a `python -c` shim under torchrun --no-python). Only
what the ranks write counts as theirs (torchrun --tee prefixes it); torchrun's own report
(a ChildFailedError traceback whenever a rank exits non-zero) gives each rank's exit
status. Classes:

- clean: the job stops; every rank exits with status 2 by itself (no kill by torchrun);
  exactly one error line, from rank 0, naming the culprit; no traceback or abort;
- correct: the job trains, and rank 0's run ends at step 3 with the reference's params,
  bit for bit;
- traceback: a rank printed a traceback, aborted (SIGABRT, std::terminate) or crashed;
- wrong: anything else: trained where it should have stopped, stopped where it should
  have trained, no or several error lines, an error from another rank or not naming the
  culprit, a rank killed, a wrong result;
- hang: not ended within the case's timeout (its launcher and ranks are killed);
- data loss: a file that existed before a failed job is changed or gone, or a fixture
  changed at all.

Prints a table (the rows that are neither clean nor correct; every row with --all) and
the totals; exits 1 unless every case is clean or correct. About 5 minutes on 2 cores.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import functional_gpt as fg  # noqa: E402
from bad_input_census import arguments, fingerprint, first_line, lost, report  # noqa: E402

CLASSES = ("clean", "correct", "traceback", "wrong", "hang", "data loss")
TINY = fg.GPTConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                    embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
STEPS = 3

# Rank r runs `fgpt` with its own argv and environment: sys.argv[1] is JSON, one
# {"argv": [...], "env": {name: value or null (unset)}} per rank.
PER_RANK = ("import json, os, sys; me = json.loads(sys.argv[1])[int(os.environ['RANK'])]; "
            "[os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v) for k, v in me['env'].items()]; "
            "from functional_gpt.cli import main; sys.exit(main(me['argv']))")


# ----------------------------------------------------------------------------- cases


@dataclass
class Rank:
    argv: list[str]  # fgpt's argv ({F}: the fixtures, {W}: the case's directory)
    env: dict = field(default_factory=dict)  # environment changes (None: unset)


@dataclass
class Case:
    name: str
    ranks: tuple[Rank, Rank]
    culprit: str | None  # rank 0's one error line must hold this; None: the job must train
    out: str = "{W}/run"  # rank 0's run directory, checked when the job trains
    setup: Callable | None = None  # fn(W, F) before the job
    timeout: float = 90.0


@dataclass
class Result:
    case: Case
    cls: str
    message: str
    seconds: float


BASE = dict(data="{F}/data", init="{F}/init.safetensors", out="{W}/run", batch_size=4, context_length=16,
            max_steps=STEPS, decay_steps=STEPS, warmup_steps=1, lr=0.01, min_lr=0.001, eval_interval=1,
            eval_windows=0, sample_tokens=0, device="cpu", dtype="float32")


def fresh(*more: str, env: dict | None = None, **changes) -> Rank:
    """The base run with `changes` (None drops a flag, True/False turn a switch on/off)."""
    argv = ["train"]
    for key, value in (BASE | changes).items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return Rank(argv + list(more), env or {})


def resume(run: str, *more: str) -> Rank:
    return Rank(["train", "--resume", run, "--max_steps", str(STEPS), *more])


def copy(*pairs: tuple[str, str]):
    """setup: copy fixture or case paths ({F}, {W}) to case paths."""
    def setup(W: Path, F: Path) -> None:
        for source, target in pairs:
            source, target = Path(fill(source, F, W)), Path(fill(target, F, W))
            (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return setup


def edit_state(run: str, **fields):
    """setup: copy the step-2 checkpoint to `run` and change state.json's `fields`."""
    def setup(W: Path, F: Path) -> None:
        copy(("{F}/run2", run))(W, F)
        path = Path(fill(run, F, W)) / "state.json"
        state = json.loads(path.read_text())
        for key, value in fields.items():
            state[key] = value(state[key]) if callable(value) else value
        path.write_text(json.dumps(state))
    return setup


def flip_byte(hex_text: str, i: int) -> str:
    data = bytearray.fromhex(hex_text)
    data[i] ^= 0xFF
    return data.hex()


def differs(label: str, a, b) -> str:
    return f"error: {label} differs across ranks: rank 0 has {a}, rank 1 has {b}"


def cases() -> list[Case]:
    same = fresh()
    one_rank = lambda name, rank1, culprit, **kw: Case(name, (same, rank1), culprit, **kw)
    return [
        # -------------------------------------------- a flag differs on rank 1
        one_rank("float --lr", fresh(lr=0.005), differs("--lr", 0.01, 0.005)),
        one_rank("float --weight_decay", fresh(weight_decay=0.0), differs("--weight_decay", 0.1, 0.0)),
        one_rank("float --beta2", fresh(beta2=0.99), differs("--beta2", 0.95, 0.99)),
        one_rank("float --grad_clip 0 (off)", fresh(grad_clip=0), differs("--grad_clip", 1.0, 0.0)),
        one_rank("float --dropout on one rank", fresh(dropout=0.1), differs("--dropout", None, 0.1)),
        one_rank("int --seed", fresh(seed=1), differs("--seed", 0, 1)),
        one_rank("int --max_steps", fresh(max_steps=4), differs("--max_steps", 3, 4)),
        one_rank("int --batch_size", fresh(batch_size=8), differs("--batch_size", 4, 8)),
        one_rank("int --grad_accum", fresh(grad_accum=2), differs("--grad_accum", 1, 2)),
        one_rank("int --context_length", fresh(context_length=8), differs("--context_length", 16, 8)),
        one_rank("int --stride", fresh(stride=8), differs("--stride", 16, 8)),
        one_rank("int --warmup_steps", fresh(warmup_steps=2), differs("--warmup_steps", 1, 2)),
        one_rank("int --eval_interval", fresh(eval_interval=2), differs("--eval_interval", 1, 2)),
        one_rank("int --eval_windows", fresh(eval_windows=4), differs("--eval_windows", 0, 4)),
        one_rank("bool --shard_optimizer on one rank", fresh(shard_optimizer=True),
                 differs("--shard_optimizer", False, True)),
        one_rank("bool --compile on one rank", fresh(compile=True), differs("--compile", False, True)),
        one_rank("str --dtype", fresh(dtype="bfloat16"), differs("--dtype", "float32", "bfloat16")),
        one_rank("str --preset, no --init on rank 1", fresh(init=None, preset="cpu-tiny"),
                 differs("--preset", "cpu-small", "cpu-tiny")),
        one_rank("--init differs in one value", fresh(init="{F}/other.safetensors"),
                 "error: --init h.1.mlp.c_proj.bias differs across ranks: rank 0 has crc32 "),
        one_rank("--init of another width", fresh(init="{F}/wide.safetensors"), differs("the model's n_embd", 32, 48)),
        one_rank("--data of other tokens", fresh(data="{F}/data_other"),
                 "error: --data train.bin differs across ranks: rank 0 has 4,000 tokens (crc32 "),
        one_rank("--config giving another --lr", fresh("--config", "{F}/lr.json", lr=None),
                 differs("--lr", 0.01, 0.005)),
        # -------------------------------------------- what may differ: the job trains
        Case("the same flags", (same, same), None),
        one_rank("--data a copy at another path", fresh(data="{F}/data_copy"), None),
        one_rank("--init a copy at another path", fresh(init="{F}/init_copy.safetensors"), None),
        one_rank("--out elsewhere on rank 1 (rank 0 writes)", fresh(out="{W}/elsewhere"), None),
        one_rank("--sample_tokens on rank 1", fresh(sample_tokens=4), None),
        one_rank("--checkpoint_activations on rank 1", fresh(checkpoint_activations=True), None),
        one_rank("--device cpu:0 on rank 1", fresh(device="cpu:0"), None),
        # -------------------------------------------- a failure on one rank
        one_rank("--config missing on rank 1", fresh("--config", "{F}/missing.json"),
                 "error: rank 1: {F}/missing.json: cannot read"),
        one_rank("--config garbled on rank 1", fresh("--config", "{F}/garbled.json"),
                 "error: rank 1: {F}/garbled.json: not valid JSON"),
        one_rank("--data missing on rank 1", fresh(data="{F}/none"), "error: rank 1: {F}/none"),
        one_rank("--data odd-sized train.bin on rank 1", fresh(data="{F}/data_odd"),
                 "error: rank 1: {F}/data_odd/train.bin"),
        one_rank("--init missing on rank 1", fresh(init="{F}/none.safetensors"), "error: rank 1: {F}/none.safetensors"),
        one_rank("--init garbage on rank 1", fresh(init="{F}/garbage.safetensors"),
                 "error: rank 1: {F}/garbage.safetensors"),
        one_rank("--lr -1 on rank 1", fresh(lr=-1), "error: rank 1: --lr: expected a finite number > 0"),
        one_rank("--dtype float16 on rank 1 (CPU)", fresh(dtype="float16"), "error: rank 1: --dtype float16"),
        one_rank("--device mps on rank 1", fresh(device="mps"), "error: rank 1: --device mps"),
        one_rank("--context_length beyond the model on rank 1", fresh(context_length=64),
                 "error: rank 1: --context_length 64 does not fit"),
        one_rank("--batch_size 3 on rank 1", fresh(batch_size=3), "error: rank 1: --batch_size 3 does not split"),
        Case("--batch_size 3 on both", (fresh(batch_size=3), fresh(batch_size=3)),
             "error: --batch_size 3 does not split evenly over 2 processes"),
        one_rank("--out holding a run on rank 1", fresh(out="{W}/held"), "error: rank 1: {W}/held: already holds a run",
                 setup=copy(("{F}/run2", "{W}/held"))),
        Case("--out a file on rank 0", (fresh(out="{W}/file"), same), "error: {W}/file: exists and is not a directory",
             setup=lambda W, F: (W / "file").write_text("keep me")),
        # -------------------------------------------- resume
        Case("--resume two copies of one checkpoint", (resume("{W}/a"), resume("{W}/b")), None, out="{W}/a",
             setup=copy(("{F}/run2", "{W}/a"), ("{F}/run2", "{W}/b"))),
        Case("--resume on rank 0 only", (resume("{W}/a"), fresh(out="{W}/new")), differs("--resume", True, False),
             setup=copy(("{F}/run2", "{W}/a"))),
        Case("--resume --max_steps differs", (resume("{W}/a"), resume("{W}/b", "--max_steps", "4")),
             differs("--max_steps", 3, 4), setup=copy(("{F}/run2", "{W}/a"), ("{F}/run2", "{W}/b"))),
        Case("--resume checkpoints at other steps", (resume("{W}/a", "--max_steps", "4"),
                                                     resume("{W}/b", "--max_steps", "4")),
             differs("the starting step", 2, 3), setup=copy(("{F}/run2", "{W}/a"), ("{F}/ref", "{W}/b"))),
        Case("--resume --shard_optimizer on one rank", (resume("{W}/a"), resume("{W}/b", "--shard_optimizer")),
             differs("--shard_optimizer", False, True), setup=copy(("{F}/run2", "{W}/a"), ("{F}/run2", "{W}/b"))),
        Case("--resume, sharded, best_val_loss edited on rank 1",
             (resume("{W}/a", "--shard_optimizer"), resume("{W}/b", "--shard_optimizer")),
             "error: the best validation loss differs across ranks",
             setup=lambda W, F: (copy(("{F}/run2", "{W}/a"))(W, F), edit_state("{W}/b", best_val_loss=9.0)(W, F))),
        Case("--resume, RNG state edited on rank 1", (resume("{W}/a"), resume("{W}/b")),
             "error: the RNG state differs across ranks",
             setup=lambda W, F: (copy(("{F}/run2", "{W}/a"))(W, F),
                                 edit_state("{W}/b", rng=lambda r: {**r, "torch": flip_byte(r["torch"], 100)})(W, F))),
        Case("--resume, state.json garbled on rank 1", (resume("{W}/a"), resume("{W}/b")),
             "error: rank 1: {W}/b/state.json: not valid JSON",
             setup=lambda W, F: (copy(("{F}/run2", "{W}/a"), ("{F}/run2", "{W}/b"))(W, F),
                                 (W / "b" / "state.json").write_text("{"))),
        Case("--resume a missing run on rank 1", (resume("{W}/a"), resume("{W}/none")),
             "error: rank 1: {W}/none: no such run directory", setup=copy(("{F}/run2", "{W}/a"))),
        # -------------------------------------------- the environment
        one_rank("WORLD_SIZE=3 on rank 1", fresh(env={"WORLD_SIZE": "3"}), differs("WORLD_SIZE", 2, 3)),
        Case("no MASTER_ADDR on either rank", (fresh(env={"MASTER_ADDR": None}), fresh(env={"MASTER_ADDR": None})),
             "error: environment: WORLD_SIZE=2 without MASTER_ADDR"),
        Case("MASTER_PORT not a number on either rank", (fresh(env={"MASTER_PORT": "x"}),
                                                         fresh(env={"MASTER_PORT": "x"})),
             "error: environment: MASTER_PORT='x' is not a port number"),
        one_rank("RANK=2 on rank 1 (beyond WORLD_SIZE)", fresh(env={"RANK": "2"}),
                 "error: a process outside the job's ranks: environment: RANK=2 does not fit WORLD_SIZE=2"),
        one_rank("RANK not a number on rank 1", fresh(env={"RANK": "x"}),
                 "error: a process outside the job's ranks: environment: RANK='x' is not a count"),
        Case("LOCAL_RANK not a number on rank 0", (fresh(env={"LOCAL_RANK": "x"}), same),
             "error: a process outside the job's ranks: environment: LOCAL_RANK='x' is not a count"),
        one_rank("LOCAL_RANK=7 on rank 1 (CPU: unused)", fresh(env={"LOCAL_RANK": "7"}), None),
    ]


# ----------------------------------------------------------------------------- fixtures


def make_fixtures(F: Path) -> None:
    """The read-only files the cases start from (see the module docstring)."""
    F.mkdir(parents=True)
    params = fg.init_params(TINY, seed=1)
    fg.save_params(F / "init.safetensors", params, TINY)
    shutil.copy(F / "init.safetensors", F / "init_copy.safetensors")
    params["h"][1]["mlp"]["c_proj"]["bias"][5] += 1e-3
    fg.save_params(F / "other.safetensors", params, TINY)
    wide = fg.GPTConfig(**{**TINY.to_dict(), "n_embd": 48})
    fg.save_params(F / "wide.safetensors", fg.init_params(wide, seed=1), wide)
    (F / "garbage.safetensors").write_bytes(b"not a safetensors file")
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 4400).astype("<u2")
    for name, train in [("data", tokens[:4000]), ("data_copy", tokens[:4000]), ("data_other", tokens[:4000][::-1]),
                        ("data_odd", None)]:
        (F / name).mkdir()
        tokens[4000:].tofile(F / name / "val.bin")
        if train is None:
            (F / name / "train.bin").write_bytes(b"\0" * 8001)
        else:
            train.copy().tofile(F / name / "train.bin")
    (F / "garbled.json").write_text("{")
    (F / "lr.json").write_text(json.dumps({"lr": 0.005}))
    for name, steps in (("run2", 2), ("ref", STEPS)):
        rank = fresh(out=f"{F}/{name}", max_steps=steps)
        job = run_job((rank, rank), F, F, timeout=120)
        if job.returncode != 0 or not (F / name / "state.json").is_file():
            raise SystemExit(f"fixture {name}: the 2-rank job failed:\n{job.stderr[-3000:]}")


# ----------------------------------------------------------------------------- running


@dataclass
class Job:
    returncode: int | None  # None: killed on its timeout
    stderr: str  # the launcher's stdout and stderr, the ranks' lines prefixed [default<r>]:
    seconds: float


def fill(text: str, F: Path, W: Path) -> str:
    return text.replace("{F}", str(F)).replace("{W}", str(W))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(ranks: tuple[Rank, Rank], F: Path, W: Path, timeout: float) -> Job:
    """One 2-rank torchrun job on 127.0.0.1, rank r running fgpt with ranks[r]'s argv and
    environment; killed, launcher and ranks, after `timeout` seconds."""
    spec = [{"argv": [fill(a, F, W) for a in r.argv], "env": r.env} for r in ranks]
    logs = Path(tempfile.mkdtemp(prefix="fgpt_census_logs_"))
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--tee", "3", "--log-dir", str(logs), "--no-python",
            sys.executable, "-c", PER_RANK, json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=W,
                           start_new_session=True)
    try:
        output, _ = job.communicate(timeout=timeout)
        code = job.returncode
    except subprocess.TimeoutExpired:
        kill_job(job.pid)
        output, _ = job.communicate()
        code = None
    shutil.rmtree(logs, ignore_errors=True)
    return Job(code, output, time.perf_counter() - t0)


def kill_job(launcher: int) -> None:
    """SIGKILL the launcher and every process below it (torchrun starts each rank in a
    session of its own, which killing the launcher's process group would miss)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    below, grew = {launcher}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in below} - below
        below |= more
        grew = bool(more)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_case(case: Case, F: Path, W: Path) -> Result:
    W.mkdir(parents=True)
    if case.setup:
        case.setup(W, F)
    before_w, before_f = fingerprint(W, True), fingerprint(F, False)
    job = run_job(case.ranks, F, W, case.timeout)
    after_w, after_f = fingerprint(W, True), fingerprint(F, False)
    gone = [f"fixture {k}" for k in lost(before_f, after_f)] + (lost(before_w, after_w) if job.returncode else [])
    if gone:
        return Result(case, "data loss", f"changed or gone: {', '.join(gone[:4])}", job.seconds)
    return Result(case, *classify(case, job, F, W), job.seconds)


def classify(case: Case, job: Job, F: Path, W: Path) -> tuple[str, str]:
    if job.returncode is None:
        return "hang", f"not ended in {case.timeout:g} s"
    ranks = [(int(m[1]), m[2]) for m in re.finditer(r"^\[default(\d+)\]:(.*)$", job.stderr, re.M)]
    crash = next((text for _, text in ranks if any(s in text for s in ("Traceback", "terminate called",
                                                                       "Fatal Python error"))), None)
    exits = re.findall(r"^  exitcode +: (\S+)", job.stderr, re.M)
    if crash or any(code in ("-6", "-11") for code in exits) or "SIGABRT" in job.stderr:
        return "traceback", first_line(crash or f"exit statuses {exits}")
    errors = [(rank, text) for rank, text in ranks if text.startswith("fgpt train: error")]
    if case.culprit is None:
        if job.returncode != 0:
            return "wrong", f"refused: {first_line(errors[0][1]) if errors else f'exit statuses {exits}'}"
        reason = reference_mismatch(Path(fill(case.out, F, W)), F / "ref")
        return ("wrong", reason) if reason else ("correct", f"trained to step {STEPS}, the reference's params")
    culprit = fill(case.culprit, F, W)
    if job.returncode == 0:
        return "wrong", f"trained; expected an error naming {culprit!r}"
    if len(errors) != 1 or errors[0][0] != 0:
        return "wrong", f"error lines {[f'rank {r}: {t}' for r, t in errors] or 'none'}; exit statuses {exits}"
    if sorted(exits) != ["2", "2"]:
        return "wrong", f"exit statuses {exits} (2 on every rank expected): {errors[0][1]}"
    if culprit not in errors[0][1]:
        return "wrong", f"does not name {culprit!r}: {errors[0][1]}"
    return "clean", errors[0][1]


def reference_mismatch(run: Path, ref: Path) -> str | None:
    """Why `run` is not the reference run (None if it is): the step, then each tensor."""
    try:
        step = json.loads((run / "state.json").read_text())["step"]
        got, expected = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    except (OSError, ValueError, KeyError) as e:
        return f"{run}: no finished run ({e})"
    if step != STEPS:
        return f"{run}: at step {step}, not {STEPS}"
    differing = [k for k in expected if k not in got or not torch.equal(got[k], expected[k])]
    return f"{run}: params differ from the reference's: {differing[:3]}" if differing else None


# ----------------------------------------------------------------------------- main


def run_census(only: str | None = None) -> list[Result]:
    root = Path(tempfile.mkdtemp(prefix="fgpt_census_dp_"))
    try:
        F = root / "fixtures"
        make_fixtures(F)
        chosen = [c for c in cases() if not only or only in c.name]
        return [run_case(case, F, root / "cases" / f"{i:03d}") for i, case in enumerate(chosen)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main_cli(argv=None) -> int:
    args = arguments(argv)
    t0 = time.time()
    results = run_census(args.only)
    print(report(results, args.all, classes=CLASSES, column=("s", 4, lambda r: f"{r.seconds:4.1f}")))
    print(f"{time.time() - t0:.0f} s")
    return 0 if all(r.cls in ("clean", "correct") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main_cli())

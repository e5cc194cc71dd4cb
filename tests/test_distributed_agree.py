"""Ranks agree on everything or stop: at the start of a data-parallel run every rank's
resolved flags, model, starting state, data and weights are compared (training/loop.py
`_facts`, distributed.py `start_together`), and a rank that differs or fails stops them
all with one line from rank 0, exit status 2 on every rank, within seconds.

In-process: the verdict on the ranks' words, what `_facts` compares, and two ranks (two
threads) meeting through a real TCPStore on 127.0.0.1, as torchrun's agent store. Then
real `torchrun --nproc_per_node 2` jobs whose ranks are given their own flags, each
bounded in time and killed with its process group on a timeout.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

import functional_gpt.training.loop as loop
from functional_gpt import load_params, save_params
from functional_gpt.device import cpu_has_bf16
from functional_gpt.errors import AgreedError, UserError
from functional_gpt.training import distributed
from functional_gpt.training.distributed import World, disagreement, start_together, stop_together
from functional_gpt.training.loop import train
from functional_gpt.training.settings import make_config, resume_config

from conftest import TINY, hf_model, params_of, random_token_data
from test_distributed import as_argv, finished, flags, free_port, start, torchrun_argv

JOB_SECONDS = 60  # a job ends within seconds; the rendezvous and gloo timeouts are 10 minutes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(data_dir, init_file, other_init): random tokens, trained-like weights, and the same
    weights with one value of h.1.mlp.c_proj.bias changed."""
    root = tmp_path_factory.mktemp("agree")
    data = random_token_data(root / "data", TINY.vocab_size, 4000, 400)
    params = params_of(hf_model(TINY, seed=1))
    init, other = root / "init.safetensors", root / "other.safetensors"
    save_params(init, params, TINY)
    params["h"][1]["mlp"]["c_proj"]["bias"][5] += 1e-3
    save_params(other, params, TINY)
    return data, init, other


# ------------------------------------------------------------------ the verdict


def words(*facts_or_errors, size: int = 2) -> dict:
    return {rank: {"world_size": size, **({"error": w} if isinstance(w, str) else {"facts": w})}
            for rank, w in enumerate(facts_or_errors)}


def test_the_verdict_names_the_first_difference_or_the_first_error():
    same = {"--lr": 0.0006, "--max_steps": 3}
    assert disagreement(words(same, dict(same))) is None
    assert disagreement(words(same, same | {"--lr": 0.001, "--max_steps": 4})) == \
        "--lr differs across ranks: rank 0 has 0.0006, rank 1 has 0.001"
    assert disagreement(words(same, same, same | {"--max_steps": 4})) == \
        "--max_steps differs across ranks: rank 0 has 3, rank 2 has 4"
    assert disagreement(words(same, same | {"--extra": None})) == \
        "--extra differs across ranks: rank 0 has nothing, rank 1 has None"
    assert disagreement(words(same, "x.json: cannot read", "y")) == "rank 1: x.json: cannot read"
    assert disagreement(words("--batch_size 3 does not split", "--batch_size 3 does not split")) == \
        "--batch_size 3 does not split"  # every rank met it alike: no rank named
    assert disagreement(words("a", "b")) == "rank 0: a"
    mixed = words(same, same) | {1: {"world_size": 3, "facts": same}}
    assert disagreement(mixed) == "WORLD_SIZE differs across ranks: rank 0 has 2, rank 1 has 3"


# ------------------------------------------------------- what the ranks compare


def facts_of(files, tmp_path, resume: bool = False, **overrides) -> dict:
    """What rank 1 of 2 would post for a run into tmp_path/out (or resuming it), flags
    changed by `overrides`."""
    data, init, _ = files
    if resume:
        cfg = resume_config(overrides.pop("out", tmp_path / "out"), overrides)
    else:
        cfg = make_config(flags(data, init, tmp_path / "out", max_steps=3) | overrides)
    return loop._facts(loop._start(cfg, World(1, 2, 1), resume=resume, log=lambda *a: None), resume)


def differences(a: dict, b: dict) -> list[str]:
    return [label for label in a | b if a.get(label, "missing") != b.get(label, "missing")]


def test_every_setting_that_changes_the_run_is_compared_and_where_a_rank_reads_is_not(files, tmp_path):
    data, init, other = files
    base = facts_of(files, tmp_path)
    copies = tmp_path / "copies"
    shutil.copytree(data, copies / "data")
    shutil.copy(init, copies / "init.safetensors")
    # Another path to the same bytes, another --out, rank 0's sampling, recomputed activations.
    assert differences(base, facts_of(files, tmp_path, data=str(copies / "data"), init=str(copies / "init.safetensors"),
                                      out=str(tmp_path / "elsewhere"), sample_tokens=8,
                                      checkpoint_activations=True)) == []
    for field, value in [("lr", 0.001), ("seed", 1), ("grad_accum", 2), ("batch_size", 6), ("context_length", 8),
                         ("dtype", "bfloat16"), ("dropout", 0.1), ("shard_optimizer", True), ("max_steps", 4),
                         ("weight_decay", 0.0), ("eval_windows", 2), ("compile", True)]:
        assert differences(base, facts_of(files, tmp_path, **{field: value}))[0] == f"--{field}", field
    assert differences(base, facts_of(files, tmp_path, init=str(other))) == ["--init h.1.mlp.c_proj.bias"]
    assert base["--init h.1.mlp.c_proj.bias"] == \
        f"crc32 {distributed.crc32(load_params(init)[0]['h'][1]['mlp']['c_proj']['bias']):08x}"
    tokens = np.fromfile(data / "train.bin", dtype="<u2")
    assert base["--data train.bin"] == f"4,000 tokens (crc32 {zlib.crc32(tokens.tobytes()):08x})"


def test_what_is_compared_is_named_as_a_difference_is_reported_in_that_order(files, tmp_path):
    """Past the flags: the labels word for word and in order, with the values a fresh
    float32 run on the CPU starts from (the CRC-32s only in form: their contents are
    compared above)."""
    facts = facts_of(files, tmp_path)
    crc = re.compile(r"crc32 [0-9a-f]{8}")
    rest = {k: v for k, v in facts.items() if not k.startswith("--")}
    assert list(rest) == ["the device kind", "the compute dtype", *(f"the model's {k}" for k in TINY.to_dict()),
                          "the starting step", "the data position", "the RNG state", "the loss scale",
                          "the best validation loss", "Adam's moments"]
    assert rest["the device kind"] == "cpu" and rest["the compute dtype"] == "float32"
    assert {k.removeprefix("the model's "): v for k, v in rest.items() if k.startswith("the model's")} == \
        TINY.to_dict() | {f"{p}_pdrop": 0.0 for p in ("embd", "attn", "resid")}  # the run's --dropout 0
    assert rest["the starting step"] == 0 and rest["the data position"] == [0, 0]
    assert rest["the loss scale"] is None and rest["the best validation loss"] is None
    assert crc.fullmatch(rest["the RNG state"]) and crc.fullmatch(rest["Adam's moments"])
    val = np.fromfile(files[0] / "val.bin", dtype="<u2")
    assert facts["--data val.bin"] == f"400 tokens (crc32 {zlib.crc32(val.tobytes()):08x})"
    bf16 = "bfloat16" if cpu_has_bf16() else "float32"  # --dtype bfloat16 falls back on a CPU without it
    assert facts_of(files, tmp_path, dtype="bfloat16")["the compute dtype"] == bf16
    fresh = facts_of(files, tmp_path, init=None, preset="cpu-tiny")  # weights of the seed, not a file
    assert [k for k in fresh if "wte" in k] == ["the initial wte.weight"]
    assert crc.fullmatch(fresh["the initial wte.weight"])


def test_a_resumed_state_is_compared_by_its_contents(files, tmp_path):
    """Two copies of one checkpoint agree wherever they lie; a resume against a fresh
    start differs first in --resume; a checkpoint a step further differs in its step."""
    data, init, _ = files
    run = tmp_path / "out"
    values = flags(data, init, run, max_steps=2, eval_interval=1)
    train(make_config(values), progress=False, log=lambda *a: None)
    shutil.copytree(run, tmp_path / "copy")
    resumed = facts_of(files, tmp_path, resume=True, max_steps=4)
    assert differences(resumed, facts_of(files, tmp_path, resume=True, out=tmp_path / "copy", max_steps=4)) == []
    assert differences(resumed, facts_of(files, tmp_path / "fresh", max_steps=4))[0] == "--resume"
    train(resume_config(run, {"max_steps": 3}), resume=True, progress=False, log=lambda *a: None)
    later = differences(facts_of(files, tmp_path, resume=True, out=tmp_path / "copy", max_steps=4),
                        facts_of(files, tmp_path, resume=True, max_steps=4))
    assert later[0] == "the starting step" and "the checkpoint's wte.weight" in later


# --------------------------------------------- two ranks meet through a real store


@pytest.fixture
def endpoint(monkeypatch):
    """A TCPStore on 127.0.0.1 standing in for torchrun's agent store (each rank a client of
    it, as under torchrun). The ranks here are threads of this process, which must not
    ignore SIGTERM (nor can from a thread): stop_together's signal.signal is left out
    (the torchrun jobs below see its effect: status 2 on every rank). A rank waits 20 s
    for the others, not 10 minutes."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setattr(distributed.signal, "signal", lambda *args: None)
    monkeypatch.setattr(distributed, "TIMEOUT", timedelta(seconds=20))  # a broken exchange ends the test
    yield server


def env_of(rank, size: int = 2) -> dict:
    """The environment torchrun gives `rank`, at the endpoint fixture's store."""
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": "0"} | \
        {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")}


def rank_starts(rank: int, facts: dict, *, size: int = 2, fails: str | None = None):
    """-> a function that runs `start_together` as `rank` would: its value, or what it raised."""
    world = World(rank, size, rank)

    def prepare():
        if fails:
            raise UserError(fails)
        return f"rank {rank} ready"

    return lambda: start_together(world, distributed.meet(world), prepare, lambda value: facts)


def both(*ranks) -> list:
    """Run the ranks at once, each in its own thread: -> what each returned or raised
    (within the endpoint's 20 s)."""
    with ThreadPoolExecutor(len(ranks)) as pool:
        futures = [pool.submit(rank) for rank in ranks]
        return [f.exception(timeout=30) or f.result() for f in futures]


def said(outcomes) -> list[str]:
    assert all(isinstance(o, AgreedError) for o in outcomes), outcomes
    return [str(o) for o in outcomes]


def test_ranks_that_agree_go_on_and_a_difference_stops_both_alike(endpoint, monkeypatch):
    """Then, in the next torchrun attempt (a restart: the same store), the ranks hear
    only each other's new words."""
    same = {"--lr": 0.0006}
    assert both(rank_starts(0, same), rank_starts(1, same)) == ["rank 0 ready", "rank 1 ready"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert said(both(rank_starts(0, same), rank_starts(1, {"--lr": 0.001}))) == \
        ["--lr differs across ranks: rank 0 has 0.0006, rank 1 has 0.001"] * 2


def test_an_error_on_one_rank_stops_the_other(endpoint):
    assert said(both(rank_starts(0, {}), rank_starts(1, {}, fails="data/train.bin: no such file"))) == \
        ["rank 1: data/train.bin: no such file"] * 2


def test_a_crash_on_one_rank_stops_the_other_and_stays_that_ranks_own(endpoint):
    """A bug or an out-of-memory while preparing raises on its rank, as it is (a
    traceback there), and the other stops in one line naming it."""
    world = World(1, 2, 1)

    def crash():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")

    outcomes = both(rank_starts(0, {}), lambda: start_together(world, distributed.meet(world), crash, dict))
    assert str(outcomes[0]) == "rank 1: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert isinstance(outcomes[0], AgreedError) and type(outcomes[1]) is torch.OutOfMemoryError


def test_an_error_before_the_start_reaches_the_others_and_a_later_one_stays_the_ranks_own(endpoint):
    """A rank that failed reading its flags (cli.main hands the error to stop_together)
    takes its place at the start: the other stops in the same line. An error once the
    rank has spoken at the start is its own, returned as it is."""
    missing = UserError("run.json: cannot read (No such file or directory)")
    outcomes = both(rank_starts(0, {}), lambda: stop_together(missing, env_of(1)))
    assert said(outcomes) == ["rank 1: run.json: cannot read (No such file or directory)"] * 2
    later = UserError("disk full")
    assert stop_together(later, env_of(1)) is later and stop_together(later, env_of(0, size=1)) is later
    agreed = AgreedError("every rank")
    assert stop_together(agreed, env_of(1)) is agreed


def test_a_process_whose_rank_names_no_rank_of_the_job_stops_it_from_outside(endpoint):
    """RANK=2 in a job of 2 (a wrapper that sets it wrongly): the process cannot take a
    rank's place, yet rank 0, waiting for rank 1, hears it and stops; a process with no
    job to reach (nothing listening) says its own error."""
    wrong = UserError("environment: RANK=2 does not fit WORLD_SIZE=2")
    assert said(both(rank_starts(0, {}), lambda: stop_together(wrong, env_of(2)))) == \
        ["a process outside the job's ranks: environment: RANK=2 does not fit WORLD_SIZE=2"] * 2
    assert stop_together(wrong, env_of(2) | {"MASTER_PORT": str(free_port())}) is wrong


def test_a_rank_with_another_world_size_does_not_wait_for_ranks_that_do_not_exist(endpoint):
    began = time.monotonic()
    assert said(both(rank_starts(0, {}), rank_starts(1, {}, size=3))) == \
        ["WORLD_SIZE differs across ranks: rank 0 has 2, rank 1 has 3"] * 2
    assert time.monotonic() - began < 10


# ------------------------------------------------------------- real torchrun jobs

# Each rank runs `fgpt train` with its own argv: sys.argv[1] is JSON, one argv per rank.
PER_RANK = ("import json, os, sys; from functional_gpt.cli import main; "
            "sys.exit(main(json.loads(sys.argv[1])[int(os.environ['RANK'])]))")


def per_rank_job(argvs: list[list[str]], logs) -> tuple[subprocess.CompletedProcess, float]:
    """A 2-rank torchrun job on 127.0.0.1, rank r running `fgpt` with argvs[r], every line a
    rank writes prefixed [default<r>]: -> (the finished job, its stderr only, and its
    wall seconds)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--tee", "3", "--log-dir", str(logs), "--no-python",
            sys.executable, "-c", PER_RANK, json.dumps(argvs)]
    began = time.monotonic()
    job = start(argv)
    err = finished(job, JOB_SECONDS)
    return subprocess.CompletedProcess(argv, job.returncode, "", err), time.monotonic() - began


def assert_one_line_from_rank_0(output: str, expected: str, exits: list[str]) -> None:
    """Exactly `expected` from rank 0 (no error line from another rank), no traceback,
    abort or std::terminate from a rank, and `exits`: every rank's status in torchrun's
    report (no "SIGABRT", no "SIGTERM" kill: each rank ended by itself)."""
    ranks = [line for line in output.splitlines() if re.match(r"\[default\d\]:", line)]
    errors = [line for line in ranks if "error" in line]
    assert errors == [f"[default0]:fgpt train: error: {expected}"], output[-3000:]
    for bad in ("Traceback", "SIGABRT", "terminate called"):
        assert not any(bad in line for line in ranks), output[-3000:]
    assert "SIGABRT" not in output and "Signal 15" not in output, output[-3000:]
    assert sorted(re.findall(r"^  exitcode +: (\S+)", output, re.M)) == exits, output[-3000:]


def train_argv(files, out, **overrides) -> list[str]:
    data, init, _ = files
    return ["train", *as_argv(flags(data, init, out) | overrides)]


@pytest.mark.parametrize("rank0, rank1, expected", [
    (dict(lr=2e-3), dict(lr=1e-2), "--lr differs across ranks: rank 0 has 0.002, rank 1 has 0.01"),
    (dict(max_steps=3), dict(max_steps=4), "--max_steps differs across ranks: rank 0 has 3, rank 1 has 4"),
    ({}, dict(shard_optimizer=True), "--shard_optimizer differs across ranks: rank 0 has False, rank 1 has True"),
    ({}, "other init", "--init h.1.mlp.c_proj.bias differs across ranks: rank 0 has crc32 {}, rank 1 has crc32 {}"),
], ids=["float-lr", "int-max_steps", "bool-shard_optimizer-on-one-rank", "init-one-value"])
def test_a_rank_with_other_flags_or_weights_stops_the_job_in_one_line(files, tmp_path, rank0, rank1, expected):
    """Before: --lr trained silently, --max_steps and another --init aborted rank 0 in
    gloo (SIGABRT), --shard_optimizer on one rank hung for gloo's 10 minutes."""
    data, init, other = files
    if rank1 == "other init":
        bias = lambda f: load_params(f)[0]["h"][1]["mlp"]["c_proj"]["bias"]
        expected = expected.format(*(f"{distributed.crc32(bias(f)):08x}" for f in (init, other)))
        rank1 = dict(init=other)
    out = tmp_path / "run"
    done, seconds = per_rank_job([train_argv(files, out, **rank0), train_argv(files, out, **rank1)], tmp_path / "logs")
    assert done.returncode != 0
    assert_one_line_from_rank_0(done.stderr, expected, ["2", "2"])
    assert seconds < 30 and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("bad, said", [
    (["--config", "{missing}"], r"{missing}: cannot read \(No such file or directory\)"),
    (["--lr", "abc"], r"argument --lr: invalid float value: 'abc' \(see fgpt train --help\)"),
], ids=["config-missing", "flag-unparsable"])
def test_a_rank_that_cannot_read_its_config_stops_the_other_machine(files, tmp_path, bad, said):
    """Two torchrun launchers (--nnodes 2): the rank whose --config is missing, or whose
    flag does not parse, fails in the CLI, before the run starts; the other, with no
    launcher in common to kill it, waited for the 10-minute rendezvous timeout before. Now
    both stop in one line, status 2."""
    missing = tmp_path / "missing.json"
    bad = [arg.replace("{missing}", str(missing)) for arg in bad]
    said = said.replace("{missing}", re.escape(str(missing)))
    launcher = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv_id", "agree"]
    extra = [[], bad]
    began = time.monotonic()
    data, init, _ = files
    argv = as_argv(flags(data, init, tmp_path / "run"))
    nodes = [start(torchrun_argv(argv + e, nproc=1, launcher=launcher)) for e in extra]
    errs = [finished(node, JOB_SECONDS) for node in nodes]
    assert time.monotonic() - began < 40
    lines = [line for err in errs for line in err.splitlines() if "error" in line and line.startswith("fgpt")]
    assert len(lines) == 1 and re.fullmatch(rf"fgpt( train)?: error: rank [01]: {said}", lines[0]), errs
    assert [re.findall(r"^  exitcode +: (\S+)", err, re.M) for err in errs] == [["2"], ["2"]]
    assert not (tmp_path / "run").exists()

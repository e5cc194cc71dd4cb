"""Data-parallel training under torchrun (gloo, CPU), against one process and transformers.

Each run is a real `torchrun ... -m functional_gpt train` on 127.0.0.1 (gloo pinned to the
loopback interface), one torch thread per process, on the tiny model with trained-like
weights and random tokens; every subprocess has a timeout.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import functional_gpt.training.loop as train_module
from functional_gpt import flatten, init_params, load_params, save_params
from functional_gpt.training.data import Position, next_batch
from functional_gpt.training.distributed import World, GradientReducer, my_share, owners, world_from_env
from functional_gpt.errors import UserError
from functional_gpt.training.optim import lr_at
from functional_gpt.training.step import loss_and_grads
from functional_gpt.training.loop import train
from functional_gpt.training.settings import make_config, resume_config

from conftest import TINY, hf_model, params_of, random_token_data, reference_training, without_key_bias

ROOT = Path(__file__).resolve().parents[1]
STEPS, LR, MIN_LR, WARMUP, WD, CLIP = 5, 1e-2, 1e-3, 2, 0.1, 0.05


@pytest.fixture(autouse=True)
def no_loss_plot(monkeypatch):
    monkeypatch.setattr(train_module, "plot_losses", lambda metrics, path: None, raising=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data_dir, init_file): random tokens of the tiny vocabulary, trained-like weights."""
    root = tmp_path_factory.mktemp("dp")
    data = random_token_data(root / "data", TINY.vocab_size, 4000, 400)
    init = root / "init.safetensors"
    save_params(init, params_of(hf_model(TINY, seed=1)), TINY)
    return data, init


def flags(data, init, out, **overrides) -> dict:
    values = dict(data=str(data), init=str(init), out=str(out), batch_size=4, context_length=16, lr=LR,
                  min_lr=MIN_LR, warmup_steps=WARMUP, decay_steps=STEPS, max_steps=STEPS, weight_decay=WD,
                  grad_clip=CLIP, dropout=0.0, eval_interval=STEPS, eval_windows=0, sample_tokens=0,
                  device="cpu", dtype="float32", optimizer="adamw", schedule="cosine")
    return values | overrides


def as_argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return env | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}


def torchrun_argv(train_argv: list[str], *, nproc: int = 2, launcher: list[str] | None = None) -> list[str]:
    launcher = launcher or ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *launcher,
            "-m", "functional_gpt", "train", *train_argv]


def torchrun(train_argv: list[str], *, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """The finished job (its stderr), or a failed test once `timeout` has killed it."""
    job = start(torchrun_argv(train_argv, nproc=nproc))
    err = finished(job, timeout)
    return subprocess.CompletedProcess(job.args, job.returncode, "", err)


def one_process(values: dict, *, resume: bool = False):
    cfg = resume_config(values["out"], values) if resume else make_config(values)
    return train(cfg, resume=resume, progress=False, log=lambda *a: None)


def params(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def assert_same_params(got: dict, expected: dict, rtol: float, what: str) -> None:
    """Per tensor: max |got - expected| <= rtol x max |expected| (the key bias aside: see
    conftest.without_key_bias)."""
    assert set(got) == set(expected)
    for key in expected:
        g, e = (without_key_bias(key, t, TINY.n_embd).double() for t in (got[key], expected[key]))
        error, scale = float((g - e).abs().max()), float(e.abs().max())
        assert error <= rtol * scale, f"{what}: {key} differs by {error:.2e} ({error / scale:.1e} of its scale)"


def reference_batches(data: Path, *, steps: int, windows: int):
    tokens, position, batches = np.fromfile(data / "train.bin", dtype="<u2"), Position(), []
    for _ in range(steps):
        x, y, position = next_batch(tokens, position, batch_size=windows, context_length=16, stride=16, seed=0)
        batches.append((x, y))
    return batches


def closed_form_lrs(steps: int) -> list[float]:
    return [lr_at(s, lr=LR, warmup_steps=WARMUP, decay_steps=STEPS, min_lr=MIN_LR) for s in range(steps)]


def final_val_loss(run: Path) -> float:
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return next(m["final_val_loss"] for m in lines if "final_val_loss" in m)


def logged(run: Path) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


# --------------------------------------------------------- equal to one process


def one_and_two_processes(setup, tmp_path, shard: bool, **settings) -> tuple[Path, Path]:
    """The run of `settings` in one process and on 2 ranks (shard: with --shard_optimizer)
    -> (one, two) run directories, the two's final validation loss checked to be the one's
    within 1e-6 (every rank's share of the windows, all-reduced)."""
    data, init = setup
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(flags(data, init, one, **settings))
    done = torchrun(as_argv(flags(data, init, two, shard_optimizer=shard, **settings)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert final_val_loss(two) == pytest.approx(final_val_loss(one), rel=1e-6)
    return one, two


def moments(run: Path) -> dict:
    """The run's optimizer.safetensors as {"<key>|<moment>": tensor}."""
    stored = load_file(str(run / "optimizer.safetensors"))
    return {f"{k.split('.', 1)[1]}|{k.split('.')[0]}": v for k, v in stored.items()}


@pytest.mark.parametrize("grad_accum, shard", [(1, False), pytest.param(2, False, marks=pytest.mark.slow),
                                                pytest.param(2, True, marks=pytest.mark.slow)],
                         ids=["batch4", "accum2", "accum2-sharded-optimizer"])
def test_two_processes_train_as_one_process_and_as_transformers(setup, tmp_path, grad_accum, shard):
    """--batch_size 4 on 2 ranks (2 windows each) gives, after 5 AdamW steps with clipping
    active at each, the params of --batch_size 4 in one process within 1e-5 of each
    tensor's scale (measured: 5.4e-6, 2.9e-6 with grad_accum 2), the moments within 1e-4
    (3.6e-6), the final validation loss within 1e-6 (2.4e-7 absolute), and the params of
    transformers + torch.optim.AdamW on the same 4 * accum windows per step within 1e-4
    (2.3e-5, as one process's own gap); the logged loss and gradient norm are the global
    ones. With --shard_optimizer each rank holds half the moments, and the checkpoint
    holds them all, equal to the one-process run's."""
    data, init = setup
    one, two = one_and_two_processes(setup, tmp_path, shard, grad_accum=grad_accum)
    assert_same_params(params(two), params(one), 1e-5, "2 processes vs 1")
    assert_same_params(moments(two), moments(one), 1e-4, "moments")
    start = flatten(load_params(init)[0])
    batches = reference_batches(data, steps=STEPS, windows=4 * grad_accum)
    expected, losses, norms = reference_training(start, TINY, batches, lrs=closed_form_lrs(STEPS),
                                                 weight_decay=WD, clip=CLIP)
    assert_same_params(params(two), expected, 1e-4, "2 processes vs transformers")
    for m, loss, norm in zip(logged(two), losses, norms, strict=True):
        assert m["loss"] == pytest.approx(loss, rel=1e-5) and m["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert min(norms) > CLIP


def test_a_muon_run_on_two_processes_with_sharded_moments_is_one_process(setup, tmp_path):
    """--optimizer muon --schedule wsd on 2 ranks, each keeping the moments of its share
    of the tensors (ZeRO-1): the params of one process within 1e-5 of each tensor's scale,
    the final validation loss within 1e-6, and a checkpoint holding every moment (a Muon
    matrix's momentum buffer alone, no second moment), equal to the one-process run's to
    1e-4. (Muon against torch.optim.Muon: tests/test_muon.py.)"""
    one, two = one_and_two_processes(setup, tmp_path, True, optimizer="muon", schedule="wsd")
    assert_same_params(params(two), params(one), 1e-5, "2 processes vs 1")
    matrices = {k for k, t in params(one).items() if t.dim() == 2 and k not in ("wte.weight", "wpe.weight")}
    assert len(matrices) == 4 * TINY.n_layer
    assert set(moments(two)) == {f"{k}|exp_avg" for k in params(one)} | {f"{k}|exp_avg_sq" for k in params(one)
                                                                          if k not in matrices}
    assert_same_params(moments(two), moments(one), 1e-4, "moments")


def adapter_of(run: Path) -> dict:
    """The run's LoRA adapter in our layout (peft stores each matrix transposed)."""
    stored = load_file(str(run / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.transformer.").removesuffix(".weight"): t.t() for k, t in stored.items()}


@pytest.mark.parametrize("shard", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["lora", "lora-sharded-optimizer"])
def test_a_lora_run_on_two_processes_is_one_process_and_peft(setup, tmp_path, shard):
    """--lora_rank 4 on attn.c_attn and mlp.c_fc, 2 ranks of 2 windows: the adapter of one
    process within 1e-5 of each tensor's scale and the final validation loss within 1e-6,
    the moments (all of them, also when each rank kept half) within 1e-4, and peft's LoRA
    on transformers' GPT-2 trained by torch.optim.AdamW on the same windows within 1e-4."""
    from functional_gpt.model.lora import init_adapter
    from functional_gpt.model.lora_files import save_adapter

    from conftest import reference_lora_training

    pytest.importorskip("peft")
    data, init = setup
    one, two = one_and_two_processes(setup, tmp_path, shard, lora_rank=4, lora_alpha=8.0,
                                     lora_targets="attn.c_attn,mlp.c_fc")
    assert_same_params(adapter_of(two), adapter_of(one), 1e-5, "2 processes vs 1")
    assert set(moments(two)) == {f"{k}|{m}" for m in ("exp_avg", "exp_avg_sq") for k in adapter_of(one)}
    assert_same_params(moments(two), moments(one), 1e-4, "moments")
    base = load_params(init)[0]
    save_adapter(tmp_path / "first", init_adapter(base, 4, 8.0, ["attn.c_attn", "mlp.c_fc"], seed=0))
    expected, _, norms = reference_lora_training(flatten(base), TINY, tmp_path / "first",
                                                 reference_batches(data, steps=STEPS, windows=4),
                                                 lrs=closed_form_lrs(STEPS), weight_decay=WD, clip=CLIP)
    assert_same_params(adapter_of(two), expected, 1e-4, "2 processes vs peft")
    assert min(norms) > CLIP  # clipped at every step
    assert not (two / "model.safetensors").exists()


@pytest.mark.slow
def test_a_checkpoint_resumes_with_another_number_of_processes(setup, tmp_path):
    """2 ranks to step 3, then 1 process to step 5; and 1 process to step 3, then 2 ranks
    with --shard_optimizer to step 5: both end at the uninterrupted run's params (1e-5)."""
    data, init = setup
    whole = tmp_path / "whole"
    one_process(flags(data, init, whole))
    two_then_one, one_then_two = tmp_path / "two_then_one", tmp_path / "one_then_two"

    done = torchrun(as_argv(flags(data, init, two_then_one, max_steps=3, eval_interval=3)))
    assert done.returncode == 0, done.stderr[-3000:]
    one_process(flags(data, init, two_then_one, max_steps=STEPS, eval_interval=3), resume=True)
    assert_same_params(params(two_then_one), params(whole), 1e-5, "2 then 1 process")

    one_process(flags(data, init, one_then_two, max_steps=3, eval_interval=3))
    done = torchrun(["--resume", str(one_then_two), "--max_steps", str(STEPS), "--shard_optimizer"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_params(params(one_then_two), params(whole), 1e-5, "1 then 2 processes")
    assert json.loads((one_then_two / "state.json").read_text())["step"] == STEPS


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_checkpoint(setup, tmp_path):
    """Two torchrun launchers (--nnodes 2, one process each) meet through torchrun's c10d
    rendezvous on 127.0.0.1, train and checkpoint: the params of one process (1e-5)."""
    data, init = setup
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(flags(data, init, one))
    launcher = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv_id", "test"]
    argv = torchrun_argv(as_argv(flags(data, init, two)), nproc=1, launcher=launcher)
    nodes = [start(argv) for _ in range(2)]
    errs = [finished(node, 180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for err in errs]
    assert_same_params(params(two), params(one), 1e-5, "2 nodes vs 1 process")
    assert (two / "state.json").exists() and (two / "optimizer.safetensors").exists()


# ------------------------------------------------------------------ bad input


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("fgpt train: error")]


@pytest.mark.parametrize("nproc, batch_size, message", [
    (2, 3, "--batch_size 3 does not split evenly over 2 processes; give a multiple of 2"),
    pytest.param(4, 2, "--batch_size 2 is fewer windows than the 4 processes: each needs at least one; give a "
                       "multiple of 4", marks=pytest.mark.slow),
])
def test_a_batch_the_ranks_cannot_share_is_one_line_from_rank_0(setup, tmp_path, nproc, batch_size, message):
    data, init = setup
    done = torchrun(as_argv(flags(data, init, tmp_path / "run", batch_size=batch_size)), nproc=nproc)
    assert done.returncode != 0
    assert error_lines(done) == [f"fgpt train: error: {message}"]
    assert not (tmp_path / "run").exists()


def test_a_world_without_a_rendezvous_endpoint_is_one_line():
    with pytest.raises(UserError, match=r"^environment: WORLD_SIZE=2 without MASTER_ADDR and MASTER_PORT \(the "
                                        r"rendezvous endpoint\): start data parallel runs with torchrun$"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match=r"^environment: RANK='x' is not a count"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match=r"^environment: RANK=2 does not fit WORLD_SIZE=2$"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    with pytest.raises(UserError, match=r"^environment: MASTER_PORT='x' is not a port number \(1\.\.65535\)$"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"})
    assert world_from_env({}) == World() and world_from_env({"WORLD_SIZE": "1"}) == World()
    env = launch_env() | {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "functional_gpt", "train", "--max_steps", "1"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and error_lines(done) == [
        "fgpt train: error: environment: WORLD_SIZE=2 without MASTER_ADDR and MASTER_PORT (the rendezvous "
        "endpoint): start data parallel runs with torchrun"]


@pytest.mark.parametrize("raised, shown", [
    ("The client socket has timed out after 2s while trying to connect to (127.0.0.1, 1).\n"
     "Exception raised from throwTimeoutError at /pytorch/torch/csrc/distributed/c10d/socket.cpp:1021",
     "The client socket has timed out after 2s while trying to connect to (127.0.0.1, 1)."),
    ("  \n refused\nsecond line", "refused"),
    ("x" * 300, "x" * 200),
    ("", ""),
])
def test_an_endpoint_that_cannot_be_reached_is_one_line_with_the_first_line_of_the_reason(
        tmp_path, monkeypatch, raised, shown):
    """torch's store errors run to many lines (a C++ stack): the message keeps the first, cut at 200 characters."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)

    def unreachable(*args, **kwargs):
        raise RuntimeError(raised)

    monkeypatch.setattr(dist, "rendezvous", unreachable)
    with pytest.raises(UserError) as failed:
        train(make_config({"out": str(tmp_path / "run")}), progress=False, log=lambda *a: None)
    assert str(failed.value) == f"data parallel: cannot reach the rendezvous endpoint ({shown})"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_rank_with_other_data_is_one_line_from_rank_0_and_nothing_is_written(setup, tmp_path):
    data, init = setup
    other = tmp_path / "other"
    other.mkdir()
    tokens = np.fromfile(data / "train.bin", dtype="<u2")
    tokens[:400].copy().tofile(other / "val.bin")
    tokens[::-1].copy().tofile(other / "train.bin")
    launcher = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv_id", "bad"]
    nodes = [start(torchrun_argv(as_argv(flags(d, init, tmp_path / "run")), nproc=1, launcher=launcher))
             for d in (data, other)]
    errs = [finished(node, 180) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    said = [line for err in errs for line in err.splitlines() if line.startswith("fgpt train: error")]
    crcs = [f"{zlib.crc32(np.fromfile(d / 'train.bin', dtype='<u2').tobytes()):08x}" for d in (data, other)]
    assert len(said) == 1 and re.fullmatch(r"fgpt train: error: --data train\.bin differs across ranks: rank 0 has "
                                           r"4,000 tokens \(crc32 (\w+)\), rank 1 has 4,000 tokens \(crc32 (\w+)\)",
                                           said[0]), said
    assert sorted(re.match(r".*crc32 (\w+).*crc32 (\w+)", said[0]).groups()) == sorted(crcs)  # either is rank 0
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ a rank dies


def rank_pid(out: Path, rank: int) -> int | None:
    """The pid of the training process of `rank` whose command line names `out`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"functional_gpt" in cmdline and str(out).encode() in cmdline and f"RANK={rank}".encode() in environ \
                and b"torch.distributed.run" not in cmdline:
            return int(entry.name)
    return None


def kill_rank_after_checkpoint(out: Path, rank: int, at_least: int, timeout: float = 120) -> int:
    """Wait for a checkpoint at step >= at_least, SIGKILL `rank`: -> that checkpoint's step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            step = json.loads((out / "state.json").read_text())["step"]
        except (OSError, ValueError):
            step = -1
        if step >= at_least:
            pid = rank_pid(out, rank)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                return step
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step >= {at_least} in {timeout} s")


def finished(job: subprocess.Popen, timeout: float) -> str:
    """The job's stderr once it ends; a job still running after `timeout` is killed, the
    launcher and every process below it, and the test fails."""
    try:
        return job.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        kill_job(job.pid)
        job.communicate()
        raise AssertionError(f"the job did not end within {timeout} s") from None


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


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env(),
                            start_new_session=True)


LONG = dict(max_steps=300, decay_steps=300, eval_interval=20)


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_in_one_line_and_the_checkpoint_resumes(setup, tmp_path):
    """SIGKILL rank 1 after a checkpoint: rank 0 stops in one line, and the checkpoint
    left behind resumes (in one process) to the end."""
    data, init = setup
    killed = tmp_path / "killed"
    job = start(torchrun_argv(as_argv(flags(data, init, killed, **LONG))))
    kill_rank_after_checkpoint(killed, 1, 20)
    err = finished(job, 120)
    assert job.returncode != 0
    said = [line for line in err.splitlines() if line.startswith("fgpt train: error")]
    assert len(said) == 1 and "another rank stopped" in said[0], err[-3000:]
    one_process(flags(data, init, killed, **LONG), resume=True)
    assert json.loads((killed / "state.json").read_text())["step"] == 300


@pytest.fixture(scope="module")
def uninterrupted_long_run(setup, tmp_path_factory) -> Path:
    """The run directory of a LONG 2-rank run nothing interrupts."""
    data, init = setup
    whole = tmp_path_factory.mktemp("whole")
    done = torchrun(as_argv(flags(data, init, whole, **LONG)))
    assert done.returncode == 0, done.stderr[-3000:]
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_max_restarts_resumes_a_job_whose_rank_was_killed(setup, uninterrupted_long_run, tmp_path, attempt):
    """With --max-restarts 1, torchrun restarts both ranks after rank 1 is SIGKILLed; they
    resume from the last checkpoint by themselves and end bit-exactly where an
    uninterrupted 2-rank run ends. Three times over: the restarted ranks meet in the store
    of the attempt before, and a stale address there hung or failed them one run in two
    before distributed.join put the group's keys under the attempt."""
    data, init = setup
    restarted = tmp_path / "restarted"
    job = start(torchrun_argv(as_argv(flags(data, init, restarted, **LONG)),
                              launcher=["--max-restarts", "1", "--master_addr", "127.0.0.1",
                                        "--master_port", str(free_port())]))
    kill_rank_after_checkpoint(restarted, 1, 20)
    err = finished(job, 180)
    assert job.returncode == 0, err[-3000:]
    got, expected = params(restarted), params(uninterrupted_long_run)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ------------------------------------------------------------- in one process


@pytest.fixture
def gloo_world_of_one():
    """A real gloo process group of one rank, so that the collectives run (as identities)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("accumulated", [False, True])
def test_the_reducer_returns_the_gradients_autograd_gives(gloo_world_of_one, monkeypatch, accumulated):
    """Through the buckets (small ones: 5 for the tiny model, each within the cap unless a
    single tensor exceeds it), the gradients equal torch.autograd.grad's exactly, plus the
    earlier micro-batches' sum when given; each bucket's all-reduce starts once all its
    gradients are in, in bucket order, and while backward still runs (the first before the
    last gradient arrives)."""
    started = []
    all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        i = next(i for i, b in enumerate(reducer.buckets) if b is tensor)
        started.append((i, reducer.missing[i], sum(reducer.missing)))
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording_all_reduce)
    flat = flatten(params_of(hf_model(TINY, seed=2)))
    x, y = torch.randint(TINY.vocab_size, (2, 2, 16))
    _, expected = loss_and_grads(flat, x, y, TINY)
    earlier = {k: torch.randn_like(t) for k, t in flat.items()} if accumulated else None
    reducer = GradientReducer({k: t.shape for k, t in flat.items()}, "cpu", accumulated=earlier, bucket_bytes=4 * 5000)
    _, got = loss_and_grads(flat, x, y, TINY, reducer=reducer)
    assert list(got) == list(flat)
    for key in flat:
        assert torch.equal(got[key], expected[key] + (earlier[key] if accumulated else 0)), key
    assert len(reducer.buckets) >= 5 and reducer.started == len(reducer.buckets)
    assert [i for i, _, _ in started] == list(range(len(reducer.buckets)))
    assert all(missing == 0 for _, missing, _ in started) and started[0][2] > 0
    assert all(b.numel() <= 5000 or len([k for k, i in reducer.bucket_of.items() if i == n]) == 1
               for n, b in enumerate(reducer.buckets))
    assert reducer.bucket_of["ln_f.weight"] == 0 and reducer.bucket_of["wte.weight"] == len(reducer.buckets) - 1


def test_owners_balance_whole_tensors_and_the_shares_cover_every_key():
    flat = flatten(init_params(TINY))
    for size in (1, 2, 3):
        owner = owners(flat, size)
        loads = [sum(flat[k].numel() for k in flat if owner[k] == r) for r in range(size)]
        assert max(loads) - min(loads) <= max(t.numel() for t in flat.values())
        shares = [my_share(World(r, size, r))(flat) for r in range(size)]
        assert sorted(k for share in shares for k in share) == sorted(flat)
    gpt2 = flatten(init_params(train_module.preset("gpt2"), device="meta"))
    loads = [sum(t.numel() for k, t in gpt2.items() if owners(gpt2, 2)[k] == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) < 0.01 * sum(loads)


def test_each_rank_draws_its_own_dropout_masks_from_the_one_state():
    """In a world of 2 the ranks' dropout streams differ, the state after the step is the
    same on both (one value to save) and differs from the one before; one process draws
    from the state itself, as before data parallelism existed."""
    from functional_gpt.training.step import _dropout_rng

    rng = {"torch": torch.Generator().manual_seed(3).get_state()}
    draws, afters = [], []
    for rank in (0, 1):
        afters.append(_dropout_rng(rng, World(rank, 2, rank)))
        draws.append(torch.rand(8))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(afters[0]["torch"], afters[1]["torch"]) and not torch.equal(afters[0]["torch"], rng["torch"])
    _dropout_rng(rng, World(1, 2, 1))
    assert torch.equal(torch.rand(8), draws[1])  # a resume with the same world replays them
    assert _dropout_rng(rng, World()) is None
    assert torch.equal(torch.rand(8), torch.rand(8, generator=torch.Generator().manual_seed(3)))

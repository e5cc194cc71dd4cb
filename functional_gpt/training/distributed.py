"""Data parallelism over torch.distributed, for functions over plain tensors.

DDP and FSDP wrap an nn.Module; this project has none, so their two jobs are done here over
the {GPT-2 key: tensor} dicts the training step works on, with torch.distributed's own
collectives (gloo on the CPU, NCCL on CUDA):

- `World`: this process's place in the job, read from torchrun's environment.
- `start_together`: before any collective, every rank's word (what it will train with, or
  the error it met reading it) goes through the job's store, and a rank that differs or
  failed stops them all alike; `stop_together` brings in a rank that failed earlier.
- `GradientReducer`: the gradients of one backward pass, cast to float32 into flat buckets
  (in the order backward produces them), each bucket all-reduced asynchronously the moment
  its last gradient arrives, so communication overlaps the rest of the backward pass.
- ZeRO-1 (`owners`, `broadcast_owned`, `gather_moments`): each rank keeps and updates
  AdamW's moments for its own share of the tensors, then sends the updated tensors to all.
"""

import json
import os
import signal
import socket
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..errors import AgreedError, UserError
from .optim import AdamWState

# As DDP's default bucket_cap_mb: big enough that a gpt2 step makes about 20 calls, small
# enough that the first buckets leave while backward still has most of its work to do.
BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes (local_rank: its index on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and shows progress."""
        return self.rank == 0


SINGLE = World()


def world_from_env(environ=os.environ) -> World:
    """The World torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (SINGLE when
    WORLD_SIZE is unset). A malformed value, or WORLD_SIZE > 1 without the MASTER_ADDR and
    MASTER_PORT (a port number) that torchrun sets, is a one-line UserError (the endpoint's,
    one for the whole job, an AgreedError)."""
    if "WORLD_SIZE" not in environ:
        return SINGLE
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = environ.get(name, "0")
        if not text.isdigit():
            raise UserError(f"environment: {name}={text!r} is not a count; start data parallel runs with torchrun")
        values[name] = int(text)
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.size < 1 or world.rank >= world.size:
        raise UserError(f"environment: RANK={world.rank} does not fit WORLD_SIZE={world.size}")
    if world.size > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if missing:
            raise AgreedError(f"environment: WORLD_SIZE={world.size} without {' and '.join(missing)} (the "
                            f"rendezvous endpoint): start data parallel runs with torchrun")
        port = environ["MASTER_PORT"]
        if not (port.isdigit() and 0 < int(port) < 2**16):
            raise AgreedError(f"environment: MASTER_PORT={port!r} is not a port number (1..65535)")
    return world


# How long a rank waits for the others, to meet and at the start of the run (loading weights and
# checksumming data may take a while), as torch's own rendezvous does.
TIMEOUT = timedelta(minutes=10)


def meet(world: World, timeout: timedelta = TIMEOUT):
    """The job's key-value store, at the endpoint in the environment (torchrun's; rank 0's
    when the environment was set by hand), with this rank connected; None for SINGLE. Its keys live under the torchrun attempt
    (TORCHELASTIC_RESTART_COUNT): torchrun hands the restarted workers the same store, and
    without the prefix a restarted rank may read a dead peer's word (or address) from the
    attempt before and hang or fail connecting."""
    if world.size == 1:
        return None
    store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
    return _under_attempt(store)


def _under_attempt(store):
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fgpt/attempt_{attempt}/", store)


def join(world: World, device: torch.device, store) -> None:
    """Join the process group of a multi-process world (nothing for SINGLE) through `store`
    (from `meet`): gloo for the CPU, NCCL for CUDA. Called once the ranks agree
    (`start_together`), so every rank asks for the same backend."""
    if world.size == 1 or dist.is_initialized():
        return
    if device.type not in ("cpu", "cuda"):
        raise AgreedError(f"--device {device.type}: data parallel training runs on cpu or cuda")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=TIMEOUT)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean(world: World, values: list[float], device) -> list[float]:
    """The mean of each value over the ranks (the values themselves in a single process)."""
    return [v / world.size for v in total(world, values, device)]


def total(world: World, values: list[float], device) -> list[float]:
    """The sum of each value over the ranks."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def every_rank(world: World, value: float, device) -> list[float]:
    """`value` as each rank has it, in rank order."""
    if world.size == 1:
        return [value]
    t = torch.zeros(world.size, dtype=torch.float64, device=device)
    t[world.rank] = value
    dist.all_reduce(t)
    return t.tolist()


def any_rank(world: World, flag: bool, device) -> bool:
    """Whether `flag` holds on some rank: every rank gets the same answer, so they all
    take the same branch (stop, save) at the same step."""
    if world.size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ------------------------------------------------------- the start of a run


def start_together(world: World, store, prepare, facts):
    """-> prepare(), on every rank, once the ranks agree: every rank's prepare() returned
    and facts(its value) ({what: a JSON value}) are the same on every rank. Otherwise every
    rank raises the same AgreedError (rank 0 alone says it): the error of the first rank
    that met one (a UserError from prepare), prefixed "rank r: " unless every rank met it
    alike; or the first fact that differs, with both values ("--lr differs across ranks:
    rank 0 has 0.0006, rank 1 has 0.001"). Nothing has run a collective yet, so a rank
    that differs (a model of another shape, --shard_optimizer on one rank) cannot hang or
    abort one. Any other exception from prepare() is posted as that rank's error too (so the
    others stop), then raised there. `store`: from `meet`; once per process and torchrun
    attempt (the words stay in the store). In a single process: prepare()'s value, its
    errors as they are."""
    if world.size == 1:
        return prepare()
    try:
        value = prepare()
        post = {"facts": facts(value)}
    except UserError as e:
        value, post = None, {"error": str(e)}
    except Exception as e:  # a bug or a crash (out of memory): its traceback is this rank's, the others stop
        first = (str(e).strip().splitlines() or [""])[0][:200]
        _post(store, world.rank, {"world_size": world.size, "error": f"{type(e).__name__}: {first}"})
        _gather(world, store)  # the others wait for this rank to have read their words
        raise
    _post(store, world.rank, {"world_size": world.size, **post})
    verdict = disagreement(_gather(world, store))
    if verdict is not None:
        raise AgreedError(verdict)
    return value


def stop_together(error: UserError, environ=os.environ) -> UserError:
    """-> the error a rank of a data-parallel job prints for `error`, as it is about to exit
    (cli.main). A rank that met `error` before the start of the run (reading its flags or
    config file) takes its place in `start_together` with it, so the others stop at once
    instead of waiting for it: -> the AgreedError every rank raises there. Any other error
    (outside such a job, or once the rank has spoken at the start) is returned as it is.
    From then on the process ignores SIGTERM: torchrun sends it to the ranks still running
    once the first has exited, which would turn their own exit (status 2, a moment later)
    into a kill."""
    agreed = error if isinstance(error, AgreedError) else _said_at_start(error, environ)
    if environ.get("WORLD_SIZE", "1") != "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return agreed


def _said_at_start(error: UserError, environ) -> UserError:
    try:
        world = world_from_env(environ)
    except UserError:
        return _said_as_outsider(error, environ)
    hosts = world.rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # rank 0's own store
    if world.size == 1 or not (hosts or _listening(environ)):
        return error
    try:
        store = meet(world, timeout=timedelta(seconds=30))
    except RuntimeError:  # this rank cannot reach the others: it speaks for itself
        return error
    if not _post(store, world.rank, {"world_size": world.size, "error": str(error)}):
        return error
    try:
        return AgreedError(disagreement(_gather(world, store)))
    except UserError as e:  # the others did not come
        return e


# The place at the start of a process whose own RANK, WORLD_SIZE or LOCAL_RANK names no rank
# of the job (a wrapper that sets them wrongly): the ranks stop when they hear from it.
OUTSIDER = -1


def _said_as_outsider(error: UserError, environ) -> UserError:
    """`error` told to the job's ranks from OUTSIDER's place, by a process that names no rank
    of the job but has its endpoint: -> the AgreedError, once a rank has heard it. Where
    there is no job to reach (no endpoint, nothing listening), `error`."""
    port, size = environ.get("MASTER_PORT", ""), environ.get("WORLD_SIZE", "")
    if not (environ.get("MASTER_ADDR") and port.isdigit() and 0 < int(port) < 2**16 and size.isdigit()
            and _listening(environ)):
        return error
    try:
        store = _under_attempt(dist.TCPStore(environ["MASTER_ADDR"], int(port), is_master=False,
                                             timeout=timedelta(seconds=30)))
    except RuntimeError:
        return error
    if not _post(store, OUTSIDER, {"error": str(error)}):
        return error  # another outsider spoke first
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    try:
        while not any(store.check([f"read/{rank}"]) for rank in range(int(size))):
            _wait(deadline, "no rank heard a process outside the job's ranks")
    except UserError as e:
        return e
    store.set(f"read/{OUTSIDER}", "")
    return AgreedError(disagreement({OUTSIDER: {"error": str(error)}}))


def _listening(environ) -> bool:
    """Whether something listens at MASTER_ADDR:MASTER_PORT, asked with a plain socket (a
    TCPStore that cannot connect retries until its timeout, then writes a C++ stack to
    stderr)."""
    try:
        socket.create_connection((environ["MASTER_ADDR"], int(environ["MASTER_PORT"])), timeout=5).close()
        return True
    except OSError:
        return False


def _post(store, rank: int, post: dict) -> bool:
    """Put the word at the start of `rank` (or OUTSIDER) in the store, unless it is there
    already: -> whether it was put now."""
    text = json.dumps(post)
    return store.compare_set(f"start/{rank}", "", text) == text.encode()


def _gather(world: World, store) -> dict[int, dict]:
    """-> {rank: its word at the start}: every rank's, or fewer as soon as one names another
    WORLD_SIZE or OUTSIDER has spoken (waiting would be for ranks that will not come). Then
    waits until every rank it heard has read the others' words too, so that none leaves
    (taking the store with it, when it hosts it) before. A rank not heard within TIMEOUT is
    a UserError."""
    posts, deadline = {}, time.monotonic() + TIMEOUT.total_seconds()
    while True:
        for rank in (OUTSIDER, *range(world.size)):
            if rank not in posts and store.check([f"start/{rank}"]):
                posts[rank] = json.loads(store.get(f"start/{rank}"))
        if len(posts) == world.size or OUTSIDER in posts or \
                any(p["world_size"] != world.size for p in posts.values()):
            break
        _wait(deadline, f"rank {min(set(range(world.size)) - set(posts))} did not reach the start of the run")
    store.set(f"read/{world.rank}", "")
    while not store.check([f"read/{rank}" for rank in posts]):
        _wait(deadline, "a rank did not read the others' word at the start of the run")
    return posts


def _wait(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise UserError(f"data parallel: {what} within {TIMEOUT.total_seconds():.0f} s")
    time.sleep(0.01)


def disagreement(posts: dict[int, dict]) -> str | None:
    """What the ranks' words at the start disagree on, in one line; None if nothing.
    posts: {rank: {"world_size": N, "error": message} or {"world_size": N, "facts": {what:
    value}}}, rank 0's among them, or {OUTSIDER: {"error": message}} among them."""
    if OUTSIDER in posts:
        return f"a process outside the job's ranks: {posts[OUTSIDER]['error']}"
    ranks = sorted(posts)
    sizes = [posts[r]["world_size"] for r in ranks]
    if len(set(sizes)) > 1:
        other = next(r for r in ranks if posts[r]["world_size"] != sizes[0])
        return _differs("WORLD_SIZE", ranks[0], sizes[0], other, posts[other]["world_size"])
    errors = [(r, posts[r]["error"]) for r in ranks if "error" in posts[r]]
    if errors:
        rank, message = errors[0]
        alike = len(errors) == len(ranks) and all(m == message for _, m in errors)
        return message if alike else f"rank {rank}: {message}"
    facts = {r: posts[r]["facts"] for r in ranks}
    labels = dict.fromkeys(label for r in ranks for label in facts[r])  # rank 0's order first
    for label in labels:
        mine = facts[0].get(label, _MISSING)
        other = next((r for r in ranks if facts[r].get(label, _MISSING) != mine), None)
        if other is not None:
            return _differs(label, 0, mine, other, facts[other].get(label, _MISSING))
    return None


_MISSING = "nothing"


def _differs(label: str, a: int, value_a, b: int, value_b) -> str:
    return f"{label} differs across ranks: rank {a} has {value_a}, rank {b} has {value_b}"


def crc32(x) -> int:
    """The CRC-32 of a tensor's or array's bytes (as laid out in memory, row-major)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    return zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))  # no copy of a memmap


def crc32_of(tensors) -> str:
    """"crc32 xxxxxxxx": one CRC-32 over the tensors' CRC-32s, in the order given."""
    return f"crc32 {crc32(np.array([crc32(t) for t in tensors], dtype=np.uint32)):08x}"


class GradientReducer:
    """The sum over the ranks of one backward pass's gradients, bucketed and overlapped.

    Built for {key: shape} (the params' keys in forward order); `hook(key)` is the
    post-accumulate-grad hook of that key's leaf: it casts the gradient to float32 into its
    bucket (adding `accumulated[key]`, the earlier micro-batches' local sum, if given),
    frees the leaf's .grad, and once every gradient of the bucket is in, starts its
    all-reduce. Buckets start in a fixed order on every rank (a bucket waits for those
    before it), as collectives must. `wait()` -> {key: float32 sum over the ranks}, and
    sets `waited`: the seconds it blocked, the communication backward did not hide.
    """

    def __init__(self, shapes: dict[str, torch.Size], device, *, accumulated: dict | None = None,
                 bucket_bytes: int = BUCKET_BYTES):
        self.accumulated = accumulated
        self.bucket_of, self.views, self.buckets = {}, {}, []
        sizes: list[list[str]] = [[]]
        used = 0
        for key in reversed(shapes):  # backward reaches the last layers first
            n = int(np.prod(shapes[key], dtype=np.int64))
            if sizes[-1] and used + 4 * n > bucket_bytes:
                sizes.append([])
                used = 0
            sizes[-1].append(key)
            used += 4 * n
        for i, keys in enumerate(sizes):
            counts = [int(np.prod(shapes[k], dtype=np.int64)) for k in keys]
            buffer = torch.empty(sum(counts), dtype=torch.float32, device=device)
            for key, piece in zip(keys, buffer.split(counts)):
                self.bucket_of[key], self.views[key] = i, piece.view(shapes[key])
            self.buckets.append(buffer)
        self.missing = [len(keys) for keys in sizes]
        self.order = list(shapes)
        self.started, self.works, self.waited = 0, [], 0.0

    def hook(self, key: str):
        def arrived(leaf: torch.Tensor) -> None:
            view = self.views[key]
            view.copy_(leaf.grad)
            if self.accumulated is not None:
                view.add_(self.accumulated[key])
            leaf.grad = None
            self.missing[self.bucket_of[key]] -= 1
            self._start_ready()

        return arrived

    def _start_ready(self) -> None:
        while self.started < len(self.buckets) and self.missing[self.started] == 0:
            self.works.append(dist.all_reduce(self.buckets[self.started], async_op=True))
            self.started += 1

    def wait(self) -> dict:
        if any(self.missing):  # a parameter backward never reached: the graph does not use it
            key = next(k for k in self.order if self.missing[self.bucket_of[k]])
            raise RuntimeError(f"data parallel: no gradient reached {key}")
        started = time.perf_counter()
        for work in self.works:
            work.wait()
        self.waited = time.perf_counter() - started  # the communication backward did not hide
        return {key: self.views[key] for key in self.order}


# ------------------------------------------------------------------------ ZeRO-1


def owners(flat: dict, size: int) -> dict[str, int]:
    """Which rank keeps each tensor's AdamW moments: whole tensors, largest first, each to
    the rank holding the fewest elements so far (gpt2 on 2 ranks: 62.2M and 62.2M)."""
    load = [0] * size
    owner = {}
    for key in sorted(flat, key=lambda k: -flat[k].numel()):
        rank = min(range(size), key=load.__getitem__)
        owner[key] = rank
        load[rank] += flat[key].numel()
    return {key: owner[key] for key in flat}


def my_share(world: World):
    """-> moments_of(flat params): the keys whose moments `owners` gives this rank."""

    def keys(flat: dict) -> list[str]:
        owner = owners(flat, world.size)
        return [k for k in flat if owner[k] == world.rank]

    return keys


def broadcast_owned(flat: dict, owner: dict[str, int]) -> None:
    """Each tensor of `flat`, as its owner updated it, copied in place on every rank."""
    works = [dist.broadcast(t, src=owner[key], async_op=True) for key, t in flat.items()]
    for work in works:
        work.wait()


def fetch_moments(flat: dict, size: int):
    """On rank 0: -> fetch(kind, key), the moment ("exp_avg" or "exp_avg_sq") of `key`
    received from the rank that owns it, for runs.save_checkpoint to write as it goes
    (one tensor at a time: rank 0 never holds every moment at once)."""
    owner = owners(flat, size)

    def fetch(kind: str, key: str) -> torch.Tensor:
        into = torch.empty_like(flat[key])
        dist.recv(into, src=owner[key])
        return into

    return fetch


def send_moments(world: World, opt: AdamWState, flat: dict) -> None:
    """On a rank > 0: send its moments to rank 0, in the order a checkpoint writes them
    (exp_avg of every key, then exp_avg_sq of those that have one), as rank 0's
    `fetch_moments` asks for them."""
    owner = owners(flat, world.size)
    for moments in (opt.exp_avg, opt.exp_avg_sq):
        for key in flat:
            if owner[key] == world.rank and key in moments:
                dist.send(moments[key].contiguous(), dst=0)

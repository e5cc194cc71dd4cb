"""Data parallelism over torch.distributed, for functions over plain tensors.

DDP and FSDP wrap an nn.Module; this project has none, so their two jobs are done here over
the {GPT-2 key: tensor} dicts the training step works on, with torch.distributed's own
collectives (gloo on the CPU, NCCL on CUDA):

- `World`: this process's place in the job, read from torchrun's environment.
- `GradientReducer`: the gradients of one backward pass, cast to float32 into flat buckets
  (in the order backward produces them), each bucket all-reduced asynchronously the moment
  its last gradient arrives, so communication overlaps the rest of the backward pass.
- ZeRO-1 (`owners`, `broadcast_owned`, `gather_moments`): each rank keeps and updates
  AdamW's moments for its own share of the tensors, then sends the updated tensors to all.
"""

import os
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
    MASTER_PORT that torchrun sets, is a one-line UserError."""
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
    return world


def join(world: World, device: torch.device) -> None:
    """Join the process group of a multi-process world (nothing for SINGLE): gloo for the
    CPU, NCCL for CUDA, through the endpoint torchrun put in the environment.

    The group's keys live under the torchrun attempt (TORCHELASTIC_RESTART_COUNT): torchrun
    hands the restarted workers the same store, and without the prefix a restarted rank
    may read a dead peer's address from the attempt before and hang or fail connecting."""
    if world.size == 1 or dist.is_initialized():
        return
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device.type}: data parallel training runs on cpu or cuda")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    timeout = timedelta(minutes=10)
    store, _, _ = next(dist.rendezvous("env://", world.rank, world.size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"fgpt/attempt_{attempt}/", store), rank=world.rank,
                            world_size=world.size, timeout=timeout)


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


def check_same_data(world: World, arrays: dict[str, np.ndarray], device) -> None:
    """Every rank must train on the same tokens: a UserError on every rank (said by rank
    0) naming the first rank whose arrays differ from rank 0's in length or CRC-32."""
    if world.size == 1:
        return
    crc = lambda a: zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))  # no copy of a memmap
    mine = torch.tensor([v for a in arrays.values() for v in (len(a), crc(a))], device=device)
    every = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    for rank, theirs in enumerate(every):
        if not torch.equal(theirs, every[0]):
            i = next(i for i in range(0, len(mine), 2) if not torch.equal(theirs[i : i + 2], every[0][i : i + 2]))
            name = list(arrays)[i // 2]
            raise AgreedError(f"rank {rank} reads a different {name} from rank 0's ({theirs[i]:,} tokens, crc32 "
                            f"{int(theirs[i + 1]):08x}, against {every[0][i]:,}, {int(every[0][i + 1]):08x}): "
                            f"give every rank the same --data")


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
    (exp_avg of every key, then exp_avg_sq), as rank 0's `fetch_moments` asks for them."""
    owner = owners(flat, world.size)
    for moments in (opt.exp_avg, opt.exp_avg_sq):
        for key in flat:
            if owner[key] == world.rank:
                dist.send(moments[key].contiguous(), dst=0)

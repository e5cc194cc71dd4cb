"""Scale-out figures on this machine, each from real `fgpt train` / torchrun processes:

  dp        cpu-small: 1 process x 2 threads against 2 processes x 1 thread (torchrun),
            interleaved rounds, median training tokens/s of each, the all-reduce time a
            step waits for (from metrics.jsonl) and a bare all-reduce of the gradients
  shard     gpt2 on 2 processes: each rank's peak RSS with and without --shard_optimizer
  ckpt      gpt2 1 x 1024: --checkpoint_activations' largest gradient difference, and
            the peak RSS and tokens/s of a training run with and without it
  compile   cpu-small: training tokens/s with and without --compile (after its warm-up)

    python tools/bench_scale_out.py [dp shard ckpt compile] [--rounds 2]

Needs `fgpt prepare` (data/shakespeare). Prints one Markdown table per part.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "shakespeare"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_val_data(tmp: Path) -> Path:
    """The prepared training tokens beside a 4,000-token val.bin: the final evaluation
    over all of val.bin would otherwise outlast these short runs."""
    import numpy as np

    data = tmp / "data"
    data.mkdir()
    (data / "train.bin").symlink_to(DATA / "train.bin")
    np.fromfile(DATA / "val.bin", dtype="<u2")[:4000].tofile(data / "val.bin")
    return data


def fgpt_train(out: Path, args: list[str], *, nproc: int = 1, threads: int = 2, timeout: float = 1800) -> dict:
    """One `fgpt train` (under torchrun when nproc > 1) -> its per-step metrics and the
    peak RSS of each rank, read from its last line of output."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    train = ["-m", "functional_gpt", "train", "--out", str(out), "--sample_tokens", "0", *args]
    if nproc == 1:
        argv = [sys.executable, *train]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), *train]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    peaks = re.search(r"peak memory ([\d / ]+) MiB", done.stdout + done.stderr)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": [m for m in metrics if "loss" in m],
            "peak_rss_mib": [float(p) for p in peaks.group(1).split(" / ")] if peaks else []}


def steady(steps: list[dict], key: str, skip: int) -> float:
    return statistics.median(m[key] for m in steps[skip:])


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------- parts


def part_dp(tmp: Path, rounds: int) -> str:
    data = short_val_data(tmp)
    common = ["--data", str(data), "--max_steps", "40", "--eval_interval", "1000", "--eval_windows", "8"]
    runs = {"1 process x 2 threads": [], "2 processes x 1 thread": []}
    for r in range(rounds):
        for name in runs:
            nproc, threads = (1, 2) if name.startswith("1") else (2, 1)
            result = fgpt_train(tmp / f"dp{r}{nproc}", common, nproc=nproc, threads=threads)
            runs[name].append(result)
            print(f"round {r + 1} {name}: {steady(result['steps'], 'tokens_per_s', 5):.0f} tok/s", flush=True)
    bare = bare_allreduce(tmp)
    rows = []
    for name, results in runs.items():
        tps = [steady(res["steps"], "tokens_per_s", 5) for res in results]
        wait = [steady(res["steps"], "allreduce_wait_s", 5) * 1e3 for res in results
                if "allreduce_wait_s" in res["steps"][-1]]
        rows.append([name, f"{statistics.median(tps):.0f} ({', '.join(f'{t:.0f}' for t in tps)})",
                     f"{statistics.median(wait):.1f}" if wait else "-",
                     f"{bare * 1e3:.1f}" if wait else "-"])
    return ("`cpu-small` (8 x 128 tokens per step, bfloat16), median tokens/s of steps 6-40 per run, "
            f"{rounds} interleaved rounds\n\n"
            + table(["run", "train tok/s (per round)", "all-reduce wait per step, ms",
                     "bare all-reduce of the gradients, ms"], rows))


def bare_allreduce(tmp: Path) -> float:
    """Median seconds of one float32 all-reduce of cpu-small's gradients in 25 MB buckets
    over 2 processes (nothing to overlap with): the whole cost of the communication."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    out = tmp / "allreduce.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), __file__, "--allreduce-worker", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(out.read_text())["seconds"]


def allreduce_worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    from functional_gpt import count_params, preset
    from functional_gpt.training.distributed import BUCKET_BYTES

    dist.init_process_group("gloo")
    n = count_params(preset("cpu-small"))
    buckets = [torch.ones(min(BUCKET_BYTES // 4, n - i)) for i in range(0, n, BUCKET_BYTES // 4)]
    times = []
    for _ in range(12):
        started = time.perf_counter()
        for work in [dist.all_reduce(b, async_op=True) for b in buckets]:
            work.wait()
        times.append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"seconds": statistics.median(times[2:])}))
    dist.destroy_process_group()


def part_shard(tmp: Path, rounds: int) -> str:
    data = short_val_data(tmp)
    common = ["--data", str(data), "--preset", "gpt2", "--max_steps", "3", "--batch_size", "2",
              "--context_length", "256", "--dropout", "0", "--eval_interval", "1000", "--eval_windows", "2"]
    rows = []
    for shard in (False, True):
        peaks = [fgpt_train(tmp / f"shard{shard}{r}", common + (["--shard_optimizer"] if shard else []), nproc=2,
                            threads=1)["peak_rss_mib"] for r in range(rounds)]
        per_rank = [statistics.median(p[i] for p in peaks) for i in range(2)]
        rows.append(["--shard_optimizer" if shard else "replicated moments", *(f"{p:.0f}" for p in per_rank)])
        print(rows[-1], flush=True)
    return ("`gpt2` on 2 processes x 1 thread, 2 x 256 tokens per step, bfloat16, 3 steps and the final "
            "checkpoint; peak RSS of each rank, MiB\n\n" + table(["AdamW moments", "rank 0", "rank 1"], rows))


def part_ckpt(tmp: Path, rounds: int) -> str:
    data = short_val_data(tmp)
    common = ["--data", str(data), "--preset", "gpt2", "--max_steps", "4", "--batch_size", "1", "--dropout", "0",
              "--eval_interval", "1000", "--eval_windows", "1"]
    results = {False: [], True: []}
    for r in range(rounds):
        for ckpt in results:
            results[ckpt].append(fgpt_train(tmp / f"ckpt{ckpt}{r}", common + (["--checkpoint_activations"] if ckpt
                                                                               else [])))
            print(ckpt, results[ckpt][-1]["peak_rss_mib"], steady(results[ckpt][-1]["steps"], "tokens_per_s", 1),
                  flush=True)
    rows = [["--checkpoint_activations" if ckpt else "activations kept",
             f"{statistics.median(res['peak_rss_mib'][0] for res in runs):.0f}",
             f"{statistics.median(steady(res['steps'], 'tokens_per_s', 1) for res in runs):.0f}"]
            for ckpt, runs in results.items()]
    # After the runs: Linux carries a parent's peak RSS over fork + exec into the child's ru_maxrss.
    gradient_gap = checkpoint_gradient_gap()
    return (f"`gpt2`, 1 x 1024 tokens, bfloat16, `fgpt train` 4 steps, 2 threads, {rounds} interleaved rounds; "
            f"largest gradient difference (float32, dropout 0.1 on both): {gradient_gap:.1e} of its tensor's "
            "scale\n\n" + table(["run", "peak RSS MiB", "train tok/s"], rows))


def checkpoint_gradient_gap() -> float:
    """max over tensors of max |g_ckpt - g| / max |g| for one gpt2 1 x 1024 float32 step
    with dropout on (the same seed before each)."""
    import torch

    from functional_gpt import flatten, init_params, preset
    from functional_gpt.training.step import loss_and_grads

    config = preset("gpt2")
    flat = flatten(init_params(config, seed=0))
    t = torch.randint(config.vocab_size, (1, 1025), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(1)
        grads.append(loss_and_grads(flat, t[:, :-1], t[:, 1:], config, dropout=True, checkpoint=checkpoint)[1])
    return max(float((grads[1][k] - g).abs().max() / g.abs().max()) for k, g in grads[0].items())


def part_compile(tmp: Path, rounds: int) -> str:
    data = short_val_data(tmp)
    common = ["--data", str(data), "--max_steps", "60", "--eval_interval", "1000", "--eval_windows", "8"]
    results = {False: [], True: []}
    for r in range(rounds):
        for compiled in results:
            started = time.time()
            res = fgpt_train(tmp / f"compile{compiled}{r}", common + (["--compile"] if compiled else []))
            res["wall_s"] = time.time() - started
            results[compiled].append(res)
            print(compiled, steady(res["steps"], "tokens_per_s", 10), res["wall_s"], flush=True)
    rows = [["--compile" if compiled else "eager",
             f"{statistics.median(steady(res['steps'], 'tokens_per_s', 10) for res in runs):.0f}",
             f"{statistics.median(res['steps'][0]['tokens_per_s'] for res in runs):.0f}",
             f"{statistics.median(res['wall_s'] for res in runs):.0f}"] for compiled, runs in results.items()]
    return (f"`cpu-small` (8 x 128 tokens per step, bfloat16), 60 steps, 2 threads, {rounds} interleaved rounds\n\n"
            + table(["run", "train tok/s, steps 11-60", "first step tok/s", "whole run, s"], rows))


PARTS = {"dp": part_dp, "shard": part_shard, "ckpt": part_ckpt, "compile": part_compile}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--allreduce-worker":
        allreduce_worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    if not (DATA / "train.bin").exists():
        raise SystemExit(f"{DATA}: run `fgpt prepare` first")
    for name in args.parts or PARTS:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"\n## {name}\n\n{PARTS[name](Path(tmp), args.rounds)}\n", flush=True)


if __name__ == "__main__":
    main()

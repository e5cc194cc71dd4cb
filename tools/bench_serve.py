"""Throughput of `fgpt serve` against the number of concurrent clients (a benchmark, not a test).

    python tools/bench_serve.py [--config gpt2] [--clients 1 2 4 8 16] [--rounds 2] [--png serve.png]

Starts `fgpt serve` on 127.0.0.1 (a free port, --max_batch 8) with random weights of the
config, then for each number of clients C runs C threads, each sending --requests
completions one after another with the official openai client (128-token prompts, 128
new tokens, greedy, streamed so that the time to the first token is seen). Rounds go
through the client counts in alternating order. Prints, per C: total new tokens/s over
all clients (median over rounds), p50 and p99 time to first token, and the ratio to one
client; draws throughput and p50 TTFT against C into --png.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(weights: Path, max_batch: int):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "functional_gpt", "serve", "--weights", str(weights), "--port",
                             str(port), "--max_batch", str(max_batch)], env=os.environ | {"PYTHONPATH": str(ROOT)},
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc, base
        except OSError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit("bench_serve: the server did not start")


def one_request(client, prompt, new_tokens):
    """-> (time to first token, new tokens) of one streamed greedy completion."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model=None, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                           stream=True, logprobs=0):
        lp = chunk.choices[0].logprobs
        if lp and lp.tokens:
            first = first or time.perf_counter() - t0
            tokens += len(lp.tokens)
    return first, tokens


def run_clients(client, clients: int, requests: int, prompt_len: int, new_tokens: int, seed: int):
    import random

    rng = random.Random(seed)
    prompts = [[rng.randrange(50000) for _ in range(prompt_len)] for _ in range(clients * requests)]

    def worker(c):
        return [one_request(client, prompts[c * requests + r], new_tokens) for r in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for per in pool.map(worker, range(clients)) for x in per]
    elapsed = time.perf_counter() - t0
    return sum(n for _, n in results) / elapsed, [f for f, _ in results]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="gpt2")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="completions each client sends per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--max_batch", type=int, default=8)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    import openai

    from functional_gpt import init_params, preset, save_params

    config = preset(args.config)
    weights = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "model.safetensors"
    save_params(weights, init_params(config, seed=0), config)
    proc, base = start(weights, args.max_batch)
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=600, max_retries=0)
    try:
        one_request(client, [1] * 8, 4)  # warm up
        rates = {c: [] for c in args.clients}
        ttfts = {c: [] for c in args.clients}
        for r in range(args.rounds):
            order = args.clients if r % 2 == 0 else args.clients[::-1]
            for c in order:
                rate, firsts = run_clients(client, c, args.requests, args.prompt_tokens, args.new_tokens, seed=r)
                rates[c].append(rate)
                ttfts[c] += firsts
                print(f"round {r + 1}, {c:2d} clients: {rate:7.1f} tok/s, p50 first token "
                      f"{statistics.median(firsts):.2f} s", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    base_rate = statistics.median(rates[args.clients[0]])
    print(f"\n{args.config}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, "
          f"--max_batch {args.max_batch}, medians of {args.rounds} rounds:")
    print("| clients | total tok/s | vs 1 client | p50 first token | p99 first token |")
    print("| --- | --- | --- | --- | --- |")
    for c in args.clients:
        rate = statistics.median(rates[c])
        print(f"| {c} | {rate:.1f} | {rate / base_rate:.2f}x | {percentile(ttfts[c], 0.5):.2f} s | "
              f"{percentile(ttfts[c], 0.99):.2f} s |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(args.clients, [statistics.median(rates[c]) for c in args.clients], "o-", label="total tokens/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.clients, [str(c) for c in args.clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("new tokens/s (all clients)")
        ax2 = ax.twinx()
        ax2.plot(args.clients, [percentile(ttfts[c], 0.5) for c in args.clients], "s--", color="tab:orange",
                 label="p50 time to first token")
        ax2.set_ylabel("p50 time to first token (s)")
        fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
        ax.set_title(f"fgpt serve, {args.config}, --max_batch {args.max_batch}")
        fig.tight_layout()
        tmp = args.png.with_name(args.png.name + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

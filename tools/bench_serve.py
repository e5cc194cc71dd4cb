"""`fgpt serve` for one client and for eight, against one `fgpt generate` stream (a benchmark, not a test).

    python tools/bench_serve.py [--config gpt2 | --weights PATH] [--baseline REV] [--prompt_lookup N]
                                [--draft WEIGHTS] [--rounds 3] [--png FILE]

Contenders, each its own process on the same weights (random ones of --config unless
--weights), measured in interleaved rounds (medians reported):
  generate          one greedy stream through functional_gpt's `generate` (a fresh process
                    per round): the single-stream rate a server is held to;
  serve             `fgpt serve` in its default mode (busy rows only, prefix caching);
  batch_invariant   `fgpt serve --batch_invariant` (every step multiplies all rows);
  REV               with --baseline REV: `fgpt serve` of that git revision (a worktree of
                    it), e.g. the server before this mode existed;
  prompt_lookup N, draft
                    with --prompt_lookup N or --draft WEIGHTS: the default mode with
                    speculative decoding (against plain `generate`, as the others).
Each server is asked, with the official openai client, greedy and streamed: one client
alone (its decode rate: new tokens after the first over the time from first to last), and
--clients clients arriving together at a barrier, one request each (their total new
tokens over the wall time, and the p50 of their times to the first token). Prompts are
--prompt_tokens random tokens, distinct per request (no shared prefix), --new_tokens new.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GENERATE = """
import sys, time, torch
sys.path.insert(0, {root!r})
from functional_gpt import load_params
from functional_gpt.generation.decoding import generate
params, config = load_params({weights!r})
torch.manual_seed(0)
prompt = torch.randint(50000, ({n},), generator=torch.Generator().manual_seed(99)).tolist()
list(generate(params, [prompt[:8]], config, max_new_tokens=4))
times = [time.perf_counter() for _ in generate(params, [prompt], config, max_new_tokens={new})]
print(({new} - 1) / (times[-1] - times[0]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(weights: Path, root: Path, flags: list[str]):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "functional_gpt", "serve", "--weights", str(weights), "--port",
                             str(port), *flags], env=os.environ | {"PYTHONPATH": str(root)}, cwd=root,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc, base
        except OSError:
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(f"bench_serve: the server of {root} did not start")


def stop(servers) -> None:
    """SIGTERM each (process, base URL) that `start` returned, and wait for it to end."""
    for proc, _ in servers:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def one_request(client, prompt, new_tokens, barrier=None):
    """-> (time to first token, time from first to last token, new tokens) of one streamed
    greedy completion."""
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in client.completions.create(model=None, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                           stream=True, logprobs=0):
        lp = chunk.choices[0].logprobs if chunk.choices else None
        if lp and lp.tokens:
            last = time.perf_counter() - t0
            first = first if first is not None else last
            tokens += len(lp.tokens)
    return first, last - first, tokens


def together(client, clients: int, prompts, new_tokens: int):
    """-> (total new tokens/s over the wall time, p50 time to first token) of `clients`
    requests arriving together."""
    barrier = threading.Barrier(clients)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(client, p, new_tokens, barrier), prompts))
    elapsed = time.perf_counter() - t0
    return sum(n for _, _, n in results) / elapsed, statistics.median(f for f, _, _ in results)


def weights_to_serve(weights: Path | None, config_name: str, folder: Path) -> Path:
    """`weights`, or random weights of the preset `config_name` written into `folder`."""
    if weights is not None:
        return weights
    from functional_gpt import init_params, preset, save_params

    config = preset(config_name)
    save_params(folder / "model.safetensors", init_params(config, seed=0), config)
    return folder / "model.safetensors"


def cpu_line() -> str:
    from functional_gpt.device import cpu_summary

    return cpu_summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="gpt2")
    parser.add_argument("--weights", type=Path, help="a checkpoint to serve instead of random weights")
    parser.add_argument("--baseline", metavar="REV", help="also serve this git revision's fgpt serve")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--max_batch", type=int, default=8)
    parser.add_argument("--prompt_lookup", type=int, metavar="N", help="also serve with --prompt_lookup N")
    parser.add_argument("--draft", metavar="WEIGHTS", help="also serve with --draft WEIGHTS")
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    import openai
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    weights = weights_to_serve(args.weights, args.config, work)
    servers = {"serve": (ROOT, []), "batch_invariant": (ROOT, ["--batch_invariant"])}
    if args.prompt_lookup:
        servers[f"prompt_lookup {args.prompt_lookup}"] = (ROOT, ["--prompt_lookup", str(args.prompt_lookup)])
    if args.draft:
        servers["draft"] = (ROOT, ["--draft", args.draft])
    if args.baseline:
        tree = work / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline], check=True,
                       capture_output=True)
        servers[args.baseline] = (tree, [])
    running = {name: start(weights, root, ["--max_batch", str(args.max_batch), *flags])
               for name, (root, flags) in servers.items()}
    gen = torch.Generator().manual_seed(0)
    rates = {name: [] for name in ["generate", *servers]}
    crowd, ttft = {name: [] for name in servers}, {name: [] for name in servers}
    try:
        clients = {name: openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=600, max_retries=0)
                   for name, (_, base) in running.items()}
        for c in clients.values():
            one_request(c, [1] * 8, 4)  # warm up
        for r in range(args.rounds):
            order = ["generate", *servers] if r % 2 == 0 else ["generate", *servers][::-1]
            for name in order:
                if name == "generate":
                    out = subprocess.run([sys.executable, "-c", GENERATE.format(
                        root=str(ROOT), weights=str(weights), n=args.prompt_tokens, new=args.new_tokens)],
                        capture_output=True, text=True, check=True)
                    rates[name].append(float(out.stdout.split()[-1]))
                    print(f"round {r + 1}, generate: {rates[name][-1]:.1f} tok/s", flush=True)
                    continue
                prompts = [torch.randint(50000, (args.prompt_tokens,), generator=gen).tolist()
                           for _ in range(args.clients + 1)]
                _, seconds, n = one_request(clients[name], prompts[0], args.new_tokens)
                rates[name].append((n - 1) / seconds)
                rate, first = together(clients[name], args.clients, prompts[1:], args.new_tokens)
                crowd[name].append(rate)
                ttft[name].append(first)
                print(f"round {r + 1}, {name}: 1 client {rates[name][-1]:.1f} tok/s; {args.clients} clients "
                      f"{rate:.1f} tok/s, p50 first token {first:.2f} s", flush=True)
    finally:
        stop(running.values())
        if args.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline")],
                           capture_output=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    base_ttft = statistics.median(ttft[args.baseline]) if args.baseline else None
    print(f"\n{args.weights or args.config}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, "
          f"--max_batch {args.max_batch}; medians of {args.rounds} rounds; {cpu_line()}")
    print(f"one `generate` stream: {med['generate']:.1f} tok/s\n")
    print(f"| server | 1 client tok/s | vs generate | {args.clients} clients total tok/s | vs generate | "
          f"p50 first token | vs {args.baseline or 'baseline'} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in servers:
        total, first = statistics.median(crowd[name]), statistics.median(ttft[name])
        vs = f"{first / base_ttft:.2f}x" if base_ttft else "-"
        print(f"| {name} | {med[name]:.1f} | {med[name] / med['generate']:.2f}x | {total:.1f} | "
              f"{total / med['generate']:.2f}x | {first:.2f} s | {vs} |")
    if args.png:
        draw(args, servers, med, crowd, ttft)


def draw(args, servers, med, crowd, ttft) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(servers)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(names))
    a.bar([i - 0.2 for i in x], [med[n] for n in names], 0.4, label="1 client")
    a.bar([i + 0.2 for i in x], [statistics.median(crowd[n]) for n in names], 0.4, label=f"{args.clients} clients")
    a.axhline(med["generate"], color="k", ls="--", lw=1, label="one generate stream")
    a.set_xticks(list(x), names)
    a.set_ylabel("new tokens/s (all clients)")
    a.legend(fontsize=8)
    b.bar(list(x), [statistics.median(ttft[n]) for n in names], 0.5, color="tab:orange")
    b.set_xticks(list(x), names)
    b.set_ylabel(f"p50 time to first token, {args.clients} together (s)")
    fig.suptitle(f"fgpt serve, {args.weights or args.config}, --max_batch {args.max_batch}")
    fig.tight_layout()
    tmp = args.png.with_name(args.png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

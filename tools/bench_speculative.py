"""Speculative greedy decoding against plain greedy decoding of the same model and dtype.

Prompts are held-out text (a prepared data directory's val.bin): --prompts
windows of --prompt_tokens tokens spread over it. Each contender continues each prompt
greedily by --new_tokens tokens, in rounds interleaved over the contenders (plain; prompt
lookup; the draft, when --draft names one); the report gives each one's total decode
tokens/s (median over rounds), its ratio to plain, the guesses kept per forward, and
whether its tokens equal plain's (they must: speculative decoding is exact).

    python tools/bench_speculative.py --weights runs/shakespeare --data data/shakespeare [--draft runs/draft]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functional_gpt import load_params  # noqa: E402
from functional_gpt.device import cpu_flags  # noqa: E402
from functional_gpt.generation.decoding import generate  # noqa: E402
from functional_gpt.generation.speculative import DraftModel, PromptLookup, speculative_generate  # noqa: E402
from functional_gpt.training.data import load_tokens  # noqa: E402


def continue_all(params, config, prompts, n, proposer, k):
    """-> (tokens per prompt, decode seconds: each prompt's first token to its last)."""
    outputs, seconds = [], 0.0
    for prompt in prompts:
        if proposer is None:
            steps = generate(params, [prompt], config, max_new_tokens=n)
        else:
            steps = speculative_generate(params, prompt, config, max_new_tokens=n, proposer=proposer, k=k)
        tokens, times = [], []
        for step in steps:
            times.append(time.perf_counter())
            tokens.append(int(step[0]))
        outputs.append(tokens)
        seconds += times[-1] - times[0]
    return outputs, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True, help="a prepared data directory (its val.bin is the held-out text)")
    ap.add_argument("--draft", help="a draft model's weights")
    ap.add_argument("--prompt_lookup", type=int, default=3)
    ap.add_argument("--speculate", type=int, nargs="+", default=[4], help="guesses per forward (each a contender)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt_tokens", type=int, default=48)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    params, config = load_params(args.weights, dtype=dtype)
    tokens = load_tokens(args.data, "val", config.vocab_size)
    gap = (len(tokens) - args.prompt_tokens) // args.prompts
    prompts = [[int(t) for t in tokens[i * gap:i * gap + args.prompt_tokens]] for i in range(args.prompts)]
    contenders = {"plain": None}
    for k in args.speculate:
        contenders[f"lookup{args.prompt_lookup}-k{k}"] = (PromptLookup(args.prompt_lookup), k)
        if args.draft:
            draft, draft_config = load_params(args.draft, dtype=dtype)
            contenders[f"draft-k{k}"] = (DraftModel(draft, draft_config, config), k)
    flags = " ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
    print(f"{args.weights} ({args.dtype}): {args.prompts} held-out prompts of {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new each, greedy, {torch.get_num_threads()} threads; CPU {platform.machine()} [{flags}]")
    rates, outputs = {name: [] for name in contenders}, {}
    with torch.inference_mode():
        continue_all(params, config, prompts[:1], 8, None, 1)  # warm up
        for r in range(args.rounds):
            for name, spec in contenders.items():
                proposer, k = spec if spec else (None, 1)
                out, seconds = continue_all(params, config, prompts, args.new_tokens, proposer, k)
                rates[name].append(sum(len(o) - 1 for o in out) / seconds)
                outputs[name] = out
                print(f"  round {r + 1} {name:14s} {rates[name][-1]:8.1f} tok/s", flush=True)
    base = statistics.median(rates["plain"])
    print("\nmedian decode tokens/s:")
    for name in contenders:
        same = sum(a == b for a, b in zip(outputs[name], outputs["plain"]))
        rate = statistics.median(rates[name])
        print(f"  {name:14s} {rate:8.1f}   {rate / base:5.2f}x plain   outputs equal to plain: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()

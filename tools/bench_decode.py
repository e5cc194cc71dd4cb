"""Decode speed: functional_gpt's cached generation vs transformers' generate(use_cache=True).

Same weights (a random init of the config, copied into GPT2LMHeadModel), batch 1, greedy,
both under torch.inference_mode with the same threads, side by side in one run. Decode
tokens/s = (new tokens - 1) / (time of the last token - time of the first), so the prefill
is left out of both; each side is timed `--repeats` times in alternation, best kept. Each
prompt length is its own comparison: transformers' cache grows by concatenation each step,
ours is preallocated, so the ratio grows with the context.

    python tools/bench_decode.py [--preset gpt2] [--new_tokens 512] [--prompt_tokens 64 512]
"""

import argparse
import time

import torch
import transformers

from functional_gpt import flatten, init_params, preset
from functional_gpt.generation.decoding import generate


class Clock:  # a transformers streamer: put() gets the prompt, then each new token
    def __init__(self):
        self.times, self.tokens = [], []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        pass


def decode_rate(times):
    return (len(times) - 1) / (times[-1] - times[0])


def run_ours(params, config, prompt, n):
    times, tokens = [], []
    for step in generate(params, [prompt.tolist()], config, max_new_tokens=n):
        times.append(time.perf_counter())
        tokens.append(int(step[0]))
    return decode_rate(times), tokens


def run_hf(model, prompt, n):
    clock = Clock()
    model.generate(torch.tensor([prompt.tolist()]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                   max_new_tokens=n, do_sample=False, use_cache=True, streamer=clock)
    new = [t[0] for t in clock.tokens[1:]]  # the first put is the prompt
    return decode_rate(clock.times[1:]), new


def weights_floor(params, repeats=20):
    """Tokens/s if a decode step cost nothing but its matrix products: the step's 4 per
    block plus the LM head, on the same weights, back to back (best of `repeats`). Batch-1
    decoding streams every weight once per token, so this is the memory-bandwidth ceiling."""
    mats = [block[a][m]["weight"] for block in params["h"] for a, m in
            (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))]
    inputs = [torch.randn(1, w.shape[0]) for w in mats]
    head, x = params["wte"]["weight"], torch.randn(1, params["wte"]["weight"].shape[1])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w, a in zip(mats, inputs):
            a @ w
        x @ head.T
        best = min(best, time.perf_counter() - t)
    return 1 / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--new_tokens", type=int, default=512)
    ap.add_argument("--prompt_tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    if max(args.prompt_tokens) + args.new_tokens > config.n_positions:
        ap.error(f"--prompt_tokens + --new_tokens must fit in n_positions={config.n_positions}")
    params = init_params(config, seed=0)
    hf_config = transformers.GPT2Config(**config.to_dict(), activation_function="gelu_new",
                                        eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.transformer.load_state_dict(flatten(params), strict=False)
    model.generation_config.eos_token_id = None
    print(f"{args.preset}: batch 1, {args.new_tokens} new tokens, greedy, {args.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    summary = []
    with torch.inference_mode():
        for prompt_tokens in args.prompt_tokens:
            prompt = torch.randint(config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
            summary.append(compare(params, config, model, prompt, args))
        floor = weights_floor(params)
    for line in summary:
        print(line)
    print(f"weights-only ceiling (the step's matrix products alone): {floor:.2f} tok/s")


def compare(params, config, model, prompt, args):
    """Time both sides on one prompt; print each run, return the summary line."""
    print(f"prompt {len(prompt)} tokens:")
    run_ours(params, config, prompt, 8), run_hf(model, prompt, 8)  # warm up
    ours, theirs = [], []
    for r in range(args.repeats):
        rate, ours_tokens = run_ours(params, config, prompt, args.new_tokens)
        ours.append(rate)
        rate, hf_tokens = run_hf(model, prompt, args.new_tokens)
        theirs.append(rate)
        print(f"  run {r + 1}: functional_gpt {ours[-1]:7.2f} tok/s   transformers {theirs[-1]:7.2f} tok/s")
    same = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
    return (f"prompt {len(prompt):4d}: decode tokens/s (best of {args.repeats}): functional_gpt {max(ours):.2f}, "
            f"transformers {max(theirs):.2f}, ratio {max(ours) / max(theirs):.2f}x; "
            f"greedy tokens equal: {same}/{len(hf_tokens)}")


if __name__ == "__main__":
    main()

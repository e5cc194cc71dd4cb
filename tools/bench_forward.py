"""Forward and training-step speed of functional_gpt vs transformers, side by side.

Both run the same weights on the same tokens in one process, timed alternately so that
load from elsewhere hits both alike; prints median tokens/s of each and the ratio
(transformers' time / ours: above 1 means functional_gpt is faster).
Usage: python tools/bench_forward.py [--preset gpt2] [--batch 1] [--seq 256]
"""

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from functional_gpt import flatten, forward, init_params, load_params, preset, save_params, write_hf_config


def alternate(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each callable, run in turn after one warm-up call each."""
    ours(), theirs()
    times = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((ours, theirs), times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = preset(args.preset)
    with tempfile.TemporaryDirectory() as d:
        save_params(f"{d}/model.safetensors", init_params(config, seed=0), config)
        write_hf_config(config, f"{d}/config.json")
        params, _ = load_params(d)
        reference = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
    for module in reference.modules():  # no dropout on either side
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    leaves = list(flatten(params).values())
    for t in leaves:
        t.requires_grad_()
    tokens = torch.randint(config.vocab_size, (args.batch, args.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:].flatten()

    @torch.inference_mode()
    def ours_forward():
        forward(params, x, config)

    @torch.inference_mode()
    def theirs_forward():
        reference(x)

    def ours_step():
        loss = F.cross_entropy(forward(params, x, config).flatten(0, 1), y)
        torch.autograd.grad(loss, leaves)

    def theirs_step():
        reference.zero_grad(set_to_none=True)
        F.cross_entropy(reference(x).logits.flatten(0, 1), y).backward()

    n = args.batch * args.seq
    print(f"{args.preset}, batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads")
    for label, ours, theirs in [("forward", ours_forward, theirs_forward), ("forward+backward", ours_step, theirs_step)]:
        t_ours, t_theirs = alternate(ours, theirs, args.repeats)
        print(
            f"{label:17s} functional_gpt {n / t_ours:8.0f} tok/s   transformers {n / t_theirs:8.0f} tok/s"
            f"   ratio {t_theirs / t_ours:.2f}x"
        )


if __name__ == "__main__":
    main()

"""torch.func against plain loops (a benchmark, not a test).

    python tools/bench_func.py [--config cpu-tiny] [--batch 16] [--context 64] [--members 4] [--rounds 5]

Per-example gradients: `func.per_example_grads` over a batch against a loop of one
`torch.autograd.grad` per window. Ensemble: `func.ensemble_logits` over M stacked models
against M `forward` calls. Each case runs in its own subprocess per round, the two ways
alternating, so its peak RSS is its own (ru_maxrss of the child). Prints medians of time
and peak RSS and their ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
import torch.nn.functional as F
from functional_gpt import flatten, forward, init_params, preset, unflatten
from functional_gpt.interp.func import ensemble_logits, per_example_grads, stack_params
what, config_name, batch, context, members = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
config = preset(config_name)
params = init_params(config, seed=0)
g = torch.Generator().manual_seed(0)
x = torch.randint(config.vocab_size, (batch, context), generator=g)
y = torch.randint(config.vocab_size, (batch, context), generator=g)
if what.startswith("ensemble"):
    models = [init_params(config, seed=s) for s in range(members)]
    stacked = stack_params(models) if what == "ensemble_vmap" else None
t0 = time.perf_counter()
if what == "grads_vmap":
    per_example_grads(params, x, y, config)
elif what == "grads_loop":
    flat = {k: v.requires_grad_() for k, v in flatten(params).items()}
    out = []
    for b in range(batch):
        loss = F.cross_entropy(forward(unflatten(flat), x[b:b + 1], config)[0], y[b])
        out.append(torch.autograd.grad(loss, list(flat.values())))
    out = [torch.stack(g) for g in zip(*out)]  # the same [B, ...] result per_example_grads returns
elif what == "ensemble_vmap":
    with torch.no_grad():
        ensemble_logits(stacked, x, config)
else:
    with torch.no_grad():
        torch.stack([forward(m, x, config) for m in models])
print(json.dumps({"s": time.perf_counter() - t0, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(what, args) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, what, args.config, str(args.batch), str(args.context),
                           str(args.members)], capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        sys.exit(f"bench_func: {what} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cpu-tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for fast, slow in (("grads_vmap", "grads_loop"), ("ensemble_vmap", "ensemble_loop")):
        results = {fast: [], slow: []}
        for r in range(args.rounds):
            for what in ((fast, slow) if r % 2 == 0 else (slow, fast)):
                results[what].append(run(what, args))
        med = {w: {k: statistics.median(x[k] for x in v) for k in ("s", "rss_mib")} for w, v in results.items()}
        print(f"{fast}: {med[fast]['s']:.3f} s, peak RSS {med[fast]['rss_mib']:.0f} MiB; {slow}: {med[slow]['s']:.3f} s, "
              f"{med[slow]['rss_mib']:.0f} MiB; time ratio (vmap / loop) {med[fast]['s'] / med[slow]['s']:.2f}, "
              f"memory ratio {med[fast]['rss_mib'] / med[slow]['rss_mib']:.2f}", flush=True)


if __name__ == "__main__":
    main()

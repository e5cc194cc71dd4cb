"""Untapped speed of this checkout against another one: single-request decode, or a
forward (inference, or with backward as training runs it) (a benchmark, not a test).

    git archive <commit> functional_gpt | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python tools/bench_decode_path.py --baseline /tmp/before [--config gpt2] [--rounds 15] [--what decode]

Both versions of the package run in this one process (the baseline's copied under the
name functional_gpt_baseline), on the same random-weight params, one torch thread. Each
round times, in alternating order, greedy `generate` of each version from one 128-token
prompt for --new_tokens tokens: the decode steps, every token after the first; or
(--what forward / backward) `forward` on a [4, min(256, n_positions)] batch without or with the backward
pass. Prints the medians: ms per token (or per call) of each version and their ratio.
"""

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_baseline(tree: Path):
    """The baseline's functional_gpt, imported as functional_gpt_baseline (its imports are relative)."""
    copy = Path(tempfile.mkdtemp(prefix="fgpt-baseline-"))
    shutil.copytree(tree / "functional_gpt", copy / "functional_gpt_baseline")
    sys.path.insert(0, str(copy))
    # the layout of subpackages, or the flat one before it (commits up to 3826f04)
    layout = (copy / "functional_gpt_baseline" / "model").is_dir()
    paths = ("generation.decoding", "model.config", "model.transformer") if layout else ("generate", "config", "model")
    return tuple(importlib.import_module(f"functional_gpt_baseline.{m}") for m in paths)


def ms_per_forward(forward, params, tokens, config, backward: bool) -> float:
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        logits = forward(params, tokens, config)
        if backward:
            logits.float().square().mean().backward()
    return 1000 * (time.perf_counter() - start)


def ms_per_token(generate, sampling, params, prompt, config, new_tokens: int) -> float:
    times = [time.perf_counter() for _ in generate(params, [prompt], config, max_new_tokens=new_tokens,
                                                    sampling=sampling)]
    return 1000 * (times[-1] - times[0]) / (len(times) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout holding the earlier functional_gpt/")
    parser.add_argument("--config", default="gpt2")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--what", choices=["decode", "forward", "backward"], default="decode")
    args = parser.parse_args()
    if not (args.baseline / "functional_gpt").is_dir():
        sys.exit(f"bench_decode_path: --baseline {args.baseline} holds no functional_gpt/")
    from functional_gpt import flatten, init_params, preset
    from functional_gpt.generation import decoding as this
    from functional_gpt.model import config as this_config, transformer as this_model

    versions = {"this": (this, this_config, this_model), "baseline": load_baseline(args.baseline)}
    torch.set_num_threads(1)
    config = preset(args.config)
    params = init_params(config, seed=0)
    prompt = torch.randint(config.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = torch.randint(config.vocab_size, (4, min(256, config.n_positions)), generator=torch.Generator().manual_seed(0))
    if args.what == "backward":
        for t in flatten(params).values():
            t.requires_grad_()
    times = {name: [] for name in versions}
    unit = "token" if args.what == "decode" else "call"
    for r in range(args.rounds + 1):  # round 0 warms up
        order = list(versions) if r % 2 == 0 else list(versions)[::-1]
        for name in order:
            module, configs, model = versions[name]
            if args.what == "decode":
                t = ms_per_token(module.generate, module.Sampling(greedy=True), params, prompt,
                                 configs.preset(args.config), args.new_tokens)
            else:
                t = ms_per_forward(model.forward, params, batch, configs.preset(args.config), args.what == "backward")
            if r:
                times[name].append(t)
        if r:
            print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in versions) + f" ms/{unit}", flush=True)
    mine, base = (statistics.median(times[n]) for n in ("this", "baseline"))
    print(f"median: this {mine:.2f} ms/{unit}, baseline {base:.2f} ms/{unit}, this / baseline = {mine / base:.3f}")


if __name__ == "__main__":
    main()

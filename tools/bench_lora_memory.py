"""Peak memory of one training step: LoRA against full fine-tuning (a benchmark, not a test).

    python tools/bench_lora_memory.py [--preset gpt2-medium] [--rank 8] [--batch 4] [--context 256]

Each contender runs in a fresh process on random weights of the preset: the params, a
fresh training state (AdamW's moments: for every weight in full fine-tuning, for the
adapter's A and B alone with LoRA), then one `train_step` of --batch windows of --context
tokens in float32. Reported: the process's peak resident memory (ru_maxrss) after the
step, the memory held before it, and the trainable parameters. LoRA targets every block
matrix (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) and runs unmerged
(`attach`: the low-rank product per call, no merged copy of a weight).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from functional_gpt import init_params, preset
from functional_gpt.model.lora import TARGETS, init_adapter, trainable_count
from functional_gpt.training.data import Position
from functional_gpt.training.step import Batch, StepSettings, new_state, train_step
config = preset({preset!r})
params = init_params(config, seed=0)
adapter = init_adapter(params, {rank}, targets=TARGETS) if {lora} else None
state = new_state(params, 0, torch.device("cpu"), adapter=adapter)
held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = torch.randint(config.vocab_size, (1, {batch}, {context} + 1), generator=torch.Generator().manual_seed(0))
settings = StepSettings(config=config, lr=1e-4, min_lr=1e-5, warmup_steps=1, decay_steps=10, dropout=False)
start = time.perf_counter()
state, metrics = train_step(state, Batch(t[..., :-1], t[..., 1:], Position()), settings)
seconds = time.perf_counter() - start
trainable = trainable_count(adapter) if adapter is not None else sum(p.numel() for p in state.trainable().values())
print(json.dumps(dict(peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, held_kib=held,
                      trainable=trainable, step_s=seconds, loss=metrics["loss"])))
"""


def run(args, lora: bool) -> dict:
    code = ONE.format(root=str(ROOT), preset=args.preset, rank=args.rank, lora=lora, batch=args.batch,
                      context=args.context)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from functional_gpt.device import cpu_flags

    results = {}
    for name, lora in ((f"LoRA r={args.rank}", True), ("full fine-tuning", False)):
        results[name] = run(args, lora)
        r = results[name]
        print(f"{name}: peak {r['peak_kib'] / 2**20:.2f} GiB, before the step {r['held_kib'] / 2**20:.2f} GiB, "
              f"{r['trainable']:,} trainable, step {r['step_s']:.1f} s", flush=True)
    flags = " ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
    print(f"\n{args.preset}, one float32 step of {args.batch} x {args.context} tokens; "
          f"{platform.machine()}, {os.cpu_count()} cores, flags: {flags}")
    print("| step | peak memory | memory before the step | trainable parameters | step time |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['peak_kib'] / 2**20:.2f} GiB | {r['held_kib'] / 2**20:.2f} GiB | {r['trainable']:,} | "
              f"{r['step_s']:.1f} s |")


if __name__ == "__main__":
    main()

"""`fgpt bench`: functional_gpt's training step and forward pass against transformers'
GPT2LMHeadModel on the same weights and tokens, side by side.

Each measurement runs in its own subprocess (so peak RSS is each contender's own), and
the contenders take turns round by round (A B C D, A B C D, ...) so that load from
elsewhere on a shared machine hits all alike; the report gives medians over rounds and
the per-round ratios against transformers in float32. Before any speed, it checks that
the two agree: the same first-step loss within 1e-4 in float32.

A training step is forward + backward + gradient clipping + AdamW, as `fgpt train` runs
it (ours: `step.train_step`; theirs: the model under torch.autocast for bfloat16, with
torch.optim.AdamW). MFU is the model's FLOPs per step (6 N + 12 L C T per token, N the
parameter count, as nanoGPT estimates it) over the step time, against the float32 or
bfloat16 matmul peak measured on the spot.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .checks import check_choice, check_int, describe
from .errors import UserError

CONTENDERS = ("ours-float32", "ours-bfloat16", "transformers-float32", "transformers-bfloat16")
# On request (--contenders): our bf16 step with --checkpoint_activations.
EXTRA_CONTENDERS = ("ours-bfloat16-checkpointed",)
BASELINE = "transformers-float32"
AGREEMENT = 1e-4  # |first-step loss, ours - theirs| in float32, nats/token


def bench(preset_name: str = "gpt2", *, batch: int = 1, seq: int | None = None, rounds: int = 3, steps: int = 3,
          contenders=CONTENDERS, progress=print) -> dict:
    """Run the benchmark -> the report (see `markdown`): per contender the medians over
    `rounds` of training tokens/s (median of `steps` timed steps after one warm-up),
    forward latency, peak RSS, MFU, and the per-round ratios against transformers fp32."""
    from .model.config import preset
    from .device import cpu_has_bf16

    config = preset(preset_name)
    seq = check_int("--seq", config.n_positions if seq is None else seq, 1, config.n_positions)
    batch, rounds, steps = (check_int(name, value, 1) for name, value in (("--batch", batch), ("--rounds", rounds),
                                                                           ("--steps", steps)))
    if isinstance(contenders, str) or not isinstance(contenders, (list, tuple)) or not contenders:
        raise UserError(f"--contenders: expected a list of contender names, got {describe(contenders)}")
    for c in contenders:
        check_choice("--contenders", c, CONTENDERS + EXTRA_CONTENDERS)
    if not cpu_has_bf16():
        dropped = [c for c in contenders if "bfloat16" in c]
        contenders = [c for c in contenders if "bfloat16" not in c]
        if dropped:
            progress(f"bench: this CPU has no bfloat16 arithmetic (no AVX512-BF16 or AMX); leaving out "
                     f"{', '.join(dropped)}")
        if not contenders:
            raise UserError("--contenders: every one asked for is bfloat16, and this CPU has no bfloat16 arithmetic "
                            "(bf16 would be emulated, far slower than float32); add a float32 contender")
    with tempfile.TemporaryDirectory() as tmp:
        _write_weights(config, Path(tmp))
        job = {"dir": tmp, "batch": batch, "seq": seq, "steps": steps}
        peaks = _run({**job, "kind": "peak"})
        results = {c: [] for c in contenders}
        for r in range(rounds):
            for contender in contenders:
                started = time.perf_counter()
                results[contender].append(_run({**job, "kind": contender}))
                m = results[contender][-1]
                progress(f"round {r + 1}/{rounds} {contender:22s} {m['tokens_per_s']:8.0f} tok/s "
                         f"peak {m['peak_rss_mib']:6.0f} MiB ({time.perf_counter() - started:.0f} s)")
                if r == 0 and contender == contenders[-1]:
                    _check_agreement(results)
    return _report(preset_name, config, batch, seq, peaks, results)


def _write_weights(config, directory: Path) -> None:
    from .model.config import write_hf_config
    from .model.checkpoint import save_params
    from .model.params import init_params

    save_params(directory / "model.safetensors", init_params(config, seed=0), config)
    write_hf_config(config, directory / "config.json")


def _run(job: dict) -> dict:
    """One measurement in a fresh interpreter -> its JSON result."""
    done = subprocess.run([sys.executable, "-m", "functional_gpt.bench", json.dumps(job)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"bench: the {job['kind']} measurement failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_agreement(results: dict) -> None:
    ours, theirs = results.get("ours-float32"), results.get(BASELINE)
    if ours and theirs:
        gap = abs(ours[0]["first_loss"] - theirs[0]["first_loss"])
        if gap > AGREEMENT:
            raise UserError(f"bench: first-step losses differ by {gap:.2e} (ours {ours[0]['first_loss']:.6f}, "
                            f"transformers {theirs[0]['first_loss']:.6f}): no speed is reported for a model "
                            f"that does not compute the reference's loss")


def _report(preset_name, config, batch, seq, peaks, results) -> dict:
    from .model.params import count_params

    n_params = count_params(config)
    flops_per_step = (6 * n_params + 12 * config.n_layer * config.n_embd * seq) * batch * seq
    base = results.get(BASELINE)
    rows = {}
    for contender, runs in results.items():
        peak = peaks["bfloat16" if "bfloat16" in contender else "float32"]
        step_s = statistics.median(r["step_s"] for r in runs)
        row = {
            "tokens_per_s": batch * seq / step_s,
            "step_s": step_s,
            "forward_ms": statistics.median(r["forward_s"] for r in runs) * 1e3,
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "first_loss": runs[0]["first_loss"],
            "mfu": flops_per_step / step_s / (peak * 1e9),
        }
        if base:
            row["speed_ratios"] = [b["step_s"] / r["step_s"] for r, b in zip(runs, base)]
            row["speed_vs_baseline"] = statistics.median(row["speed_ratios"])
            row["rss_vs_baseline"] = row["peak_rss_mib"] / statistics.median(b["peak_rss_mib"] for b in base)
        rows[contender] = row
    return {"preset": preset_name, "batch": batch, "seq": seq, "rounds": len(next(iter(results.values()))),
            "threads": torch.get_num_threads(), "cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "flops_per_step": flops_per_step, "matmul_peak_gflops": peaks,
            "contenders": rows}


def markdown(report: dict) -> str:
    """The report as a Markdown table (and a line saying what was run)."""
    lines = [f"`{report['preset']}`, {report['batch']} x {report['seq']} tokens, {report['threads']} threads, "
             f"{report['cpu']}, torch {report['torch']}, {report['date']}; medians of {report['rounds']} "
             f"interleaved rounds; matmul peak measured here: {report['matmul_peak_gflops']['float32']:.0f} "
             f"GFLOP/s fp32, {report['matmul_peak_gflops'].get('bfloat16', 0):.0f} bf16",
             "",
             "| contender | train tok/s | vs transformers fp32 (per round) | MFU | forward ms | peak RSS MiB "
             "| RSS vs transformers fp32 | first-step loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["contenders"].items():
        ratios = ", ".join(f"{x:.2f}" for x in r.get("speed_ratios", []))
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r.get('speed_vs_baseline', 0):.2f}x ({ratios}) "
                     f"| {r['mfu']:.0%} | {r['forward_ms']:.0f} | {r['peak_rss_mib']:.0f} "
                     f"| {r.get('rss_vs_baseline', 0):.2f}x | {r['first_loss']:.6f} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


# ------------------------------------------------------------ in the subprocess


def _measure(job: dict) -> dict:
    if job["kind"] == "peak":
        return {dtype: _matmul_gflops(getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}
    side, dtype_name, *variant = job["kind"].split("-")
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(50257, (job["steps"] + 1, job["batch"], job["seq"] + 1), generator=generator)
    if side == "ours":
        step, forward = _ours(Path(job["dir"]), dtype, checkpoint=variant == ["checkpointed"])
    else:
        step, forward = _theirs(Path(job["dir"]), dtype)
    losses, times = [], []
    for i in range(job["steps"] + 1):
        x, y = tokens[i, :, :-1], tokens[i, :, 1:]
        started = time.perf_counter()
        losses.append(step(x, y))
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times[1:])
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # of training alone
    forward_times = []
    for i in range(3):
        started = time.perf_counter()
        forward(tokens[i % len(tokens), :, :-1])
        forward_times.append(time.perf_counter() - started)
    return {"first_loss": losses[0], "step_s": step_s, "tokens_per_s": job["batch"] * job["seq"] / step_s,
            "forward_s": statistics.median(forward_times),
            "peak_rss_mib": peak_rss_mib}


def _ours(directory: Path, dtype, checkpoint: bool = False):
    from .model.checkpoint import load_params
    from .training.data import Position
    from .model.transformer import forward
    from .model.params import flatten, unflatten
    from .training.step import Batch, StepSettings, new_state, train_step
    from .training.loop import keep_freed_memory

    keep_freed_memory()  # as `fgpt train` does
    params, config = load_params(directory)
    settings = StepSettings(config, lr=1e-4, min_lr=1e-5, warmup_steps=1, decay_steps=100, weight_decay=0.1,
                            grad_clip=1.0, dtype=dtype, dropout=False, checkpoint_activations=checkpoint)
    state = [new_state(params, 0, torch.device("cpu"))]

    def step(x, y) -> float:
        state[0], metrics = train_step(state[0], Batch(x[None], y[None], Position()), settings)
        return metrics["loss"]

    inference_weights = []  # the params in the compute dtype, cast at the first forward

    @torch.inference_mode()
    def infer(x):
        if not inference_weights:
            inference_weights.append(unflatten({k: t.to(dtype) for k, t in flatten(state[0].params).items()}))
        forward(inference_weights[0], x, config)

    return step, infer


def _theirs(directory: Path, dtype):
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    from .training.optim import decays

    model = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="sdpa")
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    named = [(k.removeprefix("transformer."), p) for k, p in model.named_parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for k, p in named if decays(k, p)], "weight_decay": 0.1},
                                   {"params": [p for k, p in named if not decays(k, p)], "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95))
    low = dtype != torch.float32

    def step(x, y) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=low):
            logits = model(x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    @torch.inference_mode()
    def infer(x):
        with torch.autocast("cpu", dtype=dtype, enabled=low):
            model(x)

    return step, infer


def _matmul_gflops(dtype) -> float:
    """The best rate of GPT-2's block matmul shapes (c_attn, c_fc, c_proj of the MLP, 2048
    rows), best of 10 each: the peak MFU is measured against."""
    best = 0.0
    for n_in, n_out in ((768, 2304), (768, 3072), (3072, 768)):
        a, b = torch.randn(2048, n_in, dtype=dtype), torch.randn(n_in, n_out, dtype=dtype)
        for _ in range(10):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * 2048 * n_in * n_out / (time.perf_counter() - started) / 1e9)
    return best


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))

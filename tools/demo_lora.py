"""Fine-tuning three ways on local data: LoRA r=8, LoRA r=32 and full (a demonstration).

    python tools/demo_lora.py [--pretrain_steps 600] [--steps 200] [--out runs/demo]

Pretrains the main job's model (cpu-small) on the tragedies (`fgpt prepare --plays
tragedies`), then fine-tunes it on the comedies (`--plays comedies --val_files 2`: the
held-out comedies are the local lm-eval tasks' plays) three ways with the same steps,
batch and schedule: LoRA r=8 and r=32 on all four block matrices (alpha = 2r, lr
LORA_LR) and full fine-tuning (lr FULL_LR). Each run is its own `fgpt train` process, so
its peak memory is its own. Reports, for the pretrained model and each fine-tune: the
validation loss on the held-out comedies (all of comedies' val.bin, as the run's final
evaluation), the local lm-eval tasks' scores (`fgpt eval --tasks`), trainable parameters,
peak memory and median tokens/s; draws runs/demo/lora_demo.png (validation loss by step).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_serve import cpu_line  # noqa: E402

LORA_LR, FULL_LR = 2e-3, 3e-4
TASKS = "shakespeare_cloze,shakespeare_scenes,shakespeare_next_line"


def fgpt(*args: str) -> str:
    """Run `python -m functional_gpt ARGS` to the end -> its stderr and stdout (shown as it goes)."""
    print("$ fgpt " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, "-m", "functional_gpt", *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(done.stdout[-1500:], flush=True)
    if done.returncode:
        raise SystemExit(f"fgpt {args[0]} failed ({done.returncode})")
    return done.stdout


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path, log: str) -> dict:
    entries = metrics(run)
    peak = next(line for line in log.splitlines() if "peak memory" in line)
    return {"val_loss": next(m["final_val_loss"] for m in entries if "final_val_loss" in m),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in entries if "tokens_per_s" in m),
            "peak_mib": float(peak.rsplit("peak memory ", 1)[1].split()[0]),
            "curve": [(m["step"], m["val_loss"]) for m in entries if "val_loss" in m]}


def scores(weights: str, adapter: str | None) -> dict:
    from functional_gpt.reference.lm_eval_run import evaluate_tasks

    out = evaluate_tasks(weights, TASKS, adapter=adapter, device="cpu")["results"]
    return {"cloze acc": out["shakespeare_cloze"]["acc,none"],
            "scenes bits/byte": out["shakespeare_scenes"]["bits_per_byte,none"],
            "next line exact": out["shakespeare_next_line"]["exact_match,none"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain_steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    args = ap.parse_args()
    out, data = args.out, args.out / "data"
    if not (data / "tragedies" / "meta.json").exists():
        fgpt("prepare", "--plays", "tragedies", "--out", str(data / "tragedies"))
        fgpt("prepare", "--plays", "comedies", "--val_files", "2", "--out", str(data / "comedies"))
    base = out / "tragedies"
    if not (base / "state.json").exists():
        fgpt("train", "--data", str(data / "tragedies"), "--out", str(base), "--max_steps", str(args.pretrain_steps),
             "--sample_tokens", "0")
    from functional_gpt import flatten, load_params
    from functional_gpt.model.lora_files import load_adapter
    from functional_gpt.training.data import eval_starts, load_tokens
    from functional_gpt.training.loop import val_loss

    base_params, config = load_params(base)
    val = load_tokens(data / "comedies", "val")
    T = config.n_positions  # as a run's evaluations: all of val.bin at the end, 64 fixed windows on the way
    before = val_loss(base_params, config, val, eval_starts(len(val), T), T, "cpu")
    before_quick = val_loss(base_params, config, val, eval_starts(len(val), T, 64), T, "cpu")
    common = ["--data", str(data / "comedies"), "--init", str(base), "--max_steps", str(args.steps),
              "--warmup_steps", "20", "--eval_interval", "25", "--sample_tokens", "0"]
    ways = {"LoRA r=8": ["--lora_rank", "8", "--lora_alpha", "16", "--lr", str(LORA_LR)],
            "LoRA r=32": ["--lora_rank", "32", "--lora_alpha", "64", "--lr", str(LORA_LR)],
            "full fine-tuning": ["--lr", str(FULL_LR)]}
    all_targets = ["--lora_targets", "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"]
    rows = {"pretrained (tragedies)": {"val_loss": before, **scores(str(base), None)}}
    total = sum(t.numel() for t in flatten(base_params).values())
    runs = {name: out / name.lower().replace(" ", "-").replace("=", "") for name in ways}
    existing = next((run for run in runs.values() if run.exists()), None)
    if existing is not None:
        raise SystemExit(f"{existing} exists: remove the fine-tuning runs to measure them again")
    for name, flags in ways.items():
        run, lora = runs[name], name.startswith("LoRA")
        log = fgpt("train", *common, "--out", str(run), *flags, *(all_targets if lora else []))
        row = summary(run, log)
        trainable = (sum(t.numel() for t in load_adapter(run, base_params).tensors.values()) if lora else total)
        weights, adapter = (str(base), str(run)) if lora else (str(run), None)
        rows[name] = {**row, "trainable": trainable, **scores(weights, adapter)}
    print(f"\ncpu-small pretrained {args.pretrain_steps} steps on the tragedies, fine-tuned {args.steps} steps of "
          f"8 x 128 tokens on the comedies; held out: the last two comedies; {cpu_line()}")
    print("| model | val loss (held-out comedies) | cloze acc | scenes bits/byte | next line exact | trainable "
          "parameters | peak memory | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        extra = (f"{r['trainable']:,} | {r['peak_mib']:.0f} MiB | {r['tokens_per_s']:.0f}" if "trainable" in r
                 else "| |")
        print(f"| {name} | {r['val_loss']:.4f} | {r['cloze acc']:.3f} | {r['scenes bits/byte']:.4f} | "
              f"{r['next line exact']:.3f} | {extra} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from functional_gpt.files import save_png

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in rows.items():
        if "curve" in r:
            ax.plot(*zip(*([(0, before_quick)] + r["curve"])), "o-", label=f"{name}: {r['val_loss']:.3f} at the end")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("val loss, 64 windows of the held-out comedies")
    ax.set_title("cpu-small from the tragedies to the comedies")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, out / "lora_demo.png")
    print(f"wrote {out / 'lora_demo.png'}")


if __name__ == "__main__":
    main()

"""The main job's choices at equal wall time: each variant trains for the same --time_budget.

    python tools/sweep_budget.py [--budget 3m] [--out runs/sweep] [--only "main job,adamw"]

Every variant is the main job (`fgpt train` with its defaults: cpu-small, Muon + AdamW,
warmup-stable-decay, lr 2e-3, batches of 8 x 128) with one thing changed: the optimizer,
the schedule, the learning rate, the batch, the context or the model's shape (a shape
other than cpu-small starts from random weights of that shape, written here with
init_params and given as --init). Each is its own `fgpt train` process, run one after
the other, never two at once. Reports each variant's final validation loss (all of
val.bin at 128 tokens, the run's own final evaluation), steps reached and median tokens/s;
writes <out>/sweep.json and <out>/sweep.png. A variant whose run directory already holds
a final validation loss is not run again, so an interrupted sweep picks up where it
stopped (remove <out> to start over).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_serve import cpu_line  # noqa: E402

SHAPES = {"6 x 256": (6, 256, 4), "4 x 384": (4, 384, 6), "8 x 192": (8, 192, 4)}  # n_layer, n_embd, n_head
VARIANTS = {  # name -> (what it changes, fgpt train flags)
    "main job": ("", []),
    "adamw": ("optimizer", ["--optimizer", "adamw"]),
    "cosine": ("schedule", ["--schedule", "cosine"]),
    "lr 8e-4": ("learning rate", ["--lr", "8e-4"]),
    "lr 1.6e-3": ("learning rate", ["--lr", "1.6e-3"]),
    "lr 3.2e-3": ("learning rate", ["--lr", "3.2e-3"]),
    "batch 4": ("batch", ["--batch_size", "4"]),
    "batch 16": ("batch", ["--batch_size", "16"]),
    "context 64": ("context", ["--context_length", "64"]),
    **{name: ("shape", []) for name in SHAPES},
}


def init_of(name: str, out: Path) -> list[str]:
    """--init flags for a shape variant: random weights of that shape (seed 0), else none."""
    if name not in SHAPES:
        return []
    from functional_gpt import init_params, preset, save_params
    import dataclasses

    n_layer, n_embd, n_head = SHAPES[name]
    config = dataclasses.replace(preset("cpu-small"), n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    path = out / f"init-{n_layer}x{n_embd}.safetensors"
    if not path.exists():
        save_params(path, init_params(config, seed=0), config)
    return ["--init", str(path)]


def run_variant(name: str, flags: list[str], budget: str, out: Path) -> dict:
    """Train one variant (unless its run is complete) -> its figures."""
    run = out / name.replace(" ", "_")
    if not (run / "metrics.jsonl").exists() or "final_val_loss" not in (run / "metrics.jsonl").read_text():
        if run.exists():
            raise SystemExit(f"{run} holds an unfinished run: remove it to run {name!r} again")
        command = [sys.executable, "-m", "functional_gpt", "train", "--time_budget", budget, "--out", str(run),
                   "--sample_tokens", "0", *flags, *init_of(name, out)]
        print(f"\n== {name}: fgpt {' '.join(command[3:])}", flush=True)
        began = time.time()
        done = subprocess.run(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(done.stdout[-600:], flush=True)
        if done.returncode:
            raise SystemExit(f"{name}: fgpt train failed ({done.returncode})")
        print(f"{name}: {time.time() - began:.0f}s in all", flush=True)
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((run / "state.json").read_text())
    return {"val_loss": next(m["final_val_loss"] for m in entries if "final_val_loss" in m),
            "steps": state["step"], "seconds": state["time_spent"],
            "tokens": state["step"] * state["config"]["batch_size"] * state["config"]["context_length"],
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in entries if "tokens_per_s" in m),
            "curve": [(m["step"], m["val_loss"]) for m in entries if "val_loss" in m]}


def plot(results: dict, budget: str, cpu: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from functional_gpt.files import save_png

    names = sorted(results, key=lambda n: results[n]["val_loss"])
    groups = sorted({VARIANTS[n][0] for n in names})
    colours = dict(zip(groups, plt.cm.tab10.colors))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    bars = ax.barh(names, [results[n]["val_loss"] for n in names], color=[colours[VARIANTS[n][0]] for n in names])
    for bar, name in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {results[name]['val_loss']:.3f} ({results[name]['steps']} steps)", va="center", fontsize=8)
    low = min(r["val_loss"] for r in results.values())
    ax.set_xlim(low - 0.3, max(r["val_loss"] for r in results.values()) + 0.25)
    ax.invert_yaxis()
    ax.set_xlabel("final validation loss, nats/token (all of val.bin)")
    ax.set_title(f"The main job's choices, each trained for {budget}\n{cpu}", fontsize=9)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups],
              labels=[g or "main job" for g in groups], fontsize=8, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="3m", help="each variant's --time_budget")
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    names = list(VARIANTS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--only: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_line()
    print(cpu, flush=True)
    results = {}
    for name in names:
        results[name] = run_variant(name, VARIANTS[name][1], args.budget, out)
        (out / "sweep.json").write_text(json.dumps({"budget": args.budget, "cpu": cpu, "results": results}, indent=1))
    print(f"\n{cpu}\neach variant: --time_budget {args.budget}\n")
    print(f"{'variant':<12} {'val loss':>8} {'steps':>6} {'tokens':>8} {'tok/s':>6}")
    for name in sorted(results, key=lambda n: results[n]["val_loss"]):
        r = results[name]
        print(f"{name:<12} {r['val_loss']:8.4f} {r['steps']:6d} {r['tokens']:8d} {r['tokens_per_s']:6.0f}")
    plot(results, args.budget, cpu, out / "sweep.png")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")


if __name__ == "__main__":
    main()

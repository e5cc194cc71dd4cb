"""`fgpt train` against karpathy/nanoGPT's train.py for the same wall time on the same data (a benchmark).

    python tools/race_nanogpt.py --nanogpt PATH [--budget 10m] [--data data/shakespeare] [--out runs/race]
                                 [--fgpt_args "..." | --fgpt_run RUN]

PATH is a checkout of github.com/karpathy/nanoGPT (its train.py, model.py, configurator.py);
nothing of it is downloaded here or copied into this repository. One after the other, never
together, so that no timing overlaps another:
  ours      `fgpt train --time_budget BUDGET` into OUT/fgpt (with --fgpt_args), or the
            finished run RUN of that budget on --data (the main job's, runs/shakespeare);
  nanoGPT   its train.py from scratch in the working directory OUT/nanogpt, whose
            data/fgpt/{train,val}.bin link to --data's: first 25 iterations that measure
            its seconds per iteration, then the run whose cosine schedule is fitted to the
            budget (max_iters = lr_decay_iters = the iterations the budget holds at that
            pace, less the calibration's fixed cost); a timer stops it at the budget should
            the estimate run over.
Both are then scored by one evaluation (`mean_loss`): the mean next-token cross-entropy in
nats/token over every non-overlapping window of the training context in val.bin. Prints a
table with the CPU's flags, and writes OUT/race.json and OUT/race.png (both train-loss
curves, the validation losses as markers).

nanoGPT keeps its defaults (AdamW lr 6e-4 to min_lr 6e-5 on a cosine, betas 0.9/0.95, weight
decay 0.1, clip 1.0, dropout 0, bias False, vocab 50304) but for what must match ours, read
from our run's state.json: n_layer, n_head, n_embd, block_size (our context), batch_size,
gradient_accumulation_steps (ours), warmup_iters (our warmup_steps), and the budget's
max_iters = lr_decay_iters. For the race itself: device=cpu, compile=False, dtype=float32 (on
a CPU train.py computes in float32 whatever dtype says; its default float16 would only ask
for a GradScaler that torch then disables with a warning), dataset=fgpt, wandb_log=False,
eval_iters=1 and eval_interval past max_iters (it evaluates at iteration 0 only: we score it
ourselves), always_save_checkpoint=False. So it writes no ckpt.pt (only an evaluation after
iteration 0 would) and finds no meta.pkl: nothing is ever unpickled here. Ours keeps its
own defaults (race.json records them); on a CPU with bfloat16 arithmetic they train in bf16
while train.py on a CPU cannot, so pass --fgpt_args "--dtype float32" to race at one precision.

nanoGPT runs in a child process of this script (`--drive JOB`, see `drive`): it sets
train.py's `--key=value` overrides as sys.argv, execs train.py's source with the working
directory as cwd and the checkout on sys.path, then scores the `model` it leaves behind.
torch 2.13 needs no shim: torch.cuda.amp.GradScaler is still there (deprecated, a
FutureWarning in the log), and everything else train.py and model.py call works on CPU.
"""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_serve import cpu_line  # noqa: E402

CALIBRATION_ITERS = 25
WARMUP_ITERS = 5  # calibration iterations left out of the pace (the first one also holds an evaluation)
ITER_LINE = re.compile(r"iter (\d+): loss (\S+), time ([\d.]+)ms")  # train.py's line per iteration


def fgpt_command(args, run_dir: Path) -> list[str]:
    """Our side's command line: `fgpt train` for the budget, the rest its defaults or --fgpt_args."""
    return [sys.executable, "-m", "functional_gpt", "train", "--time_budget", args.budget, "--data", str(args.data),
            "--out", str(run_dir), "--sample_tokens", "0", *shlex.split(args.fgpt_args)]


def check_inputs(args) -> None:
    """One-line SystemExits for a checkout that is not nanoGPT's, data that is not prepared,
    an --out that already holds a race."""
    missing = [f for f in ("train.py", "model.py", "configurator.py") if not (args.nanogpt / f).is_file()]
    if missing:
        raise SystemExit(f"--nanogpt {args.nanogpt}: not a nanoGPT checkout (no {', '.join(missing)})")
    missing = [f for f in ("train.bin", "val.bin") if not (args.data / f).is_file()]
    if missing:
        raise SystemExit(f"--data {args.data}: not a prepared data directory (no {', '.join(missing)}; "
                         f"run `fgpt prepare`)")
    taken = [d for d in ("fgpt", "nanogpt") if (args.out / d).exists()]
    if taken:
        raise SystemExit(f"--out {args.out}: already holds {' and '.join(taken)}/ of an earlier race; "
                         f"pick another --out or remove them")


def run_logged(command: list[str], log: Path, what: str, cwd: Path | None = None) -> float:
    """Run `command` with its output into `log` -> its wall time in seconds; a failure is a
    one-line SystemExit quoting the log's last line."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    seconds = time.perf_counter() - t0
    if code:
        last = next((line for line in reversed(log.read_text(encoding="utf-8").splitlines()) if line.strip()), "")
        raise SystemExit(f"{what} failed (exit {code}): {last.strip()} (log: {log})")
    return seconds


def mean_loss(loss_of, tokens, context_length: int) -> tuple[float, int]:
    """The evaluation both sides share: mean next-token cross-entropy (nats/token) over every
    non-overlapping window of `context_length` tokens of `tokens`, `loss_of(x, y)` being the
    mean over a batch (x, y: int64 [B, T]) -> (loss, number of windows)."""
    import torch

    from functional_gpt.training.data import eval_starts, gather_windows

    starts = eval_starts(len(tokens), context_length)
    batch = max(1, 2048 // context_length)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            x, y = gather_windows(tokens, starts[i : i + batch], context_length)
            total += float(loss_of(x, y)) * y.numel()
            count += y.numel()
    return total / count, len(starts)


# ---------------------------------------------------------------------------- ours


def race_ours(args, out: Path) -> dict:
    """Train our side for the budget, then score it -> its numbers, config and loss curve."""
    from functional_gpt.training.runs import read_metrics, read_state

    if args.fgpt_run is not None:  # a finished run of the budget: the main job's, say
        run_dir, command, wall = args.fgpt_run, None, None
        print(f"ours: the run in {run_dir}", flush=True)
    else:
        run_dir, log = out / "fgpt", out / "fgpt.log"
        command = fgpt_command(args, run_dir)
        print(f"ours: fgpt {shlex.join(command[3:])} (log: {log})", flush=True)
        wall = run_logged(command, log, "fgpt train")
    state, metrics = read_state(run_dir), read_metrics(run_dir)
    if state["config"].get("time_budget") != args.budget:
        raise SystemExit(f"--fgpt_run {run_dir}: trained for --time_budget {state['config'].get('time_budget')}, "
                         f"not the race's --budget {args.budget}")
    if Path(state["data_dir"]).resolve() != args.data.resolve():
        raise SystemExit(f"--fgpt_run {run_dir}: trained on {state['data_dir']}, not the race's --data {args.data}")
    cfg = state["config"]
    tokens_per_update = cfg["batch_size"] * cfg["grad_accum"] * cfg["context_length"]
    steps = [m for m in metrics if "loss" in m]
    step_seconds = sum(tokens_per_update / m["tokens_per_s"] for m in steps)
    own = next(m["final_val_loss"] for m in metrics if "final_val_loss" in m)
    print(f"ours: {state['step']} updates in {state['time_spent']:.1f} s of the budget; scoring it on val.bin",
          flush=True)
    scored = score_ours(run_dir, args.data, cfg["context_length"])
    print(f"ours: val loss {scored['val_loss']:.4f} over {scored['windows']} windows (fgpt train's own final "
          f"evaluation: {own:.4f})", flush=True)
    return {"command": command, "updates": state["step"], "step_seconds": step_seconds,
            "budget_seconds_spent": state["time_spent"],
            "tokens_per_s": len(steps) * tokens_per_update / step_seconds, "wall_seconds": wall, **scored,
            "own_final_val_loss": own, "curve": [(m["step"], m["loss"]) for m in steps], "config": cfg,
            "model_config": state["model_config"]}


def score_ours(run_dir: Path, data: Path, context_length: int) -> dict:
    """Our trained run on val.bin, through `forward` and cross_entropy -> val_loss, windows, parameters."""
    import torch.nn.functional as F

    from functional_gpt import flatten, forward, load_params
    from functional_gpt.training.data import load_tokens

    params, config = load_params(run_dir)
    loss_of = lambda x, y: F.cross_entropy(forward(params, x, config).flatten(0, 1), y.flatten())  # noqa: E731
    val, windows = mean_loss(loss_of, load_tokens(data, "val"), context_length)
    return {"val_loss": val, "windows": windows, "parameters": sum(t.numel() for t in flatten(params).values())}


# ---------------------------------------------------------------------------- nanoGPT


def nanogpt_overrides(ours: dict, max_iters: int) -> dict:
    """train.py's overrides of its defaults: our shape, batch, context and warm-up, a schedule
    of `max_iters`, and what the race needs (see the module doc)."""
    cfg, model = ours["config"], ours["model_config"]
    return {"n_layer": model["n_layer"], "n_head": model["n_head"], "n_embd": model["n_embd"],
            "block_size": cfg["context_length"], "batch_size": cfg["batch_size"],
            "gradient_accumulation_steps": cfg["grad_accum"], "warmup_iters": cfg["warmup_steps"],
            "max_iters": max_iters, "lr_decay_iters": max_iters, "eval_interval": max_iters + 1, "eval_iters": 1,
            "always_save_checkpoint": False, "dataset": "fgpt", "device": "cpu", "compile": False,
            "dtype": "float32", "wandb_log": False}


def working_dir(out: Path, nanogpt: Path, data: Path) -> Path:
    """OUT/nanogpt, where train.py runs: its configurator.py and data/fgpt/{train,val}.bin
    linked in, nothing else (no meta.pkl)."""
    work = out / "nanogpt"
    (work / "data" / "fgpt").mkdir(parents=True)
    for name in ("train.bin", "val.bin"):
        (work / "data" / "fgpt" / name).symlink_to((data / name).resolve())
    (work / "configurator.py").symlink_to((nanogpt / "configurator.py").resolve())
    return work


def run_nanogpt(name: str, work: Path, job: dict) -> dict:
    """One train.py run in its own process (`drive`) -> its result, with the per-iteration
    losses and times train.py printed."""
    (work / f"{name}.job.json").write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    log = work / f"{name}.log"
    wall = run_logged([sys.executable, str(Path(__file__).resolve()), "--drive", f"{name}.job.json"], log,
                      f"nanoGPT's {name}", cwd=work)
    result = json.loads((work / f"{name}.json").read_text(encoding="utf-8"))
    iters = [(int(i), float(loss), float(ms) / 1000) for i, loss, ms in ITER_LINE.findall(log.read_text("utf-8"))]
    return {**result, "wall_seconds": wall, "log": str(log), "curve": [(i + 1, loss) for i, loss, _ in iters],
            "iter_seconds": [s for *_, s in iters]}


def fit_iters(calibration: dict, budget: float) -> tuple[int, float, float]:
    """-> (max_iters the budget holds, seconds per iteration, fixed seconds): the pace of the
    calibration's iterations after the warm-up, and what its wall time holds beyond that pace
    (setup, the first iterations). train.py runs iterations 0..max_iters."""
    steady = calibration["iter_seconds"][WARMUP_ITERS:]
    pace = sum(steady) / len(steady)
    fixed = max(0.0, calibration["train_seconds"] - calibration["iters"] * pace)
    return max(1, int((budget - fixed) / pace) - 1), pace, fixed


def race_nanogpt(args, out: Path, ours: dict, budget: float) -> dict:
    """nanoGPT's calibration, then its run fitted to the budget -> its numbers."""
    work = working_dir(out, args.nanogpt, args.data)
    job = {"nanogpt": str(args.nanogpt.resolve()), "data": str((work / "data" / "fgpt").resolve()),
           "budget_s": None, "score": False}
    print(f"nanoGPT: calibration, {CALIBRATION_ITERS} iterations (log: {work / 'calibration.log'})", flush=True)
    calibration = run_nanogpt("calibration", work, {**job, "overrides": nanogpt_overrides(ours, CALIBRATION_ITERS - 1)})
    max_iters, pace, fixed = fit_iters(calibration, budget)
    print(f"nanoGPT: {pace:.3f} s/iteration after {WARMUP_ITERS} warm-up ones, {fixed:.1f} s fixed: "
          f"max_iters = lr_decay_iters = {max_iters}; its run for {args.budget} (log: {work / 'run.log'})", flush=True)
    overrides = nanogpt_overrides(ours, max_iters)
    result = run_nanogpt("run", work, {**job, "overrides": overrides, "budget_s": budget, "score": True})
    stopped = " (stopped at the budget)" if result["stopped_at_budget"] else ""
    print(f"nanoGPT: {result['iters']} iterations in {result['train_seconds']:.1f} s{stopped}; val loss "
          f"{result['val_loss']:.4f} over {result['windows']} windows", flush=True)
    tokens_per_update = overrides["batch_size"] * overrides["gradient_accumulation_steps"] * overrides["block_size"]
    step_seconds = sum(result["iter_seconds"])
    return {**result, "overrides": overrides, "step_seconds": step_seconds,
            "tokens_per_s": len(result["iter_seconds"]) * tokens_per_update / step_seconds,
            "calibration": {"seconds_per_iter": pace, "fixed_seconds": fixed, "iters": calibration["iters"],
                            "train_seconds": calibration["train_seconds"]}}


class OutOfTime(Exception):
    """Raised by SIGALRM inside train.py's loop when the budget is spent."""


def _out_of_time(signum, frame):
    raise OutOfTime


def drive(job_file: Path) -> None:
    """(The child process, cwd the working directory.) Run nanoGPT's train.py with the job's
    overrides, stopped by a timer at budget_s if one is set; score its model if asked; write
    {name}.json: iters, train_seconds (exec to the end of the loop), stopped_at_budget,
    parameters, and val_loss (nats/token) and windows."""
    job = json.loads(job_file.read_text(encoding="utf-8"))
    checkout = Path(job["nanogpt"])
    sys.path.insert(0, str(checkout))  # train.py: `from model import GPTConfig, GPT`
    sys.argv = ["train.py", *(f"--{key}={value}" for key, value in job["overrides"].items())]
    source = checkout / "train.py"
    code = compile(source.read_text(encoding="utf-8"), str(source), "exec")
    namespace = {"__name__": "__main__", "__file__": str(source)}
    signal.signal(signal.SIGALRM, _out_of_time)
    t0 = time.perf_counter()
    if job["budget_s"]:
        signal.setitimer(signal.ITIMER_REAL, job["budget_s"])
    try:
        exec(code, namespace)
        stopped = False
    except OutOfTime:
        stopped = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.perf_counter() - t0
    model = namespace["model"]
    result = {"iters": namespace["iter_num"], "train_seconds": seconds, "stopped_at_budget": stopped,
              "parameters": sum(p.numel() for p in model.parameters())}
    if job["score"]:
        from functional_gpt.training.data import load_tokens

        model.eval()
        loss_of = lambda x, y: model(x, y.contiguous())[1]  # noqa: E731 (model.py takes targets.view(-1))
        result["val_loss"], result["windows"] = mean_loss(loss_of, load_tokens(job["data"], "val"),
                                                          model.config.block_size)
    Path(job_file.name.removesuffix(".job.json") + ".json").write_text(json.dumps(result, indent=2) + "\n",
                                                                       encoding="utf-8")


# ---------------------------------------------------------------------------- report


def report(args, out: Path, budget: float, load: float, ours: dict, theirs: dict) -> None:
    """The table on stdout, OUT/race.json, OUT/race.png."""
    from functional_gpt.files import write_json

    cfg, model = ours["config"], ours["model_config"]
    print(f"\nrace for {args.budget} on {args.data}: {model['n_layer']} layers, {model['n_head']} heads, "
          f"n_embd {model['n_embd']}, context {cfg['context_length']}, {cfg['batch_size']} x {cfg['grad_accum']} "
          f"windows per update; val: {ours['windows']} windows; {cpu_line()}; load average {load:.2f} before")
    print("| | parameters | updates | in steps s | tokens/s | training s | val loss | vs fgpt |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r, updates, wall in (("fgpt", ours, ours["updates"], ours["budget_seconds_spent"]),
                                   ("nanoGPT", theirs, theirs["iters"], theirs["train_seconds"])):
        vs = "" if r is ours else f"{r['val_loss'] - ours['val_loss']:+.4f}"
        print(f"| {name} | {r['parameters']:,} | {updates} | {r['step_seconds']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{wall:.1f} | {r['val_loss']:.4f} | {vs} |")
    print("in steps: the sum of each update's time as its trainer logs it; training: fgpt train's loop (steps, "
          "evaluations, checkpoints: the budget it spent), nanoGPT's train.py from exec to the end of its loop")
    write_json(out / "race.json", {"budget": args.budget, "budget_seconds": budget, "data": str(args.data),
                                   "cpu": cpu_line(), "load_average_before": load, "fgpt": ours, "nanogpt": theirs,
                                   "difference": theirs["val_loss"] - ours["val_loss"]})
    draw(out / "race.png", args.budget, ours, theirs)
    print(f"wrote {out / 'race.json'} and {out / 'race.png'}")


def draw(path: Path, budget: str, ours: dict, theirs: dict) -> None:
    """Both train-loss curves over updates (moving averages over the faint raw ones) and each
    side's validation loss as a marker at its last update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from functional_gpt.files import save_png

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, side, color in (("fgpt", ours, "tab:blue"), ("nanoGPT", theirs, "tab:orange")):
        steps, losses = zip(*side["curve"])
        k = max(1, len(losses) // 50)
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps[k - 1 :], np.convolve(losses, np.ones(k) / k, mode="valid"), color=color,
                label=f"{name} train (mean of {k})")
        ax.plot(steps[-1], side["val_loss"], "*", color=color, markersize=12,
                label=f"{name} val, all of val.bin: {side['val_loss']:.3f}")
    ax.set_title(f"fgpt train vs nanoGPT train.py, {budget} each")
    ax.set_xlabel("update")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    ap.add_argument("--budget", default="10m", help="each side's training time: 90s, 10m, 1h")
    ap.add_argument("--data", type=Path, default=Path("data/shakespeare"), help="a prepared data directory")
    ap.add_argument("--out", type=Path, default=Path("runs/race"))
    ap.add_argument("--fgpt_args", default="", help="more flags for fgpt train, one string")
    ap.add_argument("--fgpt_run", type=Path, default=None,
                    help="race this finished `fgpt train --time_budget BUDGET` run instead of training one")
    args = ap.parse_args()
    from functional_gpt.errors import UserError
    from functional_gpt.training.budget import budget_seconds

    try:
        budget = budget_seconds(args.budget, "--budget")
    except UserError as e:
        raise SystemExit(str(e)) from None
    check_inputs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    busy = ": other processes are using the CPU, so both sides' timings will suffer" if load > 0.5 else ""
    print(f"load average {load:.2f} before the race{busy}", flush=True)
    ours = race_ours(args, args.out)
    theirs = race_nanogpt(args, args.out, ours, budget)
    report(args, args.out, budget, load, ours, theirs)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--drive"]:  # nanoGPT's side, in a process of its own (see drive)
        drive(Path(sys.argv[2]))
    else:
        main()

"""lm-eval's "fgpt" model against its "hf" model on the same weights, on the local tasks (a benchmark).

    python tools/bench_lm_eval_model.py [--config gpt2 | --weights PATH] [--limit 20] [--rounds 2]

Both run in this process through lm-eval's own `simple_evaluate`, on the local tasks
(shakespeare_cloze, shakespeare_scenes, shakespeare_next_line; the first --limit documents
of each), in interleaved rounds after an untimed warm-up each; transformers gets the
weights through `fgpt export`. Reports each model's wall time per task (median), the
ratio, the scores, and the largest difference between their log-likelihoods.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import cpu_line, weights_to_serve  # noqa: E402

TASKS = ("shakespeare_cloze", "shakespeare_scenes", "shakespeare_next_line")
METRIC = {"shakespeare_cloze": "acc,none", "shakespeare_scenes": "bits_per_byte,none",
          "shakespeare_next_line": "exact_match,none"}


def run(model: str, model_args: str, task: str, limit: int, batch_size: int):
    """-> (seconds, [response per request], the task's score) of one lm-eval run."""
    import lm_eval

    from functional_gpt.reference.lm_eval_run import task_manager

    manager = task_manager()
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit, log_samples=True,
                                  task_manager=manager, batch_size=batch_size, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    responses = [r for s in out["samples"][task] for r in s["resps"]]
    return seconds, responses, out["results"][task][METRIC[task]]


def largest_difference(a: list, b: list) -> float:
    values = lambda rs: [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in rs]
    pairs = [(x, y) for x, y in zip(values(a), values(b)) if not isinstance(x, str)]
    return max((abs(x - y) for x, y in pairs), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="gpt2")
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--limit", type=int, default=20, help="documents of each task")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    from functional_gpt.reference.export import export_hf

    folder = Path(tempfile.mkdtemp(prefix="bench-lm-eval-model-"))
    weights = weights_to_serve(args.weights, args.config, folder)
    export_hf(weights, folder / "hf")
    models = {"fgpt": ("fgpt", f"weights={weights},device=cpu"),
              "hf": ("hf", f"pretrained={folder / 'hf'},dtype=float32,device=cpu")}
    rows = []
    for task in args.tasks.split(","):
        seconds, responses, score = {m: [] for m in models}, {}, {}
        for r in range(args.rounds + 1):  # round 0 warms each model up, untimed
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                took, responses[name], score[name] = run(*models[name], task, args.limit, args.batch_size)
                if r:
                    seconds[name].append(took)
                print(f"{task}, {f'round {r}' if r else 'warm-up'}, {name}: {took:.1f} s", flush=True)
        ours, theirs = (statistics.median(seconds[m]) for m in models)
        rows.append((task, ours, theirs, score["fgpt"], score["hf"], largest_difference(responses["fgpt"],
                                                                                       responses["hf"])))
    print(f"\n{args.weights or args.config}, first {args.limit} documents of each task, batch {args.batch_size}, "
          f"medians of {args.rounds} rounds; {cpu_line()}")
    print("| task | fgpt | hf | speed-up | score fgpt / hf | largest log-likelihood difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for task, ours, theirs, a, b, diff in rows:
        print(f"| {task} | {ours:.1f} s | {theirs:.1f} s | {theirs / ours:.2f}x | {a:.4g} / {b:.4g} | {diff:.1e} |")
    total_ours, total_theirs = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| all | {total_ours:.1f} s | {total_theirs:.1f} s | {total_theirs / total_ours:.2f}x | | |")


if __name__ == "__main__":
    main()

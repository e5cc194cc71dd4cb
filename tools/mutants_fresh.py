"""Run mutmut's mutants each in a fresh pytest process, for code mutmut's workers cannot
switch: a function called at import (openai_api.py's checks, bound into the request models
and the OpenAPI document when the module loads) runs before a forked worker picks its
mutant, so under `mutmut run` it always runs unmutated. Here the mutant is chosen by
MUTANT_UNDER_TEST before Python starts, so import-time code is mutated too, and so is a
server process the tests start (tests/test_serve.py puts the mutated tree on its path).

Run from the project root after `mutmut run` has generated `mutants/` (it may be stopped
once the mutants exist):

    python tools/mutants_fresh.py functional_gpt/generation/openai_api.py \\
        --tests tests/test_openai_api.py tests/test_serve_faults.py tests/test_serve_schema.py

Prints one line per mutant (killed: a test failed; survived: all passed; timeout) with
progress and an ETA, then the counts; --out FILE keeps the lines (a rerun skips the
mutants already in it). A clean run (no mutant) goes first and must pass.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(key: str, tests: list[str], timeout: float, marks: str) -> str:
    """-> "killed", "survived" or "timeout": `tests` (those `marks` selects) in a fresh
    process with mutant `key`."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
               "-m", marks, *tests]
    try:
        done = subprocess.run(command, cwd="mutants", env=os.environ | {"MUTANT_UNDER_TEST": key},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if done.returncode == 0 else "killed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the mutated source file, e.g. functional_gpt/generation/openai_api.py")
    parser.add_argument("--tests", nargs="+", required=True, help="test files or node ids, relative to the root")
    parser.add_argument("--only", nargs="*", help="these mutant names alone (default: all of the module's)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant (default 300)")
    parser.add_argument("--marks", default="not slow",
                        help="pytest's -m (default 'not slow'; '' runs the slow tests too)")
    parser.add_argument("--out", type=Path, help="append each result line to this file; skip those already in it")
    args = parser.parse_args()
    meta = Path("mutants") / f"{args.module}.meta"
    if not meta.is_file():
        parser.error(f"{meta}: no such file; run `mutmut run` first to generate the mutants")
    keys = list(json.loads(meta.read_text())["exit_code_by_key"])
    if args.only:
        unknown = sorted(set(args.only) - set(keys))
        if unknown:
            parser.error(f"--only: not mutants of {args.module}: {', '.join(unknown[:3])}")
        keys = [k for k in keys if k in args.only]
    done = {}
    if args.out and args.out.is_file():
        done = dict(line.split() for line in args.out.read_text().splitlines() if line.strip())
    if run("", args.tests, args.timeout, args.marks) != "survived":
        print("the tests fail with no mutant: fix them first", file=sys.stderr)
        return 1
    todo = [k for k in keys if k not in done]
    start = time.time()
    for n, key in enumerate(todo, 1):
        done[key] = run(key, args.tests, args.timeout, args.marks)
        if args.out:
            with args.out.open("a") as f:
                f.write(f"{key} {done[key]}\n")
        eta = (time.time() - start) / n * (len(todo) - n)
        print(f"[{n}/{len(todo)}, ETA {eta / 60:.0f} min] {key} {done[key]}", flush=True)
    results = [done[k] for k in keys]  # --out may also hold other runs' mutants
    counts = {kind: results.count(kind) for kind in ("killed", "survived", "timeout")}
    print(f"{len(results)} mutants: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The side-by-side benchmark against transformers, as `fgpt bench` runs it (see
functional_gpt/bench.py): python tools/bench.py [--preset gpt2] [--batch 1] [--seq 1024] [--json]"""

import sys

from functional_gpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

"""`python -m functional_gpt ...` is `fgpt ...`: the form torchrun launches (torchrun -m functional_gpt train ...)."""

import sys

from .cli import main

sys.exit(main())

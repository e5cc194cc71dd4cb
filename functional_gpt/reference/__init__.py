"""Comparing with references: `hf_model` (transformers' GPT2LMHeadModel on the same
params, hooked under our names) -> `diff` (activation and gradient dumps, diff tables,
`fgpt compare`); `export` (to a directory transformers loads, and download) and
`perplexity` (`fgpt eval`: perplexity and bits per byte) beside them.

transformers is imported only when a reference model is built.
"""

from .diff import capture, compare, diff_files, diff_tensors, dump, format_diff, read_dump, write_dump
from .export import download, export_hf
from .hf_model import capture_reference, reference_model, reference_names
from .perplexity import EvalResult, evaluate, load_eval_data

__all__ = [
    "EvalResult", "capture", "capture_reference", "compare", "diff_files", "diff_tensors", "download", "dump",
    "evaluate", "export_hf", "format_diff", "load_eval_data", "read_dump", "reference_model", "reference_names",
    "write_dump",
]

"""Peak resident memory of loading a big GPT-2 checkpoint, against the size of the file.

    python tools/measure_load_rss.py [--preset gpt2-xl] [--dir /tmp/fgpt-rss] [--keep]

Writes (once) a randomly initialised checkpoint of the preset in the published Hugging
Face layout (model.safetensors with unprefixed keys and the h.N.attn.bias buffers, plus
config.json), tensor by tensor so that writing needs one tensor in memory. Then, each in
a fresh subprocess, measures the peak RSS (getrusage ru_maxrss) of
functional_gpt.load_params and, for comparison, of safetensors' safe_open + get_tensor
(how load_params read before) and of load_file with every page touched (memory-mapped
tensors count in RSS once read, so both touch every tensor), and prints them beside the
file size; "peak-base" is the peak less the RSS held before loading (interpreter,
torch). The file is deleted afterwards unless --keep.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from functional_gpt import load_params, param_spec, preset, write_hf_config  # noqa: E402
from functional_gpt.model.params import flatten  # noqa: E402

GIB = 2**30


def write_published_layout(config, directory: Path) -> Path:
    """model.safetensors as published for GPT-2: fp32, no prefix, causal-mask buffers."""
    P = config.n_positions
    shapes = {}
    for key, spec in param_spec(config).items():
        shapes[key] = spec
        if key.endswith("ln_1.bias"):
            shapes[key.replace("ln_1.bias", "attn.bias")] = None  # the buffer follows ln_1
    header, offset = {}, 0
    for key, spec in shapes.items():
        shape = [1, 1, P, P] if spec is None else list(spec.shape)
        nbytes = 4 * int(torch.tensor(shape).prod())
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, spec in shapes.items():
            if spec is None:
                t = torch.ones(P, P).tril()
            elif spec.init == "ones":
                t = torch.ones(spec.shape)
            elif spec.init == "zeros":
                t = torch.zeros(spec.shape)
            else:
                t = torch.empty(spec.shape).normal_(0.0, 0.02, generator=generator)
            f.write(memoryview(t.numpy()).cast("B"))
    write_hf_config(config, directory / "config.json")
    return path


def current_rss() -> int:
    """Resident bytes now (Linux /proc), to subtract what the interpreter and torch hold."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(method: str, directory: Path) -> None:
    """Runs in a fresh process: load, then print RSS figures (bytes) as JSON."""
    file = str(directory / "model.safetensors")
    baseline = current_rss()
    start = time.perf_counter()
    if method == "load_params":
        params, _ = load_params(directory)
        tensors = flatten(params)
    else:  # tensors may stay on the memory map: touch every page, as a forward pass would
        if method == "safe_open":  # what load_params did before
            from safetensors import safe_open

            with safe_open(file, "pt") as f:
                tensors = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}
        else:
            from safetensors.torch import load_file

            tensors = load_file(file)
        for t in tensors.values():
            t.sum()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    if method == "load_params":  # the values are those in the file, read independently
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            for key in ("wte.weight", "h.0.attn.c_attn.weight", f"h.{len(params['h']) - 1}.mlp.c_proj.bias"):
                assert torch.equal(f.get_tensor(key), tensors[key]), key
    print(json.dumps({"baseline": baseline, "peak": peak, "held": held, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2-xl")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fgpt-rss"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    parser.add_argument("--child", choices=["load_params", "safe_open", "load_file"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = args.dir / args.preset
    if args.child:
        return child(args.child, directory)
    path = directory / "model.safetensors"
    if not path.exists():
        start = time.perf_counter()
        write_published_layout(preset(args.preset), directory)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:  # warm the page cache, so every loader starts equal
        while f.read(1 << 26):
            pass
    print(f"file        {path}: {size / GIB:.2f} GiB ({size:,} bytes)")
    print(f"{'loader':<32}{'peak RSS':>12}{'baseline':>12}{'peak-base':>12}{'tensors':>12}{'(peak-base)/file':>18}{'time':>8}")
    try:
        for method, label in (
            ("load_params", "functional_gpt.load_params"),
            ("safe_open", "safe_open + get_tensor (before)"),
            ("load_file", "load_file (mmap) + touch"),
        ):
            out = subprocess.run(
                [sys.executable, __file__, "--preset", args.preset, "--dir", str(args.dir), "--child", method],
                check=True, capture_output=True, text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            grown = r["peak"] - r["baseline"]
            print(
                f"{label:<32}{r['peak'] / GIB:>10.2f}Gi{r['baseline'] / GIB:>10.2f}Gi{grown / GIB:>10.2f}Gi"
                f"{r['held'] / GIB:>10.2f}Gi{grown / size:>18.2f}{r['seconds']:>7.1f}s"
            )
    finally:
        if not args.keep:
            path.unlink()
            (directory / "config.json").unlink()
            print(f"deleted {path}")


if __name__ == "__main__":
    main()

"""Batch-1 decode speed of each way to run one GPT-2 on this CPU, side by side.

Every contender runs the same weights, greedy, from the same prompt, in a fresh process
per round (rounds interleaved, medians reported), so one cannot warm another's caches:

  ours-float32, ours-bfloat16, ours-int8   functional_gpt's cached generate (--quantize int8)
  hf-float32                               transformers' generate(use_cache=True)
  hf-torchao-int8                          transformers with TorchAoConfig(Int8WeightOnlyConfig()),
                                           when torchao is installed
  llama.cpp-f32, llama.cpp-q8_0            llama-cpp-python on the weights converted to GGUF,
                                           when llama_cpp is installed and --llama_cpp_convert
                                           names llama.cpp's convert_hf_to_gguf.py

and, in the same run, each dtype's weight-streaming ceiling: a decode step's matrix
products alone (4 per block and the tied head) back to back, the rate no decoder that
reads every weight once per token can pass. Decode tokens/s = (new tokens - 1) / (time of
the last token - time of the first): the prefill is left out.

    python tools/bench_inference.py [--preset gpt2 | --weights PATH] [--rounds 3] [--png FILE]
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from functional_gpt import init_params, load_params, preset, quantize, save_params  # noqa: E402
from functional_gpt.device import cpu_flags  # noqa: E402
from bench_decode import Clock, decode_rate  # noqa: E402  (tools/, this script's directory)

OURS = {"ours-float32": torch.float32, "ours-bfloat16": torch.bfloat16, "ours-int8": "int8"}
CEILINGS = ("ceiling-float32", "ceiling-bfloat16", "ceiling-int8")


def run_ours(weights: str, kind, prompt: list[int], n: int) -> dict:
    from functional_gpt.generation.decoding import generate

    params, config = load_params(weights, dtype=torch.float32 if kind == "int8" else kind)
    if kind == "int8":
        params = quantize(params)
    list(generate(params, [prompt], config, max_new_tokens=8))  # warm up
    times, tokens = [], []
    for step in generate(params, [prompt], config, max_new_tokens=n):
        times.append(time.perf_counter())
        tokens.append(int(step[0]))
    return {"tok_s": decode_rate(times), "tokens": tokens}


def run_hf(hf_dir: str, torchao: bool, prompt: list[int], n: int) -> dict:
    import transformers

    extra = {}
    if torchao:
        from torchao.quantization import Int8WeightOnlyConfig

        extra["quantization_config"] = transformers.TorchAoConfig(Int8WeightOnlyConfig())
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, **extra).eval()
    model.generation_config.eos_token_id = None

    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)  # warm up
        clock = Clock()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True, streamer=clock)
    quantized = [name for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                 and type(m.weight).__name__ not in ("Parameter", "Tensor")]
    return {"tok_s": decode_rate(clock.times[1:]), "tokens": [t[0] for t in clock.tokens[1:]],
            **({"quantized_modules": quantized} if torchao else {})}


def run_llama_cpp(gguf: str, prompt: list[int], n: int) -> dict:
    from llama_cpp import Llama

    model = Llama(gguf, n_ctx=len(prompt) + n + 8, n_threads=torch.get_num_threads(), verbose=False)
    times, tokens = [], []
    for i, token in enumerate(model.generate(prompt, top_k=1, temp=0.0, reset=True)):
        times.append(time.perf_counter())
        tokens.append(int(token))
        if i + 1 == n:
            break
    return {"tok_s": decode_rate(times), "tokens": tokens}


def ceiling(weights: str, kind: str, repeats: int = 20) -> dict:
    """Tokens/s of a decode step's matrix products alone, in `kind`'s kernels, best of
    `repeats` (batch 1: every weight streamed once per token)."""
    from functional_gpt.model.layers import int8_matmul

    params, config = load_params(weights)
    names = [("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")]
    if kind == "int8":
        q = quantize(params)
        mats = [(q["h"][i][a][m]["weight"], q["h"][i][a][m]["weight_scale"]) for i in range(config.n_layer)
                for a, m in names] + [(q["wte"]["weight"].t(), q["wte"]["weight_scale"])]
        step = [lambda w=w, s=s, x=torch.randn(1, w.shape[0]): int8_matmul(x, w, s) for w, s in mats]
    else:
        dtype = getattr(torch, kind)
        mats = [params["h"][i][a][m]["weight"].to(dtype) for i in range(config.n_layer) for a, m in names]
        head = params["wte"]["weight"].to(dtype)
        step = [lambda w=w, x=torch.randn(1, w.shape[0], dtype=dtype): x @ w for w in mats]
        step.append(lambda x=torch.randn(1, head.shape[1], dtype=dtype): torch.nn.functional.linear(x, head))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            for f in step:
                f()
            best = min(best, time.perf_counter() - t)
    return {"tok_s": 1 / best}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    prompt = json.loads(args.prompt)
    if args.worker in OURS:
        result = run_ours(args.weights, OURS[args.worker], prompt, args.new_tokens)
    elif args.worker in ("hf-float32", "hf-torchao-int8"):
        result = run_hf(args.hf_dir, args.worker == "hf-torchao-int8", prompt, args.new_tokens)
    elif args.worker.startswith("llama.cpp-"):
        result = run_llama_cpp(args.gguf.replace("KIND", args.worker.removeprefix("llama.cpp-")), prompt,
                               args.new_tokens)
    else:
        result = ceiling(args.weights, args.worker.removeprefix("ceiling-"))
    print(json.dumps(result))


def contenders(args) -> list[str]:
    names = [*OURS, "hf-float32"]
    if importlib.util.find_spec("torchao"):
        names.append("hf-torchao-int8")
    else:
        print("hf-torchao-int8: left out (torchao is not installed)")
    if not importlib.util.find_spec("llama_cpp"):
        print("llama.cpp: left out (llama-cpp-python is not installed)")
    elif not args.llama_cpp_convert:
        print("llama.cpp: left out (--llama_cpp_convert names no convert_hf_to_gguf.py)")
    else:
        names += ["llama.cpp-f32", "llama.cpp-q8_0"]
    return names + list(CEILINGS)


def prepare(args, workdir: Path, names: list[str]) -> tuple[str, str, str]:
    """The weights file every contender reads, the Hugging Face directory, the GGUF path."""
    if args.weights:
        params, config = load_params(args.weights)
    else:
        config = preset(args.preset)
        params = init_params(config, seed=0)
    weights = workdir / "model.safetensors"
    save_params(weights, params, config)
    hf_dir = workdir / "hf"
    subprocess.run([sys.executable, "-m", "functional_gpt", "export", "--weights", str(weights), "--out",
                    str(hf_dir)], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    gguf = str(workdir / "model-KIND.gguf")
    for name in names:
        if name.startswith("llama.cpp-"):
            kind = name.removeprefix("llama.cpp-")
            subprocess.run([sys.executable, args.llama_cpp_convert, str(hf_dir), "--outtype", kind, "--outfile",
                            gguf.replace("KIND", kind)], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    return str(weights), str(hf_dir), gguf


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--preset", default="gpt2")
    source.add_argument("--weights", help="a checkpoint (e.g. the main job's run) instead of a random preset")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", nargs="+", help="run these contenders alone")
    ap.add_argument("--llama_cpp_convert", help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--png", help="also draw the medians as a bar chart")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hf_dir", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    names = args.only or contenders(args)
    flags = " ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}))
    print(f"{args.weights or args.preset}: batch 1, greedy, {args.new_tokens} new tokens after {args.prompt_tokens}, "
          f"{args.threads} threads; CPU {platform.processor() or platform.machine()} [{flags}]; torch "
          f"{torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        weights, hf_dir, gguf = prepare(args, Path(tmp), names)
        vocab = load_params(weights)[1].vocab_size
        prompt = torch.randint(vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        rates, tokens = {n: [] for n in names}, {}
        for r in range(args.rounds):
            for name in names:
                command = [sys.executable, __file__, "--worker", name, "--weights", weights, "--hf_dir", hf_dir,
                           "--gguf", gguf, "--prompt", json.dumps(prompt), "--new_tokens", str(args.new_tokens),
                           "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
                if done.returncode:
                    print(f"  {name}: failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rates[name].append(result["tok_s"])
                tokens.setdefault(name, result.get("tokens"))
                if result.get("quantized_modules") is not None and r == 0:
                    print(f"  {name}: torchao quantized {len(result['quantized_modules'])} modules "
                          f"({', '.join(result['quantized_modules'][:3])}{' ...' if len(result['quantized_modules']) > 3 else ''})")
                print(f"  round {r + 1} {name:16s} {result['tok_s']:8.2f} tok/s", flush=True)
    report(names, rates, tokens, args)


def report(names, rates, tokens, args) -> None:
    medians = {n: statistics.median(v) for n, v in rates.items() if v}
    base = medians.get("hf-float32")
    print(f"\nmedian decode tokens/s over {args.rounds} rounds:")
    for name in names:
        if name not in medians:
            continue
        line = f"  {name:16s} {medians[name]:8.2f}"
        if base and not name.startswith("ceiling"):
            line += f"   {medians[name] / base:5.2f}x hf-float32"
        kind = name.rsplit("-", 1)[-1]
        if name.startswith("ours-") and f"ceiling-{kind}" in medians:
            line += f"   {medians[name] / medians[f'ceiling-{kind}']:5.0%} of the {kind} ceiling"
        if tokens.get(name) and tokens.get("ours-float32") and not name.startswith("ceiling"):
            same = sum(a == b for a, b in zip(tokens[name], tokens["ours-float32"]))
            line += f"   greedy tokens as ours-float32: {same}/{len(tokens['ours-float32'])}"
        print(line)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = [n for n in names if n in medians]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1))
        ax.barh(shown, [medians[n] for n in shown], color=["#999" if n.startswith("ceiling") else "#36c" for n in shown])
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (batch 1, median)")
        ax.set_title(f"{args.weights or args.preset}: batch-1 decode")
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

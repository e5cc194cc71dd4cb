"""`fgpt`: the command line. Parses flags and calls one library function per subcommand;
a UserError becomes one line on stderr and exit status 2."""

import argparse
import sys

from .config import PRESETS
from .errors import UserError


def _info(args) -> int:
    from .info import info_report

    print(info_report(preset_name=args.preset, weights=args.weights, device=args.device))
    return 0


def _load(args):
    from .checkpoint import load_params
    from .device import pick_device

    return load_params(args.weights, device=pick_device(args.device))


def _generate(args) -> int:
    from .generate import print_samples
    from .sampling import Sampling

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, greedy=args.greedy)
    prompt = args.prompt
    if prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt -: standard input is not UTF-8 ({e.reason} at byte {e.start})") from None
    params, config = _load(args)
    print_samples(params, prompt, config, max_new_tokens=args.max_new_tokens, sampling=sampling,
                  num_samples=args.num_samples, seed=args.seed, stop=tuple(args.stop), out=sys.stdout, err=sys.stderr)
    return 0


def _eval(args) -> int:
    import json

    from .evaluate import evaluate, load_eval_data

    params, config = _load(args)
    texts, source = load_eval_data(args.data, args.weights)
    result = evaluate(params, texts, config, max_length=args.max_length, stride=args.stride,
                      batch_size=args.batch_size, show_progress=not args.json)
    if args.json:
        print(json.dumps({"weights": args.weights, "data": source, **result.to_dict()}))
    else:
        print(f"{source}: {result.tokens} tokens, {result.bytes} bytes (window {result.max_length}, "
              f"stride {result.stride})\n"
              f"cross-entropy {result.nats_per_token:.4f} nats/token, perplexity {result.perplexity:.3f}, "
              f"{result.bits_per_byte:.4f} bits/byte")
    return 0


def _attention(args) -> int:
    from .attention_map import draw_attention

    params, config = _load(args)
    n = draw_attention(params, args.prompt, config, args.out)
    print(f"wrote {args.out} ({config.n_layer} layers x {config.n_head} heads, {n} tokens)")
    return 0



def _dump(args) -> int:
    from .compare import dump

    side = "transformers" if args.reference else "functional_gpt"
    print(dump(args.weights, args.prompt, args.out, side=side, grads=args.grads, dtype=args.dtype, device=args.device))
    return 0


def _diff(args) -> int:
    from .compare import diff_files

    report, ok = diff_files(args.a, args.b, atol=args.atol, rtol=args.rtol)
    print(report)
    return 0 if ok else 1


def _compare(args) -> int:
    from .compare import compare

    report, ok = compare(args.weights, args.prompt, grads=args.grads, dtype=args.dtype, device=args.device,
                         atol=args.atol, rtol=args.rtol)
    print(report)
    return 0 if ok else 1


def _export(args) -> int:
    from .compare import DTYPES
    from .export import export_hf

    out = export_hf(args.weights, args.out, dtype=DTYPES.get(args.dtype))
    print(f"wrote {out}/config.json and {out}/model.safetensors (transformers: GPT2LMHeadModel.from_pretrained)")
    return 0


def _download(args) -> int:
    from .export import download

    out = download(args.name, args.out)
    print(f"downloaded {args.name} into {out}/ (try: fgpt compare --weights {out})")
    return 0


def _tolerance_flags(parser, *, default, default_text):
    parser.add_argument("--atol", type=float, default=default, help=f"absolute tolerance (default {default_text})")
    parser.add_argument("--rtol", type=float, default=default,
                        help=f"tolerance relative to the largest |B| of each tensor (default {default_text})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fgpt", description="GPT-2 as pure functions.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="environment, config, parameter count, one forward pass")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(PRESETS)} (default gpt2)")
    source.add_argument("--weights", metavar="PATH", help="a checkpoint file or directory")
    info.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    info.set_defaults(run=_info)

    gen = commands.add_parser("generate", help="stream text from a checkpoint (KV cache)")
    gen.add_argument("--weights", required=True, metavar="PATH",
                     help="a checkpoint file, a training run directory or a Hugging Face GPT-2 directory")
    gen.add_argument("--prompt", default="", metavar="TEXT",
                     help="the text to continue; - reads standard input; empty: start from <|endoftext|>")
    gen.add_argument("--max_new_tokens", type=int, default=200, metavar="N")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy (default 1.0)")
    gen.add_argument("--greedy", action="store_true", help="always the most likely token")
    gen.add_argument("--top_k", type=int, default=None, metavar="K", help="keep the K most likely tokens")
    gen.add_argument("--top_p", type=float, default=1.0, metavar="P", help="nucleus: keep tokens up to mass P")
    gen.add_argument("--min_p", type=float, default=0.0, metavar="P",
                     help="drop tokens below P times the top probability")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, metavar="R",
                     help="> 1 discourages tokens already in the text")
    gen.add_argument("--seed", type=int, default=None, help="for reproducible samples (default: random)")
    gen.add_argument("--num_samples", type=int, default=1, metavar="N")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop before this text (repeatable); <|endoftext|> always stops")
    gen.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    gen.set_defaults(run=_generate)

    ev = commands.add_parser("eval", help="cross-entropy, perplexity and bits per byte over a text")
    ev.add_argument("--weights", required=True, metavar="PATH", help="a checkpoint file or directory")
    ev.add_argument("--data", metavar="FILE_OR_DIR",
                    help="a text file, a directory of text files, a .bin token file or a prepared data directory "
                         "(its val.bin); default: the validation split of the run directory given as --weights")
    ev.add_argument("--max_length", type=int, default=None, metavar="N", help="window (default n_positions)")
    ev.add_argument("--stride", type=int, default=None, metavar="N", help="window step (default max_length // 2)")
    ev.add_argument("--batch_size", type=int, default=8, metavar="N", help="windows per forward pass")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    ev.set_defaults(run=_eval)

    att = commands.add_parser("attention", help="draw the attention maps of a short prompt (PNG)")
    att.add_argument("--weights", required=True, metavar="PATH", help="a checkpoint file or directory")
    att.add_argument("--prompt", required=True, metavar="TEXT")
    att.add_argument("--out", required=True, metavar="FILE.png")
    att.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    att.set_defaults(run=_attention)

    dtypes = ["float32", "float16", "bfloat16"]
    prompt = "Hello, I'm a language model,"
    dump = commands.add_parser("dump", help="write every activation (and gradient) on a prompt to a safetensors file")
    dump.add_argument("--weights", metavar="PATH", required=True, help="a checkpoint file or directory")
    dump.add_argument("--prompt", metavar="TEXT", default=prompt, help=f"(default {prompt!r})")
    dump.add_argument("--out", metavar="FILE", required=True, help="the dump, a .safetensors file")
    dump.add_argument("--grads", action="store_true", help="add the next-token loss and every parameter's gradient")
    dump.add_argument("--reference", choices=["transformers"], help="run transformers' GPT2LMHeadModel instead")
    dump.add_argument("--dtype", choices=dtypes, default="float32", help="compute dtype (default float32)")
    dump.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    dump.set_defaults(run=_dump)

    diff = commands.add_parser("diff", help="compare two dumps tensor by tensor; exit 1 if they differ")
    diff.add_argument("a", metavar="A.safetensors")
    diff.add_argument("b", metavar="B.safetensors")
    _tolerance_flags(diff, default=1e-4, default_text="1e-4")
    diff.set_defaults(run=_diff)

    compare = commands.add_parser("compare", help="diff functional_gpt against transformers on a prompt")
    compare.add_argument("--weights", metavar="PATH", required=True, help="a checkpoint file or directory")
    compare.add_argument("--prompt", metavar="TEXT", default=prompt, help=f"(default {prompt!r})")
    compare.add_argument("--grads", action="store_true", help="compare the loss and every parameter's gradient too")
    compare.add_argument("--dtype", choices=dtypes, default="float32",
                         help="compute dtype; sets default tolerances: float32 1e-4/1e-4, float16 1e-2/1e-2, bfloat16 1e-1/5e-2")
    compare.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    _tolerance_flags(compare, default=None, default_text="by --dtype")
    compare.set_defaults(run=_compare)

    export = commands.add_parser("export", help="write config.json + model.safetensors that transformers loads")
    export.add_argument("--weights", metavar="PATH", required=True, help="a checkpoint file or directory")
    export.add_argument("--out", metavar="DIR", required=True, help="the directory to write")
    export.add_argument("--dtype", choices=dtypes, help="convert the tensors (default: keep the checkpoint's)")
    export.set_defaults(run=_export)

    download = commands.add_parser("download", help="fetch a published GPT-2 (needs huggingface_hub and network)")
    download.add_argument("name", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    download.add_argument("--out", metavar="DIR", help="where to put the files (default weights/NAME)")
    download.set_defaults(run=_download)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"fgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fgpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

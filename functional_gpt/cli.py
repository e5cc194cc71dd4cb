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

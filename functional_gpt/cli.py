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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fgpt", description="GPT-2 as pure functions.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="environment, config, parameter count, one forward pass")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(PRESETS)} (default gpt2)")
    source.add_argument("--weights", metavar="PATH", help="a checkpoint file or directory")
    info.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    info.set_defaults(run=_info)

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

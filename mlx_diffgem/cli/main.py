"""`diffgem` command line: parses arguments, then calls the Python API."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

DESCRIPTION = """\
Run DiffusionGemma, Google's text-diffusion model: it writes a whole canvas of
tokens at once and refines it over a few denoising passes. Runs on Apple silicon
(MLX), NVIDIA GPUs and CPUs (PyTorch); without --model it uses a small model
embedded in the package, so everything works offline."""

EXAMPLES = """\
examples:
  diffgem generate --prompt "def fibonacci(n):" --max-tokens 64
  diffgem generate --model google/diffusiongemma-26B-A4B-it --prompt "Hi" --chat
  diffgem generate --prompt "def add(a, b):" --drafter self
  diffgem infill --prefix-file head.py --suffix-file tail.py
  diffgem serve --port 8080
  diffgem bench run --help

`diffgem COMMAND --help` lists each command's options."""


def _top_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="diffgem",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    return parser


# Each command is a module of this package with add_parser(sub) and run(args); none
# imports more than argparse until it runs (the web stack loads only when serving).
COMMANDS = ("generate", "convert", "bench", "infill", "serve")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        name: importlib.import_module(f".{name}", __package__) for name in COMMANDS
    }
    for command in commands.values():
        command.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return commands[args.command].run(args)
    # Input errors, a missing model file or backend: one line, not a traceback.
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the shell's status, no traceback
        print(file=sys.stderr)
        return 130

"""`diffgem infill`: fill the text between a prefix file and a suffix file.

diffgem infill --prefix-file head.py --suffix-file tail.py > middle.py
cat head.py | diffgem infill --prefix-file - --suffix-file tail.py --whole
"""

from __future__ import annotations

import argparse
import sys

from . import options

DESCRIPTION = """\
Fill the text between a prefix and a suffix. The model sees the text on both
sides of the gap: the given tokens sit in its canvas and are never changed, only
the gap is denoised. The middle (or with --whole the whole text) goes to stdout,
the stats to stderr."""

EXAMPLES = """\
examples:
  diffgem infill --prefix-file head.py --suffix-file tail.py > middle.py
  cat head.py | diffgem infill --prefix-file - --suffix-file tail.py --whole
  diffgem infill --prefix-file head.py --suffix-file tail.py --length 12"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infill",
        help="fill the text between a prefix and a suffix",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--prefix-file", required=True, help="the text before the gap ('-': stdin)"
    )
    p.add_argument(
        "--suffix-file", required=True, help="the text after the gap ('-': stdin)"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"the middle's most tokens, {options.TOKENS_RANGE}; it ends at the "
        "first <eos> the model writes (default: one canvas)",
    )
    size.add_argument(
        "--length",
        type=int,
        default=None,
        metavar="N",
        help=f"exactly N tokens, {options.TOKENS_RANGE}",
    )
    p.add_argument(
        "--whole", action="store_true", help="print prefix + middle + suffix"
    )
    options.add_seed(p)
    options.add_model(p)
    options.add_sampler(p)
    options.add_speculative(p)


def _read(path: str, name: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"{name}: cannot read {path}: {e.strerror}") from e


def _check(args: argparse.Namespace) -> dict:
    """Every flag, before the files are read and the model loads."""
    from ..core.config import MAX_NEW_TOKENS
    from ..core.validate import integer

    if args.prefix_file == "-" and args.suffix_file == "-":
        raise ValueError("--prefix-file/--suffix-file: only one of them can be '-'")
    for flag in ("length", "max_tokens"):
        value = getattr(args, flag)
        if value is not None:
            integer(value, f"--{flag.replace('_', '-')}", lo=1, hi=MAX_NEW_TOKENS)
    return options.sampler_overrides(args)


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..core.infill import Hole, fill
    from . import terminal

    overrides = _check(args)
    load = options.load_options(args)
    prefix = _read(args.prefix_file, "--prefix-file")
    suffix = _read(args.suffix_file, "--suffix-file")
    model, tokenizer = api.load(args.model, **load)
    memory = terminal.memory_label(model)
    r = fill(
        model,
        tokenizer,
        [prefix, Hole(args.length), suffix],
        max_hole_tokens=args.max_tokens,
        seed=args.seed,
        **overrides,
    )
    sys.stdout.write(r.text if args.whole else r.holes[0])
    sys.stdout.flush()
    print(file=sys.stderr)
    terminal.print_stats(
        r.stats, canvas=model.config.canvas_length, max_tokens=None, memory=memory
    )
    return 0

"""`diffgem infill`: fill the text between a prefix file and a suffix file.

diffgem infill --prefix-file head.py --suffix-file tail.py > middle.py
cat head.py | diffgem infill --prefix-file - --suffix-file tail.py --whole
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infill", help="fill the text between a prefix and a suffix")
    p.add_argument("--prefix-file", required=True, help="text before ('-': stdin)")
    p.add_argument("--suffix-file", required=True, help="text after ('-': stdin)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="the middle's most tokens; it ends at <eos> (default: one canvas)",
    )
    size.add_argument("--length", type=int, default=None, help="exactly N tokens")
    p.add_argument(
        "--whole", action="store_true", help="print prefix + middle + suffix"
    )
    p.add_argument(
        "--model", default=None, help="local folder or HF repo id (default: embedded)"
    )
    p.add_argument("--backend", default=None, choices=["auto", "mlx", "torch"])
    p.add_argument("--device", default=None, help="torch backend: cuda, cpu or mps")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--drafter", default=None, metavar="SPEC", help="e.g. 'self'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-denoising-steps", type=int, default=None)


def _read(path: str, name: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"{name}: cannot read {path}: {e.strerror}") from e


def run(args: argparse.Namespace) -> int:
    if args.prefix_file == "-" and args.suffix_file == "-":
        raise ValueError("--prefix-file/--suffix-file: only one of them can be '-'")
    prefix = _read(args.prefix_file, "--prefix-file")
    suffix = _read(args.suffix_file, "--suffix-file")
    from .. import api
    from ..core.infill import Hole, fill

    opts = {"device": args.device} if args.device else {}
    if args.backend is not None:
        opts["backend"] = args.backend
    model, tokenizer = api.load(
        args.model, dtype=args.dtype, drafter=args.drafter, **opts
    )
    if args.length is not None and args.length <= 0:
        raise ValueError(f"--length: expected a positive integer, got {args.length}")
    steps = args.max_denoising_steps
    r = fill(
        model,
        tokenizer,
        [prefix, Hole(args.length), suffix],
        max_hole_tokens=args.max_tokens,
        seed=args.seed,
        **({} if steps is None else {"max_denoising_steps": steps}),
    )
    sys.stdout.write(r.text if args.whole else r.holes[0])
    sys.stdout.flush()
    print("\n" + "=" * 10 + "\n" + r.stats.summary(), file=sys.stderr)
    return 0

"""`diffgem bench`: the benchmark tools of a clone of the repository."""

from __future__ import annotations

import argparse
import sys

BENCH_TOOLS = ("run", "report", "backends")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (from a clone of the repository): run a suite, build the "
        "report, or compare the MLX and torch backends here",
    )
    p.add_argument("tool", choices=BENCH_TOOLS, help="`diffgem bench TOOL --help`")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's arguments")


def run(args: argparse.Namespace) -> int:
    import importlib

    _bench_on_path()
    tool = importlib.import_module(f"bench.{args.tool}")
    return tool.main(args.rest, prog=f"diffgem bench {args.tool}")


def _bench_on_path() -> None:
    """`bench/` is not installed with the package (a generic top-level name that
    would shadow other packages); it runs from the checkout next to it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "run.py").is_file():
        raise ImportError(
            "bench: needs a clone of the repository (bench/ is not installed with "
            "the package); run `diffgem bench` from an editable install"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

"""`diffgem` command line: parses arguments, then calls the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument(
        "--model", default=None, help="local folder or HF repo id (default: embedded)"
    )
    p.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    p.add_argument("--device", default=None, help="torch backend: cuda, cpu or mps")
    p.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=None,
        metavar="MODE",
        help="torch backend: torch.compile the step (MODE: a torch.compile mode, "
        "e.g. reduce-overhead for CUDA graphs)",
    )
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument(
        "--max-tokens", type=int, default=None, help="new tokens (whole canvases)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-denoising-steps", type=int, default=None)
    p.add_argument("--t-min", type=float, default=None)
    p.add_argument("--t-max", type=float, default=None)
    p.add_argument("--entropy-bound", type=float, default=None)
    p.add_argument("--confidence-threshold", type=float, default=None)
    p.add_argument("--stability-threshold", type=int, default=None)
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="apply the chat template to the prompt",
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false")
    p.add_argument("--draft", action="store_true", help="show the live canvas per step")
    p.add_argument(
        "--drafter",
        default=None,
        metavar="SPEC",
        help="decode speculatively: 'self' (the model's own weights, run cheaply), "
        "'self:layers=0,5 top_k=1 sc_top_k=32 head_vocab=1024' (explicit cuts), "
        "'target' (the model at full cost) or 'default' (the drafter shipped with "
        "the model)",
    )
    p.add_argument(
        "--draft-steps",
        type=int,
        default=None,
        help="with --drafter: drafter passes before the first verify (default 16)",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        default=None,
        help="with --drafter: verify rounds before the model finishes the canvas "
        "natively (default 8)",
    )


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a HF checkpoint to a (quantized) MLX one"
    )
    p.add_argument("--hf-path", required=True, help="local folder or HF repo id")
    p.add_argument("--mlx-path", required=True, help="output folder")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument(
        "--recipe",
        default=None,
        choices=["mixed"],
        help="mixed: embeddings, attention and router at 8 bits, experts at q-bits",
    )
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: run a suite, or build the report")
    p.add_argument("tool", choices=["run", "report"], help="bench.run | bench.report")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's arguments")


def run_bench(args: argparse.Namespace) -> int:
    # The bench package ships with the project (pyproject packages: bench*).
    from bench import report, run

    return {"run": run.main, "report": report.main}[args.tool](args.rest)


def _overrides(args: argparse.Namespace) -> dict:
    keys = (
        "max_denoising_steps",
        "t_min",
        "t_max",
        "entropy_bound",
        "confidence_threshold",
        "stability_threshold",
    )
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def run_generate(args: argparse.Namespace) -> int:
    from . import api

    opts = {"device": args.device} if args.device else {}
    if args.compile is not None:
        opts["compile"] = args.compile
    spec = {
        k: getattr(args, k)
        for k in ("draft_steps", "max_rounds")
        if getattr(args, k) is not None
    }
    model, tokenizer = api.load(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        drafter=args.drafter,
        speculative=spec or None,
        **opts,
    )
    if tokenizer is None:
        raise SystemExit(
            f"error: {model.path} has no tokenizer.json; use the Python API with ids"
        )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    stats = None
    for r in api.stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        seed=args.seed,
        draft=args.draft,
        chat=args.chat,
        **_overrides(args),
    ):
        if r.is_draft:
            print(
                f"\r[{r.source} step {r.step}] {r.draft!r}"[:120],
                end="",
                file=sys.stderr,
                flush=True,
            )
            continue
        if args.draft:
            print(file=sys.stderr)
        print(r.text, end="", flush=True)
        stats = r.stats
    print()
    if stats is not None:
        print("=" * 10, file=sys.stderr)
        print(stats.summary(), file=sys.stderr)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        bits=args.q_bits,
        group_size=args.q_group_size,
        recipe=args.recipe,
        dtype=args.dtype,
    )
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffgem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _convert_parser(sub)
    _bench_parser(sub)
    from . import infill_cli

    infill_cli.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        commands = {
            "generate": run_generate,
            "convert": run_convert,
            "bench": run_bench,
            "infill": infill_cli.run,
        }
        return commands[args.command](args)
    # Input errors, a missing model file or backend: one line, not a traceback.
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

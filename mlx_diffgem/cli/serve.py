"""`diffgem serve`: the OpenAI-compatible HTTP server (`mlx_diffgem/serve/`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `diffgem serve` subcommand."""
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    p.add_argument(
        "--model", default=None, help="local folder or HF repo id (default: embedded)"
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=["mlx", "torch"],
        help="default: the library's choice (see `diffgem generate --help`)",
    )
    p.add_argument("--device", default=None, help="torch backend: cuda, cpu or mps")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--drafter",
        default=None,
        metavar="SPEC",
        help="decode speculatively (see `diffgem generate --help`)",
    )
    p.add_argument("--draft-steps", type=int, default=None)
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: --model as given, or 'default')",
    )
    p.add_argument(
        "--max-queue", type=int, default=16, help="waiting requests before 429"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=4096,
        help="the largest max_tokens a request may ask for",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt (default: the model's context)",
    )
    p.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    """`diffgem serve`: parse-level checks, then `serve`."""
    for flag in ("port", "max_queue", "max_tokens_limit", "timeout"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a positive number")
    opts: dict[str, Any] = {"dtype": args.dtype}
    if args.backend:
        opts["backend"] = args.backend
    if args.device:
        opts["device"] = args.device
    spec = {
        k: getattr(args, k)
        for k in ("draft_steps", "max_rounds")
        if getattr(args, k) is not None
    }
    from ..serve.server import Limits, serve

    limits = Limits(
        args.max_queue, args.timeout, args.max_tokens_limit, args.max_prompt_tokens
    )
    serve(
        args.model,
        host=args.host,
        port=args.port,
        name=args.served_model_name,
        limits=limits,
        log_level=args.log_level,
        drafter=args.drafter,
        speculative=spec or None,
        **opts,
    )
    return 0

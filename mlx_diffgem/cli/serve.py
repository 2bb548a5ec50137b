"""`diffgem serve`: the OpenAI-compatible HTTP server (`mlx_diffgem/serve/`)."""

from __future__ import annotations

import argparse

from . import options

DESCRIPTION = """\
Serve one model over an OpenAI-compatible HTTP API: POST /v1/completions (with
`suffix`: infill), POST /v1/chat/completions (models with a chat template),
GET /v1/models and GET /health. The model loads once; requests run one at a time
from a bounded queue. Needs the serve extra (from a clone: pip install -e
'.[cpu,serve]', on macOS '.[mlx,serve]'). docs/serving.md has the details."""

EXAMPLES = """\
examples:
  diffgem serve                      # the embedded model on 127.0.0.1:8080
  diffgem serve --model google/diffusiongemma-26B-A4B-it --drafter self
  curl -s http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "default", "prompt": "def fibonacci(n):", "max_tokens": 64}'"""

LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `diffgem serve` subcommand."""
    p = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model(p)
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model name clients send (default: --model as given, as vLLM "
        "names it, or 'default' for the embedded model)",
    )
    options.add_speculative(p)
    _http_options(p)
    _limit_options(p)


def _http_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: "
        "%(default)s, this machine only)",
    )
    g.add_argument(
        "--port", type=int, default=8080, help="1..65535 (default: %(default)s)"
    )
    g.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="uvicorn's log level; info logs every request (default: %(default)s)",
    )


def _limit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-queue",
        type=int,
        default=16,
        metavar="N",
        help="requests waiting behind the running one; more get 429 (default: "
        "%(default)s)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds per request from its arrival, queueing included; past it: "
        "504 (default: %(default)g)",
    )
    g.add_argument(
        "--max-tokens-limit",
        type=int,
        default=4096,
        metavar="N",
        help=f"the largest max_tokens a request may ask for, {options.TOKENS_RANGE} "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        metavar="N",
        help="the longest prompt in tokens (default: the model's context)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        metavar="N",
        help="the largest request body in bytes; a larger one gets 413 (default: "
        "32 per token of the prompt limit, at least 1 MiB: 4 MiB for the "
        "embedded and the released model, whose context is 131,072 tokens)",
    )


def _check(args: argparse.Namespace):
    """The serving flags, before anything loads; returns the Limits."""
    from ..core.config import MAX_NEW_TOKENS
    from ..core.validate import integer, number
    from ..serve.server import Limits

    integer(args.port, "--port", lo=1, hi=65535)
    integer(args.max_queue, "--max-queue", lo=1)
    number(args.timeout, "--timeout", lo=0, lo_open=True)
    integer(args.max_tokens_limit, "--max-tokens-limit", lo=1, hi=MAX_NEW_TOKENS)
    for flag in ("max_prompt_tokens", "max_request_bytes"):
        if getattr(args, flag) is not None:
            integer(getattr(args, flag), "--" + flag.replace("_", "-"), lo=1)
    return Limits(
        args.max_queue,
        args.timeout,
        args.max_tokens_limit,
        args.max_prompt_tokens,
        args.max_request_bytes,
    )


def run(args: argparse.Namespace) -> int:
    """`diffgem serve`: every flag checked, then `serve` until a signal stops it."""
    limits = _check(args)
    load = options.load_options(args)
    from ..serve.server import serve

    return serve(
        args.model,
        host=args.host,
        port=args.port,
        name=args.served_model_name,
        limits=limits,
        log_level=args.log_level,
        **load,
    )

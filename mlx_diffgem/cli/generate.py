"""`diffgem generate`: text from a prompt, streamed canvas by canvas."""

from __future__ import annotations

import argparse
import sys

from . import options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text from a prompt. The model writes whole canvases "
        "of tokens (64 for the embedded model, 256 for the released one), each "
        "denoised in parallel over several passes; the text streams to stdout "
        "canvas by canvas, the stats go to stderr.",
    )
    # The order of these calls is the order of the usage line.
    options.add_model(p, compile_option=True)
    _prompt_options(p)
    options.add_sampler(p)
    _chat_and_draft_options(p)
    options.add_speculative(p)


def _prompt_options(p: argparse.ArgumentParser) -> None:
    """The prompt, how many tokens to write, and the seed."""
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"new tokens, {options.TOKENS_RANGE}, rounded up to whole canvases "
        "(default: the model's generation_config, 256)",
    )
    options.add_seed(p)


def _chat_and_draft_options(p: argparse.ArgumentParser) -> None:
    """Chat template or plain text; the live canvas per step."""
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="apply the chat template to the prompt",
    )
    chat.add_argument(
        "--no-chat",
        dest="chat",
        action="store_false",
        help="encode the prompt as plain text (the default for a text prompt)",
    )
    p.add_argument("--draft", action="store_true", help="show the live canvas per step")
    p.add_argument(
        "--no-heal",
        dest="heal",
        action="store_false",
        help="turn token healing off: by default a plain-text prompt may end "
        "anywhere (after a newline, inside a word): its last token is taken back and "
        "the first generated one must extend it",
    )


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..core.tokenizer import format_prompt
    from . import terminal

    # Every flag is checked before the model loads (seconds, or minutes for a
    # download): a typo costs nothing.
    overrides = options.sampler_overrides(args, max_new_tokens=args.max_tokens)
    model, tokenizer = api.load(args.model, **options.load_options(args))
    if tokenizer is None:
        raise SystemExit(
            f"error: {model.path} has no tokenizer.json; use the Python API with ids"
        )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = format_prompt(tokenizer, prompt, args.chat)
    compile_s = _warm_up(model, ids, args, overrides) if args.compile else None
    memory = terminal.memory_label(model)
    if len(ids) >= terminal.PREFILL_BAR_MIN and terminal.tty():
        model = terminal.PrefillProgress(model, len(ids))
    stats = None
    responses = api.stream_generate(
        model,
        tokenizer,
        ids,
        max_tokens=args.max_tokens,
        seed=args.seed,
        draft=args.draft,
        heal=args.heal and not args.chat,  # the ids of a plain-text prompt
        **overrides,
    )
    with _canvas_bar(model, args) as bar:
        for r in responses:
            if r.is_draft:
                _show_draft(r)
                continue
            if args.draft:
                print(file=sys.stderr)
            print(r.text, end="", flush=True)
            bar.update(1)
            stats = r.stats
    print()
    if stats is not None:
        terminal.print_stats(
            stats,
            canvas=model.config.canvas_length,
            max_tokens=args.max_tokens,
            memory=memory,
            compile_s=compile_s,
        )
    return 0


def _warm_up(model, ids: list[int], args: argparse.Namespace, overrides: dict) -> float:
    """Compile the step on a one-canvas run, so compile time stays out of tok/s."""
    import time

    from ..core.generate import generate_ids

    print(
        "compiling the denoising step (torch.compile; tens of seconds on a CPU)...",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    # a short prompt: shapes are dynamic, so the graphs serve the real prompt too
    generate_ids(model, [ids[:16]], seed=args.seed, max_new_tokens=1, **overrides)
    return time.perf_counter() - t0


def _canvas_bar(model, args: argparse.Namespace):
    """Canvases done, on stderr; only when the text is not already streaming to the
    same terminal (stdout redirected) and no live draft is shown."""
    from . import terminal

    total = terminal.canvases_for(
        args.max_tokens,
        model.generation_config.max_new_tokens,
        model.config.canvas_length,
    )
    show = terminal.tty() and not sys.stdout.isatty() and not args.draft
    return terminal.bar(total, "canvases", "canvas", show)


def _show_draft(r) -> None:
    print(
        f"\r[{r.source} step {r.step}] {r.draft!r}"[:120],
        end="",
        file=sys.stderr,
        flush=True,
    )

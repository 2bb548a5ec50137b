"""`diffgem generate`: text from a prompt, streamed canvas by canvas."""

from __future__ import annotations

import argparse
import sys


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
    _model_options(p)
    _prompt_options(p)
    _sampler_options(p)
    _chat_and_draft_options(p)
    _speculative_options(p)


def _model_options(p: argparse.ArgumentParser) -> None:
    """Which model, on which backend, device and dtype."""
    p.add_argument(
        "--model", default=None, help="local folder or HF repo id (default: embedded)"
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "mlx", "torch"],
        help="auto (default): MLX on Apple silicon, else torch when installed "
        "(CUDA, or CPU, where it is faster than MLX's CPU backend), else MLX",
    )
    p.add_argument("--device", default=None, help="torch backend: cuda, cpu or mps")
    p.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=None,
        metavar="MODE",
        help="torch backend: torch.compile the step (MODE: a torch.compile mode, "
        "e.g. reduce-overhead for CUDA graphs); compiles first, untimed",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights and activations (default: bfloat16 on a GPU, float32 on CPU)",
    )


def _prompt_options(p: argparse.ArgumentParser) -> None:
    """The prompt, how many tokens to write, and the seed."""
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="new tokens, rounded up to whole canvases (default: the model's "
        "generation_config, 256)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the sampling noise (default 0; MLX and torch draw different "
        "numbers from the same seed)",
    )


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


def _speculative_options(p: argparse.ArgumentParser) -> None:
    """Speculative decoding: the drafter and its policy (api.load's speculative)."""
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
        help="with --drafter: drafter passes before the first verify, at most "
        "(default 24; fewer are faster and cost quality)",
    )
    p.add_argument(
        "--max-rounds",
        type=int,
        default=None,
        help="with --drafter: verify rounds before the model finishes the canvas "
        "natively (default 8)",
    )
    p.add_argument(
        "--draft-entropy-bound",
        type=float,
        default=None,
        help="with --drafter: the drafter's entropy bound per pass (default: the "
        "model's); larger means fewer drafter passes and more rejected drafts",
    )


def _sampler_options(p: argparse.ArgumentParser) -> None:
    """The denoising sampler's settings (defaults: the model's generation_config)."""
    g = p.add_argument_group(
        "sampler", "defaults come from the model's generation_config.json"
    )
    g.add_argument(
        "--max-denoising-steps",
        type=int,
        default=None,
        metavar="N",
        help="most denoising passes per canvas (release: 48)",
    )
    g.add_argument(
        "--t-min",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature of the last pass (release: 0.4); it falls "
        "linearly from --t-max",
    )
    g.add_argument(
        "--t-max",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature of the first pass (release: 0.8)",
    )
    g.add_argument(
        "--entropy-bound",
        type=float,
        default=None,
        metavar="H",
        help="per pass, keep the lowest-entropy positions while their summed "
        "entropy stays under H and renoise the rest (release: 0.1)",
    )
    g.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        metavar="H",
        help="a canvas stops before --max-denoising-steps once its mean entropy "
        "is under H and it is stable (release: 0.005)",
    )
    g.add_argument(
        "--stability-threshold",
        type=int,
        default=None,
        metavar="N",
        help="stable: its argmax has not changed for N passes (release: 1)",
    )


def _overrides(args: argparse.Namespace) -> dict:
    from ..core.config import SAMPLER_KEYS

    return {k: getattr(args, k) for k in SAMPLER_KEYS if getattr(args, k) is not None}


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..core.tokenizer import format_prompt
    from . import terminal

    model, tokenizer = _load_generate(args)
    if tokenizer is None:
        raise SystemExit(
            f"error: {model.path} has no tokenizer.json; use the Python API with ids"
        )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = format_prompt(tokenizer, prompt, args.chat)
    compile_s = _warm_up(model, ids, args) if args.compile else None
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
        **_overrides(args),
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
        lines = terminal.stats_lines(
            stats,
            canvas=model.config.canvas_length,
            max_tokens=args.max_tokens,
            memory=memory,
            compile_s=compile_s,
        )
        print("=" * 10, *lines, sep="\n", file=sys.stderr)
    return 0


def _load_generate(args: argparse.Namespace):
    from .. import api

    opts = {"device": args.device} if args.device else {}
    if args.compile is not None:
        opts["compile"] = args.compile
    spec = {
        k: getattr(args, k)
        for k in ("draft_steps", "max_rounds", "draft_entropy_bound")
        if getattr(args, k) is not None
    }
    return api.load(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        drafter=args.drafter,
        speculative=spec or None,
        **opts,
    )


def _warm_up(model, ids: list[int], args: argparse.Namespace) -> float:
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
    generate_ids(
        model, [ids[:16]], seed=args.seed, max_new_tokens=1, **_overrides(args)
    )
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

"""`diffgem` command line: parses arguments, then calls the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text from a prompt. The model writes whole canvases "
        "of tokens (64 for the embedded model, 256 for the released one), each "
        "denoised in parallel over several passes; the text streams to stdout "
        "canvas by canvas, the stats go to stderr.",
    )
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
    _sampler_options(p)
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


BENCH_TOOLS = ("run", "report", "backends")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (from a clone of the repository): run a suite, build the "
        "report, or compare the MLX and torch backends here",
    )
    p.add_argument("tool", choices=BENCH_TOOLS, help="`diffgem bench TOOL --help`")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's arguments")


def run_bench(args: argparse.Namespace) -> int:
    import importlib

    _bench_on_path()
    tool = importlib.import_module(f"bench.{args.tool}")
    return tool.main(args.rest, prog=f"diffgem bench {args.tool}")


def _bench_on_path() -> None:
    """`bench/` is not installed with the package (a generic top-level name that
    would shadow other packages); it runs from the checkout next to it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        raise ImportError(
            "bench: needs a clone of the repository (bench/ is not installed with "
            "the package); run `diffgem bench` from an editable install"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def _overrides(args: argparse.Namespace) -> dict:
    from .core.config import SAMPLER_KEYS

    return {k: getattr(args, k) for k in SAMPLER_KEYS if getattr(args, k) is not None}


def run_generate(args: argparse.Namespace) -> int:
    from . import api, terminal
    from .core.tokenizer import format_prompt

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
    from . import api

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

    from .core.generate import generate_ids

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
  diffgem bench run --help

`diffgem COMMAND --help` lists each command's options."""


def _top_parser() -> argparse.ArgumentParser:
    from . import __version__

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _convert_parser(sub)
    _bench_parser(sub)
    from . import infill_cli

    infill_cli.add_parser(sub)
    from . import server  # the web stack loads only when serving

    server.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        commands = {
            "generate": run_generate,
            "convert": run_convert,
            "bench": run_bench,
            "infill": infill_cli.run,
            "serve": server.run,
        }
        return commands[args.command](args)
    # Input errors, a missing model file or backend: one line, not a traceback.
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

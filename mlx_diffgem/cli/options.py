"""Options shared by `generate`, `infill` and `serve`, and their checks before the
model loads.

The checks are the core's own validators (GenerationConfig for the sampler and the
lengths, SpecPolicy for speculative decoding), so a bad value is refused at once,
with the message the Python API gives for it, instead of after a load of 20-40 s.
What needs the model (a t_min against the model's own t_max, a drafter's cuts
against its layers) is still checked after it loads. The help texts state the
core's bounds (MAX_NEW_TOKENS, MAX_DENOISING_STEPS); tests/test_cli.py holds them
equal, as importing the core here would slow every `diffgem --help`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DTYPES = ["float32", "bfloat16", "float16"]
TOKENS_RANGE = "1..1,048,576 (2**20)"  # core.config.MAX_NEW_TOKENS
STEPS_RANGE = "1..10,000"  # MAX_DENOISING_STEPS; SpecPolicy's step counts
SPEC_KEYS = (
    "draft_steps",
    "refine_steps",
    "max_rounds",
    "draft_entropy_bound",
    "verify",
    "verify_groups",
    "accept_threshold",
    "verify_sure",
    "min_commit",
)


def add_model(p: argparse.ArgumentParser, compile_option: bool = False) -> None:
    """Which model, on which backend, device and dtype."""
    p.add_argument(
        "--model",
        default=None,
        help="local model folder or Hugging Face repo id (default: the embedded model)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "mlx", "torch"],
        help="auto (default): MLX on Apple silicon, else torch when installed "
        "(CUDA, or CPU, where it is faster than MLX's CPU backend), else MLX",
    )
    p.add_argument("--device", default=None, help="torch backend: cuda, cpu or mps")
    if compile_option:
        p.add_argument(
            "--compile",
            nargs="?",
            const=True,
            default=None,
            metavar="MODE",
            help="torch backend: torch.compile the step (MODE: a torch.compile "
            "mode, e.g. reduce-overhead for CUDA graphs); compiles first, untimed",
        )
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="weights and activations (default: bfloat16 on a GPU, float32 on CPU)",
    )


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the sampling noise (default 0): any integer, reduced modulo "
        "2**64 (so -1 is 2**64-1); MLX and torch draw different numbers from the "
        "same seed",
    )


def add_sampler(p: argparse.ArgumentParser) -> None:
    """The denoising sampler's settings (defaults: the model's generation_config)."""
    g = p.add_argument_group(
        "sampler", "defaults come from the model's generation_config.json"
    )
    g.add_argument(
        "--max-denoising-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"most denoising passes per canvas, {STEPS_RANGE} (release: 48)",
    )
    g.add_argument(
        "--t-min",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature of the last pass, >= 0 (release: 0.4); it "
        "falls linearly from --t-max",
    )
    g.add_argument(
        "--t-max",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature of the first pass, > --t-min (release: 0.8)",
    )
    g.add_argument(
        "--entropy-bound",
        type=float,
        default=None,
        metavar="H",
        help="per pass, keep the lowest-entropy positions while their summed "
        "entropy stays under H (> 0) and renoise the rest (release: 0.1)",
    )
    g.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        metavar="H",
        help="a canvas stops before --max-denoising-steps once its mean entropy "
        "is under H (> 0) and it is stable (release: 0.005)",
    )
    g.add_argument(
        "--stability-threshold",
        type=int,
        default=None,
        metavar="N",
        help="stable: its argmax has not changed for N passes, N >= 0 and at most "
        "--max-denoising-steps (release: 1)",
    )


def add_speculative(p: argparse.ArgumentParser) -> None:
    """Speculative decoding: the drafter and its policy (api.load's speculative)."""
    g = p.add_argument_group("speculative decoding")
    g.add_argument(
        "--drafter",
        default=None,
        metavar="SPEC",
        help="decode speculatively: 'self' (the model's own weights, run cheaply; "
        "no training), 'self:layers=0,5 top_k=1 sc_top_k=32 head_vocab=1024' "
        "(explicit cuts), 'target' (the model at full cost), a trained drafter's "
        "folder, or 'default' (the one shipped with the model, run with the "
        "settings its config recommends; flags given here override them)",
    )
    steps = [
        ("--draft-steps", "drafter passes before the first verify, at most", 24),
        ("--refine-steps", "drafter passes between two verifies", 2),
        ("--max-rounds", "verifies before the model finishes natively", 8),
    ]
    for flag, what, default in steps:
        g.add_argument(
            flag,
            type=int,
            default=None,
            metavar="N",
            help=f"with --drafter: {what}, {STEPS_RANGE} (default {default}, or "
            "a trained drafter's own)",
        )
    g.add_argument(
        "--draft-entropy-bound",
        type=float,
        default=None,
        metavar="H",
        help="with --drafter: the drafter's entropy bound per pass, > 0 (default: "
        "the model's); larger means fewer drafter passes and more rejected drafts",
    )
    add_verify(g)


def add_verify(g) -> None:
    """How the model checks a draft (SpecPolicy.verify and its settings)."""
    g.add_argument(
        "--verify",
        default=None,
        choices=["plain", "hidden", "others"],
        help="with --drafter: hidden (default) scores each drafted token without "
        "showing it, rejects what the model would not write and leaves it to the "
        "model (text as good as the model's; on the embedded model it takes more "
        "passes than decoding natively); others judges each drafted token on the "
        "whole rest of the draft, unordered: keeps more of a draft, trades some "
        "quality for speed; plain checks the clean draft in one pass "
        "and keeps almost all of it: faster, text only as good as the drafter's",
    )
    g.add_argument(
        "--verify-groups",
        type=int,
        default=None,
        metavar="G",
        help="with --verify hidden only: groups of the drafter's confidence order, "
        "1..65536 (default 8)",
    )
    g.add_argument(
        "--accept-threshold",
        type=threshold,
        default=None,
        metavar="P|ratio",
        help="with --verify hidden or others: keep a drafted token where the model "
        "gives it at least P (0..1) instead of only where it is the model's argmax, "
        "which trades quality for speed; or, hidden only, 'ratio': speculative "
        "sampling, keep it with the model's probability of it and draw the model's "
        "token where it is not kept (the text is then a sample of the model's; use "
        "with --verify-sure 0)",
    )
    g.add_argument(
        "--verify-sure",
        type=float,
        default=None,
        metavar="P",
        help="with --verify hidden or others: commit a token only where the model "
        "gives it at least P, 0..1 (default 0.9 with hidden, 0.98 with others); "
        "lower keeps more and writes worse text",
    )
    g.add_argument(
        "--min-commit",
        type=float,
        default=None,
        metavar="S",
        help="with --verify hidden or others: where a verify commits less than this "
        "share of the open positions, stop drafting and let the model finish "
        "natively, 0..1 (default 0.1; 0: never)",
    )


def threshold(text: str) -> float | str:
    """--accept-threshold's value: a number, else the text as given ('ratio'), which
    SpecPolicy checks with the API's message."""
    try:
        return float(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------------------
# Checks before the model loads
# --------------------------------------------------------------------------------------


def check_model(model: str | None) -> None:
    """A local folder given as --model must hold a model (its config.json)."""
    if model is None:
        return
    folder = Path(model).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ValueError(f"--model {model}: not a model folder (no config.json)")


def sampler_overrides(args: argparse.Namespace, **lengths: Any) -> dict[str, Any]:
    """The sampler flags that were given (and `lengths`, e.g. max_new_tokens), as
    generation overrides checked by GenerationConfig with the API's messages.

    The check runs on a config whose other settings never object (t_max at the
    float32 maximum, stability 0, the largest step budget), so that a flag is
    checked against another only when both are given: the model's own values are
    known after it loads.
    """
    from ..core.config import MAX_DENOISING_STEPS, SAMPLER_KEYS, GenerationConfig

    given = {k: getattr(args, k, None) for k in SAMPLER_KEYS}
    given = {k: v for k, v in given.items() if v is not None}
    lax = GenerationConfig(
        t_min=0.0,
        t_max=3.4e38,
        max_denoising_steps=MAX_DENOISING_STEPS,
        stability_threshold=0,
    )
    checked = {k: v for k, v in lengths.items() if v is not None}
    lax.update(source="generate", **given, **checked)
    return given


def spec_policy(args: argparse.Namespace) -> dict | None:
    """The speculative flags given, as api.load's `speculative` dict (None: none
    given; a trained drafter's recommended settings fill the rest), checked now."""
    from ..core.speculative import SpecPolicy

    spec = {k: getattr(args, k, None) for k in SPEC_KEYS}
    spec = {k: v for k, v in spec.items() if v is not None}
    if not spec:
        return None
    if args.drafter is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in spec)
        raise ValueError(f"{flags}: only applies with --drafter")
    SpecPolicy(**spec)
    return spec


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """api.load's keyword arguments from the model and speculative flags, checked
    before anything loads."""
    check_model(args.model)
    opts: dict[str, Any] = {
        "backend": args.backend,
        "dtype": args.dtype,
        "drafter": getattr(args, "drafter", None),
        "speculative": spec_policy(args),
    }
    if args.device:
        opts["device"] = args.device
    if getattr(args, "compile", None) is not None:
        opts["compile"] = args.compile
    return opts

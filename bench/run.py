"""Run a benchmark suite and write one JSON record (see bench/README.md).

    OMP_NUM_THREADS=1 python -m bench.run step --backend mlx --preset mid \\
        --context 64,512,2048 --repeats 5 --measure --out bench/results/
    python -m bench.run peers --backend torch --preset mid --context 512
    python -m bench.run generate --backend mlx --preset tiny --canvases 4

Suites: step | prefill | generate | peers | spec (not implemented yet). The weights are
random (presets tiny | mid | released, built on first use into $DIFFGEM_HOME/bench).
The last stdout line is a JSON summary with the record's path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

SUITES = ("step", "prefill", "generate", "peers", "spec")
PRESETS = ("tiny", "mid", "released")
QUANTS = ("4bit", "8bit", "mixed", "int8")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (e.g. contexts)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        )
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--device", default=None, help="torch backend: cuda, cpu or mps")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, choices=QUANTS)
    p.add_argument(
        "--weights",
        default="checkpoint",
        choices=["checkpoint", "device"],
        help="device: torch only, random weights made on the device (no checkpoint "
        "written or read; for the released shape on a lent GPU)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="torch backend: torch.compile the step (the warmup repeats compile)",
    )
    p.add_argument("--context", type=int_list, default=[512], help="e.g. 64,512,2048")
    p.add_argument("--canvas", type=int, default=None, help="canvas length override")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="steps per timed canvas")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    p.add_argument(
        "--canvases", type=int, default=2, help="generate: canvases per call"
    )
    p.add_argument(
        "--max-denoising-steps",
        dest="steps_override",
        type=int,
        default=None,
        help="generate: override the checkpoint's max_denoising_steps (48)",
    )
    p.add_argument(
        "--peers",
        type=lambda t: [x for x in t.split(",") if x],
        default=None,
        help="peers: transformers,mlx_vlm (default: transformers for torch, "
        "mlx_vlm for mlx)",
    )
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (BLAS/torch)")
    p.add_argument("--measure", action="store_true", help="measure matmul/bandwidth")
    p.add_argument("--checkpoint-dir", default=None, help="default $DIFFGEM_HOME/bench")
    p.add_argument("--out", default="bench/results", help="folder of the JSON record")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 4:
        p.error("--steps must be >= 4 (steps 3..S-1 are timed)")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.canvases < 1:
        p.error("--repeats, --batch and --canvases must be >= 1, --warmup >= 0")
    if args.suite == "peers" and args.batch != 1:
        p.error("peers: batch 1 only (mlx-vlm's loop runs one row)")
    if args.peers and not set(args.peers) <= {"transformers", "mlx_vlm"}:
        p.error(f"--peers: expected transformers and/or mlx_vlm, got {args.peers}")
    if args.device and args.backend != "torch":
        p.error("--device: only for the torch backend")
    if args.compile and args.backend != "torch":
        p.error("--compile: only for the torch backend")
    if args.weights == "device" and (args.backend != "torch" or args.quantization):
        p.error("--weights device: torch backend only, without --quantization")
    if args.weights == "device" and args.suite == "peers":
        p.error("--weights device: peers load the checkpoint themselves")
    if args.compile and args.warmup < 1:
        p.error("--compile: needs --warmup >= 1 (compilation is not timed)")


def _set_threads(n: int | None) -> None:
    """Pin BLAS and torch threads; must run before numpy/torch/mlx are imported."""
    if n is None:
        return
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    if "numpy" in sys.modules:
        print("note: --threads set after numpy was imported", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    """Run the suite of `args` and return its record (does not write it)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import suites

    if args.suite == "spec":
        return suites.spec(args)
    if args.threads is not None and (args.backend == "torch" or args.suite == "peers"):
        _torch_threads(args.threads)
    return _record(suites, args)


def _torch_threads(n: int) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def _record(suites, args: argparse.Namespace) -> dict:
    from . import record

    s = suites.setup(args)
    rec = record.envelope(args.suite, s.accelerator, _blas())
    rec.update(
        backend=args.backend,
        device=s.device,
        dtype=s.dtype,
        quantization=args.quantization,
        compile=args.compile,
        model=s.model,
        settings=_settings(args),
        measured_machine=s.measured,
    )
    peers: list = []
    if args.suite == "peers":
        peers, rec["peers"] = suites.load_peers(s, args)
    # step and peers interleave the contexts inside the suite
    if args.suite == "step":
        rec["results"] = suites.step_points(s, args)
    elif args.suite == "peers":
        rec["results"] = suites.peers_points(s, args, peers)
    else:
        point = {"prefill": suites.prefill_point, "generate": suites.generate_point}
        rec["results"] = [point[args.suite](s, args, n) for n in args.context]
    rec["machine"]["loadavg_after"] = list(os.getloadavg())
    rec["summary"] = summary(rec)
    return rec


def _blas() -> list[str]:
    from mlx_diffgem import _blas

    return list(_blas.loaded)


PROTOCOL = {
    "step": "prefill each context once; per repeat, for each context in turn, one "
    "canvas of exactly `steps` steps (never confident) then 2 lone decoder passes; "
    "a step = interval between consecutive decoder-call starts; steps 3..S-1 of "
    "every timed canvas pooled",
    "prefill": "fresh cache per repeat; chunked encode of the prompt + device sync",
    "generate": "generate_ids end to end (canvases x canvas_length new tokens) with "
    "the checkpoint's generation config (release values, no EOS); Stats per call",
    "peers": "one-canvas generation of exactly `steps` steps per call (prefill "
    "included); per repeat, for each context in turn: ours, then each peer; a "
    "step = interval between consecutive decoder-call starts, steps 3..S-1",
}


def _settings(args: argparse.Namespace) -> dict:
    keys = (
        "context batch steps repeats warmup canvases steps_override peers "
        "prefill_chunk seed threads measure weights"
    ).split()
    out = {k: getattr(args, k) for k in keys}
    out["protocol"] = PROTOCOL[args.suite]
    return out


def summary(rec: dict) -> dict:
    """The one-line digest: per context, the suite's headline number."""
    head = {
        "step": lambda r: r["step_ms"]["median"],
        "prefill": lambda r: r["tokens_per_s"],
        "generate": lambda r: r["tokens_per_s"],
        "peers": lambda r: {
            k: v["step_ours_over_peer"] for k, v in r["ratios"].items()
        },
    }[rec["suite"]]
    unit = {
        "step": "ms_per_step",
        "prefill": "tokens_per_s",
        "generate": "tokens_per_s",
    }
    return {
        "suite": rec["suite"],
        "backend": rec["backend"]
        + (f" (compile {rec['compile']})" if rec.get("compile") else ""),
        "preset": rec["model"]["preset"],
        "device": f"{rec['machine']['accelerator']} [{rec['device']}]",
        unit.get(rec["suite"], "ratio_ours_over_peer"): {
            str(r["context"]): head(r) for r in rec["results"]
        },
    }


def _table(rec: dict) -> str:
    """A few human-readable lines per context."""
    lines = []
    for r in rec["results"]:
        if rec["suite"] == "peers":
            parts = [
                f"{k} {v['step_ms']['median']:.3f} ms" for k, v in r["impls"].items()
            ]
            parts += [
                f"ours/{k} {v['step_ours_over_peer']:.3f}"
                for k, v in r["ratios"].items()
            ]
        elif rec["suite"] == "step":
            s = r["step_ms"]
            parts = [
                f"step {s['median']:.3f} ms (p10 {s['p10']:.3f}, p90 {s['p90']:.3f})"
            ]
            parts.append(f"decode {r['decode_ms']['median']:.3f} ms")
        else:
            parts = [f"{r['tokens_per_s']:.1f} tok/s"]
        pct = r.get("pct_of_floor")
        parts += [f"{pct:.1f}% of floor"] if pct is not None else []
        lines.append(f"context {r['context']}: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check(p, args)
    _set_threads(args.threads)
    try:
        rec = run(args)
    except (NotImplementedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from . import record

    path = record.write(rec, args.out)
    print(_table(rec))
    print(json.dumps(rec["summary"] | {"record": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

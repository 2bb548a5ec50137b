"""Run a benchmark suite and write one JSON record (see bench/README.md).

    OMP_NUM_THREADS=1 python -m bench.run step --backend mlx --preset mid \\
        --context 64,512,2048 --repeats 5 --measure --out bench/results/
    python -m bench.run peers --backend torch --preset mid --context 512
    python -m bench.run generate --backend mlx --preset tiny --canvases 4
    python -m bench.run spec --backend mlx --drafter self --drafter target \\
        --prompts 6 --max-tokens 128 --repeats 3
    python -m bench.run spec-cost --backend torch --preset mid --context 512
    python -m bench.run hygiene --backend mlx --preset mid --context 64,512,2048

Suites: step | prefill | generate | peers | spec | spec-cost | hygiene (in
bench/suites.py, bench/spec_suites.py, bench/step_hygiene.py). The weights are random
(presets tiny | mid | released, built on first use into $DIFFGEM_HOME/bench), except
for `spec`, which runs the trained default model (or --model) on held-out prompts and
writes one record per --drafter. The last stdout line is a JSON summary with the
record's path (spec: the list of records).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mlx_diffgem.cli.options import threshold

SUITES = ("step", "prefill", "generate", "peers", "spec", "spec-cost", "hygiene")
SPEC_SUITES = ("spec", "spec-cost")
DEFAULT_REPEATS = {"spec": 3}  # others: 5
PRESETS = ("tiny", "mid", "released")
QUANTS = ("4bit", "8bit", "mixed", "int8", "fp8")
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


def _parser(prog: str = "python -m bench.run") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=SUITES)
    _model_args(p)
    _shape_args(p)
    _spec_args(p)
    _run_args(p)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    """What runs: backend, preset, device, precision, weights, compilation."""
    p.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    p.add_argument(
        "--preset", default=None, choices=PRESETS, help="default tiny (not for spec)"
    )
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


def _shape_args(p: argparse.ArgumentParser) -> None:
    """What is measured: contexts, canvas, batch, steps, repeats, peers."""
    p.add_argument("--context", type=int_list, default=[512], help="e.g. 64,512,2048")
    p.add_argument("--canvas", type=int, default=None, help="canvas length override")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--steps",
        type=int,
        default=8,
        help="steps per timed canvas (spec-cost: passes per model per repeat)",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (5; spec: 3)"
    )
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
    p.add_argument(
        "--solo",
        default=None,
        choices=["ours", "transformers", "mlx_vlm"],
        help="peers: time this implementation alone in this process (when two "
        "copies of the weights do not fit on one device; needed with --weights "
        "device); bench.device_table pairs the records",
    )


def _spec_args(p: argparse.ArgumentParser) -> None:
    """The spec suites' drafters, model, prompts and SpecPolicy."""
    p.add_argument(
        "--drafter",
        action="append",
        default=None,
        help="spec, spec-cost: a drafter (self, 'self:layers=0,5 top_k=1 ...', "
        "target); repeat the option for several (default: self)",
    )
    p.add_argument(
        "--model", default=None, help="spec: model folder (default: embedded)"
    )
    p.add_argument("--prompts", type=int, default=6, help="spec: held-out prompts")
    p.add_argument("--max-tokens", type=int, default=128, help="spec: new tokens")
    p.add_argument("--spec-draft-steps", type=int, default=None, help="SpecPolicy")
    p.add_argument("--spec-refine-steps", type=int, default=None, help="SpecPolicy")
    p.add_argument("--spec-max-rounds", type=int, default=None, help="SpecPolicy")
    p.add_argument(
        "--spec-draft-confidence", type=float, default=None, help="SpecPolicy"
    )
    p.add_argument(
        "--spec-draft-entropy-bound", type=float, default=None, help="SpecPolicy"
    )
    p.add_argument(
        "--spec-verify-on",
        choices=["argmax", "canvas"],
        default=None,
        help="SpecPolicy",
    )
    p.add_argument(
        "--spec-verify",
        choices=["plain", "hidden", "others"],
        default=None,
        help="SpecPolicy",
    )
    p.add_argument("--spec-verify-groups", type=int, default=None, help="SpecPolicy")
    p.add_argument(
        "--spec-accept-threshold",
        type=threshold,
        default=None,
        help="SpecPolicy: a number or 'ratio'",
    )
    p.add_argument("--spec-verify-sure", type=float, default=None, help="SpecPolicy")
    p.add_argument("--spec-min-commit", type=float, default=None, help="SpecPolicy")


def _run_args(p: argparse.ArgumentParser) -> None:
    """How it runs: prefill chunk, seed, threads, rates, folders."""
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (BLAS/torch)")
    p.add_argument("--measure", action="store_true", help="measure matmul/bandwidth")
    p.add_argument("--checkpoint-dir", default=None, help="default $DIFFGEM_HOME/bench")
    p.add_argument("--out", default="bench/results", help="folder of the JSON record")


def _defaults(args: argparse.Namespace) -> None:
    """Suite-dependent defaults (the parser's None)."""
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS.get(args.suite, 5)
    if args.preset is None and args.suite != "spec":
        args.preset = "tiny"
    if args.drafter is None and args.suite in SPEC_SUITES:
        args.drafter = ["self"]


def _check_spec(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.suite not in SPEC_SUITES:
        spec_only = ("drafter", "model", "spec_draft_steps", "spec_refine_steps")
        spec_only += ("spec_max_rounds", "spec_draft_confidence")
        spec_only += ("spec_draft_entropy_bound", "spec_verify_on", "spec_verify")
        spec_only += ("spec_verify_groups", "spec_accept_threshold", "spec_verify_sure")
        spec_only += ("spec_min_commit",)
        given = [k for k in spec_only if getattr(args, k) is not None]
        if given:
            p.error(f"--{given[0].replace('_', '-')}: only for the spec suites")
        return
    if args.compile:
        p.error(f"{args.suite}: no --compile (drafter passes run the eager model)")
    if len(set(args.drafter)) != len(args.drafter):
        p.error("--drafter: each drafter once")
    if args.suite == "spec":
        if args.preset is not None:
            p.error("spec: runs the trained default model (or --model), no --preset")
        if args.weights != "checkpoint":
            p.error("spec: --weights device is for random presets")
        if args.batch != 1:
            p.error("spec: batch 1 only")
        if args.prompts < 1 or args.max_tokens < 1:
            p.error("--prompts and --max-tokens must be >= 1")
    elif args.model is not None:
        p.error("--model: only for spec (spec-cost runs --preset)")


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _defaults(args)
    _check_spec(p, args)
    if args.steps < 4:
        p.error("--steps must be >= 4 (steps 3..S-1 are timed)")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.canvases < 1:
        p.error("--repeats, --batch and --canvases must be >= 1, --warmup >= 0")
    if args.suite == "peers" and args.batch != 1:
        p.error("peers: batch 1 only (mlx-vlm's loop runs one row)")
    if args.suite == "hygiene" and args.backend != "mlx":
        p.error("hygiene: MLX backend only (it counts MLX host syncs)")
    if args.peers and not set(args.peers) <= {"transformers", "mlx_vlm"}:
        p.error(f"--peers: expected transformers and/or mlx_vlm, got {args.peers}")
    if args.device and args.backend != "torch":
        p.error("--device: only for the torch backend")
    if args.compile and args.backend != "torch":
        p.error("--compile: only for the torch backend")
    torch_quant = (None, "int8", "fp8")
    if args.weights == "device" and (
        args.backend != "torch" or args.quantization not in torch_quant
    ):
        p.error("--weights device: torch backend only, quantization int8 or fp8")
    _check_peers(p, args)
    if args.compile and args.warmup < 1:
        p.error("--compile: needs --warmup >= 1 (compilation is not timed)")


def _check_peers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.solo is None:
        if args.suite == "peers" and args.weights == "device":
            p.error("--weights device: peers run one at a time, pass --solo")
        return
    if args.suite != "peers":
        p.error("--solo: only for the peers suite")
    if args.solo != "ours":
        if args.peers and args.peers != [args.solo]:
            p.error(f"--solo {args.solo}: --peers names another ({args.peers})")
        args.peers = [args.solo]
    if args.weights == "device" and args.solo == "mlx_vlm":
        p.error("--weights device: transformers or ours (torch), not mlx_vlm")


def _set_threads(n: int | None) -> None:
    """Pin BLAS and torch threads; must run before numpy/torch/mlx are imported."""
    if n is None:
        return
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    if "numpy" in sys.modules:
        print("note: --threads set after numpy was imported", file=sys.stderr)


def run(args: argparse.Namespace) -> dict | list[dict]:
    """Run the suite of `args` and return its record (spec: one per drafter; does
    not write them). `args` must have passed the parser's checks (`_check`)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _defaults(args)
    if args.threads is not None and (args.backend == "torch" or args.suite == "peers"):
        _torch_threads(args.threads)
    if args.suite == "spec":
        from . import spec_suites

        recs = spec_suites.spec(args)
        for rec in recs:
            rec["summary"] = summary(rec)
        return recs
    return _record(args)


def _torch_threads(n: int) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def _record(args: argparse.Namespace) -> dict:
    from . import record, suites

    s = suites.setup(args)
    rec = record.envelope(args.suite, s.accelerator, _blas())
    rec.update(
        backend=args.backend,
        device=s.device,
        dtype=s.dtype,
        quantization=args.quantization,
        compile=args.compile,
        expert_gemm=getattr(s.target, "expert_path", None),
        fused_sampler=getattr(getattr(s.target, "model", None), "fused_sampler", None),
        compile_scope=_compile_scope(args),
        cuda_graphs=_graphs(s),
        model=s.model,
        settings=_settings(args),
        measured_machine=s.measured,
    )
    rec.update(_results(s, args))
    rec["machine"]["loadavg_after"] = list(os.getloadavg())
    rec["summary"] = summary(rec)
    return rec


def _graphs(s) -> dict | None:
    """The bucketed CUDA graphs of the decoder pass, when the model replays them."""
    graphs = getattr(getattr(s.target, "model", None), "graphs", None)
    if graphs is None:
        return None
    return {"bucket_tokens": graphs.size, "captured": graphs.captures}


def _compile_scope(args: argparse.Namespace) -> str | None:
    if not args.compile:
        return None
    from cuda_backend.compile import scope

    return scope()


def _results(s, args: argparse.Namespace) -> dict:
    """The suite's `results` (a point per context) and the entries that go with
    them. step and peers interleave the contexts inside the suite."""
    from . import suites

    if args.suite == "step":
        return suites.step_points(s, args)
    if args.suite == "peers":
        peers, info = suites.load_peers(s, args)
        points = suites.peers_points(s, args, peers)
        return {"peers": info, "solo": args.solo, "results": points}
    if args.suite == "spec-cost":
        from . import spec_suites

        return {
            "results": spec_suites.spec_cost_points(s, args),
            "released": spec_suites.spec_cost_released(args),
        }
    if args.suite == "hygiene":
        from . import step_hygiene

        points = step_hygiene.hygiene_points(s, args)
        return {"results": points, "checks": step_hygiene.checks(points)}
    point = {"prefill": suites.prefill_point, "generate": suites.generate_point}
    return {"results": [point[args.suite](s, args, n) for n in args.context]}


def _blas() -> list[str]:
    from mlx_diffgem.mlx_backend import _blas

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
    "spec-cost": "prefill each context once; per repeat, per context, `steps` "
    "rounds of: one target decoder pass, then one pass of each drafter's plan "
    "(Model.decode(..., plan=)), on the same random canvas, cache and "
    "self-conditioning logits; each pass timed to a device sync; measured ratio = "
    "median drafter pass / median target pass; paired = per-repeat mean ratios",
    "hygiene": "prefill each context once; one decoder pass under CopyProbe (bytes "
    "through mx.concatenate and mx.array.__setitem__, cache buffers whose data "
    "pointer moved); canvases of S/2 and S steps (never confident) under "
    "SyncCounter, per step = the difference over S - S/2 (a host sync: eval, "
    "synchronize, or a read of an array not evaluated before); the cache compared "
    "before and after (bench/step_hygiene.py); untimed: no repeats",
}


def _settings(args: argparse.Namespace) -> dict:
    keys = (
        "context batch steps repeats warmup canvases steps_override peers "
        "prefill_chunk seed threads measure weights"
    ).split()
    out = {k: getattr(args, k) for k in keys}
    if args.suite == "spec-cost":
        out["drafters"] = list(args.drafter)
    out["protocol"] = PROTOCOL[args.suite]
    return out


def summary(rec: dict) -> dict:
    """The one-line digest: per context, the suite's headline number."""
    if rec["suite"] == "spec":
        return _spec_summary(rec)
    head = {
        "step": lambda r: r["step_ms"]["median"],
        "prefill": lambda r: r["tokens_per_s"],
        "generate": lambda r: r["tokens_per_s"],
        "peers": lambda r: (
            {k: v["step_ours_over_peer"] for k, v in r["ratios"].items()}
            or {k: v["step_ms"]["median"] for k, v in r["impls"].items()}
        ),
        "spec-cost": lambda r: {
            k: v["measured_ratio"] for k, v in r["drafters"].items()
        },
        "hygiene": lambda r: r["syncs_per_step"]["host_syncs"],
    }[rec["suite"]]
    unit = {
        "step": "ms_per_step",
        "peers": "ms_per_step" if rec.get("solo") else "ratio_ours_over_peer",
        "prefill": "tokens_per_s",
        "generate": "tokens_per_s",
        "spec-cost": "drafter_over_target_pass",
        "hygiene": "host_syncs_per_step",
    }
    checks = {"checks": rec["checks"]} if "checks" in rec else {}
    return {
        "suite": rec["suite"],
        "backend": rec["backend"]
        + (f" (compile {rec['compile']})" if rec.get("compile") else ""),
        "preset": rec["model"]["preset"],
        "device": f"{rec['machine']['accelerator']} [{rec['device']}]",
        unit[rec["suite"]]: {str(r["context"]): head(r) for r in rec["results"]},
    } | checks


def _spec_summary(rec: dict) -> dict:
    nat, spec, ratios = rec["native"], rec["speculative"], rec["ratios"]
    return {
        "suite": "spec",
        "backend": rec["backend"],
        "preset": rec["model"]["preset"],
        "drafter": rec["drafter"]["name"],
        "device": f"{rec['machine']['accelerator']} [{rec['device']}]",
        "target_passes_per_canvas": {
            "native": nat["target_passes_per_canvas"]["mean"],
            "speculative": spec["target_passes_per_canvas"]["mean"],
        },
        "drafter_passes_per_canvas": spec["drafter_passes_per_canvas"]["mean"],
        "tokens_per_s": {
            "native": nat["tokens_per_s"],
            "speculative": spec["tokens_per_s"],
        },
        "tokens_per_s_spec_over_native": ratios["tokens_per_s_spec_over_native"],
    }


def _paired(rec: dict) -> str:
    from .report import parse_interval

    ci = parse_interval(rec)
    return f" (paired difference, 95%: {ci} points)" if ci else ""


def _spec_lines(rec: dict) -> str:
    nat, spec, r = rec["native"], rec["speculative"], rec["ratios"]
    tp = "target_passes_per_canvas"
    return (
        f"{rec['drafter']['name']}: target passes/canvas {nat[tp]['mean']:.2f} native"
        f" -> {spec[tp]['mean']:.2f} speculative (+ "
        f"{spec['drafter_passes_per_canvas']['mean']:.2f} drafter, "
        f"{spec['verify_rounds_per_canvas']['mean']:.2f} verifies, "
        f"{100 * spec['draft_kept_share']:.0f}% of the draft kept); tok/s "
        f"{nat['tokens_per_s']:.1f} -> {spec['tokens_per_s']:.1f} "
        f"(x{r['tokens_per_s_spec_over_native']:.3f}); parse rate "
        f"{nat['parse_rate']:.0%} -> {spec['parse_rate']:.0%}{_paired(rec)}; "
        "committed entropy "
        f"{nat['committed_entropy']:.3f} -> {spec['committed_entropy']:.3f} nats"
    )


def _table(rec: dict) -> str:
    """A few human-readable lines per context."""
    if rec["suite"] == "spec":
        return _spec_lines(rec)
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
        elif rec["suite"] == "spec-cost":
            parts = [f"target {r['target_ms']['median']:.3f} ms"] + [
                f"{k} {v['drafter_ms']['median']:.3f} ms = x{v['measured_ratio']:.3f} "
                f"(predicted FLOPs x{v['predicted_flops_ratio']:.3f})"
                for k, v in r["drafters"].items()
            ]
        elif rec["suite"] == "step":
            s = r["step_ms"]
            parts = [
                f"step {s['median']:.3f} ms (p10 {s['p10']:.3f}, p90 {s['p90']:.3f})"
            ]
            parts.append(f"decode {r['decode_ms']['median']:.3f} ms")
        elif rec["suite"] == "hygiene":
            parts = _hygiene_parts(r)
        else:
            parts = [f"{r['tokens_per_s']:.1f} tok/s"]
        pct = r.get("pct_of_floor")
        parts += [f"{pct:.1f}% of floor"] if pct is not None else []
        lines.append(f"context {r['context']}: " + ", ".join(parts))
    return "\n".join(lines)


def _hygiene_parts(r: dict) -> list[str]:
    syncs, copies = r["syncs_per_step"], r["copies_per_pass"]
    return [
        f"{syncs['host_syncs']:g} host syncs per step ({syncs['evals']:g} evals)",
        f"{copies['written_bytes'] / 1024:.1f} KiB written per decoder pass",
        f"{copies['moved_buffers']} cache buffers moved",
        "cache untouched" if r["cache_untouched"] else "cache CHANGED",
    ]


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench.run") -> int:
    p = _parser(prog)
    args = p.parse_args(argv)
    _check(p, args)
    _set_threads(args.threads)
    from . import record

    record.pin_git()
    try:
        rec = run(args)
    except (NotImplementedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(rec, list):  # spec: one record per drafter
        done = []
        for one in rec:
            path = write(one, args.out)
            print(_table(one))
            done.append(one["summary"] | {"record": str(path)})
        print(json.dumps({"suite": args.suite, "records": done}))
        return 0
    path = write(rec, args.out)
    print(_table(rec))
    print(json.dumps(rec["summary"] | {"record": str(path)}))
    return 0


def write(rec: dict, out: str) -> Path:
    """bench.record.write; spec records get the drafter in their file name (several
    records of one run share the time stamp), solo peers records the implementation."""
    from . import record

    path = record.write(rec, out)
    if rec["suite"] == "spec":
        name = rec["drafter"]["name"]
    elif rec.get("solo"):
        name = f"solo-{rec['solo']}"
    else:
        return path
    slug = record.device_slug(name.replace("=", "-"))
    named = path.with_name(f"{path.stem}-{slug}.json")
    path.replace(named)
    return named


if __name__ == "__main__":
    sys.exit(main())

"""Cost model of DiffusionGemma: FLOPs and bytes per pass, and the roofline limit.

The cost report of one model and its command line, `python -m bench.cost`: a decoder
step's and a canvas commit's FLOPs and bytes (bench/pass_cost.py), a self-drafter
pass next to them (bench/drafter_cost.py), their roofline floors and tokens/s on every
device of the table (bench/roofline.py, bench/hardware.py), and on request the
released-model projections (bench/projection.py). A canvas is S_steps decoder steps
+ 1 encoder pass over the C committed tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from typing import Any

from mlx_diffgem.core.config import ModelConfig

from .drafter_cost import self_draft_cost, self_draft_plan
from .hardware import DEVICES, Device, get_device, measure_this_machine
from .pass_cost import (
    PRESETS,
    QUANTS,
    PassCost,
    PassOptions,
    decoder_cost,
    encoder_cost,
    load_preset,
    param_counts,
)
from .projection import ProjectedModel, multi_canvas_regimes, project_speculative
from .roofline import Schedule, estimate

ASSUMPTIONS = [
    "weights: every parameter of the touched experts and all dense weights read once "
    "per pass; the decoder reads the embedding twice (LM head + soft embedding)",
    "experts touched: E (1 - (1 - k/E)^(B C)), independent uniform top-k routing",
    "quantization: MLX affine, group size 64, bf16 scale + bias per group; norms and "
    "scalars stay bf16",
    "KV cache bf16; sliding layers hold min(N, W-1) tokens, full layers N; K and V "
    "both stored unless kv_shared",
    "sampler: `sampler_passes` fp32 [B, C, V] tensors written per step",
    "every decoder step runs the self-conditioning path (the first step has none)",
    "canvas: S decoder steps + 1 encoder commit over C tokens at the same context; "
    "prefill and activations are not counted",
    "speculative: target passes + drafter passes x drafter cost (fraction of a target "
    "step) + 1 commit",
]


def report(
    cfg: ModelConfig,
    *,
    context: int = 512,
    options: PassOptions | None = None,
    schedule: Schedule | None = None,
    devices: list[Device] | None = None,
    drafter: str | None = None,
) -> dict:
    """Everything `python -m bench.cost --json` prints, as a dict.

    `options`: how the passes run (None: PassOptions(); canvas None: the config's);
    `schedule`: passes per canvas (None: Schedule()). `drafter`: a self-drafter plan
    ("auto", "full", "layers=0,5 top_k=1 ..."): its pass cost next to the target
    step's, and the speculative estimates charge each drafter pass its own floor
    instead of `schedule.drafter_cost`."""
    opts = PassOptions() if options is None else options
    opts = replace(opts, canvas=opts.canvas or cfg.canvas_length)
    schedule = Schedule() if schedule is None else schedule
    dec = decoder_cost(cfg, context, **asdict(opts))
    kw = dict(batch=opts.batch, quant=opts.quant, kv_shared=opts.kv_shared)
    enc = encoder_cost(cfg, opts.canvas, context, **kw)
    devs = list(DEVICES.values()) if devices is None else devices
    plan = None if drafter is None else self_draft_plan(cfg, drafter)
    draft = None
    if plan is not None:
        draft = decoder_cost(cfg, context, plan=plan, **asdict(opts))
    S = schedule.steps_per_canvas
    return {
        "config": _config_summary(cfg),
        "context": context,
        "canvas_length": opts.canvas,
        "batch": opts.batch,
        "quant": opts.quant,
        "params": param_counts(cfg).to_dict(),
        **_step_section(cfg, context, opts, dec),
        "decoder": dec.to_dict(),
        "encoder": enc.to_dict(),
        "canvas": {
            "flops": S * dec.total_flops + enc.total_flops,
            "bytes": S * dec.total_bytes + enc.total_bytes,
        },
        "schedule": asdict(schedule),
        "drafter": None
        if plan is None
        else self_draft_cost(cfg, plan, context, options=opts, devices=devs),
        "devices": {
            d.name: {
                b: estimate(dec, enc, d, schedule, b, draft).to_dict()
                for b in d.bases()
            }
            for d in devs
        },
        "assumptions": ASSUMPTIONS,
    }


def _step_section(
    cfg: ModelConfig, context: int, opts: PassOptions, dec: PassCost
) -> dict:
    """The decoder step's headline figures, and its weight bytes at each precision."""
    by_quant = {
        name: decoder_cost(cfg, context, **asdict(replace(opts, quant=name)))
        for name in QUANTS
    }
    return {
        "flops_per_step": dec.total_flops,
        "bytes_per_step": dec.total_bytes,
        "weight_bytes_per_step": dec.bytes["weights"],
        "weight_bytes_by_quant": {q: c.bytes["weights"] for q, c in by_quant.items()},
        "kv_read_bytes_per_step": dec.bytes["kv_read"],
        "sampler_bytes_per_step": dec.bytes["sampler"],
        "sampler_passes": opts.sampler_passes,
        "experts_hit_per_layer": dec.experts_hit_per_layer,
    }


def _multi_text(rows: list[dict], k: int) -> str:
    lines = [
        f"Verifying {k} canvases in one target pass: per-canvas cost vs one canvas "
        "per pass (1.00 = no gain)",
        f"{'device':<10} {'weights':<6} {'bandwidth':<20} {'1-canvas pass':<14} ratio",
    ]
    for r in rows:
        lines.append(
            f"{r['device']:<10} {r['quant']:<6} {r['bandwidth']:<20} "
            f"{r['single_bound'] + '-bound':<14} {r['per_canvas_vs_single']:.2f}"
        )
    return "\n".join(lines)


def _config_summary(cfg: ModelConfig) -> dict:
    keys = (
        "vocab_size hidden_size intermediate_size num_hidden_layers "
        "num_attention_heads num_key_value_heads head_dim sliding_window num_experts "
        "top_k_experts moe_intermediate_size canvas_length"
    ).split()
    d = {k: getattr(cfg, k) for k in keys}
    d["full_layers"] = [i for i in range(cfg.num_hidden_layers) if cfg.is_full(i)]
    d["per_layer_config"] = {str(i): v for i, v in cfg.per_layer_config.items()}
    return d


def _si(x: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.0f}"


def _text(rep: dict) -> str:
    d, e = rep["decoder"], rep["encoder"]
    lines = [
        f"decoder step: {_si(d['total_flops'])}FLOP, {_si(d['total_bytes'])}B "
        f"({rep['quant']}, context {rep['context']}, batch {rep['batch']})",
        "  flops: " + ", ".join(f"{k} {_si(v)}" for k, v in d["flops"].items()),
        "  bytes: " + ", ".join(f"{k} {_si(v)}" for k, v in d["bytes"].items()),
        f"encoder commit: {_si(e['total_flops'])}FLOP, {_si(e['total_bytes'])}B",
        *_drafter_text(rep.get("drafter")),
        f"{'device':<14}{'basis':<10}{'step ms':>9}{'bound':>9}"
        f"{'native tok/s':>14}{'spec tok/s':>12}{'fits':>6}",
    ]
    for name, by_basis in rep["devices"].items():
        for basis, e in by_basis.items():
            lines.append(
                f"{name:<14}{basis:<10}{e['step']['floor_s'] * 1e3:>9.4g}"
                f"{e['step']['bound']:>9}{e['native_tokens_per_s']:>14.0f}"
                f"{e['speculative_tokens_per_s']:>12.0f}"
                f"{'yes' if e['weights_fit_in_memory'] else 'no':>6}"
            )
    return "\n".join(lines)


def _drafter_text(d: dict | None) -> list[str]:
    if d is None:
        return []
    plan = ", ".join(f"{k}={v}" for k, v in d["plan"].items() if v is not None)
    t, x = d["drafter"], d["target"]
    return [
        f"self-drafter pass ({plan or 'no cuts'}): {_si(t['flops'])}FLOP, "
        f"{_si(t['bytes'])}B = {d['flops_ratio']:.3f} of the step's FLOPs, "
        f"{d['bytes_ratio']:.3f} of its bytes",
        "  flops: " + ", ".join(f"{k} {_si(v)}" for k, v in t["flops_by_part"].items()),
        f"  (target step: {_si(x['flops'])}FLOP, {_si(x['bytes'])}B)",
    ]


def _projection_text(proj: dict) -> str:
    n = proj["passes_per_canvas"]
    lines = [
        f"projection ({proj['model']}, {proj['quant']}, context {proj['context']}): "
        f"native {n['native_target']:g} target passes/canvas; speculative "
        f"{n['speculative_target']:g} target + {n['speculative_drafter']:g} drafter",
        f"{'device':<10}{'basis':<10}{'draft cost':>11}{'native tok/s':>14}"
        f"{'spec tok/s':>12}{'speedup':>9}  published native / AR tok/s",
    ]
    for name, d in proj["devices"].items():
        pubs = "; ".join(
            f"{p['tokens_per_s']:g} ({p['engine']} {p['quant']}) -> "
            f"{p['scaled_by_speedup']:.1f} / AR {p['autoregressive_tokens_per_s']}"
            for p in d["published"]
        )
        for basis, e in d["floor"].items():
            note = (pubs or "none published") if basis == "peak" else ""
            lines.append(
                f"{name:<10}{basis:<10}{e['drafter_cost']:>11.3f}"
                f"{e['native_tokens_per_s']:>14.1f}"
                f"{e['speculative_tokens_per_s']:>12.1f}{e['speedup']:>9.3f}  {note}"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.cost", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--preset", default="diffusiongemma-26b-a4b", help=", ".join(PRESETS)
    )
    p.add_argument("--config", help="a config.json instead of a preset")
    p.add_argument("--context", type=int, default=512, help="cached tokens N_ctx")
    p.add_argument("--canvas", type=int, help="canvas length C (default: config)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--quant", default="bf16", choices=list(QUANTS))
    p.add_argument("--device", help="one device of the table (default: all)")
    p.add_argument("--steps-per-canvas", type=float, default=15)
    p.add_argument("--target-passes", type=float, default=2)
    p.add_argument("--drafter-passes", type=float, default=8)
    p.add_argument("--drafter-cost", type=float, default=0.1)
    p.add_argument("--sampler-passes", type=float, default=5)
    p.add_argument("--kv-shared", action="store_true", help="k==v layers store once")
    p.add_argument(
        "--drafter",
        nargs="?",
        const="auto",
        default=None,
        metavar="PLAN",
        help="a self-drafter pass's cost (auto, full, or 'layers=0,5 top_k=1 "
        "sc_top_k=32 head_vocab=1024'); speculative estimates charge its floor",
    )
    p.add_argument(
        "--project",
        type=_three_floats,
        default=None,
        metavar="NATIVE,SPEC,DRAFTER",
        help="project tokens/s on M1 Ultra, M4 Max, M5 Max from measured target "
        "passes per canvas (native, speculative) and drafter passes per canvas",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="measure this machine (device this-machine)",
    )
    p.add_argument(
        "--multi-canvas",
        type=int,
        default=None,
        metavar="K",
        help="per device and precision: does one target pass over K canvases "
        "beat K passes (memory- vs compute-bound)?",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(
            f"expected NATIVE,SPEC,DRAFTER passes per canvas, got {text!r}"
        )
    return values  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.context < 0 or args.batch < 1 or (args.canvas or 1) < 1:
        p.error("--context must be >= 0, --batch and --canvas >= 1")
    here = measure_this_machine() if args.measure else None
    cfg, devices, plan = _inputs(p, args, here)
    rep = _report(args, cfg, devices, plan)
    if here is not None:
        rep["measured"] = here.to_dict()
    if args.multi_canvas is not None:
        if args.multi_canvas < 2:
            p.error(
                f"--multi-canvas: expected an integer >= 2, got {args.multi_canvas}"
            )
        rep["multi_canvas"] = multi_canvas_regimes(cfg, args.context, args.multi_canvas)
    if args.json:
        print(json.dumps(rep))
    else:
        _print(rep, args)
    return 0


def _inputs(
    p: argparse.ArgumentParser, args: argparse.Namespace, here: Device | None
) -> tuple[ModelConfig, list[Device] | None, Any]:
    """The config, the devices (None: the table) and the drafter plan of `args`;
    a bad preset, config, device or plan is a usage error."""
    extra = {} if here is None else {here.name: here}
    try:
        cfg = (
            ModelConfig.from_file(args.config)
            if args.config
            else load_preset(args.preset)
        )
        devices = None
        if args.device:
            devices = [get_device(args.device, extra)]
        elif extra:
            devices = [*DEVICES.values(), *extra.values()]
        plan = self_draft_plan(cfg, args.drafter or "auto")
    except ValueError as e:
        p.error(str(e))
    return cfg, devices, plan


def _report(
    args: argparse.Namespace,
    cfg: ModelConfig,
    devices: list[Device] | None,
    plan: Any,
) -> dict:
    """`report` of `args`, with the preset's name and the projection it asks for."""
    options = PassOptions(
        args.canvas, args.batch, args.quant, args.sampler_passes, args.kv_shared
    )
    schedule = Schedule(
        args.steps_per_canvas,
        args.target_passes,
        args.drafter_passes,
        args.drafter_cost,
    )
    rep = report(
        cfg,
        context=args.context,
        options=options,
        schedule=schedule,
        devices=devices,
        drafter=args.drafter,
    )
    rep["preset"] = None if args.config else args.preset
    if args.project:
        model = ProjectedModel(
            args.preset,
            cfg if args.config else None,
            args.context,
            args.quant,
            args.sampler_passes,
        )
        rep["projection"] = project_speculative(*args.project, plan=plan, model=model)
    return rep


def _print(rep: dict, args: argparse.Namespace) -> None:
    """The text form of the report (with --measure, this machine's rates first)."""
    if "measured" in rep:
        m = rep["measured"]
        bw, mm = m["bandwidth_gbs"]["value"], m["matmul_tflops"]["value"]
        print(f"this machine: {mm:.3f} TFLOP/s fp32 matmul, {bw:.1f} GB/s copy")
    print(_text(rep))
    if args.project:
        print(_projection_text(rep["projection"]))
    if args.multi_canvas is not None:
        print(_multi_text(rep["multi_canvas"], args.multi_canvas))


if __name__ == "__main__":
    sys.exit(main())

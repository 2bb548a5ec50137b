"""Projections to the released model on devices we lack: speculative and multi-canvas.

- `project_speculative`: tokens/s of the released 26B-A4B from measured passes per
  canvas (native vs speculative) on the roofline of Apple GPUs, next to the published
  native and autoregressive figures of reference/anchors.md (`PUBLISHED`).
- `multi_canvas`: whether one target pass over k canvases beats k passes (it does
  where bytes bind, not where compute does), per device and precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mlx_diffgem.core.config import ModelConfig

from .drafter_cost import self_draft_plan
from .hardware import ANCHORS, DEVICES, Device, get_device
from .pass_cost import PassCost, decoder_cost, encoder_cost, load_preset
from .roofline import Schedule, estimate


@dataclass(frozen=True)
class Published:
    """A published single-stream figure of the released 26B-A4B on one device."""

    device: str
    engine: str
    quant: str
    tokens_per_s: float  # DiffusionGemma (native decoding)
    steps_per_canvas: str | None  # as reported
    autoregressive_tokens_per_s: float | None  # Gemma 4 26B-A4B, same machine
    source: str = ANCHORS + ": DiffusionGemma on Apple silicon"


PUBLISHED = [
    Published("M3 Ultra", "mlx-vlm", "8-bit", 42.8, None, 60.9),
    Published("M1 Ultra", "mlxcel", "4-bit", 15.0, "26-28", 71.3),
    Published("M5 Pro", "mlx-vlm stock", "4-bit", 22.5, None, None),  # 19-26
    Published("M5 Max", "vmlx-swift", "MXFP4", 36.8, "32.7", 81.0),  # AR ~81
    Published("M5 Max", "vmlx-swift", "MXFP8", 42.3, "22.7", 81.0),
    Published("M4 Pro", "MLX", "4-bit", 5.4, None, 38.0),
]
PROJECTION_DEVICES = ("M1 Ultra", "M4 Max", "M5 Max")  # M4 Max: nothing published


def published(device: str) -> list[dict]:
    return [asdict(p) for p in PUBLISHED if p.device == device]


@dataclass(frozen=True)
class ProjectedModel:
    """The model and setting a projection is for: a preset (or a config) at one
    context, precision and sampler width."""

    preset: str = "diffusiongemma-26b-a4b"
    cfg: ModelConfig | None = None  # instead of the preset
    context: int = 512
    quant: str = "4bit"
    sampler_passes: float = 5


def project_speculative(
    native_passes: float,
    spec_passes: float,
    drafter_passes: float,
    *,
    drafter_cost: float | None = None,
    plan: Any = None,
    model: ProjectedModel = ProjectedModel(),
    devices: Sequence[str] = PROJECTION_DEVICES,
) -> dict:
    """Tokens/s of the released model (`model`: a preset, or a config) from measured
    pass counts per canvas: native = S target steps + 1 commit; speculative = S'
    target passes + D drafter passes + 1 commit, on the roofline floor of each device
    of the table (peak, and measured where known). A drafter pass costs
    `drafter_cost` target steps, or (None) the floor of `plan` (default
    SelfDraftPlan.auto of the config) on that device. Next to each: the published
    native and autoregressive figures and the published native figure scaled by the
    projected speedup."""
    cfg = load_preset(model.preset) if model.cfg is None else model.cfg
    plan = self_draft_plan(cfg) if plan is None and drafter_cost is None else plan
    kw = dict(quant=model.quant)
    dec = decoder_cost(cfg, model.context, sampler_passes=model.sampler_passes, **kw)
    enc = encoder_cost(cfg, cfg.canvas_length, model.context, **kw)
    draft = None
    if drafter_cost is None:
        draft = decoder_cost(
            cfg, model.context, sampler_passes=model.sampler_passes, plan=plan, **kw
        )
    sched = Schedule(
        native_passes, spec_passes, drafter_passes, 0.0 if draft else drafter_cost
    )
    return {
        "model": model.preset if model.cfg is None else "config",
        "context": model.context,
        "canvas_length": cfg.canvas_length,
        "quant": model.quant,
        "passes_per_canvas": {
            "native_target": native_passes,
            "speculative_target": spec_passes,
            "speculative_drafter": drafter_passes,
        },
        "drafter_plan": None if plan is None else plan.to_dict(),
        "drafter_cost_given": drafter_cost,
        "devices": {n: _device_projection(n, dec, enc, sched, draft) for n in devices},
        "method": "roofline floor per pass (bench.roofline.estimate): canvas = passes "
        "x floor + one encoder commit; `scaled_by_speedup` = the published native "
        "tok/s x the projected native/speculative canvas-time ratio (peak basis)",
    }


def _device_projection(
    name: str, dec: PassCost, enc: PassCost, sched: Schedule, draft: PassCost | None
) -> dict:
    """One device's floors (per basis) and its published figures x the speedup."""
    dev = get_device(name)
    bases = {}
    for basis in dev.bases():
        e = estimate(dec, enc, dev, sched, basis, draft)
        bases[basis] = {
            "step_ms": e.step.floor_s * 1e3,
            "drafter_pass_ms": e.drafter_cost * e.step.floor_s * 1e3,
            "drafter_cost": e.drafter_cost,
            "native_tokens_per_s": e.native_tokens_per_s,
            "speculative_tokens_per_s": e.speculative_tokens_per_s,
            "speedup": e.native_canvas_s / e.speculative_canvas_s,
        }
    pubs = published(name)
    speedup = bases["peak"]["speedup"]
    for p in pubs:
        p["scaled_by_speedup"] = p["tokens_per_s"] * speedup
    return {"floor": bases, "published": pubs}


MULTI_DEVICES = ("M1 Ultra", "M4 Max", "M5 Pro", "M5 Max", "RTX 4090", "H100 SXM")
# One M5 Pro study measured ~80 GB/s for single-stream 4-bit MoE decoding, even with
# Apple's tuned kernel (issue 12): dequantising gathered experts, not DRAM, limits it.
MOE_4BIT_EFFECTIVE_GBS = 80.0


def multi_canvas(
    cfg: ModelConfig,
    device: Device,
    *,
    context: int = 512,
    quant: str = "bf16",
    canvases: Sequence[int] = (1, 2, 4),
    basis: str = "peak",
    bandwidth_gbs: float | None = None,
) -> list[dict]:
    """One target pass over k canvases at once (batch k: two drafted canvases, or
    two candidate drafts of one) against k separate passes, on the roofline.

    Weights are streamed once per pass whatever k is, FLOPs grow with k: in the
    memory-bound regime a k-canvas pass costs about one pass, so each canvas's
    verification gets ~k times cheaper; compute-bound, nothing is gained.
    `bandwidth_gbs` replaces the device's bandwidth (an effective kernel figure).
    """
    flops_s, bytes_s = device.rates(basis)
    if bandwidth_gbs is not None:
        bytes_s = bandwidth_gbs * 1e9
    rows, one = [], None
    for k in sorted(set(canvases) | {1}):
        cost = decoder_cost(cfg, context, batch=k, quant=quant)
        compute, memory = cost.total_flops / flops_s, cost.total_bytes / bytes_s
        t = max(compute, memory)
        one = t if k == 1 else one
        rows.append(
            {
                "canvases": k,
                "pass_s": t,
                "bound": "compute" if compute > memory else "memory",
                "per_canvas_vs_single": t / (k * one),
            }
        )
    return rows


def multi_canvas_regimes(cfg: ModelConfig, context: int = 512, k: int = 2) -> list:
    """Per device x precision: the per-canvas cost of a k-canvas verify pass
    relative to a single-canvas one (1.0: no gain; 1/k: the whole gain)."""
    out = []
    for name in MULTI_DEVICES:
        dev = DEVICES[name]
        for quant in ("bf16", "8bit", "4bit"):
            cases = [("peak", None)]
            if quant == "4bit" and name.startswith("M"):
                cases.append(("effective 4-bit MoE", MOE_4BIT_EFFECTIVE_GBS))
            for label, gbs in cases:
                rows = multi_canvas(
                    cfg, dev, context=context, quant=quant, canvases=(k,),
                    bandwidth_gbs=gbs,
                )  # fmt: skip
                out.append(
                    {
                        "device": name,
                        "quant": quant,
                        "bandwidth": label,
                        "single_bound": rows[0]["bound"],
                        "per_canvas_vs_single": rows[-1]["per_canvas_vs_single"],
                    }
                )
    return out

"""The cost of a self-drafter pass next to a target step, and the speedup it allows.

A self-drafter is the target run under a `drafter.plan.SelfDraftPlan` (fewer layers,
experts, soft-embedding rows or head rows); `pass_cost.decoder_cost(..., plan=)`
counts its pass, this module compares it with the target's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from mlx_diffgem.core.config import ModelConfig

from .hardware import Device
from .pass_cost import PassCost, PassOptions, decoder_cost
from .roofline import floor


def self_draft_plan(cfg: ModelConfig, spec: str = "auto") -> Any:
    """A SelfDraftPlan for `cfg` from a drafter argument: "auto" / "self" (the
    default cuts), "full" / "target" (no cuts), or "self:layers=0,5 top_k=1 ..."."""
    from drafter.plan import SelfDraftPlan

    kind, _, settings = spec.partition(":")
    if kind == "target" and not settings:
        return SelfDraftPlan().checked(cfg)
    return SelfDraftPlan.parse(settings if kind == "self" else spec, cfg)


def self_draft_cost(
    cfg: ModelConfig,
    plan: Any = None,
    context: int = 512,
    *,
    options: PassOptions | None = None,
    devices: Sequence[Device] = (),
) -> dict:
    """One self-drafter pass (`plan`; default SelfDraftPlan.auto) next to one target
    step, both run as `options` say (None: PassOptions()): FLOPs and bytes by part,
    their ratios, and the roofline floor ratio on each of `devices` (peak basis)."""
    plan = self_draft_plan(cfg) if plan is None else plan
    options = PassOptions() if options is None else options
    target = decoder_cost(cfg, context, **asdict(options))
    draft = decoder_cost(cfg, context, plan=plan, **asdict(options))
    return {
        "plan": plan.to_dict(),
        "context": context,
        "canvas_length": target.tokens,
        "batch": options.batch,
        "quant": options.quant,
        "target": _pass_summary(target),
        "drafter": _pass_summary(draft),
        "flops_ratio": draft.total_flops / target.total_flops,
        "bytes_ratio": draft.total_bytes / target.total_bytes,
        "floor_ratio": {
            d.name: floor(draft, d).floor_s / floor(target, d).floor_s for d in devices
        },
    }


def pass_speedup(
    native_passes: float, spec_passes: float, drafter_passes: float, drafter_cost: float
) -> float:
    """Native / speculative time per canvas if every pass cost its share of a
    target pass (a drafter pass: `drafter_cost`, e.g. `self_draft_cost`'s
    flops_ratio) and nothing else took time: what the measured pass counts allow
    at that cost ratio, the ceiling a measured wall-clock ratio is read against."""
    return native_passes / (spec_passes + drafter_cost * drafter_passes)


def _pass_summary(cost: PassCost) -> dict:
    return {
        "flops": cost.total_flops,
        "bytes": cost.total_bytes,
        "flops_by_part": dict(cost.flops),
        "bytes_by_part": dict(cost.bytes),
        "experts_hit_per_layer": cost.experts_hit_per_layer,
    }

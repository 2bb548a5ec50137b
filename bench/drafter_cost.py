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


def released_plan(plan: Any, source: ModelConfig, cfg: ModelConfig) -> Any:
    """A trained drafter's plan, made for the model `source`, as the same design on
    `cfg` (the released shape), for the cost model: the same kept layer indices
    (each must exist and be of the same kind, sliding or full), experts per token and
    soft-embedding rows; a head over the same share of the vocabulary; the same
    number of own layers, at `cfg`'s width (its attention heads and dense MLP)."""
    from drafter.trained import AdapterConfig
    from mlx_diffgem.core.plan import PassPlan

    layers = plan.layers
    if layers is not None:
        bad = [
            i for i in layers
            if i >= cfg.num_hidden_layers or cfg.is_full(i) != source.is_full(i)
        ]  # fmt: skip
        if bad:
            raise ValueError(
                f"drafter layers {bad}: no layer of the same kind on the released shape"
            )
    head = plan.head_vocab
    if head is not None:
        head = max(1, round(cfg.vocab_size * head / source.vocab_size))
    own = getattr(plan.adapter, "config", plan.adapter)
    adapter = None if own is None else AdapterConfig.at_width_of(cfg, own.num_layers)
    return PassPlan(
        layers=layers,
        top_k=None if plan.top_k is None else min(plan.top_k, cfg.num_experts),
        sc_top_k=plan.sc_top_k,
        head_vocab=head,
        adapter=adapter,
    ).checked(cfg)


# The bandwidth regimes of DESIGN §1: a Mac with 4-bit weights, an H200 in bf16.
BYTE_REGIMES = {"mac-4bit": "4bit", "h200-bf16": "bf16"}


def byte_regime(
    cfg: ModelConfig, plan: Any, passes: dict, context: int = 512, hidden: bool = True
) -> dict:
    """Measured passes per canvas at each pass's bytes (where bytes bind, a pass
    costs what it streams), per regime of BYTE_REGIMES, on the config `cfg`.

    `passes`: native target passes, speculative target passes, of which verifies,
    and drafter passes, per canvas. A hidden verify is one pass over 2C slots (its
    bytes from the cost model: the same weights, twice the sampler and canvas rows);
    the others are plain target passes. Model pass-equivalents = bytes / one target
    pass's bytes."""
    canvas = cfg.canvas_length * (2 if hidden else 1)
    plain, native = passes["spec_target"] - passes["verifies"], passes["native_target"]
    out = {}
    for name, quant in BYTE_REGIMES.items():
        step = decoder_cost(cfg, context, quant=quant).total_bytes
        verify = decoder_cost(cfg, context, canvas=canvas, quant=quant).total_bytes
        draft = decoder_cost(cfg, context, quant=quant, plan=plan).total_bytes
        spec = plain * step + passes["verifies"] * verify + passes["drafter"] * draft
        out[name] = {
            "quant": quant,
            "target_pass_gb": step / 1e9,
            "verify_pass_ratio": verify / step,
            "drafter_pass_ratio": draft / step,
            "native_pass_equivalents": native,
            "spec_pass_equivalents": spec / step,
            "native_over_spec": native * step / spec if spec else None,
        }
    return {"context": context, "hidden_verify": hidden, "passes": passes, **out}

"""Time of a pass at a device's limits: the roofline floor, and a canvas's estimate.

The floor of a pass is max(FLOPs / matmul rate, bytes / bandwidth) on a device of the
table (bench/hardware.py), at its peak or measured rates. A canvas is S decoder steps
(native) or target verifies plus drafter passes (speculative), plus one encoder pass
that commits it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .hardware import Device
from .pass_cost import PassCost


@dataclass
class Floor:
    compute_s: float
    memory_s: float

    @property
    def floor_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s > self.memory_s else "memory"

    def to_dict(self) -> dict:
        return {**asdict(self), "floor_s": self.floor_s, "bound": self.bound}


def floor(cost: PassCost, device: Device, basis: str = "peak") -> Floor:
    """Roofline floor of one pass: max(FLOPs / matmul rate, bytes / bandwidth)."""
    flops_per_s, bytes_per_s = device.rates(basis)
    return Floor(cost.total_flops / flops_per_s, cost.total_bytes / bytes_per_s)


@dataclass(frozen=True)
class Schedule:
    """Passes per canvas: native steps, or target verifies plus drafter passes."""

    steps_per_canvas: float = 15
    target_passes: float = 2
    drafter_passes: float = 8
    drafter_cost: float = 0.1  # one drafter pass as a fraction of a target step


@dataclass
class Estimate:
    """Floors and throughput of one device at one basis (peak or measured)."""

    device: str
    basis: str
    matmul_tflops: float
    bandwidth_gbs: float
    step: Floor
    encoder: Floor
    native_canvas_s: float
    native_tokens_per_s: float
    speculative_canvas_s: float
    speculative_tokens_per_s: float
    weights_fit_in_memory: bool
    drafter_step: Floor | None = None  # one drafter pass, when given as a PassCost
    drafter_cost: float | None = None  # drafter pass / target step used (floor ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(step=self.step.to_dict(), encoder=self.encoder.to_dict())
        if self.drafter_step is not None:
            d["drafter_step"] = self.drafter_step.to_dict()
        return d


def estimate(
    decoder: PassCost,
    encoder: PassCost,
    device: Device,
    schedule: Schedule = Schedule(),
    basis: str = "peak",
    drafter: PassCost | None = None,
) -> Estimate:
    """Canvas time and tokens/s: S steps (or verifies + drafts) + one canvas commit.

    `drafter`: the cost of one drafter pass (`decoder_cost(..., plan=...)`); its floor
    on `device` replaces `schedule.drafter_cost` (a fraction of a target step)."""
    step, enc = floor(decoder, device, basis), floor(encoder, device, basis)
    native = schedule.steps_per_canvas * step.floor_s + enc.floor_s
    draft = None if drafter is None else floor(drafter, device, basis)
    ratio = schedule.drafter_cost if draft is None else draft.floor_s / step.floor_s
    drafts = schedule.drafter_passes * ratio
    spec = (schedule.target_passes + drafts) * step.floor_s + enc.floor_s
    tokens = decoder.batch * decoder.tokens
    flops_per_s, bytes_per_s = device.rates(basis)
    return Estimate(
        device=device.name,
        basis=basis,
        matmul_tflops=flops_per_s / 1e12,
        bandwidth_gbs=bytes_per_s / 1e9,
        step=step,
        encoder=enc,
        native_canvas_s=native,
        native_tokens_per_s=tokens / native,
        speculative_canvas_s=spec,
        speculative_tokens_per_s=tokens / spec,
        weights_fit_in_memory=decoder.bytes["weights"] <= device.memory_gb.value * 1e9,
        drafter_step=draft,
        drafter_cost=ratio,
    )

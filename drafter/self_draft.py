"""The training-free self-drafter: the target's own weights, run with a SelfDraftPlan.

It needs no memory of its own: its passes read the target's weights and the target's
KV cache (the layers it runs see the same cached K/V as the target's), and it runs
the backend's own canvas loop, so its denoising follows the target's sampler.
"""

from __future__ import annotations

import importlib
from typing import Any

from mlx_diffgem.core.backend import CanvasResult, CanvasState, DenoisePolicy, Target
from mlx_diffgem.core.noise import NoiseSource

from .plan import SelfDraftPlan

_CANVAS = {"mlx": "mlx_diffgem.canvas", "torch": "cuda_backend.canvas"}


class DraftView:
    """What the canvas loop needs of a model, with every pass run under `plan`."""

    role = "drafter"  # labels live drafts in stream_generate(draft=True)

    def __init__(self, model: Any, plan: SelfDraftPlan):
        self.model, self.plan, self.config = model, plan, model.config

    @property
    def dtype(self) -> Any:
        return self.model.dtype

    def grad_off(self) -> Any:  # torch's canvas loop enters it
        return self.model.grad_off()

    def decode(self, canvas: Any, cache: Any, self_conditioning: Any = None) -> Any:
        return self.model.decode(canvas, cache, self_conditioning, plan=self.plan)


class SelfDrafter:
    """Denoises with the target's weights, cut as `plan` says (DESIGN §4)."""

    kind = "self"

    def __init__(self, target: Target, plan: SelfDraftPlan):
        if target.backend not in _CANVAS:
            raise ValueError(f"drafter: no self-drafter for backend {target.backend!r}")
        self.plan = plan
        self.view = DraftView(target.model, plan)
        self._canvas = importlib.import_module(_CANVAS[target.backend])

    def denoise(
        self,
        state: CanvasState,
        cache: Any,
        policy: DenoisePolicy,
        noise: NoiseSource,
        on_step: Any = None,
    ) -> CanvasResult:
        return self._canvas.denoise(self.view, state, cache, policy, noise, on_step)

    def denoise_steps(
        self, state: CanvasState, cache: Any, policy: DenoisePolicy, noise: NoiseSource
    ):
        return self._canvas.denoise_steps(
            self.view, state, cache, policy, noise, views=True
        )

    def describe(self) -> dict:
        return {"kind": self.kind, **self.plan.to_dict()}

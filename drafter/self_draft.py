"""The training-free self-drafter: the target's own weights, run with a SelfDraftPlan.

It needs no memory of its own: its passes read the target's weights and the target's
KV cache (the layers it runs see the same cached K/V as the target's), and it runs
the backend's own canvas loop, so its denoising follows the target's sampler. With a
sub-vocabulary head that loop runs at the head's width (the sampler's vocabulary-wide
passes cost a quarter as much for a quarter of the vocabulary); the self-conditioning
crosses to and from the target at the target's width.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from mlx_diffgem.core.backend import CanvasResult, CanvasState, DenoisePolicy, Target
from mlx_diffgem.core.noise import NoiseSource

from .plan import SelfDraftPlan

_CANVAS = {"mlx": "mlx_diffgem.mlx_backend.canvas", "torch": "cuda_backend.canvas"}


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
        res = self._canvas.denoise(
            self.view, self._narrow(state), cache, policy, noise, on_step
        )
        return self._widen(res)

    def denoise_steps(
        self, state: CanvasState, cache: Any, policy: DenoisePolicy, noise: NoiseSource
    ):
        res = yield from self._canvas.denoise_steps(
            self.view, self._narrow(state), cache, policy, noise, views=True
        )
        return self._widen(res)

    def _narrow(self, state: CanvasState) -> CanvasState:
        """The target's self-conditioning cut to the drafter's head (the drafter
        cannot propose the other tokens, so its soft embedding leaves them out)."""
        sc, rows = state.self_conditioning, self.plan.head_vocab
        if sc is None or rows is None or sc.shape[-1] == rows:
            return state
        return dataclasses.replace(state, self_conditioning=sc[..., :rows])

    def _widen(self, res: CanvasResult) -> CanvasResult:
        """The drafter's self-conditioning filled out to the vocabulary."""
        sc, V = res.state.self_conditioning, self.view.config.vocab_size
        if sc is None or sc.shape[-1] == V:
            return res
        wide = self._canvas.pad_vocab(sc, V, self.plan.fill)
        state = dataclasses.replace(res.state, self_conditioning=wide)
        return dataclasses.replace(res, state=state)

    def describe(self) -> dict:
        return {"kind": self.kind, **self.plan.to_dict()}

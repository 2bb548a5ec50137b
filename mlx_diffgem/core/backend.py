"""The Backend protocol (DESIGN §3) and the registry that imports a backend by name.

Token ids cross the boundary as numpy int32 arrays; logits, hidden states and caches
stay inside the backend. A backend module exposes
`load(path, *, dtype, quantization, **kw)` returning a `Target`.
"""

from __future__ import annotations

import importlib
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .config import GenerationConfig, ModelConfig
from .layout import HiddenLayout
from .noise import NoiseSource
from .plan import PassPlan
from .validate import check_decode as check_decode

# check_ids is re-exported: the backends and the API import it from here.
from .validate import check_ids as check_ids
from .validate import check_mask

BACKENDS = {"mlx": "mlx_diffgem.mlx_backend.backend", "torch": "cuda_backend.backend"}


@dataclass(frozen=True)
class DenoisePolicy:
    """The per-canvas sampler settings (spec §4.3)."""

    max_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    # Passes to run in one `denoise` call (None: up to max_steps). The speculative
    # loop runs a model a few passes at a time; the schedule position carries over
    # in CanvasState.step.
    budget: int | None = None

    @classmethod
    def from_generation(cls, gen: GenerationConfig) -> DenoisePolicy:
        return cls(
            max_steps=gen.max_denoising_steps,
            t_min=gen.t_min,
            t_max=gen.t_max,
            entropy_bound=gen.entropy_bound,
            stability_threshold=gen.stability_threshold,
            confidence_threshold=gen.confidence_threshold,
        )

    def temperature(self, n: int) -> float:
        """T at countdown step n (N, N-1, ..., 1), in the reference's float32 math."""
        # cur_step is an int32 tensor there: the ratio and products are float32, and
        # the Python-float difference t_max - t_min is rounded to float32 once.
        f = np.float32
        frac = f(f(n) / f(self.max_steps))
        return float(f(f(self.t_min) + f(f(self.t_max - self.t_min) * frac)))

    def countdown(self, start: int) -> list[int]:
        """The countdown values n of the passes of one call that starts after `start`
        passes of this canvas; past max_steps it stays at n = 1 (T just above t_min)."""
        budget = self.max_steps - start if self.budget is None else self.budget
        first = self.max_steps - start
        return [max(n, 1) for n in range(first, first - max(0, budget), -1)]


@dataclass
class CanvasState:
    """Where a denoiser starts, and where it left off (so another model can continue).

    canvas: [B, C] ids (backend array or numpy); None draws a fresh uniform canvas.
    self_conditioning: processed logits of the previous pass, [B, C, V] backend array.
    history: argmax history for the stability test, backend array [S, B, C] or None.
    finished: rows already finished before this canvas: computed, but their passes are
        not counted (reference semantics).
    draw_initial: draw the initial canvas from the noise source even when `canvas` is
        given (the reference always draws it, which keeps replayed streams aligned).
    step: passes already run on this canvas (by any model): the temperature schedule
        continues from there.
    argmax, done, mean_entropy: the last pass's argmax [B, C], the rows that met the
        stop rule [B] (frozen from then on) and their mean entropies [B]; None on a
        fresh canvas.
    fixed: infill and edit (numpy int32 [B, C]): a token id pins that position to it
        (it is never renoised and is its own argmax), -1 marks a hole position that
        is denoised. Pinned positions count as kept with zero entropy, so they use
        none of the entropy bound, and the stop rule's mean entropy is taken over
        the holes only. None: every position is denoised (native decoding).
    heal_ids: token healing (core/healing.py): int32 ids, the only ones the first
        canvas position may take on every pass; None: no constraint.
    """

    canvas: Any = None
    self_conditioning: Any = None
    history: Any = None
    finished: np.ndarray | None = None
    draw_initial: bool = True
    step: int = 0
    argmax: Any = None
    done: Any = None
    mean_entropy: Any = None
    fixed: np.ndarray | None = None
    heal_ids: np.ndarray | None = None


@dataclass
class CanvasResult:
    """What `denoise` returns: one host copy per canvas."""

    tokens: np.ndarray  # [B, C] int32, argmax of the last executed step
    steps: int  # denoising passes of the target run on this canvas
    passes: np.ndarray  # [B] passes counted per row (rows stop counting once done)
    state: CanvasState  # final canvas, processed logits, history
    step_stats: dict[str, np.ndarray] = field(default_factory=dict)  # per-step arrays
    done: np.ndarray | None = None  # [B] rows whose stop rule held (None: not read)
    drafter_steps: int = 0  # speculative decoding: drafter passes on this canvas
    first_draft_steps: int = 0  # of those, the passes before the first verify
    verify_rounds: int = 0  # target passes that checked a drafted canvas
    drafted: int = 0  # tokens the first draft proposed (live rows; holes if infill)
    drafted_kept: int = 0  # of those, the ones the commit kept


@dataclass
class StepView:
    """What a per-step observer sees (live draft canvas); only built when requested."""

    step: int  # the canvas's pass (1, 2, ...), counted over every model's passes
    argmax: np.ndarray  # [B, C]
    done: np.ndarray  # [B]
    source: str = "target"  # or "drafter" (speculative decoding)


@runtime_checkable
class Cache(Protocol):
    """A backend's KV cache: prompt + committed canvases, never a canvas in flight."""

    backend: str  # the backend that made it ("mlx", "torch"): caches do not mix
    batch_size: int
    offset: int  # slots processed so far (pads included: positions are slot indices)
    pending: np.ndarray | None  # last committed canvas, encoded at the next call


@runtime_checkable
class Target(Protocol):
    """A loaded model on one backend."""

    config: ModelConfig
    generation_config: GenerationConfig
    backend: str

    def new_cache(self, batch_size: int) -> Cache: ...

    def encode(
        self, ids: np.ndarray, cache: Cache, attention_mask: np.ndarray | None = None
    ) -> None: ...

    def decode(
        self,
        canvas_ids: Any,
        cache: Cache,
        self_conditioning: Any = None,
        layout: HiddenLayout | None = None,
    ) -> Any: ...

    def denoise(
        self,
        state: CanvasState,
        cache: Cache,
        policy: DenoisePolicy,
        noise: NoiseSource,
        on_step: Any = None,
    ) -> CanvasResult: ...

    def denoise_steps(
        self,
        state: CanvasState,
        cache: Cache,
        policy: DenoisePolicy,
        noise: NoiseSource,
    ) -> Generator[StepView, None, CanvasResult]:
        """`denoise` as a generator: yields a StepView per step, returns the result."""
        ...

    def planned(self, plan: PassPlan) -> Target:
        """The same model with every pass run under `plan`: a drafter made of its
        weights, reading the same cache (core/plan.py)."""
        ...

    def sync(self) -> None: ...

    def peak_memory(self) -> int: ...


def to_numpy(x: Any) -> np.ndarray:
    """A backend array (mlx or torch) as numpy, on the host."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach()
        return (x.float() if x.is_floating_point() else x).cpu().numpy()
    return np.array(x)


def drain(steps: Generator[StepView, None, CanvasResult], on_step: Any) -> CanvasResult:
    """Run a `denoise_steps` generator to its result, handing each view to on_step."""
    while True:
        try:
            view = next(steps)
        except StopIteration as stop:
            return stop.value
        on_step(view)


def get_backend(name: str) -> Any:
    """Import a backend module by name ('mlx' or 'torch')."""
    if name not in BACKENDS:
        raise ValueError(
            f"backend: unknown backend {name!r}; expected one of {sorted(BACKENDS)}"
        )
    module = BACKENDS[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = {"mlx": "mlx (macOS) or cpu (Linux)", "torch": "torch"}[name]
        raise ImportError(
            f"backend {name!r} needs {e.name}: pip install 'mlx-diffgem[{extra}]'"
        ) from e


def check_batch_size(batch_size: Any) -> int:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size <= 0
    ):
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return batch_size


def check_encode(
    ids: Any, attention_mask: Any, batch_size: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated `encode` arguments: ids [B, S] int32 and a bool mask [B, S] or None."""
    ids = check_ids(ids, vocab_size, "ids")
    if ids.shape[0] != batch_size:
        raise ValueError(
            f"ids: batch {ids.shape[0]} does not match the cache's {batch_size}"
        )
    mask = check_mask(attention_mask, ids, whole_prompt=False)  # prefill chunks
    return ids, None if mask is None else mask.astype(bool)

"""Speculative block-verify decoding of one canvas, once, over the Backend protocol.

Per canvas (DESIGN §4):
1. The drafter denoises a fresh canvas with its own passes (up to `draft_steps`,
   fewer when its own stop rule holds).
2. The target continues from the drafter's state: its canvas, its argmax history (the
   stability test compares the target's argmax with the drafter's) and its processed
   logits as self-conditioning. One target pass is one verify.
3. The target's own stop rule held: commit the target's argmax. Otherwise its pass
   has already kept the confident positions and renoised the rest; the drafter
   refines them (`refine_steps` passes) and the target verifies again.
4. After `max_rounds` verifies the target finishes natively, within the step budget
   that native decoding has (`max_denoising_steps` target passes).
Invariant: the committed canvas is the argmax of the target's last pass, and that
pass met the target's stop rule or used up the native budget.

The schedule position (and so the temperature) advances with every pass of either
model; rows the target has stopped stay frozen through later drafter passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .backend import (
    CanvasResult,
    CanvasState,
    DenoisePolicy,
    StepView,
    Target,
    drain,
)
from .noise import NoiseSource


@dataclass(frozen=True)
class SpecPolicy:
    """How the drafter and the target share a canvas."""

    # Drafter passes before the first verify, at most: the drafter usually meets
    # its own stop rule first (~22 passes on the embedded model). A lower cap
    # hands the target an unfinished draft, which its verify keeps almost whole:
    # 16 cost 4-6 points of parse rate there (bench/results, 600 prompts).
    draft_steps: int = 24
    refine_steps: int = 2  # drafter passes between two verifies
    max_rounds: int = 8  # verifies before the target finishes natively
    # The drafter's stop threshold on its mean entropy (None: the target's).
    draft_confidence: float | None = None
    # The drafter's entropy bound, how much uncertainty one of its passes may keep
    # (None: the target's). Larger keeps more positions per pass: fewer drafter
    # passes, more for the target to reject.
    draft_entropy_bound: float | None = None
    # What a verify pass reads: "argmax", the drafter's argmax canvas (the draft
    # itself, clean), or "canvas", its renoised next input (what a native pass reads).
    verify_on: str = "argmax"

    def __post_init__(self) -> None:
        for name in ("draft_steps", "refine_steps", "max_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.verify_on not in ("argmax", "canvas"):
            raise ValueError(
                f"verify_on: expected 'argmax' or 'canvas', got {self.verify_on!r}"
            )
        for name in ("draft_confidence", "draft_entropy_bound"):
            c = getattr(self, name)
            if c is not None and (
                isinstance(c, bool)
                or not isinstance(c, float | int)
                or not 0 < c < np.inf
            ):
                raise ValueError(f"{name}: expected a float > 0, got {c!r}")

    def drafter_policy(self, policy: DenoisePolicy, budget: int) -> DenoisePolicy:
        conf = self.draft_confidence or policy.confidence_threshold
        bound = self.draft_entropy_bound or policy.entropy_bound
        return dataclasses.replace(
            policy,
            budget=budget,
            confidence_threshold=float(conf),
            entropy_bound=float(bound),
        )


class Drafter(Protocol):
    """What the loop needs of a drafter: a `denoise` like a Target's."""

    def denoise(self, state, cache, policy, noise, on_step=None) -> CanvasResult: ...

    def denoise_steps(self, state, cache, policy, noise): ...


def _run(model: Any, state, cache, policy, noise, views: bool):
    """A model's `denoise` call; as a generator of StepViews when `views`."""
    if views:
        return (yield from model.denoise_steps(state, cache, policy, noise))
    return model.denoise(state, cache, policy, noise)


def denoise_speculative(
    target: Target,
    drafter: Drafter,
    state: CanvasState,
    cache: Any,
    policy: DenoisePolicy,
    spec: SpecPolicy,
    noise: NoiseSource,
    views: bool = False,
) -> Generator[StepView, None, CanvasResult]:
    """One canvas, speculatively (steps 1-4 of the module docstring)."""
    B = cache.batch_size
    # 1. draft (the drafter's stop flags are its own: the target starts unstopped)
    draft = yield from _run(
        drafter,
        state,
        cache,
        spec.drafter_policy(policy, spec.draft_steps),
        noise,
        views,
    )
    first, cur = draft.tokens, draft.state
    done, drafter_steps, target_steps, rounds = state.done, draft.steps, 0, 0
    passes = np.zeros(B, np.int64)
    stats: list[dict] = []
    while True:
        # 2. verify (one pass), or 4. finish natively
        native = rounds >= spec.max_rounds
        budget = policy.max_steps - target_steps if native else 1
        canvas = cur.argmax if spec.verify_on == "argmax" and not native else cur.canvas
        res = yield from _run(
            target,
            dataclasses.replace(cur, canvas=canvas, done=done),
            cache,
            dataclasses.replace(policy, budget=budget),
            noise,
            views,
        )
        rounds += 0 if native else 1
        target_steps += res.steps
        passes += res.passes
        stats.append(res.step_stats)
        cur, done = res.state, res.state.done
        # 3. commit, or refine what the target did not accept
        if res.done.all() or target_steps >= policy.max_steps or native:
            break
        if rounds < spec.max_rounds:
            ref = yield from _run(
                drafter,
                cur,
                cache,
                spec.drafter_policy(policy, spec.refine_steps),
                noise,
                views,
            )
            drafter_steps += ref.steps
            cur = dataclasses.replace(ref.state, done=done)
    live = np.ones(B, bool) if state.finished is None else ~state.finished
    return CanvasResult(
        tokens=res.tokens,
        steps=target_steps,
        passes=passes,
        state=cur,
        step_stats={k: np.concatenate([s[k] for s in stats]) for k in stats[0]},
        done=res.done,
        drafter_steps=drafter_steps,
        verify_rounds=rounds,
        drafted_kept=int((first == res.tokens)[live].sum()),
    )


class SpeculativeModel:
    """A Target whose canvases are decoded speculatively with `drafter`.

    Everything but `denoise` is the target's, so the block loop, the API and the
    CLI use it as they use the target itself.
    """

    def __init__(self, target: Target, drafter: Drafter, spec: SpecPolicy):
        self.target, self.drafter, self.spec = target, drafter, spec
        self.config = target.config
        self.generation_config = target.generation_config
        self.backend = target.backend
        self.path = target.path

    def new_cache(self, batch_size: int) -> Any:
        return self.target.new_cache(batch_size)

    def encode(self, ids: Any, cache: Any, attention_mask: Any = None) -> None:
        self.target.encode(ids, cache, attention_mask)

    def decode(self, canvas_ids: Any, cache: Any, self_conditioning: Any = None):
        return self.target.decode(canvas_ids, cache, self_conditioning)

    def denoise(self, state, cache, policy, noise, on_step=None) -> CanvasResult:
        steps = self.denoise_steps(state, cache, policy, noise, views=on_step)
        return drain(steps, on_step)

    def denoise_steps(self, state, cache, policy, noise, views: Any = True):
        return denoise_speculative(
            self.target,
            self.drafter,
            state,
            cache,
            policy,
            self.spec,
            noise,
            bool(views),
        )

    def sync(self) -> None:
        self.target.sync()

    def peak_memory(self) -> int:
        return self.target.peak_memory()

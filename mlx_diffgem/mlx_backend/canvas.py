"""Denoise one canvas on the MLX device: the reference's inner loop (spec §4.2).

Per step n = N..1 (n counts down):
1. decode the canvas with the previous step's processed logits as self-conditioning;
2. z = logits / T(n); draw the proposal; argmax; entropies;
3. accept the low-entropy proposals, renoise every other position;
4. freeze rows that already stopped; stable-and-confident test;
5. one `mx.eval` of the step's state (the only host sync); stop when all rows are done.
The torch twin is `cuda_backend/canvas.py`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from mlx_diffgem.core.backend import (
    CanvasResult,
    CanvasState,
    DenoisePolicy,
    StepView,
    drain,
)
from mlx_diffgem.core.healing import allowed_mask
from mlx_diffgem.core.noise import NoiseSource
from mlx_diffgem.core.plan import PassPlan

from ._blas import import_mlx
from .sampling import (
    accept_mask,
    entropy,
    renoise,
    sample_tokens,
    softmax_tail,
    stop_update,
)

mx = import_mlx()


def _next_key(noise: NoiseSource) -> mx.array:
    """Split the device generator kept in `noise.state` (seeded on first use)."""
    if getattr(noise, "state", None) is None:
        seed = noise.seed if noise.seed is not None else random.getrandbits(32)
        noise.state = mx.random.key(seed)
    noise.state, sub = mx.random.split(noise.state)
    return sub


def draw_uniform(
    noise: NoiseSource, kind: str, shape: tuple[int, int], vocab: int
) -> mx.array:
    """An `initial_canvas` or `renoise` draw: replayed ids, or uniform ids on device."""
    ids = getattr(noise, kind)(shape, vocab)
    if ids is not None:
        return mx.array(ids, dtype=mx.int32)
    return mx.random.randint(0, vocab, shape, dtype=mx.int32, key=_next_key(noise))


def draw_sample(noise: NoiseSource, z: mx.array, parts: tuple) -> mx.array:
    """The `sample` draw: replayed ids, or a categorical draw from softmax(z)."""
    ids = noise.sample(z.shape[:2])
    if ids is not None:
        return mx.array(ids, dtype=mx.int32)
    return sample_tokens(z, _next_key(noise), parts)


def pad_vocab(logits: mx.array, vocab: int, fill: float) -> mx.array:
    """[..., n] logits filled out to [..., vocab] with `fill` (a drafter's
    sub-vocabulary self-conditioning, handed to the target)."""
    pad = mx.full((*logits.shape[:-1], vocab - logits.shape[-1]), fill, logits.dtype)
    return mx.concatenate([logits, pad], axis=-1)


def _start(
    model, state: CanvasState, noise: NoiseSource, shape: tuple[int, int]
) -> mx.array:
    # The reference draws the initial canvas even when a starting canvas is given.
    drawn = None
    if state.draw_initial or state.canvas is None:
        drawn = draw_uniform(noise, "initial_canvas", shape, model.config.vocab_size)
    return drawn if state.canvas is None else mx.array(state.canvas).astype(mx.int32)


def narrow(sc: mx.array | None, plan: PassPlan | None) -> mx.array | None:
    """Self-conditioning cut to a plan's head (a drafter cannot propose the other
    tokens, so its soft embedding leaves them out)."""
    rows = None if plan is None else plan.head_vocab
    if sc is None or rows is None or sc.shape[-1] == rows:
        return sc
    return sc[..., :rows]


def widen(sc: mx.array | None, vocab: int) -> mx.array | None:
    """A drafter's self-conditioning filled out to the vocabulary (for the model)."""
    if sc is None or sc.shape[-1] == vocab:
        return sc
    return pad_vocab(sc, vocab, PassPlan.fill)


def denoise(
    model,
    state: CanvasState,
    cache,
    policy: DenoisePolicy,
    noise: NoiseSource,
    on_step: Callable[[StepView], None] | None = None,
    plan: PassPlan | None = None,
) -> CanvasResult:
    """Run denoising steps until every row is stable and confident, or N steps;
    every pass under `plan` (a drafter's) when one is given."""
    steps = denoise_steps(model, state, cache, policy, noise, on_step is not None, plan)
    return drain(steps, on_step)


def denoise_steps(
    model,
    state: CanvasState,
    cache,
    policy: DenoisePolicy,
    noise: NoiseSource,
    views: bool = False,
    plan: PassPlan | None = None,
) -> Generator[StepView, None, CanvasResult]:
    """`denoise` as a generator: yields the live argmax canvas after each step when
    `views` (one extra host copy per step) and returns the CanvasResult."""
    loop = _Loop.start(model, state, cache.batch_size, noise, plan)
    role = "target" if plan is None else "drafter"
    for n in [] if loop.all_done else policy.countdown(state.step):
        loop.step(model, cache, n, policy, noise, plan)
        if views:
            step = state.step + loop.steps  # the canvas's pass, by either model
            yield StepView(step, np.array(loop.argmax), np.array(loop.done), role)
        if loop.all_done:
            break
    return loop.result(state, model.config.vocab_size)


@dataclass
class _Loop:
    """One canvas between two passes: its device state and the per-step counters."""

    canvas: mx.array  # [B, C] the next pass's input
    sc: mx.array | None  # [B, C, V'] the last pass's processed logits
    history: mx.array | None  # argmax history of the stability test
    argmax: mx.array  # [B, C]
    finished: mx.array  # [B] rows finished before this canvas (not counted)
    done: mx.array  # [B] rows whose stop rule held (frozen from then on)
    h_mean: mx.array  # [B] mean entropy of the last pass
    pins: tuple | None  # infill: (pinned mask, ids, holes per row)
    heal: mx.array | None  # [V'] bool: the ids the first position may take
    passes: mx.array  # [B] passes counted per row
    any_done: bool = False
    all_done: bool = False
    steps: int = 0
    accepted: list = field(default_factory=list)
    entropies: list = field(default_factory=list)

    @classmethod
    def start(cls, model, state: CanvasState, B: int, noise, plan) -> _Loop:
        pins = _pins(state.fixed)
        shape = (B, model.config.canvas_length)
        canvas = _pin(pins, _start(model, state, noise, shape))
        fresh = state.done is None
        loop = cls(
            canvas=canvas,
            sc=narrow(state.self_conditioning, plan),
            history=state.history,
            argmax=canvas if state.argmax is None else mx.array(state.argmax),
            finished=mx.array(
                np.zeros(B, bool) if state.finished is None else state.finished
            ),
            done=mx.zeros((B,), mx.bool_) if fresh else mx.array(state.done),
            h_mean=mx.zeros((B,), mx.float32)
            if state.mean_entropy is None
            else mx.array(state.mean_entropy),
            pins=pins,
            heal=_heal_mask(state.heal_ids, model, plan),
            passes=mx.zeros((B,), mx.int32),
        )
        if not fresh:
            loop.any_done, loop.all_done = _flags(loop.done)
        return loop

    def step(self, model, cache, n: int, policy: DenoisePolicy, noise, plan) -> None:
        """One pass at countdown step n (module docstring, 1-5)."""
        B, C = self.canvas.shape
        done, pins = self.done, self.pins
        self.passes = self.passes + (~(done | self.finished)).astype(mx.int32)
        T = mx.array(policy.temperature(n), mx.float32)
        z = model.decode(self.canvas, cache, self.sc, plan=plan)  # 1
        if self.heal is not None:  # token healing: position 0's allowed ids only
            first = mx.where(self.heal, z[:, :1], PassPlan.fill)
            z = mx.concatenate([first, z[:, 1:]], axis=1)
        z = z / T  # 2
        parts = softmax_tail(z)  # one exp pass for the draw and the entropies
        draft = draw_sample(noise, z, parts)
        new_arg = mx.argmax(z, axis=-1).astype(mx.int32)
        h = entropy(z, parts)
        if pins is not None:  # pinned positions: kept, with no entropy to count
            h = mx.where(pins[0], 0.0, h)
        keep = accept_mask(h, policy.entropy_bound)  # 3
        V = model.config.vocab_size  # renoise draws: the whole vocabulary
        new_canvas = renoise(keep, draft, draw_uniform(noise, "renoise", (B, C), V))
        new_h_mean = _mean_entropy(h, pins)
        new_arg, new_canvas = _pin(pins, new_arg), _pin(pins, new_canvas)
        if self.any_done:  # 4: rows that stopped keep their previous state
            new_arg = mx.where(done[:, None], self.argmax, new_arg)
            new_canvas = mx.where(done[:, None], self.canvas, new_canvas)
            z = mx.where(done[:, None, None], self.sc, z)
            new_h_mean = mx.where(done, self.h_mean, new_h_mean)
        stop, self.history = stop_update(
            self.history,
            new_arg,
            new_h_mean,
            policy.stability_threshold,
            policy.confidence_threshold,
        )
        self.done = done | stop
        self.sc, self.canvas = z.astype(model.dtype), new_canvas
        self.argmax, self.h_mean = new_arg, new_h_mean
        self.accepted.append(keep.sum(axis=-1))
        self.entropies.append(new_h_mean)
        status = mx.stack([mx.any(self.done), mx.all(self.done)])  # read with the state
        state = (self.done, self.canvas, self.sc, self.argmax, self.history)
        mx.eval(*state, self.passes, self.accepted[-1], self.h_mean, status)
        self.steps += 1
        self.any_done, self.all_done = status.tolist()  # 5: evaluated, no extra sync

    def result(self, state: CanvasState, vocab: int) -> CanvasResult:
        B = self.passes.shape[0]
        return CanvasResult(
            tokens=np.array(self.argmax).astype(np.int32),
            steps=self.steps,
            passes=np.array(self.passes).astype(np.int64),
            state=CanvasState(
                self.canvas,
                widen(self.sc, vocab),
                self.history,
                state.finished,
                draw_initial=False,
                step=state.step + self.steps,
                argmax=self.argmax,
                done=self.done,
                mean_entropy=self.h_mean,
                fixed=state.fixed,
                heal_ids=state.heal_ids,
            ),
            step_stats={
                "accepted": _stack(self.accepted, B),  # evaluated
                "mean_entropy": _stack(self.entropies, B),
            },
            done=np.array(self.done),
        )


def _heal_mask(ids, model, plan) -> mx.array | None:
    """[V'] bool over the pass's logits (a plan's head may be narrower): True at
    the ids token healing allows at the first position."""
    if ids is None:
        return None
    head = None if plan is None else plan.head_vocab
    return mx.array(allowed_mask(ids, model.config.vocab_size, head))


def _flags(done: mx.array) -> tuple[bool, bool]:
    return bool(mx.any(done).item()), bool(mx.all(done).item())


def _stack(arrays: list, B: int) -> np.ndarray:
    return np.stack([np.array(a) for a in arrays]) if arrays else np.zeros((0, B))


def _pins(fixed) -> tuple[mx.array, mx.array, mx.array] | None:
    """(pinned mask, ids, holes per row) of an infill canvas (CanvasState.fixed)."""
    if fixed is None:
        return None
    ids = mx.array(fixed, dtype=mx.int32)
    mask = ids >= 0
    holes = mx.maximum(mx.sum(~mask, axis=-1), 1).astype(mx.float32)
    return mask, ids, holes


def _pin(pins, x: mx.array) -> mx.array:
    """`x` [B, C] with the pinned positions set to their given ids."""
    return x if pins is None else mx.where(pins[0], pins[1], x)


def _mean_entropy(h: mx.array, pins) -> mx.array:
    # Over the holes only: pinned positions would dilute the stop rule's mean.
    return mx.mean(h, axis=-1) if pins is None else mx.sum(h, axis=-1) / pins[2]

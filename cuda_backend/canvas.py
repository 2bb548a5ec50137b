"""Denoise one canvas on the torch device: the reference's inner loop (spec §4.2).

Per step n = N..1 (n counts down):
1. decode the canvas with the previous step's processed logits as self-conditioning;
2. z = logits / T(n); draw the proposal; argmax; entropies;
3. accept the low-entropy proposals, renoise every other position;
4. freeze rows that already stopped; stable-and-confident test;
5. copy `done` to the host (the only sync of a step), then stop if all rows are done.
The MLX twin is `mlx_diffgem/mlx_backend/canvas.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

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

from . import sampling
from .sampling import accept_mask, renoise, sample_tokens, stop_update


def _generator(noise: NoiseSource, device: torch.device) -> torch.Generator:
    """The device generator kept in `noise.state` (seeded on first use)."""
    if getattr(noise, "state", None) is None:
        g = torch.Generator(device=device)
        if noise.seed is None:
            g.seed()
        else:
            g.manual_seed(noise.seed)
        noise.state = g
    return noise.state


def draw_uniform(
    noise: NoiseSource,
    kind: str,
    shape: tuple[int, int],
    vocab: int,
    device: torch.device,
) -> torch.Tensor:
    """An `initial_canvas` or `renoise` draw: replayed ids, or uniform ids on device."""
    ids = getattr(noise, kind)(shape, vocab)
    if ids is not None:
        return torch.as_tensor(ids, dtype=torch.long, device=device)
    g = _generator(noise, device)
    return torch.randint(0, vocab, shape, generator=g, device=device)


def _score_and_draw(model, z: torch.Tensor, T, noise: NoiseSource) -> tuple:
    """(argmax, entropy, sampled ids) of z / T, dividing z in place: one fused
    kernel where the model has it (CUDA with Triton) and the draw is not replayed."""
    replayed = noise.sample(tuple(z.shape[:2]))
    if replayed is None and model.fused_sampler:
        gen = _generator(noise, z.device)
        seed = torch.randint(0, 2**31 - 1, (1,), generator=gen, device=z.device)
        return sampling.fused_step(z, T, seed)
    score = getattr(model, "score", sampling.score)  # compiled by compile_model
    arg, h = score(z, T)
    if replayed is not None:
        return arg, h, torch.as_tensor(replayed, dtype=torch.long, device=z.device)
    return arg, h, sample_tokens(z, _generator(noise, z.device))


def pad_vocab(logits: torch.Tensor, vocab: int, fill: float) -> torch.Tensor:
    """[..., n] logits filled out to [..., vocab] with `fill` (a drafter's
    sub-vocabulary self-conditioning, handed to the target)."""
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), fill)
    return torch.cat([logits, pad], dim=-1)


def _start(
    model, state: CanvasState, noise: NoiseSource, shape: tuple[int, int], device
) -> torch.Tensor:
    # The reference draws the initial canvas even when a starting canvas is given.
    drawn = None
    if state.draw_initial or state.canvas is None:
        drawn = draw_uniform(
            noise, "initial_canvas", shape, model.config.vocab_size, device
        )
    if state.canvas is None:
        return drawn
    return torch.as_tensor(state.canvas, device=device).long()


def narrow(sc: torch.Tensor | None, plan: PassPlan | None) -> torch.Tensor | None:
    """Self-conditioning cut to a plan's head (a drafter cannot propose the other
    tokens, so its soft embedding leaves them out)."""
    rows = None if plan is None else plan.head_vocab
    if sc is None or rows is None or sc.shape[-1] == rows:
        return sc
    return sc[..., :rows]


def widen(sc: torch.Tensor | None, vocab: int) -> torch.Tensor | None:
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
    # The torch context decorators keep their mode off while the generator is paused.
    steps = model.grad_off()(_denoise_steps)
    return steps(model, state, cache, policy, noise, views, plan)


def _denoise_steps(model, state, cache, policy, noise, views, plan):
    loop = _Loop.start(model, state, cache, noise, plan)
    countdown = [] if loop.done_host.all() else policy.countdown(state.step)
    # Every temperature in one upload; step n divides by a device scalar, as the
    # reference does (a host float would become a reciprocal multiply on CUDA).
    temps = torch.tensor(
        [policy.temperature(n) for n in countdown], device=cache.device
    )
    role = "target" if plan is None else "drafter"
    for j in range(len(countdown)):
        loop.step(model, cache, temps[j], policy, noise, plan)
        if views:
            argmax_host = loop.argmax.cpu().numpy().astype(np.int32)
            step = state.step + loop.steps  # the canvas's pass, by either model
            yield StepView(step, argmax_host, loop.done_host, role)
        if loop.done_host.all():
            break
    return loop.result(state, model.config.vocab_size)


@dataclass
class _Loop:
    """One canvas between two passes: its device state and the per-step counters."""

    canvas: torch.Tensor  # [B, C] the next pass's input
    sc: torch.Tensor | None  # [B, C, V'] the last pass's processed logits
    history: torch.Tensor | None  # argmax history of the stability test
    argmax: torch.Tensor  # [B, C]
    finished: torch.Tensor  # [B] rows finished before this canvas (not counted)
    done: torch.Tensor  # [B] rows whose stop rule held (frozen from then on)
    h_mean: torch.Tensor  # [B] mean entropy of the last pass
    pins: tuple | None  # infill: (pinned mask, ids, holes per row)
    heal: torch.Tensor | None  # [V'] bool: the ids the first position may take
    passes: torch.Tensor  # [B] passes counted per row
    done_host: np.ndarray  # `done` on the host (the one sync of a step)
    steps: int = 0
    accepted: list = field(default_factory=list)
    entropies: list = field(default_factory=list)

    @classmethod
    def start(cls, model, state: CanvasState, cache, noise, plan) -> _Loop:
        B, C, dev = cache.batch_size, model.config.canvas_length, cache.device
        pins = _pins(state.fixed, dev)
        canvas = _pin(pins, _start(model, state, noise, (B, C), dev))
        finished = np.zeros(B, bool) if state.finished is None else state.finished
        done = torch.zeros((B,), dtype=torch.bool, device=dev)
        if state.done is not None:
            done = _on(state.done, dev).bool()
        h_mean = torch.zeros((B,), dtype=torch.float32, device=dev)
        if state.mean_entropy is not None:
            h_mean = _on(state.mean_entropy, dev).float()
        return cls(
            canvas=canvas,
            sc=narrow(state.self_conditioning, plan),
            history=state.history,
            argmax=canvas if state.argmax is None else _on(state.argmax, dev),
            finished=torch.as_tensor(finished).to(dev),
            done=done,
            h_mean=h_mean,
            pins=pins,
            heal=_heal_mask(state.heal_ids, model, plan, dev),
            passes=torch.zeros((B,), dtype=torch.int32, device=dev),
            done_host=done.cpu().numpy(),
        )

    def step(self, model, cache, T, policy: DenoisePolicy, noise, plan) -> None:
        """One pass at temperature T, a device scalar (module docstring, 1-5)."""
        (B, C), dev = self.canvas.shape, self.canvas.device
        done, pins = self.done, self.pins
        any_done = bool(self.done_host.any())
        self.passes += (~(done | self.finished)).int()
        z = model.decode(self.canvas, cache, self.sc, plan=plan)  # 1
        if self.heal is not None:  # token healing: position 0's allowed ids only
            z[:, 0].masked_fill_(~self.heal, PassPlan.fill)
        new_arg, h, draft = _score_and_draw(model, z, T, noise)  # 2: z is now z / T
        if pins is not None:  # pinned positions: kept, with no entropy to count
            h = h.masked_fill(pins[0], 0.0)
        keep = accept_mask(h, policy.entropy_bound)  # 3
        V = model.config.vocab_size  # renoise draws: the whole vocabulary
        uniform = draw_uniform(noise, "renoise", (B, C), V, dev)
        new_canvas = renoise(keep, draft, uniform)
        new_h_mean = _mean_entropy(h, pins)
        new_arg, new_canvas = _pin(pins, new_arg), _pin(pins, new_canvas)
        if any_done:  # 4: rows that stopped keep their previous state
            new_arg = torch.where(done[:, None], self.argmax, new_arg)
            new_canvas = torch.where(done[:, None], self.canvas, new_canvas)
            # In place: no extra [B, C, V] tensor.
            torch.where(done[:, None, None], self.sc, z, out=z)
            new_h_mean = torch.where(done, self.h_mean, new_h_mean)
        stop, self.history = stop_update(
            self.history,
            new_arg,
            new_h_mean,
            policy.stability_threshold,
            policy.confidence_threshold,
        )
        self.done = done | stop
        self.sc, self.canvas = z.to(model.dtype), new_canvas
        self.argmax, self.h_mean = new_arg, new_h_mean
        self.accepted.append(keep.sum(dim=-1))
        self.entropies.append(new_h_mean)
        self.done_host = self.done.cpu().numpy()  # 5
        self.steps += 1

    def result(self, state: CanvasState, vocab: int) -> CanvasResult:
        B = self.passes.shape[0]
        return CanvasResult(
            tokens=self.argmax.cpu().numpy().astype(np.int32),
            steps=self.steps,
            passes=self.passes.cpu().numpy().astype(np.int64),
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
                "accepted": _stack(self.accepted, B),
                "mean_entropy": _stack(self.entropies, B),
            },
            done=self.done_host,
        )


def _heal_mask(ids, model, plan, device) -> torch.Tensor | None:
    """[V'] bool over the pass's logits (a plan's head may be narrower): True at
    the ids token healing allows at the first position."""
    if ids is None:
        return None
    head = None if plan is None else plan.head_vocab
    mask = allowed_mask(ids, model.config.vocab_size, head)
    return torch.as_tensor(mask, device=device)


def _pins(fixed, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """(pinned mask, ids, holes per row) of an infill canvas (CanvasState.fixed)."""
    if fixed is None:
        return None
    ids = torch.as_tensor(np.asarray(fixed), device=device).long()
    mask = ids >= 0
    holes = (~mask).sum(dim=-1).clamp(min=1).float()
    return mask, ids, holes


def _pin(pins, x: torch.Tensor) -> torch.Tensor:
    """`x` [B, C] with the pinned positions set to their given ids."""
    return x if pins is None else torch.where(pins[0], pins[1], x)


def _mean_entropy(h: torch.Tensor, pins) -> torch.Tensor:
    # Over the holes only: pinned positions would dilute the stop rule's mean.
    return h.mean(dim=-1) if pins is None else h.sum(dim=-1) / pins[2]


def _on(x, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x, device=device)


def _stack(tensors: list, B: int) -> np.ndarray:
    if not tensors:
        return np.zeros((0, B))
    return torch.stack(tensors).cpu().numpy()

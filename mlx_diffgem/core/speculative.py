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

With `verify="hidden"` (a verify that can say no) step 2 is one hidden-token pass
instead (core/layout.py): the model scores every drafted token without seeing it,
given the prompt and the draft's surer tokens only (the drafter's confidence order,
`verify_groups` groups). Drafted tokens are accepted along that order while the model
agrees (core/verify.py: its argmax, or a probability of at least
`accept_threshold`, or with "ratio" speculative sampling); at the first rejection the
model's own token is taken. What is committed is pinned; the drafter redrafts the
rest from fresh noise around the pins (`refine_steps` passes) and the model verifies
again. With `verify="others"` each query sees the whole rest of the draft (a
leave-one-out pass) and every position is decided on its own: the drafted token
where the model agrees and is sure of it, else the model's own token where it is
sure of that (core/verify.judge_each). After `max_rounds` verifies, or one that
committed less than `min_commit` of what was open, the model finishes what is still
open natively, the pins held, as an infill.
Invariant: every committed token was accepted by a verify or written by the model.

The schedule position (and so the temperature) advances with every pass of either
model; rows the target has stopped stay frozen through later drafter passes.

Both models speak the Backend protocol: the drafter is the target itself run under a
PassPlan (`target.planned(plan)`, core/plan.py), so this loop calls `denoise` on two
Targets and no backend calls back into `drafter/`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import validate as V
from .backend import (
    CanvasResult,
    CanvasState,
    DenoisePolicy,
    StepView,
    Target,
    drain,
    to_numpy,
)
from .config import MAX_DENOISING_STEPS
from .healing import allowed_mask
from .layout import HiddenLayout
from .noise import NoiseSource, SeededNoise
from .verify import RATIO, draft_rank, judge, judge_each

VERIFIES = ("plain", "hidden", "others")
# The verify settings: the verifies that read each, and its default under each. A
# setting given with a verify that has no use for it is refused, not ignored.
# verify_sure: 0.9 keeps the parse rate with the order-masked verify; the
# leave-one-out one needs 0.98 (0.9 cost 6 points, 120 prompts x 3, README).
VERIFY_OPTIONS = {
    "verify_on": {"plain": "argmax"},
    "verify_groups": {"hidden": 8},
    "accept_threshold": {"hidden": None, "others": None},
    "verify_sure": {"hidden": 0.9, "others": 0.98},
    "min_commit": {"hidden": 0.1, "others": 0.1},
}


@dataclass(frozen=True)
class SpecPolicy:
    """How the drafter and the target share a canvas.

    Options and their bounds (the one place they are written; api.load's
    `speculative=` takes these fields, `diffgem --help` quotes them):
        draft_steps: drafter passes before the first verify, an integer in
            [1, 10000] (default 24).
        refine_steps: drafter passes between two verifies, in [1, 10000] (2).
        max_rounds: verifies before the target finishes natively, in [1, 10000] (8).
        draft_confidence: the drafter's stop threshold on its mean entropy, a
            finite number > 0, or None: the target's confidence_threshold.
        draft_entropy_bound: the drafter's entropy bound, a finite number > 0, or
            None: the target's entropy_bound.
        verify: "hidden" (default), "others" or "plain".
        verify_on: plain verify only: "argmax" (default) or "canvas".
        verify_groups: hidden verify only: its groups, an integer in [1, 65536] (8).
        accept_threshold: hidden and others: the acceptance, None (the model's
            argmax), a number in [0, 1] or, hidden only, "ratio" (speculative
            sampling).
        verify_sure: hidden and others: the model's least probability of a token
            it commits, in [0, 1] (hidden 0.9, others 0.98).
        min_commit: hidden and others: the least share of the open positions a
            verify must commit for the loop to go on, in [0, 1] (0.1; 0: never
            stop early).
    A verify setting left None takes its verify's default; one given with a verify
    that does not read it is refused (VERIFY_OPTIONS).
    Python or numpy numbers are accepted (numpy ones become Python ones); bools,
    strings, NaN and infinities are refused with a ValueError naming the option.
    """

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
    verify_on: str | None = None
    # "hidden" (the default: the model decides the text): the hidden-token verify.
    # "plain": one pass over the clean draft, which keeps 91-100% of any draft (the
    # model copies plausible tokens it can see), so the drafter decides the text;
    # faster, and with drafter="self" on the embedded model as good (39% -> 40%
    # parsing, 600 prompts), but self:layers=0,5 fell from 38% to 10%.
    # "others": the leave-one-out hidden verify (core/verify.judge_each), each token
    # judged on the whole rest of the draft and decided on its own, no commit order:
    # it keeps more of a draft than "hidden", and a drafted token is committed only
    # where the model, not shown it, would write it and is sure of it.
    verify: str = "hidden"
    # hidden verify: equal-size groups of the drafter's confidence order (1 judges
    # every token on the prompt alone; more groups see more of the draft). None: 8.
    verify_groups: int | None = None
    # hidden verify: None accepts a drafted token where it is the model's argmax
    # (greedy, lossless for greedy decoding); a number p accepts it where the model
    # gives it at least p, which keeps more of the draft and trades quality for speed.
    # "ratio": speculative sampling, each drafted token kept with the model's
    # probability of it at the schedule's temperature and the model's token drawn at
    # the first rejection: the text is a sample of the model's, not its argmax (with
    # verify_sure 0; the sure gate still applies).
    accept_threshold: float | str | None = None
    # hidden verify: a token is committed only where the model gives it at least
    # this probability. Lower commits more tokens the model merely finds likeliest
    # given little context: 0 on the embedded model parsed 10% against 38% natively
    # (40 prompts), 0.5 and 0.9 45% and 50% (20 prompts; native 20% on those).
    verify_sure: float | None = None
    # hidden verify: where a verify commits less than this share of what was still
    # open, the drafts are not worth their passes: the model finishes natively at
    # once (a canvas then costs about a native one, plus the first draft and verify).
    # On the embedded model the first verify commits under 10%: 0.1 took speculative
    # decoding from x0.52 to x0.81 of native speed, parse rate 35% -> 41% (40
    # prompts; 0 ran all 8 verifies and then the whole native finish anyway).
    min_commit: float | None = None

    def __post_init__(self) -> None:
        # Upper bounds, so that no option can hang a call (the denoise loop builds
        # a list per step): the native step budget's, MAX_DENOISING_STEPS.
        for name in ("draft_steps", "refine_steps", "max_rounds"):
            value = V.integer(getattr(self, name), name, lo=1, hi=MAX_DENOISING_STEPS)
            object.__setattr__(self, name, value)
        if not isinstance(self.verify, str) or self.verify not in VERIFIES:
            raise ValueError(
                f"verify: expected 'plain', 'hidden' or 'others', got {self.verify!r}"
            )
        self._verify_defaults()
        on = self.verify_on
        if on is not None and (
            not isinstance(on, str) or on not in ("argmax", "canvas")
        ):
            raise ValueError(f"verify_on: expected 'argmax' or 'canvas', got {on!r}")
        if self.verify == "others" and self.accept_threshold == RATIO:
            raise ValueError(
                "accept_threshold: 'ratio' needs verify='hidden' (the 'others' "
                "verify judges every token on the whole rest of the draft, no order)"
            )
        if self.verify_groups is not None:
            groups = V.integer(self.verify_groups, "verify_groups", lo=1, hi=1 << 16)
            object.__setattr__(self, "verify_groups", groups)
        for name in ("verify_sure", "min_commit"):
            if getattr(self, name) is not None:
                value = V.number(getattr(self, name), name, lo=0, hi=1)
                object.__setattr__(self, name, value)
        t = self.accept_threshold
        if t is not None and t != RATIO:
            if isinstance(t, str):
                raise ValueError(
                    f"accept_threshold: expected None, a number in [0, 1] or "
                    f"{RATIO!r}, got {t!r}"
                )
            t = V.number(t, "accept_threshold", lo=0, hi=1)
            object.__setattr__(self, "accept_threshold", t)
        for name in ("draft_confidence", "draft_entropy_bound"):
            c = getattr(self, name)
            if c is not None:
                c = V.number(c, name, lo=0, lo_open=True)
                object.__setattr__(self, name, c)

    def _verify_defaults(self) -> None:
        """Each verify setting: refused where this verify does not read it, its
        default where it does and none was given."""
        for name, defaults in VERIFY_OPTIONS.items():
            value = getattr(self, name)
            if self.verify not in defaults:
                if value is not None:
                    which = " or ".join(repr(v) for v in defaults)
                    raise ValueError(
                        f"{name}: only applies with verify={which}, got "
                        f"verify={self.verify!r}"
                    )
            elif value is None:
                object.__setattr__(self, name, defaults[self.verify])

    @classmethod
    def from_options(
        cls, options: dict, source: str | None = None, error: type = ValueError
    ) -> SpecPolicy:
        """A SpecPolicy of a dict of its fields (`speculative=`, or a drafter
        config's "speculative" read from the file `source`, named with each error,
        raised as `error`); a key that is no field is refused by name."""
        where = "speculative" if source is None else f"{source}: speculative"
        fields = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise error(f"{where}: unknown option {unknown[0]!r}; expected {fields}")
        if source is None:
            return cls(**options)
        try:
            return cls(**options)
        except ValueError as e:
            raise error(f"{where}: {e}") from None

    @staticmethod
    def over(recommended: dict, given: dict) -> dict:
        """The fields `given` (api.load's `speculative=`, CLI flags) over a trained
        drafter's `recommended` ones. A drafter's verify settings were tuned for its
        verify: where `given` picks another verify they are dropped, so that
        verify="plain" is not refused for a verify_sure it did not ask for."""
        theirs = recommended.get("verify", SpecPolicy.verify)
        if given.get("verify", theirs) != theirs:
            recommended = {
                k: v for k, v in recommended.items() if k not in VERIFY_OPTIONS
            }
        return {**recommended, **given}

    def drafter_policy(self, policy: DenoisePolicy, budget: int) -> DenoisePolicy:
        conf = self.draft_confidence or policy.confidence_threshold
        bound = self.draft_entropy_bound or policy.entropy_bound
        return dataclasses.replace(
            policy,
            budget=budget,
            confidence_threshold=float(conf),
            entropy_bound=float(bound),
        )


def _run(model: Target, state, cache, policy, noise, views: bool, shown: int = 0):
    """A model's `denoise` call; as a generator of StepViews when `views`, numbered
    `shown` passes on (passes of this canvas that `state.step` does not count)."""
    if views:
        steps = model.denoise_steps(state, cache, policy, noise)
        return (yield from _numbered_on(steps, shown))
    return model.denoise(state, cache, policy, noise)


@dataclass
class _Canvas:
    """One canvas decoded speculatively: the two models (the drafter is the target
    run under a plan, a Target of its own), the settings they share and the
    counters the result reports."""

    target: Target
    drafter: Target
    spec: SpecPolicy
    cache: Any
    policy: DenoisePolicy
    noise: NoiseSource
    views: bool
    drafter_steps: int = 0
    first_draft_steps: int = 0  # the drafter's passes to its first draft
    target_steps: int = 0
    rounds: int = 0
    stats: list = field(default_factory=list)

    def run(self, state: CanvasState) -> Generator[StepView, None, CanvasResult]:
        """Steps 1-4 of the module docstring."""
        spec, policy = self.spec, self.policy
        if spec.verify != "plain":
            return (yield from self.run_hidden(state))
        # 1. draft (the drafter's stop flags are its own: the target starts unstopped)
        draft = yield from self._draft(state, spec.draft_steps)
        self.first_draft_steps = self.drafter_steps
        cur, done = draft.state, state.done
        passes = np.zeros(self.cache.batch_size, np.int64)
        while True:
            native = self.rounds >= spec.max_rounds
            res = yield from self._verify(cur, done, native)  # 2, or 4
            passes += res.passes
            cur, done = res.state, res.state.done
            if res.done.all() or self.target_steps >= policy.max_steps or native:
                break  # 3: commit
            if self.rounds < spec.max_rounds:  # 3: refine what it did not accept
                ref = yield from self._draft(cur, spec.refine_steps)
                cur = dataclasses.replace(ref.state, done=done)
        return self._result(state, draft.tokens, res, cur, passes)

    def _draft(self, state: CanvasState, budget: int, shown: int = 0):
        """The drafter's passes; its live views numbered `shown` passes on (the
        hidden verifies, which its own schedule does not count)."""
        policy = self.spec.drafter_policy(self.policy, budget)
        res = yield from _run(
            self.drafter, state, self.cache, policy, self.noise, self.views, shown
        )
        self.drafter_steps += res.steps
        return res

    def _verify(self, cur: CanvasState, done: Any, native: bool):
        """One target pass on the drafter's state (a verify), or, when `native`,
        the rest of the target's native budget."""
        budget = self.policy.max_steps - self.target_steps if native else 1
        on_argmax = self.spec.verify_on == "argmax" and not native
        canvas = cur.argmax if on_argmax else cur.canvas
        start = dataclasses.replace(cur, canvas=canvas, done=done)
        policy = dataclasses.replace(self.policy, budget=budget)
        res = yield from _run(
            self.target, start, self.cache, policy, self.noise, self.views
        )
        self.rounds += 0 if native else 1
        self.target_steps += res.steps
        self.stats.append(res.step_stats)
        return res

    def run_hidden(self, state: CanvasState):
        """The hidden-token verify's rounds (module docstring), then the finish."""
        draft = yield from self._draft(state, self.spec.draft_steps)
        self.first_draft_steps = self.drafter_steps
        first = draft.tokens
        live = ~_finished(state, first.shape[0])
        pins = np.where(live[:, None], _pins(state, first.shape), first)
        rounds = min(self.spec.max_rounds, self.policy.max_steps - 1)
        while (pins < 0).any() and self.rounds < rounds:
            open_before = int((pins < 0).sum())
            pins = np.where(pins >= 0, pins, self._hidden_verify(state, draft, pins))
            if open_before - (pins < 0).sum() < self.spec.min_commit * open_before:
                break  # too little accepted: the model finishes natively
            if (pins < 0).any() and self.rounds < rounds:
                again = self._redraft(draft.state, pins)
                draft = yield from self._draft(
                    again, self.spec.refine_steps, self.rounds
                )
        passes = self.rounds * live.astype(np.int64)
        if (pins < 0).any():
            res = yield from self._finish(state, pins)
            passes += res.passes
        else:
            res = _verified(pins, state)
        return self._result(state, first, res, res.state, passes)

    def _hidden_verify(self, state, draft: CanvasResult, pins) -> np.ndarray:
        """One hidden-token pass over the draft (pins in place): the ids it commits."""
        tokens = np.where(pins >= 0, pins, draft.tokens).astype(np.int32)
        sc = draft.state.self_conditioning
        conf = np.zeros(tokens.shape) if sc is None else _confidence(to_numpy(sc))
        others = self.spec.verify == "others"
        # "others" has no order: one rank for every drafted token, -1 for pins
        rank = draft_rank(conf, pins >= 0, 1 if others else self.spec.verify_groups)
        ids = np.concatenate([self._noise(tokens.shape), tokens], axis=1)
        layout = HiddenLayout(rank, others=others)
        logits = self.target.decode(ids, self.cache, None, layout)
        logits = np.array(to_numpy(logits), np.float32)
        if state.heal_ids is not None:  # the first position extends the prompt
            allowed = allowed_mask(state.heal_ids, logits.shape[-1], None)
            logits[:, 0, ~allowed] = -np.inf
        rng, temperature = self._draws(state, tokens)
        self.rounds += 1
        self.target_steps += 1
        spec = self.spec
        if others:
            return judge_each(
                logits, tokens, rank, spec.accept_threshold, spec.verify_sure
            )
        return judge(
            logits,
            tokens,
            rank,
            spec.accept_threshold,
            spec.verify_sure,
            rng=rng,
            temperature=temperature,
        )

    def _draws(self, state, tokens: np.ndarray):
        """Speculative sampling's generator and temperature for this verify: a host
        stream keyed by the seed, the counters and the draft (so that canvases do not
        share draws), the same on every backend; the temperature of the verify's
        place in the schedule (passes of either model so far)."""
        done = state.step + self.drafter_steps + self.target_steps
        temperature = self.policy.temperature(max(self.policy.max_steps - done, 1))
        seed = getattr(self.noise, "seed", None)
        if seed is None and isinstance(self.noise, SeededNoise):  # fresh entropy
            return np.random.default_rng(), temperature
        key = [seed or 0, self.rounds, self.drafter_steps, 0xACCE]
        key.append(zlib.crc32(np.ascontiguousarray(tokens, np.int32).tobytes()))
        return np.random.default_rng(key), temperature

    def _noise(self, shape) -> np.ndarray:
        """Uniform ids for open positions: a host stream of its own, the same on
        every backend, so that replayed decisions agree."""
        rng = np.random.default_rng([self.rounds, self.drafter_steps, 0x5EED])
        return rng.integers(0, self.target.config.vocab_size, shape).astype(np.int32)

    def _redraft(self, drafted: CanvasState, pins) -> CanvasState:
        """The drafter's next start: the pins held, fresh noise elsewhere."""
        canvas = np.where(pins >= 0, pins, self._noise(pins.shape)).astype(np.int32)
        return dataclasses.replace(
            drafted,
            canvas=canvas,
            fixed=pins.astype(np.int32),
            draw_initial=False,
            self_conditioning=None,
            history=None,
            done=None,
            argmax=None,
            mean_entropy=None,
        )

    def _finish(self, state: CanvasState, pins):
        """The model decodes what is still open natively, the pins held. Its
        temperature schedule starts over, as on a fresh canvas: going on from the
        passes already run took 22.7 -> 17.8 model passes per canvas instead of
        21.8 but cost parse rate (37% -> 35%, paired 95% -6 to +1 points, 600
        prompts; README). Its live views are numbered on after those passes."""
        start = self._redraft(state, pins)
        budget = max(self.policy.max_steps - self.target_steps, 1)
        policy = dataclasses.replace(self.policy, budget=budget)
        shown = self.drafter_steps + self.target_steps
        res = yield from _run(
            self.target, start, self.cache, policy, self.noise, self.views, shown
        )
        self.target_steps += res.steps
        self.stats.append(res.step_stats)
        return res

    def _result(self, state, first, res, cur, passes) -> CanvasResult:
        # The first draft's proposals: live rows, and only the holes of an infill.
        judged = np.ones(first.shape, bool)
        if state.finished is not None:
            judged &= ~state.finished[:, None]
        if state.fixed is not None:
            judged &= np.asarray(state.fixed) < 0
        stats = self.stats
        return CanvasResult(
            tokens=res.tokens,
            steps=self.target_steps,
            passes=passes,
            state=cur,
            step_stats={k: np.concatenate([s[k] for s in stats]) for k in stats[0]}
            if stats
            else {},
            done=res.done,
            drafter_steps=self.drafter_steps,
            first_draft_steps=self.first_draft_steps,
            verify_rounds=self.rounds,
            drafted=int(judged.sum()),
            drafted_kept=int(((first == res.tokens) & judged).sum()),
        )


def _numbered_on(views: Generator, shown: int):
    """A denoise generator's StepViews numbered `shown` passes on; its result."""
    while True:
        try:
            view = next(views)
        except StopIteration as stop:
            return stop.value
        yield dataclasses.replace(view, step=view.step + shown)


def _finished(state: CanvasState, batch: int) -> np.ndarray:
    """[B] rows finished before this canvas."""
    if state.finished is None:
        return np.zeros(batch, bool)
    return np.asarray(state.finished, bool)


def _pins(state: CanvasState, shape) -> np.ndarray:
    """[B, C] the ids pinned before any verify (an infill's), -1 elsewhere."""
    if state.fixed is None:
        return np.full(shape, -1, np.int64)
    return np.asarray(state.fixed, np.int64)


def _confidence(logits: np.ndarray) -> np.ndarray:
    """[B, C] the drafter's probability of its own argmax."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return 1.0 / np.exp(z).sum(axis=-1)


def _verified(pins: np.ndarray, state: CanvasState) -> CanvasResult:
    """A canvas every position of which a verify committed: no pass of its own."""
    B = pins.shape[0]
    tokens = pins.astype(np.int32)
    return CanvasResult(
        tokens=tokens,
        steps=0,
        passes=np.zeros(B, np.int64),
        state=dataclasses.replace(
            state, canvas=tokens, argmax=tokens, done=np.ones(B, bool)
        ),
        done=np.ones(B, bool),
    )


class SpeculativeModel:
    """A Target whose canvases are decoded speculatively with `drafter`.

    Everything but `denoise` is the target's, so the block loop, the API and the
    CLI use it as they use the target itself.
    """

    def __init__(self, target: Target, drafter: Target, spec: SpecPolicy):
        self.target, self.drafter, self.spec = target, drafter, spec
        self.config = target.config
        self.generation_config = target.generation_config
        self.backend = target.backend
        self.path = target.path

    def new_cache(self, batch_size: int) -> Any:
        return self.target.new_cache(batch_size)

    def encode(self, ids: Any, cache: Any, attention_mask: Any = None) -> None:
        self.target.encode(ids, cache, attention_mask)

    def decode(self, canvas_ids, cache, self_conditioning=None, layout=None):
        return self.target.decode(canvas_ids, cache, self_conditioning, layout)

    def denoise(self, state, cache, policy, noise, on_step=None) -> CanvasResult:
        steps = self.denoise_steps(state, cache, policy, noise, views=on_step)
        return drain(steps, on_step)

    def denoise_steps(self, state, cache, policy, noise, views: Any = True):
        run = _Canvas(
            self.target, self.drafter, self.spec, cache, policy, noise, bool(views)
        )
        return run.run(state)

    def sync(self) -> None:
        self.target.sync()

    def peak_memory(self) -> int:
        return self.target.peak_memory()

"""The speculative loop's contract, one test per fault that once passed unnoticed
(issue 20, item 6): each test records what the loop hands each model and what it
reports, and would fail if that fault were back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH, needs_torch
from test_speculative import CHEAP, HostNoise, _load

import mlx_diffgem as dg
from drafter import load_drafter
from drafter.plan import SelfDraftPlan
from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
from mlx_diffgem.core.speculative import SpecPolicy, SpeculativeModel

BACKENDS = [
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx")),
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
]
PROMPT = np.asarray([[2, 10, 11, 12]], np.int32)
# The random tiny model never stops by itself: every canvas runs its verify rounds,
# refines between them and finishes natively.
POLICY = DenoisePolicy(max_steps=8)
SPEC = SpecPolicy(draft_steps=3, refine_steps=2, max_rounds=2, verify="plain")


@dataclasses.dataclass
class Call:
    canvas: np.ndarray | None
    argmax: np.ndarray | None
    fixed: np.ndarray | None
    policy: DenoisePolicy
    result: object
    step: int = 0


def _np(x):
    return None if x is None else dg.to_numpy(x)


class Recorder:
    """Wraps a Target: records every `denoise` call's state, policy and result."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def denoise(self, state, cache, policy, noise, on_step=None):
        res = self.model.denoise(state, cache, policy, noise, on_step)
        self.calls.append(
            Call(
                _np(state.canvas),
                _np(state.argmax),
                state.fixed,
                policy,
                res,
                state.step,
            )
        )
        return res


def _run(path, backend="torch", spec=SPEC, state=None, batch=1, seed=0):
    target, _ = _load(path, backend)
    t, d = Recorder(target), Recorder(load_drafter(target, CHEAP))
    cache = target.new_cache(batch)
    target.encode(np.repeat(PROMPT, batch, axis=0), cache)
    model = SpeculativeModel(t, d, spec)
    res = model.denoise(state or CanvasState(), cache, POLICY, HostNoise(seed))
    return res, t.calls, d.calls


@needs_torch
def test_the_commit_is_the_targets_last_argmax(tiny_path):
    res, t, d = _run(tiny_path)
    np.testing.assert_array_equal(res.tokens, t[-1].result.tokens)
    assert not np.array_equal(res.tokens, d[0].result.tokens)  # not the first draft


@needs_torch
def test_the_verify_runs_under_the_targets_own_sampler(tiny_path):
    spec = dataclasses.replace(SPEC, draft_confidence=0.5, draft_entropy_bound=2.0)
    _, t, d = _run(tiny_path, spec=spec)
    for c in t:
        assert c.policy.entropy_bound == POLICY.entropy_bound
        assert c.policy.confidence_threshold == POLICY.confidence_threshold
    for c in d:
        assert (c.policy.entropy_bound, c.policy.confidence_threshold) == (2.0, 0.5)


@needs_torch
@pytest.mark.parametrize("verify_on", ["argmax", "canvas"])
def test_a_verify_reads_what_verify_on_says(tiny_path, verify_on):
    _, t, d = _run(tiny_path, spec=dataclasses.replace(SPEC, verify_on=verify_on))
    verifies = [c for c in t if c.policy.budget == 1]
    assert len(verifies) == SPEC.max_rounds
    differ = 0
    for v, before in zip(verifies, d, strict=False):
        st = before.result.state
        want = _np(st.argmax if verify_on == "argmax" else st.canvas)
        np.testing.assert_array_equal(v.canvas, want)
        differ += not np.array_equal(_np(st.argmax), _np(st.canvas))
    assert differ  # the two choices were told apart


@needs_torch
def test_the_native_finish_reads_the_renoised_canvas(tiny_path):
    _, t, _ = _run(tiny_path)
    last_verify, finish = t[-2], t[-1]
    assert finish.policy.budget == POLICY.max_steps - SPEC.max_rounds
    st = last_verify.result.state
    np.testing.assert_array_equal(finish.canvas, _np(st.canvas))
    assert not np.array_equal(_np(st.canvas), _np(st.argmax))


@needs_torch
def test_a_refine_starts_from_the_targets_renoised_canvas(tiny_path):
    _, t, d = _run(tiny_path)
    refines = d[1:]
    assert len(refines) == SPEC.max_rounds - 1
    for verify, refine in zip(t, refines, strict=False):
        st = verify.result.state
        np.testing.assert_array_equal(refine.canvas, _np(st.canvas))
        assert not np.array_equal(refine.canvas, _np(st.argmax))
        assert refine.policy.budget == SPEC.refine_steps


@needs_torch
def test_pinned_positions_hold_through_rejected_verifies(tiny_path):
    fixed = np.full((1, 8), -1, np.int32)
    fixed[0, [0, 3, 7]] = [40, 41, 42]
    res, t, d = _run(tiny_path, state=CanvasState(fixed=fixed))
    assert len(t) > 1  # verifies were rejected
    for c in t + d:
        np.testing.assert_array_equal(c.fixed, fixed)
    assert res.tokens[0, [0, 3, 7]].tolist() == [40, 41, 42]
    assert res.drafted == 5  # the holes only


@needs_torch
def test_the_kept_share_counts_live_rows_only(tiny_path):
    finished = np.array([True, False])
    res, _, d = _run(tiny_path, state=CanvasState(finished=finished), batch=2)
    first = d[0].result.tokens
    assert res.drafted == 8
    assert res.drafted_kept == int((first[1] == res.tokens[1]).sum())


@needs_torch
def test_drafter_passes_are_all_counted(tiny_path):
    res, t, d = _run(tiny_path)
    assert res.drafter_steps == sum(c.result.steps for c in d)
    assert res.steps == sum(c.result.steps for c in t)
    assert res.verify_rounds == SPEC.max_rounds


@needs_torch
def test_stream_steps_count_on_within_a_canvas(tiny_path):
    """stream_generate(draft=True): the live canvases of one canvas are numbered
    1, 2, ... over the drafter's and the target's passes alike."""
    model, tok = _load(tiny_path, "torch", CHEAP, draft_steps=3, max_rounds=2)
    steps = [
        (r.step, r.source)
        for r in dg.stream_generate(
            model, None, PROMPT, draft=True, max_tokens=8, max_denoising_steps=8
        )
        if r.is_draft
    ]
    assert [s for s, _ in steps] == list(range(1, len(steps) + 1))
    assert {src for _, src in steps} == {"drafter", "target"}


@needs_torch
@pytest.mark.parametrize("verify", ["hidden", "others"])
def test_the_native_finish_starts_its_schedule_over(tiny_path, verify):
    """After hidden verifies, the model's native finish runs the temperature
    schedule from its top, as on a fresh canvas (going on from the passes already
    run cost parse rate at 600 prompts); a stream still numbers its passes on, a
    verify's pass included, never restarting within the canvas."""
    spec = SpecPolicy(draft_steps=3, max_rounds=2, verify=verify, min_commit=0)
    res, t, d = _run(tiny_path, spec=spec)
    assert res.verify_rounds == 2 and len(t) == 1  # verifies are decode calls
    assert t[0].step == 0
    assert [c.step for c in d] == [0, 3]  # the refine goes on from the draft
    model, _ = _load(tiny_path, "torch", CHEAP, **dataclasses.asdict(spec))
    steps = [
        r.step
        for r in dg.stream_generate(
            model, None, PROMPT, draft=True, max_tokens=8, max_denoising_steps=8
        )
        if r.is_draft
    ]
    # drafter 1-3, verify 4, refine 5-6, verify 7, the finish from 8: the verifies'
    # passes are the only numbers a stream does not show
    assert steps[:6] == [1, 2, 3, 5, 6, 8]
    assert steps == sorted(set(steps))
    assert set(range(1, steps[-1] + 1)) - set(steps) == {4, 7}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plan_runs_exactly_its_layers(tiny_path, backend, monkeypatch):
    target, _ = _load(tiny_path, backend)
    if backend == "torch":
        from cuda_backend.model import Layer

        method = "forward"
    else:
        from mlx_diffgem.mlx_backend.model import DecoderLayer as Layer

        method = "__call__"
    ran = []
    real = getattr(Layer, method)
    index = {id(layer): i for i, layer in enumerate(target.model.layers)}

    def counting(layer, *args, **kw):
        ran.append(index[id(layer)])
        return real(layer, *args, **kw)

    monkeypatch.setattr(Layer, method, counting)
    cache = target.new_cache(1)
    target.encode(PROMPT, cache)
    ran.clear()
    view = target.planned(SelfDraftPlan(layers=(0, 2)))
    view.decode(np.zeros((1, 8), np.int32), cache)
    assert ran == [0, 2]


def test_the_auto_plan_cuts_the_head():
    """The default self-drafter samples over a quarter of the vocabulary (at least
    1,024 ids) and takes a 32-token soft embedding; every layer and expert stays."""
    target, _ = _load(dg.default_model_path(), "torch" if HAS_TORCH else "mlx")
    V = target.config.vocab_size
    plan = SelfDraftPlan.auto(target.config)
    assert (plan.head_vocab, plan.sc_top_k) == (max(1024, V // 4), 32)
    assert plan.layers is None and plan.top_k is None
    drafter = load_drafter(target, "self")
    cache = target.new_cache(1)
    target.encode(PROMPT, cache)
    C = target.config.canvas_length
    out = drafter.decode(np.zeros((1, C), np.int32), cache)
    assert dg.to_numpy(out).shape == (1, C, plan.head_vocab)


@needs_torch
def test_the_distillation_goal_is_the_targets_view_of_the_clean_canvas(monkeypatch):
    """drafter.distill: the drafter learns the target's argmax on the clean canvas
    (what it would commit), not on the noisy one the drafter sees."""
    import torch

    from cuda_backend import train as T
    from drafter import distill

    target = T.build_model(T.model_config_dict("tiny", vocab_size=64, canvas_length=8))
    ids = torch.randint(0, 64, (2, 16 + 8), generator=torch.Generator().manual_seed(0))
    seen = {}
    real = distill.F.cross_entropy

    def spy(logits, goal, *a, **kw):
        seen["goal"] = goal.view(2, -1)
        return real(logits, goal, *a, **kw)

    monkeypatch.setattr(distill.F, "cross_entropy", spy)
    plan = SelfDraftPlan(layers=(0,))
    distill.batch_loss(target, plan, ids, 16, "target", torch.Generator())
    with torch.no_grad():
        _, prefixes = T.encoder_pass(target, ids)
        want = T.decoder_pass(target, ids[:, 16:], prefixes, 16).argmax(-1)
    assert torch.equal(seen["goal"], want)


def test_a_speculative_infill_reports_its_draft():
    """The kept share of a speculative fill counts its holes' first draft (it
    said "draft kept: 0%" when only passes were counted)."""
    model, tok = _load(dg.default_model_path(), "torch" if HAS_TORCH else "mlx")
    spec, _ = _load(dg.default_model_path(), model.backend, "self")
    r = dg.fill(spec, tok, ["def add(a, b):\n    ", dg.Hole(12), "\n"], seed=0)
    assert r.stats.drafted_tokens == 12 * r.stats.canvases
    assert 0 < r.stats.drafted_kept <= r.stats.drafted_tokens
    assert "draft kept: 0%" not in r.stats.summary()

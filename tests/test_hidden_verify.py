"""The hidden-token layout (core/layout.py): one decoder pass over a canvas laid out
twice that scores every drafted token without showing it to its own query."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH, needs_mlx, needs_torch
from test_speculative import _load

import mlx_diffgem as dg
from mlx_diffgem.core.layout import HiddenLayout

BACKENDS = [
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx")),
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
]
PROMPT = np.asarray([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]], np.int32)  # > W


def test_layout_mask_rules():
    rank = np.array([[2, 0, 1, 1]])
    m = HiddenLayout(rank).mask()[0]
    q, r = m[:4], m[4:]
    assert (q[:, :4] == np.eye(4, dtype=bool)).all()  # a query sees itself only
    assert not np.diagonal(q[:, 4:]).any()  # ... never its own drafted token
    assert q[0, 4:].tolist() == [False, True, True, True]  # rank 2 sees 0 and 1s
    assert q[2, 4:].tolist() == [False, True, False, False]  # a group: not its peer
    assert not r[:, :4].any()  # references never see a query
    assert r[2, 4:].tolist() == [False, True, True, True]  # rank <= its own


def _setup(path, backend, seed=0):
    target, _ = _load(path, backend)
    cache = target.new_cache(1)
    target.encode(PROMPT, cache)
    C, V = target.config.canvas_length, target.config.vocab_size
    rng = np.random.default_rng(seed)
    draft = rng.integers(0, V, (1, C)).astype(np.int32)
    queries = rng.integers(0, V, (1, C)).astype(np.int32)
    rank = rng.integers(0, 4, (1, C))  # groups of ties, as a drafter's passes give
    return target, cache, queries, draft, rank


def _hidden(target, cache, queries, draft, rank, others=False) -> np.ndarray:
    ids = np.concatenate([queries, draft], axis=1)
    if target.backend == "torch":
        import torch

        ids = torch.as_tensor(ids).long()
    else:
        import mlx.core as mx

        ids = mx.array(ids)
    out = target.model.decode(ids, cache, None, None, HiddenLayout(rank, others))
    return dg.to_numpy(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_never_sees_its_own_or_a_later_token(tiny_path, backend):
    """Changing the drafted tokens at positions ranked at or after i leaves query
    i's logits unchanged; changing an earlier-ranked one changes them."""
    target, cache, queries, draft, rank = _setup(tiny_path, backend)
    V = target.config.vocab_size
    base = _hidden(target, cache, queries, draft, rank)
    assert base.shape == (1, target.config.canvas_length, V)
    rng = np.random.default_rng(1)
    for i in range(draft.shape[1]):
        later = rank[0] >= rank[0, i]
        other = draft.copy()
        other[0, later] = (draft[0, later] + rng.integers(1, V, later.sum())) % V
        got = _hidden(target, cache, queries, other, rank)
        np.testing.assert_allclose(got[0, i], base[0, i], atol=1e-5)
        earlier = np.flatnonzero(~later)
        if earlier.size:
            other = draft.copy()
            other[0, earlier] = (draft[0, earlier] + 1) % V
            got = _hidden(target, cache, queries, other, rank)
            assert np.abs(got[0, i] - base[0, i]).max() > 1e-4


def test_leave_one_out_mask_rules():
    m = HiddenLayout(np.array([[2, 0, 1, 1]]), others=True).mask()[0]
    q, r = m[:4], m[4:]
    assert (q[:, :4] == np.eye(4, dtype=bool)).all()
    assert (q[:, 4:] == ~np.eye(4, dtype=bool)).all()  # all but its own token
    assert not r[:, :4].any() and (r[:, 4:] == np.eye(4, dtype=bool)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leave_one_out_query_sees_every_token_but_its_own(tiny_path, backend):
    target, cache, queries, draft, rank = _setup(tiny_path, backend)
    V = target.config.vocab_size
    base = _hidden(target, cache, queries, draft, rank, others=True)
    for i in (0, 5, draft.shape[1] - 1):
        own = draft.copy()
        own[0, i] = (own[0, i] + 1) % V
        got = _hidden(target, cache, queries, own, rank, others=True)
        np.testing.assert_allclose(got[0, i], base[0, i], atol=1e-5)
        assert np.abs(np.delete(got[0] - base[0], i, axis=0)).max() > 1e-4
        j = (i + 7) % draft.shape[1]  # any other position's token reaches query i
        other = draft.copy()
        other[0, j] = (other[0, j] + 1) % V
        got = _hidden(target, cache, queries, other, rank, others=True)
        assert np.abs(got[0, i] - base[0, i]).max() > 1e-4


@needs_torch
def test_hidden_pass_matches_one_pass_per_query(tiny_path):
    """torch: the 2C-slot pass against one small pass per query i, over [query i ;
    the drafted tokens ranked before it] at their own positions."""
    import torch

    target, cache, queries, draft, rank = _setup(tiny_path, "torch", seed=2)
    model, C = target.model, target.config.canvas_length
    got = _hidden(target, cache, queries, draft, rank)[0]
    for i in range(C):
        refs = np.flatnonzero(rank[0] < rank[0, i])
        ids = torch.as_tensor(np.r_[queries[0, i], draft[0, refs]][None]).long()
        positions = torch.as_tensor(cache.offset + np.r_[i, refs])
        r = rank[0, refs]
        n = 1 + refs.size
        allowed = np.zeros((n, n), bool)
        allowed[0, :] = True  # the query sees itself and every earlier reference
        allowed[1:, 1:] = r[None, :] <= r[:, None]
        masks = {}
        for sliding, lo in ((False, 0), (True, cache.offset - cache.sliding_length)):
            keys = np.concatenate([np.ones((n, cache.offset - lo), bool), allowed], 1)
            masks[sliding] = torch.as_tensor(keys)[None, None]
        with torch.inference_mode():
            h = model._decoder_input(ids, None)
            h = model._layers(h, positions, masks, cache, False)
            want = dg.to_numpy(model._head(model.norm(h)))[0, 0]
        np.testing.assert_allclose(got[i], want, atol=1e-5)


@needs_mlx
@needs_torch
def test_hidden_pass_same_on_both_backends(tiny_path):
    out = [_hidden(*_setup(tiny_path, b, seed=3)) for b in ("mlx", "torch")]
    np.testing.assert_allclose(out[0], out[1], atol=1e-4)


@needs_torch
def test_folded_gqa_takes_the_layout_mask(tiny_path, monkeypatch):
    """On GPUs the decoder folds query groups into the query axis; the layout's
    per-query mask must fold with them (checked here on the CPU)."""
    import cuda_backend.model as M

    args = _setup(tiny_path, "torch", seed=4)
    plain = _hidden(*args)
    monkeypatch.setattr(M, "FOLD_GQA", True)
    np.testing.assert_allclose(_hidden(*args), plain, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_refuses_self_conditioning_and_bad_shapes(tiny_path, backend):
    target, cache, queries, draft, rank = _setup(tiny_path, backend)
    with pytest.raises(ValueError, match="hidden layout expects shape"):
        _hidden(target, cache, queries[:, :4], draft, rank)
    ids = np.concatenate([queries, draft], axis=1)
    logits = target.decode(queries, cache)
    if target.backend == "torch":
        import torch

        ids = torch.as_tensor(ids).long()
        sc = torch.cat([logits, logits], 1)
    else:
        import mlx.core as mx

        ids, sc = mx.array(ids), mx.concatenate([logits, logits], 1)
    with pytest.raises(ValueError, match="self_conditioning"):
        target.model.decode(ids, cache, sc, None, HiddenLayout(rank))


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_decode_takes_the_layout(tiny_path, backend):
    """Target.decode(ids [B, 2C], cache, layout=...) is the model's layout pass,
    and refuses a layout of the wrong kind or shape by name."""
    target, cache, queries, draft, rank = _setup(tiny_path, backend, seed=5)
    ids = np.concatenate([queries, draft], axis=1)
    got = dg.to_numpy(target.decode(ids, cache, layout=HiddenLayout(rank)))
    np.testing.assert_allclose(got, _hidden(target, cache, queries, draft, rank))
    with pytest.raises(ValueError, match="layout: expected a HiddenLayout"):
        target.decode(ids, cache, layout=rank)
    with pytest.raises(ValueError, match="layout: expected an integer rank"):
        target.decode(ids, cache, layout=HiddenLayout(rank[:, :3]))
    with pytest.raises(ValueError, match="hidden layout expects shape"):
        target.decode(draft, cache, layout=HiddenLayout(rank))


def test_accept_along_the_commit_order():
    from mlx_diffgem.core.verify import accept_along

    rank = np.array([[0, 0, 1, 1, 2, 1]])
    agree = np.array([[True, True, True, False, True, True]])
    # groups 0 and 1 judged; group 1 has a rejection: its agreed tokens stay,
    # group 2 (judged on the rejected token) is not accepted
    want = [[True, True, True, False, False, True]]
    assert accept_along(rank, agree).tolist() == want
    assert accept_along(rank, np.ones_like(agree)).all()  # a perfect draft: all
    first = np.array([[False, True, True, True, True, True]])
    assert accept_along(rank, first).tolist() == [[False, True] + [False] * 4]


def test_agreement_by_argmax_or_probability():
    from mlx_diffgem.core.verify import agreement

    logits = np.log(np.array([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]]))
    draft = np.array([[1, 1]])
    assert agreement(logits, draft).tolist() == [[False, True]]
    assert agreement(logits, draft, 0.25).tolist() == [[True, True]]
    assert agreement(logits, np.array([[2, 2]]), 0.25).tolist() == [[False, True]]


def test_leave_one_out_judges_each_position():
    from mlx_diffgem.core.verify import judge_each

    # per position: p over 3 ids; drafts 0, 0, 1, 2 and a pin (rank -1)
    p = np.array([[[0.95, 0.04, 0.01], [0.3, 0.6, 0.1], [0.02, 0.03, 0.95]]])
    p = np.concatenate([p, [[[0.5, 0.45, 0.05], [0.01, 0.01, 0.98]]]], axis=1)
    logits, draft = np.log(p), np.array([[0, 0, 1, 2, 1]])
    rank = np.array([[0, 0, 0, 0, -1]])
    # kept (sure), open (neither sure), the model's own sure 2, open (the draft's 2
    # is not its argmax, and its own 0 is not sure), the pin whatever p says
    assert judge_each(logits, draft, rank, None, 0.9).tolist() == [[0, -1, 2, -1, 1]]
    # without the gate every position commits: the draft where it is the argmax,
    # else the model's own token; a threshold keeps a likely second choice (0.45 at
    # position 3) and not an unlikely one (0.05)
    assert judge_each(logits, draft, rank, None, 0.0).tolist() == [[0, 1, 2, 0, 1]]
    assert judge_each(logits, draft, rank, 0.4, 0.0).tolist() == [[0, 1, 2, 0, 1]]
    second = np.array([[0, 0, 1, 1, 1]])
    assert judge_each(logits, second, rank, 0.4, 0.0).tolist() == [[0, 1, 2, 1, 1]]


def _ratio_commits(logits, draft, sure, trials, temperature=0.7):
    """What speculative sampling commits at one position over many verifies."""
    from mlx_diffgem.core.verify import RATIO, judge

    rng = np.random.default_rng(0)
    rank = np.zeros((1, 1), np.int64)
    out = [
        judge(logits, draft, rank, RATIO, sure, rng=rng, temperature=temperature)
        for _ in range(trials)
    ]
    return np.concatenate(out)[:, 0]


def test_ratio_acceptance_commits_the_models_own_distribution():
    """Against a point-mass proposal (the drafter's argmax), accepting with p(x)
    and drawing the rest from p without x commits tokens distributed as p, at the
    verify's temperature: whatever token was drafted."""
    from mlx_diffgem.core.verify import softmax

    logits = np.array([[[2.0, 1.0, 0.5, -1.0, 0.0]]], np.float32)
    p = softmax(logits / np.float32(0.7))[0, 0]
    for drafted in (0, 2, 3):  # the model's first choice, a plausible, an unlikely
        ids = _ratio_commits(logits, np.array([[drafted]]), 0.0, 6000)
        assert (ids >= 0).all()  # with no sure gate every verify commits a token
        freq = np.bincount(ids, minlength=5) / ids.size
        np.testing.assert_allclose(freq, p, atol=0.025)


def test_ratio_acceptance_keeps_the_sure_gate_and_pins():
    from mlx_diffgem.core.verify import RATIO, judge

    # drafted 0 has p 0.3, token 1 has 0.6: an accepted 0 is not sure enough (open);
    # a rejected 0 draws from the rest, committed only where it is 1
    logits = np.log(np.array([[[0.3, 0.6, 0.05, 0.05]]], np.float32))
    ids = _ratio_commits(logits, np.array([[0]]), 0.5, 1000, temperature=1.0)
    assert set(ids.tolist()) == {-1, 1}
    # open: 0 accepted (0.3), or rejected and a 0.05 token drawn (0.7 * 0.1 / 0.7)
    assert abs((ids < 0).mean() - 0.4) < 0.06
    # a pinned token (rank -1) is kept whatever the model thinks of it
    rng = np.random.default_rng(1)
    rank = np.array([[-1]])
    for _ in range(50):
        got = judge(logits, np.array([[3]]), rank, RATIO, 0.9, rng=rng)
        assert got.tolist() == [[3]]


@needs_torch
def test_bench_verify_measures_recall_and_false_rejection():
    """bench.verify on two held-out prompts: every variant and criterion has a row,
    and the hidden pass rejects more planted errors than a plain pass."""
    import argparse

    from bench import verify

    a = argparse.Namespace(backend="torch", model=None, prompts=2, share=0.15, seed=0)
    rec = verify.run(a)
    rows = {(r["variant"], r["criterion"]): r for r in rec["rows"]}
    assert set(rows) == {
        (v, c)
        for v in ("plain", "hidden", "others", "grouped4")
        for c in verify.CRITERIA
    }
    for r in rows.values():
        assert 0 <= r["recall"] <= 1 and 0 <= r["false_rejection"] <= 1
        assert r["planted"] > 0 and r["correct"] > r["planted"]
    assert rows["hidden", "argmax"]["recall"] > rows["plain", "argmax"]["recall"]
    assert 0 < rows["hidden", "argmax"]["accepted_share"] <= 1

"""Token-identical generation against transformers with replayed random draws.

Parametrized over the backends installed here: the same block loop (core/generate.py)
drives each backend's denoiser, and must reproduce `generate`'s `sequences` exactly when
it replays the draws transformers made.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import needs_transformers
from hf_replay import hf_generate

from mlx_diffgem.core.generate import generate_ids
from mlx_diffgem.core.noise import ReplayNoise


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


BACKENDS = [
    pytest.param("mlx", marks=pytest.mark.skipif(not _has("mlx"), reason="no mlx")),
    pytest.param(
        "torch",
        marks=pytest.mark.skipif(
            not (_has("torch") and _has("cuda_backend.backend")), reason="no torch"
        ),
    ),
]

pytestmark = needs_transformers


@pytest.fixture(scope="module", params=BACKENDS)
def target(request, tiny_path):
    from mlx_diffgem.api import load

    opts = {"device": "cpu"} if request.param == "torch" else {}
    model, _ = load(tiny_path, backend=request.param, dtype="float32", **opts)
    return model


def _prompt(batch: int = 1, length: int = 13, seed: int = 1) -> np.ndarray:
    return (
        np.random.default_rng(seed).integers(3, 128, (batch, length)).astype(np.int32)
    )


def _check(target, hf_model, ids, mask=None, **kw):
    want, want_tpf, draws = hf_generate(hf_model, ids, mask, **kw)
    got, stats = generate_ids(target, ids, mask, noise=ReplayNoise(draws), **kw)
    np.testing.assert_array_equal(got, want)
    if ids.shape[0] == 1:
        assert stats.tokens_per_forward == pytest.approx(float(want_tpf[0]), rel=1e-6)
    return got, stats


def test_several_canvases(target, hf_model):
    _, stats = _check(
        target, hf_model, _prompt(), max_new_tokens=24, max_denoising_steps=6
    )
    assert stats.canvases == 3


def test_early_stop(target, hf_model):
    # random weights never give a stable argmax: stop on confidence alone
    kw = dict(stability_threshold=0, confidence_threshold=2.2)
    _, stats = _check(target, hf_model, _prompt(), max_new_tokens=16, **kw)
    assert max(stats.steps_per_canvas) < 48


def test_eos_becomes_pad(target, hf_model):
    ids = _prompt()
    seq, _, _ = hf_generate(hf_model, ids, max_new_tokens=24, max_denoising_steps=4)
    eos = int(seq[0, 13 + 10])  # a token of the second canvas: the row stops there
    got, stats = _check(
        target,
        hf_model,
        ids,
        max_new_tokens=24,
        max_denoising_steps=4,
        eos_token_id=[eos],
    )
    tail = got[0, 13:]
    first = int(np.argmax(tail == eos))
    assert (tail[first + 1 :] == 0).all() and stats.finish_reason == "stop"


def test_padded_batch(target, hf_model):
    ids = _prompt(batch=2, length=11, seed=3)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    _check(target, hf_model, ids, mask, max_new_tokens=16, max_denoising_steps=5)


def test_padded_batch_early_stop(target, hf_model):
    ids = _prompt(batch=2, length=11, seed=4)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    # rows cross the confidence bound at different steps: the first one is frozen
    kw = dict(stability_threshold=0, confidence_threshold=2.2, max_denoising_steps=10)
    _, stats = _check(target, hf_model, ids, mask, max_new_tokens=16, **kw)
    assert (
        max(stats.steps_per_canvas) < 10 and stats.row_passes < 2 * stats.target_passes
    )


def test_seeded_is_deterministic(target):
    ids = _prompt()
    a, _ = generate_ids(target, ids, seed=7, max_new_tokens=16, max_denoising_steps=4)
    b, _ = generate_ids(target, ids, seed=7, max_new_tokens=16, max_denoising_steps=4)
    c, _ = generate_ids(target, ids, seed=8, max_new_tokens=16, max_denoising_steps=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_multi_turn_cache_matches_one_shot(target, hf_model):
    """A kept cache encodes the last committed canvas before the next turn's tokens."""
    ids = _prompt()
    cache = target.new_cache(1)
    first, _ = generate_ids(
        target, ids, seed=1, cache=cache, max_new_tokens=8, max_denoising_steps=3
    )
    assert cache.pending is not None and cache.offset == ids.shape[1]
    turn = _prompt(length=5, seed=9)
    # The reference with its returned cache needs [last canvas ; new turn] as input ids.
    history = np.concatenate([first, turn], axis=1)
    _, _, draws = hf_generate(
        hf_model, history, max_new_tokens=8, max_denoising_steps=3
    )
    got, _ = generate_ids(
        target,
        turn,
        noise=ReplayNoise(draws),
        cache=cache,
        max_new_tokens=8,
        max_denoising_steps=3,
    )
    want, _ = generate_ids(
        target,
        history,
        noise=ReplayNoise(draws),
        max_new_tokens=8,
        max_denoising_steps=3,
    )
    np.testing.assert_array_equal(got[:, turn.shape[1] :], want[:, history.shape[1] :])

"""Sampler pieces on hand-built logits (the upstream cases of spec §7.1, and more).

Parametrized over the backends installed here: `mlx_diffgem/mlx_backend/sampling.py`
and its torch twin `cuda_backend/sampling.py` expose the same functions.
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import numpy as np
import pytest

from mlx_diffgem.core.backend import DenoisePolicy

V, C = 10_000, 256


class MLX:
    name = "mlx"

    def __init__(self):
        from mlx_diffgem.mlx_backend._blas import import_mlx

        self.mx = import_mlx()
        self.s = importlib.import_module("mlx_diffgem.mlx_backend.sampling")

    def arr(self, x):
        return self.mx.array(x)

    def np(self, x):
        return np.array(x)


class Torch:
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self.s = importlib.import_module("cuda_backend.sampling")

    def arr(self, x):
        return self.torch.from_numpy(np.asarray(x))

    def np(self, x):
        return x.cpu().numpy()


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _available():
    out = []
    if importlib.util.find_spec("mlx"):
        out.append(pytest.param(MLX, id="mlx"))
    if importlib.util.find_spec("torch") and importlib.util.find_spec(
        "cuda_backend.sampling"
    ):
        out.append(pytest.param(Torch, id="torch"))
    return out


@pytest.fixture(scope="module", params=_available())
def xp(request):
    return request.param()


def _logits(spikes: dict[int, float], rows: int = 1) -> np.ndarray:
    z = np.zeros((rows, C, V), np.float32)
    for pos, value in spikes.items():
        z[:, pos, 0] = value
    return z


def test_entropy_anchors(xp):
    h = xp.np(xp.s.entropy(xp.arr(_logits({0: 18.0, 1: 14.5}))))
    assert h[0, 0] == pytest.approx(2.9e-3, rel=0.05)
    assert h[0, 1] == pytest.approx(7.8e-2, rel=0.05)
    assert h[0, 2] == pytest.approx(math.log(V), rel=1e-5)


@pytest.mark.parametrize("bound, accepted", [(0.1, 3), (0.01, 2)])
def test_entropy_bound_acceptance(xp, bound, accepted):
    h = xp.s.entropy(xp.arr(_logits({0: 18.0, 1: 14.5, 2: 14.5})))
    keep = xp.np(xp.s.accept_mask(h, bound))
    assert keep.sum() == accepted
    assert keep[0, :accepted].all()


def test_acceptance_always_keeps_one(xp):
    keep = xp.np(xp.s.accept_mask(xp.s.entropy(xp.arr(_logits({}, rows=2))), 1e-9))
    assert keep.sum(axis=-1).tolist() == [1, 1]


def test_renoise_keeps_accepted_positions(xp):
    z = _logits({i: 1e6 for i in range(9)})
    keep = xp.s.accept_mask(xp.s.entropy(xp.arr(z)), 0.1)
    draft = np.full((1, C), 7, np.int32)
    noise = np.random.default_rng(0).integers(100, V, (1, C)).astype(np.int32)
    out = xp.np(xp.s.renoise(keep, xp.arr(draft), xp.arr(noise)))
    assert (out[0, :9] == 7).all()
    assert (out == 7).sum() >= 10  # plus the first high-entropy position
    assert (out[0, 10:] == noise[0, 10:]).sum() >= C - 11


def test_linear_temperature_schedule():
    p = DenoisePolicy(max_steps=48, t_min=0.4, t_max=0.8)
    assert p.temperature(48) == pytest.approx(0.8)
    assert p.temperature(24) == pytest.approx(0.6)
    assert p.temperature(1) == pytest.approx(0.4 + 0.4 / 48)  # t_min is never reached


def _stop(xp, hist, arg, mean_h, stability, conf=0.005):
    stop, hist = xp.s.stop_update(
        hist,
        xp.arr(np.asarray(arg, np.int32)),
        xp.arr(np.asarray(mean_h, np.float32)),
        stability,
        conf,
    )
    return xp.np(stop).tolist(), hist


@pytest.mark.parametrize("stability, needed", [(1, 2), (2, 3)])
def test_stability_needs_equal_consecutive_argmax(xp, stability, needed):
    hist, a, b = None, [[1, 2, 3]], [[1, 2, 4]]
    seq = [a] * (needed - 1) + [b] * needed
    stops = []
    for arg in seq:
        s, hist = _stop(xp, hist, arg, [0.0], stability)
        stops.append(s[0])
    # the change to b resets the count; it stops once `needed` argmaxes agree
    assert stops == [False] * (len(seq) - 1) + [True]


def test_confidence_threshold(xp):
    s, _ = _stop(xp, None, [[1]], [7.8e-2], 0)
    assert s == [False]
    s, _ = _stop(xp, None, [[1]], [2.9e-3], 0)
    assert s == [True]
    s, _ = _stop(xp, None, [[1], [1]], [math.log(V), 1e-3], 0)
    assert s == [False, True]


def test_sampling_follows_the_distribution(xp):
    z = np.full((1, C, 4), -1e9, np.float32)
    z[0, :, 2] = 0.0
    if xp.name == "mlx":
        draw = xp.s.sample_tokens(xp.arr(z), xp.mx.random.key(0))
    else:
        draw = xp.s.sample_tokens(xp.arr(z), xp.torch.Generator().manual_seed(0))
    assert (xp.np(draw) == 2).all()


def test_sampling_frequencies_match_the_probabilities(xp):
    p = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    z = np.broadcast_to(np.log(p), (8, C, 4)).copy()
    if xp.name == "mlx":
        draw = xp.s.sample_tokens(xp.arr(z), xp.mx.random.key(1))
    else:
        draw = xp.s.sample_tokens(xp.arr(z), xp.torch.Generator().manual_seed(1))
    draw = xp.np(draw).ravel()
    freq = np.bincount(draw, minlength=4) / draw.size
    np.testing.assert_allclose(freq, p, atol=0.03)  # 2048 draws: ~4 sigma

"""MLX <-> torch logits parity on the same weights (fp32, CPU), through the protocol."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_mlx, needs_torch

from mlx_diffgem.api import load, to_numpy

pytestmark = [needs_mlx, needs_torch]
TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tiny_path):
    mlx_model, _ = load(tiny_path, backend="mlx", dtype="float32")
    torch_model, _ = load(tiny_path, backend="torch", dtype="float32", device="cpu")
    return mlx_model, torch_model


def _ids(seed, shape, vocab=128):
    return np.random.default_rng(seed).integers(3, vocab, shape).astype(np.int32)


def _close(a, b, what):
    diff = np.abs(a - b).max()
    assert diff <= TOL, f"{what}: max diff {diff:.2e}"


def test_prefill_decode_and_self_conditioning(pair):
    prompt, canvas, canvas2 = _ids(0, (1, 13)), _ids(1, (1, 8)), _ids(2, (1, 8))
    caches = [m.new_cache(1) for m in pair]
    for m, c in zip(pair, caches, strict=True):
        m.encode(prompt, c)
    first = [m.decode(canvas, c) for m, c in zip(pair, caches, strict=True)]
    _close(*map(to_numpy, first), "first step")
    sc = [logits / 0.8 for logits in first]
    second = [
        to_numpy(m.decode(canvas2, c, s))
        for m, c, s in zip(pair, caches, sc, strict=True)
    ]
    _close(*second, "self-conditioned step")


def test_second_canvas_and_padded_batch(pair):
    prompt = _ids(3, (2, 11))
    mask = np.ones_like(prompt)
    mask[1, :4] = 0
    outs = []
    for m in pair:
        cache = m.new_cache(2)
        m.encode(prompt, cache, mask)
        m.encode(_ids(4, (2, 8)), cache)  # a committed canvas
        outs.append(to_numpy(m.decode(_ids(5, (2, 8)), cache)))
    _close(*outs, "padded batch, second canvas")

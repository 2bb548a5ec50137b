"""Token healing (core/healing.py): a prompt that ends inside a merge."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH
from test_speculative import HostNoise, _load

import mlx_diffgem as dg
from drafter import load_drafter
from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
from mlx_diffgem.core.healing import heal
from mlx_diffgem.core.speculative import SpecPolicy, SpeculativeModel
from mlx_diffgem.core.tokenizer import load_tokenizer

BACKENDS = [
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx")),
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(dg.default_model_path())


def test_heal_takes_back_the_last_token(tok):
    ids = tok.encode("def f(x):\n")
    trimmed, h = heal(tok, ids)
    assert trimmed == ids[:-1] and h.text == "\n"
    texts = [tok.decode([i]) for i in h.ids]
    assert all(t.startswith("\n") for t in texts)
    assert tok.encode("\n   ")[0] in h.ids  # the newline-and-indent merge
    _, h = heal(tok, tok.encode("import o"))
    assert h.text == " o" and tok.encode(" os")[0] in h.ids


def test_nothing_to_heal(tok):
    for ids in ([tok.bos_token_id], [5], tok.encode("def f(x):")):
        assert heal(tok, ids) == (ids, None)  # a lone token, or no longer merge
    ids = [*tok.encode("x"), tok.bos_token_id]
    assert heal(tok, ids) == (ids, None)  # a special token is not text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("speculative", [False, True])
def test_the_first_position_takes_an_allowed_id(tiny_path, backend, speculative):
    """On every pass (drafter's and target's), position 0 only takes allowed ids."""
    target, _ = _load(tiny_path, backend)
    model = target
    if speculative:
        drafter = load_drafter(target, "self:head_vocab=64")
        model = SpeculativeModel(target, drafter, SpecPolicy(draft_steps=3))
    allowed = np.array([7, 9, 100], np.int32)  # 100: beyond the drafter's head
    seen = []
    for seed in range(3):
        cache = target.new_cache(2)
        target.encode(np.array([[2, 10, 11], [2, 12, 13]], np.int32), cache)
        state = CanvasState(heal_ids=allowed)
        res = model.denoise(
            state, cache, DenoisePolicy(max_steps=6), HostNoise(seed), seen.append
        )
        assert np.isin(res.tokens[:, 0], allowed).all()
    for view in seen:  # every live canvas, by either model
        assert np.isin(view.argmax[:, 0], allowed).all()

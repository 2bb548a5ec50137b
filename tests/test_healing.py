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


@pytest.mark.parametrize("backend", BACKENDS)
def test_healed_text_continues_the_prompt_as_given(backend, tok):
    """The committed canvas starts with the text healing took back; the API yields
    what follows it, so prompt + text is what the model wrote after the prompt."""
    model, tok = _load(dg.default_model_path(), backend)
    for prompt in ("def add(a, b):\n", "import o", "x = [1, 2, 3]\nfor "):
        removed = heal(tok, tok.encode(prompt))[1].text
        first = next(iter(dg.stream_generate(model, tok, prompt, seed=0)))
        written = tok.decode(first.tokens.tolist())
        assert written.startswith(removed)
        assert first.text == written[len(removed) :]
    # colon-ended and newline-ended: the same prompt once healed
    a = dg.generate(model, tok, "def add(a, b):", max_tokens=64, seed=1)
    b = dg.generate(model, tok, "def add(a, b):\n", max_tokens=64, seed=1)
    assert a.startswith("\n") and b == a[1:]


def test_heal_option(tok):
    model, tok = _load(dg.default_model_path(), "torch" if HAS_TORCH else "mlx")
    ids = [tok.bos_token_id, *tok.encode("def add(a, b):\n")]
    plain = next(iter(dg.stream_generate(model, tok, ids, seed=0)))
    healed = next(iter(dg.stream_generate(model, tok, ids, seed=0, heal=True)))
    off = next(iter(dg.stream_generate(model, tok, "def add(a, b):\n", heal=False)))
    assert tok.decode(healed.tokens.tolist()).startswith("\n")
    # ids are healed only when asked; text unless told not to
    assert plain.stats.prompt_tokens == len(ids)
    assert healed.stats.prompt_tokens == len(ids) - 1
    assert off.stats.prompt_tokens == len(ids)
    with pytest.raises(ValueError, match="heal: expected True, False or None"):
        dg.generate(model, tok, "x", heal="yes")


def test_strip_healed_across_chunks():
    from mlx_diffgem.core.healing import strip_healed

    assert strip_healed("\n    return x", "\n") == ("    return x", "")
    assert strip_healed(" o", " os") == ("", "s")  # a first chunk with part of it
    assert strip_healed("s.path", "s") == (".path", "")
    assert strip_healed("x", "") == ("x", "")


def test_the_server_never_sends_the_healed_text(tok):
    """serve: TextOutput drops the text the prompt already ends with."""
    from mlx_diffgem.serve.engine import TextOutput

    ids = tok.encode("\n    return a + b")
    out = TextOutput(tok, 64, [], [1], healed="\n")
    assert out.add(ids) + out.close() == "    return a + b"


def test_cli_heals_a_prompt_ending_in_a_newline():
    import os
    import subprocess
    import sys

    def run(prompt, *flags):
        cmd = [sys.executable, "-m", "mlx_diffgem", "generate", "--prompt", prompt]
        cmd += ["--max-tokens", "64", "--seed", "3", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        return out.stdout

    colon, newline = run("def add(a, b):"), run("def add(a, b):\n")
    assert colon.startswith("\n") and newline == colon[1:]
    assert run("def add(a, b):\n", "--no-heal") != newline

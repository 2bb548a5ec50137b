"""The embedded default model: loads everywhere; both backends match transformers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH, needs_transformers

import mlx_diffgem as dg

PROMPT = "def add(a, b):\n"


@pytest.fixture(scope="module")
def path():
    return dg.default_model_path()


def test_default_model_ships_in_hf_layout(path):
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
    ):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size < 25 * 2**20
    # the asset limit is on the whole folder, the shipped drafter included
    files = [f for f in path.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 25 * 2**20


@needs_transformers
def test_transformers_loads_and_generates(path):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(path), dtype=torch.float32
    )
    tok = dg.load(path, backend="torch", device="cpu")[1]
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(PROMPT)]])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=64, max_denoising_steps=4)
    assert out.sequences.shape == (1, ids.shape[1] + 64)


@needs_transformers
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx")),
        pytest.param(
            "torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")
        ),
    ],
)
def test_logits_match_transformers(path, backend):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32)
    opts = {"device": "cpu"} if backend == "torch" else {}
    model, tok = dg.load(path, backend=backend, dtype="float32", **opts)
    ids = np.array([[tok.bos_token_id, *tok.encode(PROMPT * 3)]], np.int32)
    canvas = np.random.default_rng(0).integers(5, 4096, (1, model.config.canvas_length))
    with torch.no_grad():
        want = hf.eval()(
            input_ids=torch.tensor(ids, dtype=torch.long),
            decoder_input_ids=torch.tensor(canvas, dtype=torch.long),
        ).logits.numpy()
    cache = model.new_cache(1)
    model.encode(ids, cache)
    got = dg.to_numpy(model.decode(canvas.astype(np.int32), cache))
    assert np.abs(got - want).max() <= 1e-4


def test_load_without_arguments_generates_text():
    model, tok = dg.load()
    text = dg.generate(model, tok, PROMPT, max_tokens=64, seed=0)
    assert isinstance(text, str) and text


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx")),
        pytest.param(
            "torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")
        ),
    ],
)
def test_shipped_drafter_decodes_speculatively(backend):
    """drafter="default" loads the drafter distilled for this model (drafter/), and
    a speculative canvas costs the model fewer passes than the 48-pass cap."""
    model, tok = dg.load(backend=backend, drafter="default")
    assert model.drafter.plan.describe()["kind"] == "trained"
    ids = [tok.bos_token_id, *tok.encode("def add(a, b):")]
    prompt = np.asarray([ids], np.int32)
    out, stats = dg.generate_ids(model, prompt, max_new_tokens=64, seed=0)
    assert out.shape == (1, len(ids) + 64)
    assert stats.drafter_passes > 0 and 0 < stats.target_passes < 48

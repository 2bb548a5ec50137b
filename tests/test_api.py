"""The public API and the CLI, end to end on the stand-in default model (MLX)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import needs_mlx

pytestmark = needs_mlx


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    import mlx_diffgem as dg
    from mlx_diffgem.core.tiny import build_tiny_with_tokenizer

    path = build_tiny_with_tokenizer(tmp_path_factory.mktemp("home") / "tiny-random")
    return dg.load(path)


def test_generate_text(default):
    import mlx_diffgem as dg

    model, tok = default
    text = dg.generate(model, tok, "def f(x):", max_tokens=16, seed=0)
    assert isinstance(text, str) and len(text) > 0
    assert text == dg.generate(model, tok, "def f(x):", max_tokens=16, seed=0)


def test_stream_generate_with_drafts(default):
    import mlx_diffgem as dg

    model, tok = default
    items = list(
        dg.stream_generate(
            model, tok, "abc", max_tokens=32, seed=1, draft=True, max_denoising_steps=3
        )
    )
    drafts = [r for r in items if r.is_draft]
    commits = [r for r in items if not r.is_draft]
    assert len(commits) == 2 and commits[-1].finished and not commits[0].finished
    assert len(drafts) == sum(commits[-1].stats.steps_per_canvas)
    assert all(isinstance(r.draft, str) for r in drafts)
    d = commits[-1].stats.to_dict()
    for key in (
        "canvases",
        "target_passes",
        "drafter_passes",
        "generated_tokens",
        "tokens_per_forward",
        "prompt_tps",
        "generation_tps",
        "peak_memory_gb",
    ):
        assert key in d
    assert d["canvases"] == 2 and d["target_passes"] == 6


def test_low_level_encode_decode(default):
    import mlx_diffgem as dg

    model, _ = default
    cache = model.new_cache(1)
    model.encode(np.array([[2, 10, 11, 12]]), cache)
    logits = dg.to_numpy(model.decode(np.arange(16)[None] + 5, cache))
    assert logits.shape == (1, 16, model.config.vocab_size)
    assert np.isfinite(logits).all() and np.abs(logits).max() <= 30.0
    assert cache.offset == 4


def test_load_folder_without_tokenizer(tiny_path):
    import mlx_diffgem as dg

    _, tok = dg.load(tiny_path)
    assert tok is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"top_p": 0.9}, "top_p"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ],
)
def test_bad_arguments(default, kwargs, match):
    import mlx_diffgem as dg

    model, tok = default
    with pytest.raises(ValueError, match=match):
        dg.generate(model, tok, "abc", **kwargs)


def test_empty_prompt(default):
    import mlx_diffgem as dg

    model, tok = default
    with pytest.raises(ValueError, match="empty prompt"):
        dg.generate_ids(model, np.zeros((1, 0), np.int32))


def test_unknown_backend_and_drafter(tiny_path):
    import mlx_diffgem as dg

    with pytest.raises(ValueError, match="backend"):
        dg.load(tiny_path, backend="jax")
    with pytest.raises(ValueError, match="drafter: unknown drafter 'eagle'"):
        dg.load(tiny_path, drafter="eagle")


def _cli(*args):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "mlx_diffgem", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_cli_generate_prints_text_and_stats(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    out = _cli(
        "generate", "--prompt", "def f(x):", "--max-tokens", "64", "--backend", backend
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "tokens/forward" in out.stderr and "peak memory" in out.stderr


def test_cli_compile_is_for_torch_only():
    out = _cli("generate", "--backend", "mlx", "--compile", "--prompt", "x")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "'compile' for the mlx backend" in out.stderr


def test_cli_bad_model_is_one_line(tmp_path):
    out = _cli(
        "generate",
        "--model",
        str(tmp_path / "nope"),
        "--prompt",
        "x",
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "nope" in out.stderr


def test_load_reports_bad_checkpoints(tmp_path):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    import mlx_diffgem as dg
    from mlx_diffgem.core.errors import CheckpointError, ConfigError
    from mlx_diffgem.core.tiny import build_tiny_checkpoint

    src = build_tiny_checkpoint(tmp_path / "ok")
    bad = tmp_path / "shape"
    shutil.copytree(src, bad)
    w = load_file(str(bad / "model.safetensors"))
    w["model.decoder.layers.0.router.scale"] = np.ones(7, np.float32)
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.router\.scale has shape"):
        dg.load(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        dg.load(bad)
    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        dg.load(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        dg.load(bad)


def test_moved_module_paths_import_with_a_warning():
    """Release 0.1.0's module paths (CHANGELOG.md) still import, as the new module."""
    import importlib

    from mlx_diffgem._moved import MOVED

    for old in ("mlx_diffgem.terminal", "mlx_diffgem.openai_schema"):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
            module = importlib.import_module(old)
        assert module is importlib.import_module(MOVED[old])

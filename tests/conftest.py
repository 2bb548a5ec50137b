"""Shared fixtures: tiny seeded checkpoints, single-threaded math, optional backends."""

import os

# Tiny models on a 2-core CPU run 10-50x faster single-threaded (must precede imports).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Triton kernels run here through Triton's interpreter, which has to be on before
# triton is first imported (it builds its own library functions then).
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from mlx_diffgem.mlx_backend._blas import load_fast_blas  # noqa: E402

load_fast_blas()

HAS_MLX = importlib.util.find_spec("mlx") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

needs_mlx = pytest.mark.skipif(not HAS_MLX, reason="mlx not installed")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
needs_transformers = pytest.mark.skipif(
    not (HAS_TRANSFORMERS and HAS_TORCH), reason="transformers/torch not installed"
)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """The default tiny checkpoint (spec §6.2): every feature on, canvas 8, W = 8."""
    from mlx_diffgem.core.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_path):
    """transformers' DiffusionGemma on the tiny checkpoint (fp32, sdpa)."""
    if not (HAS_TRANSFORMERS and HAS_TORCH):
        pytest.skip("transformers/torch not installed")
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.set_num_threads(1)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(tiny_path), dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()

"""`backend="auto"`: the fastest installed backend for this machine.

- Apple silicon: MLX (Metal GPU, unified memory).
- Otherwise torch when installed: CUDA where there is a GPU, and on a CPU-only Linux
  machine torch's CPU kernels generate ~3x faster than MLX's CPU backend on the
  embedded model (bench/results/backends-*.json, `python -m bench.backends`).
- MLX when it is the only backend installed.

Only checks what is installed (no import of mlx or torch), so the choice costs nothing.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

# Options that only the torch backend takes: asking for one picks torch.
TORCH_ONLY = ("device", "compile", "max_len")


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def choose_backend(options: dict | None = None) -> str:
    """The backend `auto` stands for, given the backend options of `load`."""
    has_mlx, has_torch = installed("mlx"), installed("torch")
    if has_torch and any(k in (options or {}) for k in TORCH_ONLY):
        return "torch"
    if has_mlx and apple_silicon():
        return "mlx"
    if has_torch:
        return "torch"
    if has_mlx:
        return "mlx"
    raise ImportError(
        "backend: neither mlx nor torch is installed; pip install "
        "'mlx-diffgem[mlx]' (macOS), 'mlx-diffgem[cpu]' (Linux) or "
        "'mlx-diffgem[torch]' (NVIDIA)"
    )


def resolve_backend(backend: str, options: dict | None = None) -> str:
    """`backend`, with "auto" replaced by this machine's choice."""
    return choose_backend(options) if backend == "auto" else backend

"""`backend="auto"`: the fastest installed backend for this machine.

- Apple silicon: MLX (Metal GPU, unified memory).
- Otherwise torch when installed: CUDA where there is a GPU, and on a CPU-only Linux
  machine torch's CPU kernels generate 2.3x faster than MLX's CPU backend on the
  embedded model (bench/results/backends-*.json, `python -m bench.backends`).
- MLX when it is the only backend installed, or for work only MLX does: 4-bit and
  mixed quantization, checkpoints converted (quantized) for MLX.

Only checks what is installed (no import of mlx or torch), so the choice costs nothing.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any

# Options that only the torch backend takes: asking for one picks torch.
TORCH_ONLY = ("device", "compile", "max_len")


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def mlx_only(path: Any = None, quantization: Any = None) -> bool:
    """Quantization the torch backend lacks (it has int8 and fp8 only), or a local
    checkpoint that `diffgem convert` quantized for MLX."""
    if quantization is not None and quantization not in ("int8", "fp8"):
        # torch's int8 is per channel: {"bits": 8} only, no group size
        q = quantization if isinstance(quantization, dict) else {}
        if q.get("bits") != 8 or "group_size" in q:
            return True
    config = Path(str(path)) / "config.json" if path is not None else None
    if config is None or not config.is_file():
        return False  # a repo id, or no checkpoint: the loader reports it
    try:
        return "quantization" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def choose_backend(
    options: dict | None = None, *, path: Any = None, quantization: Any = None
) -> str:
    """The backend `auto` stands for, given the arguments of `load`."""
    has_mlx, has_torch = installed("mlx"), installed("torch")
    if has_torch and any(k in (options or {}) for k in TORCH_ONLY):
        return "torch"
    if has_mlx and (apple_silicon() or mlx_only(path, quantization)):
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


def resolve_backend(backend: str, options: dict | None = None, **load_args) -> str:
    """`backend`, with "auto" replaced by this machine's choice (`load_args`: path,
    quantization)."""
    return choose_backend(options, **load_args) if backend == "auto" else backend

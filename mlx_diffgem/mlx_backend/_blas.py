"""Load a fast BLAS for MLX's CPU backend on Linux, before `mlx.core` is imported.

The `mlx-cpu` wheel links the reference BLAS (float32 matmul ~3 GFLOP/s); preloading
OpenBLAS with RTLD_GLOBAL makes MLX resolve its cblas symbols there (~20-40x faster).
A no-op on macOS (Accelerate); on Linux without OpenBLAS, `import_mlx` warns once.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: list[str] = []
_warned: list[bool] = []

MISSING = (
    "warning: OpenBLAS not found; MLX's CPU backend falls back to its reference BLAS "
    "(~2.5x slower generation). Install it (Debian/Ubuntu: apt-get install "
    "libopenblas0-pthread) or use --backend torch."
)


def load_fast_blas() -> list[str]:
    """Preload OpenBLAS once; returns the libraries loaded (empty when none)."""
    if loaded or not sys.platform.startswith("linux"):
        return loaded
    if "mlx.core" in sys.modules or os.environ.get("DIFFGEM_NO_BLAS"):
        return loaded  # too late (or disabled): MLX already bound its BLAS
    for pattern in _CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded.append(path)
            except OSError:
                continue
    return loaded


def import_mlx():
    """`mlx.core`, imported after the fast BLAS is in place."""
    fresh = "mlx.core" not in sys.modules
    if not load_fast_blas() and fresh:
        warn_missing()
    import mlx.core as mx

    return mx


def warn_missing() -> None:
    """Say once (stderr) that MLX runs without a fast BLAS on this Linux machine."""
    if _warned or not sys.platform.startswith("linux"):
        return
    if os.environ.get("DIFFGEM_NO_BLAS"):
        return  # the user turned the preload off on purpose
    _warned.append(True)
    print(MISSING, file=sys.stderr)

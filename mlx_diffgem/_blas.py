"""Load a fast BLAS for MLX's CPU backend on Linux, before `mlx.core` is imported.

The `mlx-cpu` wheel links the reference BLAS (float32 matmul ~3 GFLOP/s); preloading
OpenBLAS with RTLD_GLOBAL makes MLX resolve its cblas symbols there (~20-40x faster).
A no-op on macOS (Accelerate) and when no OpenBLAS is installed.
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
    load_fast_blas()
    import mlx.core as mx

    return mx

"""mlx-diffgem: DiffusionGemma on Apple silicon (MLX) and NVIDIA (PyTorch).

The public API is imported lazily so that `import mlx_diffgem` pulls in neither mlx nor
torch; the backend named in `load` is imported on first use.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from ._moved import MovedFinder

__version__ = "0.1.0"

_API = {
    "load": "mlx_diffgem.api",
    "generate": "mlx_diffgem.api",
    "stream_generate": "mlx_diffgem.api",
    "generate_ids": "mlx_diffgem.core.generate",
    "default_model_path": "mlx_diffgem.core.checkpoint",
    "to_numpy": "mlx_diffgem.core.backend",
    "SeededNoise": "mlx_diffgem.core.noise",
    "ReplayNoise": "mlx_diffgem.core.noise",
    "GenerationConfig": "mlx_diffgem.core.config",
    "ModelConfig": "mlx_diffgem.core.config",
    "Response": "mlx_diffgem.core.stats",
    "Stats": "mlx_diffgem.core.stats",
    "SpecPolicy": "mlx_diffgem.core.speculative",
    "infill": "mlx_diffgem.core.infill",
    "edit": "mlx_diffgem.core.infill",
    "fill": "mlx_diffgem.core.infill",
    "hole": "mlx_diffgem.core.infill",
    "HOLE": "mlx_diffgem.core.infill",
    "Hole": "mlx_diffgem.core.infill",
    "FillResult": "mlx_diffgem.core.infill",
}

__all__ = sorted(_API)

# Old module paths (release 0.1.0) import for one more release, with a warning.
if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(MovedFinder())


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mlx_diffgem' has no attribute {name!r}")

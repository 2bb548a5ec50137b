"""MLX weight preparation and quantization (name mapping, shape checks, nn.quantize)."""

from __future__ import annotations

from mlx_diffgem._blas import import_mlx
from mlx_diffgem.core import checkpoint
from mlx_diffgem.core.config import ModelConfig

mx = import_mlx()


def prepare(model, config: ModelConfig, weights: dict, source: str) -> dict:
    """Checkpoint arrays -> the model's parameter names, checked against the config."""
    mapped = {}
    for name, value in weights.items():
        internal = checkpoint.hf_to_internal(name)
        if internal is not None:
            mapped[internal] = value
    checkpoint.check_shapes(
        {k: tuple(v.shape) for k, v in mapped.items()}, config, source
    )
    return model.sanitize(mapped)


def quantize_model(model, config: ModelConfig, spec) -> None:
    raise ValueError("quantization: quantize-on-load is not implemented yet")

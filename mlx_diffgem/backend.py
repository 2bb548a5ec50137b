"""The MLX backend: loads a checkpoint, implements the Backend protocol (DESIGN §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlx_diffgem._blas import import_mlx
from mlx_diffgem.core import checkpoint
from mlx_diffgem.core.backend import (
    CanvasResult,
    CanvasState,
    DenoisePolicy,
    check_batch_size,
    check_encode,
    check_ids,
)
from mlx_diffgem.core.config import GenerationConfig, ModelConfig
from mlx_diffgem.core.errors import CheckpointError
from mlx_diffgem.core.noise import NoiseSource

from . import canvas as _canvas
from . import quantize
from .cache import make_cache
from .model import Model

mx = import_mlx()

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def default_dtype() -> str:
    # bf16 on Apple GPUs; float32 on CPU, where bf16 matmuls are slow and gather_mm
    # refuses bf16.
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


class MLXTarget:
    """A DiffusionGemma loaded with MLX."""

    backend = "mlx"

    def __init__(
        self,
        model: Model,
        config: ModelConfig,
        generation_config: GenerationConfig,
        path: Path,
    ):
        self.model = model
        self.config = config
        self.generation_config = generation_config
        self.path = path

    def new_cache(self, batch_size: int):
        return make_cache(self.model, check_batch_size(batch_size))

    def encode(self, ids: Any, cache, attention_mask: Any = None) -> None:
        """Causal pass over `ids` [B, S] that appends their K/V to `cache`."""
        ids, mask = check_encode(
            ids, attention_mask, cache.batch_size, self.config.vocab_size
        )
        mask = None if mask is None else mx.array(mask)
        self.model.encode(mx.array(ids), cache, attention_mask=mask)
        # Materialize per chunk: bounds the peak memory of a chunked prefill.
        mx.eval(cache.state)

    def decode(self, canvas_ids: Any, cache, self_conditioning: Any = None) -> mx.array:
        """One bidirectional denoiser pass: [B, C] ids -> [B, C, V] float32 logits."""
        if not isinstance(canvas_ids, mx.array):
            canvas_ids = mx.array(
                check_ids(canvas_ids, self.config.vocab_size, "canvas_ids")
            )
        return self.model.decode(canvas_ids, cache, self_conditioning)

    def denoise(
        self,
        state: CanvasState,
        cache,
        policy: DenoisePolicy,
        noise: NoiseSource,
        on_step=None,
    ) -> CanvasResult:
        return _canvas.denoise(self.model, state, cache, policy, noise, on_step)

    def denoise_steps(
        self, state: CanvasState, cache, policy: DenoisePolicy, noise: NoiseSource
    ):
        """`denoise` as a generator of StepViews (live drafts); returns the result."""
        return _canvas.denoise_steps(
            self.model, state, cache, policy, noise, views=True
        )

    def sync(self) -> None:
        mx.synchronize()

    def peak_memory(self) -> int:
        return int(mx.get_peak_memory())


def to_numpy(x: Any) -> np.ndarray:
    return np.array(x)


def _load_arrays(files: list[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mx.load raises bare RuntimeErrors
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def build_model(config: ModelConfig, files: list[Path], dtype: str) -> Model:
    """A Model with the files' weights (quantized as config.json says), not evaluated.

    Arrays stay lazy (mx.load maps the files), so `convert` can stream a checkpoint
    larger than memory through quantization shard by shard.
    """
    model = Model(config)
    weights = quantize.prepare(model, config, _load_arrays(files), files[0].name)
    weights = {
        k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    return model


def load(
    path: str | Path,
    *,
    dtype: str | None = None,
    quantization: dict | str | None = None,
    **kwargs: Any,
) -> MLXTarget:
    """Load a DiffusionGemma checkpoint (HF layout, or an MLX conversion) with MLX."""
    if kwargs:
        raise ValueError(
            f"load: unexpected argument {sorted(kwargs)[0]!r} for the mlx backend"
        )
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    recipe = None if quantization is None else quantize.parse_spec(quantization)
    folder = checkpoint.resolve(path)
    config = checkpoint.load_config(folder)
    model = build_model(config, checkpoint.weight_files(folder), dtype)
    if recipe is not None:
        quantize.quantize_model(model, config, recipe)
    mx.eval(model.parameters())
    gen = checkpoint.load_generation_config(folder)
    return MLXTarget(model, config, gen, folder)

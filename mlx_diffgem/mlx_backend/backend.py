"""The MLX backend: loads a checkpoint, implements the Backend protocol (DESIGN §3)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from mlx_diffgem.core import checkpoint
from mlx_diffgem.core.backend import (
    CanvasResult,
    CanvasState,
    DenoisePolicy,
    check_batch_size,
    check_decode,
    check_encode,
    check_ids,
)
from mlx_diffgem.core.config import GenerationConfig, ModelConfig
from mlx_diffgem.core.errors import CheckpointError
from mlx_diffgem.core.layout import HiddenLayout, check_hidden
from mlx_diffgem.core.noise import NoiseSource
from mlx_diffgem.core.plan import PassPlan

from . import canvas as _canvas
from . import quantize
from ._blas import import_mlx
from .cache import make_cache
from .canvas import narrow
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
    plan: PassPlan | None = None  # a drafter's view of the model (`planned`)

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

    def decode(
        self,
        canvas_ids: Any,
        cache,
        self_conditioning: Any = None,
        layout: HiddenLayout | None = None,
    ) -> mx.array:
        """One bidirectional denoiser pass: [B, C] ids -> [B, C, V] float32 logits
        ([B, C, head_vocab] for a planned view with a sub-vocabulary head).

        canvas_ids: [B, C] (numpy or mx) with C the model's canvas_length;
        self_conditioning: [B, C, V] logits (numpy or mx) or None;
        layout: a HiddenLayout (core/layout.py): canvas_ids are [B, 2C], query
        slots then reference slots, and the logits are the query slots' [B, C, V].
        """
        if layout is None:
            shape = check_decode(self, canvas_ids, cache, self_conditioning)
        else:
            shape = check_hidden(self, canvas_ids, cache, self_conditioning, layout)
        if not isinstance(canvas_ids, mx.array):
            canvas_ids = check_ids(canvas_ids, self.config.vocab_size, "canvas_ids")
        sc = self_conditioning
        if sc is not None and not isinstance(sc, mx.array):
            sc = np.asarray(sc, np.float32)
        sc = None if sc is None else mx.array(sc).astype(self.model.dtype)
        canvas = mx.array(canvas_ids).reshape(shape)
        sc = narrow(sc, self.plan)
        return self.model.decode(canvas, cache, sc, self.plan, layout)

    def denoise(
        self,
        state: CanvasState,
        cache,
        policy: DenoisePolicy,
        noise: NoiseSource,
        on_step=None,
    ) -> CanvasResult:
        return _canvas.denoise(
            self.model, state, cache, policy, noise, on_step, self.plan
        )

    def denoise_steps(
        self, state: CanvasState, cache, policy: DenoisePolicy, noise: NoiseSource
    ):
        """`denoise` as a generator of StepViews (live drafts); returns the result."""
        return _canvas.denoise_steps(
            self.model, state, cache, policy, noise, True, self.plan
        )

    def planned(self, plan: PassPlan) -> MLXTarget:
        """This model with every denoising pass run under `plan`: a drafter made of
        its weights, reading the same cache (DESIGN §4)."""
        view = copy.copy(self)
        view.plan = plan
        return view

    @property
    def role(self) -> str:
        """What its live canvases are labelled with in stream_generate(draft=True)."""
        return "target" if self.plan is None else "drafter"

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
    dtype = check_dtype(dtype)
    recipe = None if quantization is None else quantize.parse_spec(quantization)
    folder = checkpoint.resolve(path)
    config = checkpoint.load_config(folder)
    # Both configs and every tensor header are checked before any weight is read.
    gen = checkpoint.load_generation_config(folder, config)
    checkpoint.check_checkpoint(folder, config)
    files = checkpoint.weight_files(folder)
    model = build_model(config, files, dtype)
    if recipe is not None:
        quantize.quantize_model(model, config, recipe)
    mx.eval(model.parameters())
    check_finite(model, files[0].parent)
    return MLXTarget(model, config, gen, folder)


def check_dtype(dtype: str | None) -> str:
    """The dtype name to load in: `dtype`, checked, or the device's default."""
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype != "float32" and mx.default_device() == mx.cpu:
        raise ValueError(
            f"dtype: {dtype} is not supported by MLX on the CPU (its expert matmul, "
            "gather_mm, runs float32 only); use dtype='float32' or backend='torch'"
        )
    return dtype


def check_finite(model: Model, source: Path) -> None:
    """Refuse NaN/inf weights by name (they would give empty or garbage text)."""
    from mlx.utils import tree_flatten

    params = [
        (k, v)
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating)
    ]
    for s in range(0, len(params), 64):  # a few syncs; bounded temporaries
        chunk = params[s : s + 64]
        ok = np.array(mx.stack([mx.isfinite(v).all() for _, v in chunk]))
        if not ok.all():
            name = chunk[int(np.flatnonzero(~ok)[0])][0]
            raise CheckpointError(f"{source}: tensor {name} has NaN or infinite values")

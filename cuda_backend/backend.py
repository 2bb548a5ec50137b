"""The PyTorch backend: loads a checkpoint, implements the Backend protocol (DESIGN §3).

bf16 on CUDA, float32 on CPU by default. The MLX twin is
`mlx_diffgem/mlx_backend/backend.py`.
"""

from __future__ import annotations

import copy
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from . import expert_gemm, quantize, sampling
from .cache import Cache
from .canvas import narrow
from .compile import check_mode as check_compile
from .compile import compile_model
from .model import Model, use_expert_path

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("cuda", "cpu", "mps")
# Initial capacity of the full-attention K/V buffers (they grow by doubling).
DEFAULT_MAX_LEN = 4096


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: torch.device) -> str:
    # bf16 on GPUs (the release dtype); float32 on CPU, where bf16 matmuls are slow.
    return "float32" if device.type == "cpu" else "bfloat16"


class TorchTarget:
    """A DiffusionGemma loaded with PyTorch."""

    backend = "torch"
    plan: PassPlan | None = None  # a drafter's view of the model (`planned`)

    def __init__(
        self,
        model: Model,
        config: ModelConfig,
        generation_config: GenerationConfig,
        path: Path,
        max_len: int = DEFAULT_MAX_LEN,
    ):
        self.model = model
        self.config = config
        self.generation_config = generation_config
        self.path = path
        self.max_len = max_len
        # Fixed before the first (compiled) pass traces it: expert_gemm.PATHS.
        self.expert_path = use_expert_path(model)
        model.fused_sampler = sampling.use_fused(self.device)
        note = expert_gemm.slow_note(self.expert_path, self.device)
        if note is not None:
            warnings.warn(note, stacklevel=2)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch_size: int) -> Cache:
        check_batch_size(batch_size)
        static = self.model.compiled  # buffers CUDA graphs may write into
        graphs, spare = self.model.graphs, None
        key = (batch_size, self.max_len, self.model.dtype)
        if graphs is not None:  # the last cache's buffers: its graphs replay
            spare = graphs.spares.take(key)
        cache = Cache(
            self.config,
            batch_size,
            self.max_len,
            self.device,
            self.model.dtype,
            static,
            spare,
        )
        if graphs is not None:
            graphs.spares.watch(cache, key)
        return cache

    def encode(self, ids: Any, cache: Cache, attention_mask: Any = None) -> None:
        """Causal pass over `ids` [B, S] that appends their K/V to `cache`."""
        ids, mask = check_encode(
            ids, attention_mask, cache.batch_size, self.config.vocab_size
        )
        self.model.encode(torch.as_tensor(ids, device=self.device).long(), cache, mask)

    def decode(
        self,
        canvas_ids: Any,
        cache: Cache,
        self_conditioning: Any = None,
        layout: HiddenLayout | None = None,
    ) -> torch.Tensor:
        """One bidirectional denoiser pass: [B, C] ids -> [B, C, V] float32 logits
        ([B, C, head_vocab] for a planned view with a sub-vocabulary head).

        canvas_ids: [B, C] (numpy or torch) with C the model's canvas_length;
        self_conditioning: [B, C, V] logits (numpy or torch) or None;
        layout: a HiddenLayout (core/layout.py): canvas_ids are [B, 2C], query
        slots then reference slots, and the logits are the query slots' [B, C, V].
        """
        if layout is None:
            shape = check_decode(self, canvas_ids, cache, self_conditioning)
        else:
            shape = check_hidden(self, canvas_ids, cache, self_conditioning, layout)
        if not isinstance(canvas_ids, torch.Tensor):
            canvas_ids = check_ids(canvas_ids, self.config.vocab_size, "canvas_ids")
        canvas_ids = torch.as_tensor(canvas_ids, device=self.device).long()
        sc = self_conditioning
        if sc is not None:
            sc = torch.as_tensor(sc, device=self.device).to(self.model.dtype)
        canvas = canvas_ids.reshape(shape)
        sc = narrow(sc, self.plan)
        return self.model.decode(canvas, cache, sc, self.plan, layout)

    def denoise(
        self,
        state: CanvasState,
        cache: Cache,
        policy: DenoisePolicy,
        noise: NoiseSource,
        on_step=None,
    ) -> CanvasResult:
        return _canvas.denoise(
            self.model, state, cache, policy, noise, on_step, self.plan
        )

    def denoise_steps(
        self, state: CanvasState, cache: Cache, policy: DenoisePolicy, noise
    ):
        """`denoise` as a generator of StepViews (live drafts) returning the result."""
        return _canvas.denoise_steps(
            self.model, state, cache, policy, noise, True, self.plan
        )

    def planned(self, plan: PassPlan) -> TorchTarget:
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def peak_memory(self) -> int:
        """Peak bytes: device allocations on CUDA/MPS, the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.device.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes vs KiB


def to_numpy(x: Any) -> np.ndarray:
    """A host copy of a backend array (bf16 becomes float32: numpy has no bf16)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """The dtype name to load in: `dtype`, checked, or the device's default."""
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


def _device(device: str | torch.device | None) -> torch.device:
    try:
        dev = torch.device(device or default_device())
    except RuntimeError:  # torch's message lists every device type it knows
        dev = None
    if dev is None or dev.type not in DEVICES:
        raise ValueError(
            f"device: expected one of {', '.join(DEVICES)}, got {device!r}"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch sees no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: 'mps' requested but torch sees no MPS device")
    return dev


def load_tensors(
    files: list[Path], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Internal name -> tensor on `device`; floats cast to `dtype`, vision skipped."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                for name in fh.keys():
                    internal = checkpoint.hf_to_internal(name)
                    if internal is None:
                        continue
                    t = fh.get_tensor(name)
                    out[internal] = t.to(dtype) if t.is_floating_point() else t
        except SafetensorError as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return out


def load(
    path: str | Path,
    *,
    dtype: str | None = None,
    quantization: dict | str | None = None,
    device: str | torch.device | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    compile: bool | str = False,
) -> TorchTarget:
    """Load a DiffusionGemma checkpoint (Hugging Face layout) with PyTorch.

    Args:
        path: a checkpoint folder or a Hugging Face repo id.
        dtype: "bfloat16" | "float16" | "float32" (default: bf16 on GPU, fp32 on CPU).
        quantization: "int8" (or {"bits": 8}): weight-only int8; "fp8" (or
            {"bits": 8, "mode": "fp8"}): e4m3 weights with per-row scales, through
            torch._scaled_mm where it runs; see quantize.py.
        device: "cuda" | "cpu" | "mps" (default: cuda if available, else cpu).
        max_len: initial K/V capacity of the full-attention layers (grows as needed).
        compile: run the decoder pass and the sampler step through `torch.compile`
            (dynamic shapes: one graph for every cache length): True = mode
            "default", or a torch.compile mode; "reduce-overhead" adds CUDA graphs
            on CUDA (see compile.py). Compiles on the first step (tens of seconds).
    """
    dev = _device(device)
    dtype = resolve_dtype(dtype, dev)
    if quantization is not None:
        quantize.check_mode(quantization)
    mode = check_compile(compile)
    folder = checkpoint.resolve(path)
    config = checkpoint.load_config(folder)
    if config.quantization:
        raise CheckpointError(
            f"{folder / 'config.json'}: MLX-quantized checkpoints load with backend "
            "'mlx'; the torch backend expects the Hugging Face weights"
        )
    # Both configs and every tensor header are checked before any weight is read.
    gen = checkpoint.load_generation_config(folder, config)
    checkpoint.check_checkpoint(folder, config)
    tensors = load_tensors(checkpoint.weight_files(folder), dev, DTYPES[dtype])
    check_finite(tensors, folder)
    with torch.device("meta"):
        model = Model(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.init_buffers()
    model.eval().requires_grad_(False)
    if quantization is not None:
        quantize.quantize_model(model, quantization)
    if mode is not None:
        compile_model(model, mode)
    return TorchTarget(model, config, gen, folder, max_len)


def check_finite(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse NaN/inf weights by name (they would give garbage text or a sampler
    error deep in a step)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor {name} has NaN or infinite values")

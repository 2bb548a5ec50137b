"""torch.compile for the decoder pass and the sampler's per-step math.

`compile_model(model, mode)` replaces `model.decode` with a compiled one and adds
`model.score`, the compiled `sampling.score` (temperature, argmax and entropy fused
into one pass over the [B, C, V] logits) that the canvas loop uses when present.

- Shapes are dynamic: the cache length changes at every canvas, the batch and the
  canvas do not, so one graph serves a whole generation.
- The experts' grouped GEMM stays the eager kernel in float32 (`model.grouped_linear`),
  so the decoder compiles to one graph without host syncs on CPU and GPU.
- mode "reduce-overhead" (or "max-autotune") also records CUDA graphs on CUDA (one
  per cache length, reused by every step of a canvas). A replay overwrites the
  previous replay's output, and the loop feeds each step's logits back as the next
  step's self-conditioning, so the compiled decoder returns a copy. The decoder
  writes the canvas K/V into the cache's spare rows; a compiled model's caches mark
  their buffers as static addresses (`cache._static`) so that graphs may do that.
  On CPU these modes compile like "default". Not yet run on a GPU here.
"""

from __future__ import annotations

import torch

from . import sampling
from .model import Model

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_mode(compile: bool | str) -> str | None:
    """The torch.compile mode of a `load(compile=...)` argument, None for eager."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile in MODES:
        return compile
    raise ValueError(
        f"compile: expected True, False or one of {', '.join(MODES)}, got {compile!r}"
    )


def compile_model(model: Model, mode: str = "default") -> Model:
    """Compile `model.decode` and the sampler step in place; returns the model."""
    model.compiled = True  # its passes now run under no_grad (see Model.compiled)
    decode = torch.compile(model.decode, mode=mode, dynamic=True)
    if mode in _GRAPH_MODES and model.embed_tokens.weight.is_cuda:

        def decode_graphed(*args, **kwargs) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return decode(*args, **kwargs).clone()

        model.decode = decode_graphed
    else:
        model.decode = decode
    # The sampler is elementwise work and reductions: fusion, not graphs, is the win.
    sampler_mode = "default" if mode in _GRAPH_MODES else mode
    model.score = torch.compile(sampling.score, mode=sampler_mode, dynamic=True)
    return model

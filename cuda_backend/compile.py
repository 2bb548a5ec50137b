"""torch.compile for the decoder layers and the sampler's per-step math.

`compile_model(model, mode)` compiles the model's passes and adds `model.score`, the
compiled `sampling.score` (temperature, argmax and entropy fused into one pass over
the [B, C, V] logits) that the canvas loop uses when present.

- Scope (`DIFFGEM_COMPILE_SCOPE`): "layer" (default) compiles one decoder-mode
  layer and reuses it for every layer of its kind (regional compilation: a graph
  for the sliding and one for the full-attention layers, and their variants as the
  cache fills), so compile time does not grow with the 30 layers of the released
  shape; the prompt's encoder passes stay eager, as with "decoder", which
  compiles the whole decoder pass as one graph (more fusion, minutes to compile at
  the released shape: 4 min on an H200). Inductor caches what it compiles
  (TORCHINDUCTOR_CACHE_DIR, under /tmp by default): a second process reuses it.
- Shapes are dynamic: the cache length changes at every canvas, the batch and the
  canvas do not, so one graph serves a whole generation.
- The experts' grouped GEMM is an opaque op in float32 or on Triton
  (`expert_gemm`), so the compiled code has no host syncs on the fast paths.
- mode "reduce-overhead" (or "max-autotune") also records CUDA graphs on CUDA. In
  the layer scope: the layers compile without graphs of their own, and the whole
  plain decoder pass is captured once per context bucket (`graphs.GraphedDecode`,
  fixed shapes with the cached length on the device). In the decoder scope: torch's
  own graphs, one per cache length, reused by every step of a canvas. Either way a
  replay overwrites the previous replay's output, and the loop feeds each step's
  logits back as the next step's self-conditioning, so the decoder returns a copy.
  The decoder writes the canvas K/V into the cache's spare rows; a compiled model's
  caches mark their buffers as static addresses (`cache._static`). On CPU these
  modes compile like "default" (the tests run the bucketed pass with a stand-in
  recorder). Not yet run on a GPU.
"""

from __future__ import annotations

import os

import torch

from . import sampling
from .model import Model

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# What a layer compiles with when the whole pass is one CUDA graph (layer scope).
_LAYER_MODES = {
    "reduce-overhead": "default",
    "max-autotune": "max-autotune-no-cudagraphs",
}
SCOPES = ("layer", "decoder")
SCOPE_ENV = "DIFFGEM_COMPILE_SCOPE"


def scope() -> str:
    """What one compiled graph covers: a decoder layer (default) or the whole pass."""
    value = os.environ.get(SCOPE_ENV, "layer")
    if value not in SCOPES:
        raise ValueError(
            f"{SCOPE_ENV}: expected one of {', '.join(SCOPES)}, got {value!r}"
        )
    return value


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


def _decoder_layer(layer, h, rot, mask, layer_cache, top_k):
    """One decoder-mode layer; compiled once, the layer is an input (its weights
    are graph inputs), so every layer of a kind runs the same graph."""
    return layer(h, rot, mask, layer_cache, False, top_k)


def compile_model(model: Model, mode: str = "default") -> Model:
    """Compile the passes (see `scope`) and the sampler step in place; the model."""
    model.compiled = True  # its passes now run under no_grad (see Model.compiled)
    if scope() == "layer":
        # Graph modes: the compiled layers (no graphs of their own) inside one
        # CUDA graph of the whole pass per context bucket (cuda_backend/graphs.py).
        layer_mode = _LAYER_MODES.get(mode, mode)
        model.decoder_layer = torch.compile(
            _decoder_layer, mode=layer_mode, dynamic=True
        )
        if mode in _GRAPH_MODES and model.embed_tokens.weight.is_cuda:
            from .graphs import GraphedDecode

            model.graphs = GraphedDecode(model)
        decode = model.decode
    else:
        decode = torch.compile(model.decode, mode=mode, dynamic=True)
    if (
        mode in _GRAPH_MODES
        and model.graphs is None
        and model.embed_tokens.weight.is_cuda
    ):

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

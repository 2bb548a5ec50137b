"""A preset's random weights built directly on a torch device, with no checkpoint.

The released shape is ~51 GB in bf16: writing it to disk and reading it back costs
minutes of a lent GPU's time and most of its 64 GB disk. Timing needs the weights'
shapes and distributions, not particular values, so `torch_target` allocates the model
on the device and fills each tensor with the recipe the checkpoint writer uses
(`checkpoints._init`: same init kind and scale per tensor), drawn by the device's own
generator, seeded per tensor by its name. Records made this way say
`"weights": "random-on-device"`.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from mlx_diffgem.core.config import GenerationConfig, ModelConfig

from . import checkpoints


def _fill(t: torch.Tensor, kind: str, scale: float, gen: torch.Generator) -> None:
    if kind == "const":
        t.fill_(scale)
        return
    t.normal_(0.0, 1.0, generator=gen)
    if kind == "normal":
        t.mul_(scale)
        return
    t.mul_(0.3).add_(1.0)  # ones_ish: 1 + 0.3 N(0, 1); q/k norms scaled once more
    if kind == "qk_norm":
        t.mul_(scale)


def fill_named(t: torch.Tensor, name: str, seed: int, gen: torch.Generator) -> None:
    """Tensor `t` (internal name `name`) in place, from a generator seeded by the
    name: the same numbers whatever order a model lists its tensors in, so that
    transformers' model (`peer_weights`) gets exactly ours."""
    gen.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    with torch.no_grad():
        _fill(t, *checkpoints._init(name), gen)


def init_random(model: torch.nn.Module, seed: int) -> None:
    """Every weight and layer scalar of `model`, in place, on its own device."""
    gen = torch.Generator(device=next(model.parameters()).device)
    for name, t in model.state_dict(keep_vars=True).items():
        fill_named(t, name, seed, gen)


def torch_target(
    preset: str,
    *,
    device: str | torch.device,
    dtype: str | None = None,
    seed: int = 0,
    canvas: int | None = None,
    compile: bool | str = False,
    quantization: str | None = None,
):
    """A TorchTarget of `preset` with random weights made on `device` (then
    quantized, "int8" or "fp8", when asked)."""
    from cuda_backend import backend, quantize
    from cuda_backend.compile import check_mode, compile_model
    from cuda_backend.model import Model

    dev = backend._device(device)
    dtype = backend.resolve_dtype(dtype, dev)
    mode = check_mode(compile)
    raw = checkpoints.preset_config(preset, canvas)
    cfg = ModelConfig.from_dict(raw, f"preset {preset}")
    with torch.device("meta"):
        model = Model(cfg).to(backend.DTYPES[dtype])
    model.to_empty(device=dev)  # one allocation per tensor, in the final dtype
    init_random(model, seed)
    model.init_buffers()
    model.eval().requires_grad_(False)
    if quantization is not None:
        quantize.quantize_model(model, quantization)
    if mode is not None:
        compile_model(model, mode)
    gen = GenerationConfig.from_dict(checkpoints.BENCH_GENERATION)
    where = Path(f"<random-on-device:{preset}:{seed}>")
    return backend.TorchTarget(model, cfg, gen, where)

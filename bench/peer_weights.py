"""transformers' DiffusionGemma with our random device weights, for timing it on a GPU.

`from_pretrained` builds the encoder's and the decoder's copies of the shared weights
and ties them afterwards: ~102 GB at the released shape in bf16, which neither fits
beside our model nor on an H100. Here the model is built with its parameters on the
meta device (the tying happens there, for free); each distinct tensor is then
allocated once on the device and filled by the recipe `device_weights` fills ours
with, seeded by the tensor's name, so the two implementations multiply the same
numbers (on the CPU, `tests/test_bench.py` checks equal logits). Buffers that the
model computes itself (rotary frequencies, embedding scales) are built normally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mlx_diffgem.core import checkpoint
from mlx_diffgem.core.config import ModelConfig

from . import checkpoints
from .device_weights import fill_named

OTHER_STD = 0.02  # tensors text never reads (the vision tower): finite, small


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (its buffers do
    not), so building a 26B-parameter model allocates nothing."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            meta = param.to("meta")
            self._parameters[name] = nn.Parameter(meta, param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """As `from_pretrained(dtype=...)` builds a model: parameters in that dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """One allocation per distinct parameter (tied ones stay one tensor)."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                if id(p) not in made:
                    empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                    made[id(p)] = nn.Parameter(empty, requires_grad=False)
                module._parameters[key] = made[id(p)]
    model.to(device)  # the buffers


def _checkpoint_tensors(model: nn.Module) -> dict[int, tuple[str, torch.Tensor]]:
    """Each distinct tensor of `model` by id: (internal name, tensor); a tied
    tensor takes the name its decoder alias has in the checkpoint."""
    named = [*model.named_parameters(remove_duplicate=False)]
    named += [*model.named_buffers(remove_duplicate=False)]
    found: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in named:
        if not name.startswith("model.decoder.") and "layer_scalar" not in name:
            continue  # the head and the encoder's tied weights: aliases of these
        internal = checkpoint.hf_to_internal(name)
        if internal is not None:
            found[id(t)] = (internal, t)
    return found


def fill(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Every checkpoint tensor of `model` as ours (same name, same numbers), the
    rest small and finite; raises when a checkpoint tensor is missing or off-shape."""
    want = checkpoint.expected_shapes(cfg)
    found = _checkpoint_tensors(model)
    by_name = {name: t for name, t in found.values()}
    missing = sorted(set(want) - set(by_name))
    if missing:
        raise RuntimeError(
            f"transformers model lacks {missing[:3]} (of {len(missing)})"
        )
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    for name, shape in want.items():
        t = by_name[name]
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(
                f"{name}: transformers has {tuple(t.shape)}, want {shape}"
            )
        fill_named(t, name, seed, gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) not in found:
                gen.manual_seed(len(name))
                p.normal_(0.0, OTHER_STD, generator=gen)


def transformers_model(
    preset: str,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    canvas: int | None = None,
) -> nn.Module:
    """`DiffusionGemmaForBlockDiffusion` of `preset` (sdpa attention), eval mode, with
    the weights `device_weights.torch_target` gives ours for the same seed."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    raw = checkpoints.preset_config(preset, canvas)
    config = DiffusionGemmaConfig.from_dict(raw)
    config._attn_implementation = "sdpa"
    with _default_dtype(dtype), _params_on_meta():
        model = DiffusionGemmaForBlockDiffusion(config)
    _materialize(model, torch.device(device))
    fill(model, ModelConfig.from_dict(raw), seed)
    return model.eval()

"""Weight-only int8 for the torch backend: a module swap after loading.

Every Linear except the router, and both fused expert tensors, keep int8 weights with
one scale per output channel (symmetric, max |w| / 127); the matmul runs on the
weights cast back to the activation dtype and scales the outputs. Norms, the router,
layer scalars and the tied embedding stay in the model dtype.

This halves the weight memory (26B-A4B: ~51 GB -> ~27 GB) so the model fits smaller
GPUs. It is not faster: each step still casts the int8 weights to bf16 before the
GEMMs (a fused int8 GEMM kernel would be the next step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .expert_gemm import grouped_linear
from .model import Experts, Model

SUPPORTED = ("int8",)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: w [..., out, in] -> (q, scales [..., out])."""
    w32 = w.float()
    scales = w32.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w32 / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(w.dtype)


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights and per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError(
                "quantization: int8 Linear layers with a bias are not supported"
            )
        q, s = quantize_int8(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scales", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


class Int8Experts(Experts):
    """The fused expert tensors in int8; each row's output gets its expert's scales."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.path = experts.path
        for name in ("gate_up_proj", "down_proj"):
            q, s = quantize_int8(getattr(experts, name).detach())
            self.register_buffer(name, q)
            self.register_buffer(name + "_scales", s)

    def project(
        self, name: str, x: torch.Tensor, offs: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        y = grouped_linear(x, getattr(self, name).to(x.dtype), offs, self.path)
        return y * getattr(self, name + "_scales")[ids]


def check_mode(quantization: dict[str, Any] | str) -> str:
    if isinstance(quantization, dict):
        bits, mode = quantization.get("bits"), quantization.get("mode", "affine")
        name = "int8" if bits == 8 and mode in ("affine", "weight_only") else None
    else:
        name = quantization if quantization in SUPPORTED else None
    if name is None:
        raise ValueError(
            f"quantization: {quantization!r} is not supported by the torch backend; "
            "expected 'int8' (or {'bits': 8})"
        )
    return name


def quantize_model(model: Model, quantization: dict[str, Any] | str) -> Model:
    """Swap the model's Linear layers and experts for int8 ones, in place."""
    check_mode(quantization)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not name.endswith("router"):
                setattr(module, child_name, Int8Linear(child))
            elif isinstance(child, Experts) and not isinstance(child, Int8Experts):
                setattr(module, child_name, Int8Experts(child))
    return model

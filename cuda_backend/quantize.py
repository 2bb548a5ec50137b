"""Weight quantization for the torch backend: a module swap after loading.

Two modes, both per output channel, for every Linear except the router and for both
fused expert tensors; norms, the router, layer scalars and the tied embedding stay in
the model dtype.

- "int8": weight-only int8 (symmetric, max |w| / 127). The matmul runs on the weights
  cast back to the activation dtype and scales the outputs. It halves the weight
  memory (26B-A4B: ~51 GB -> ~27 GB) but is not faster: a fused int8 GEMM would be the
  next step.
- "fp8": float8_e4m3fn weights with float32 scales (max |w| / 448). Linear layers
  also quantize their input per row and multiply through `torch._scaled_mm` where it
  runs for these operands (probed once per device and dtype: CUDA from compute
  capability 8.9, and the CPU); elsewhere an emulation gives the same numbers up to
  accumulation rounding: the raw fp8 values are exact in bf16 and float32, so it
  multiplies them in the compute dtype and applies both scales to the output, as the
  fused kernel does. The experts keep fp8 weights only (their inputs stay in the
  model dtype) and scale each row's output by its expert's scales, as int8 does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .expert_gemm import grouped_linear, triton_grouped
from .model import Experts, Model

SUPPORTED = ("int8", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_MODES = {"affine": "int8", "weight_only": "int8", "fp8": "fp8"}  # {"bits": 8} modes


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: w [..., out, in] -> (q, scales [..., out])."""
    w32 = w.float()
    scales = w32.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w32 / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(w.dtype)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn per row: w [..., out, in] -> (q, float32 scales [..., out]),
    w ~= q * scales[..., None]."""
    w32 = w.float()
    scales = w32.abs().amax(dim=-1) / FP8_MAX
    # A zero row (or one whose scale underflows) gets scale 1 and quantizes to zeros,
    # instead of 0 / 0.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    # Clamped: out-of-range casts give NaN on some devices (e4m3fn has no inf).
    q = (w32 / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scales


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the raw fp8 values are multiplied: exact in bf16 and float32 (wider
    mantissa and exponent); in float16 their products overflow (448^2 > 65504)."""
    return torch.float32 if dtype == torch.float16 else dtype


@functools.cache
def scaled_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._scaled_mm` multiplies fp8 operands with row-wise float32
    scales into `dtype` on `device` (tried once on a 16 x 16 product)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False  # fp8 tensor cores start with Ada (SM89)
    try:
        a = torch.ones(16, 16, device=device).to(FP8)
        s = torch.ones(16, 1, device=device)
        y = torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.t(), out_dtype=dtype)
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        return False
    return bool((y.float() == 16).all())


def _store_weight(module: nn.Module, linear: nn.Linear, mode: str, quantize) -> None:
    """`linear`'s weight quantized into `module`'s weight and scales buffers."""
    if linear.bias is not None:
        raise ValueError(
            f"quantization: {mode} Linear layers with a bias are not supported"
        )
    q, s = quantize(linear.weight.detach())
    module.register_buffer("weight", q)
    module.register_buffer("scales", s)


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights and per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        _store_weight(self, linear, "int8", quantize_int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


class ScaledExperts(Experts):
    """The fused expert tensors stored quantized with per-row scales (`quantize`);
    each row's output gets its expert's scales. The GEMM runs in `compute(x.dtype)`."""

    quantize = staticmethod(quantize_int8)
    compute = staticmethod(lambda dtype: dtype)

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.path = experts.path
        for name in ("gate_up_proj", "down_proj"):
            q, s = self.quantize(getattr(experts, name).detach())
            self.register_buffer(name, q)
            self.register_buffer(name + "_scales", s)

    def project(
        self, name: str, x: torch.Tensor, offs: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        ct, scales = self.compute(x.dtype), getattr(self, name + "_scales")
        if self.path == "triton":  # the stored weights, scaled in the kernel
            w = getattr(self, name)
            return triton_grouped(x.to(ct), w, offs, False, scales).to(x.dtype)
        y = grouped_linear(x.to(ct), getattr(self, name).to(ct), offs, self.path)
        return (y * scales[ids]).to(x.dtype)

    def activated(
        self, x: torch.Tensor, offs: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        if self.path != "triton":
            return super().activated(x, offs, ids)
        ct, w = self.compute(x.dtype), self.gate_up_proj
        scales = self.gate_up_proj_scales
        return triton_grouped(x.to(ct), w, offs, True, scales).to(x.dtype)


class Int8Experts(ScaledExperts):
    """The fused expert tensors in int8, multiplied in the activation dtype."""


class Fp8Linear(nn.Module):
    """A bias-free Linear with fp8 weights and inputs, each with row-wise scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        _store_weight(self, linear, "fp8", quantize_fp8)
        # The CUDA kernels want both widths divisible by 16; fixed here, before a
        # compiled graph traces the forward. False: the emulation (tests set it).
        fits = w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
        self.scaled_mm = fits and scaled_mm_runs(w.device, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_fp8(rows)
        if self.scaled_mm:
            y = torch._scaled_mm(
                xq,
                self.weight.t(),
                scale_a=xs[:, None],
                scale_b=self.scales[None],
                out_dtype=x.dtype,
            )
        else:
            ct = compute_dtype(x.dtype)
            y = F.linear(xq.to(ct), self.weight.to(ct))
            y = (y * xs[:, None] * self.scales).to(x.dtype)
        return y.view(*x.shape[:-1], -1)


class Fp8Experts(ScaledExperts):
    """The fused expert tensors in fp8 (weights only), multiplied where the raw
    fp8 values are exact (`compute_dtype`)."""

    quantize = staticmethod(quantize_fp8)
    compute = staticmethod(compute_dtype)


LINEAR = {"int8": Int8Linear, "fp8": Fp8Linear}
EXPERTS = {"int8": Int8Experts, "fp8": Fp8Experts}


def check_mode(quantization: dict[str, Any] | str) -> str:
    """The mode named by `quantization`: "int8" or "fp8"; a one-line error else."""
    if isinstance(quantization, dict):
        bits, mode = quantization.get("bits"), quantization.get("mode", "affine")
        name = _MODES.get(mode) if bits == 8 and isinstance(mode, str) else None
    else:
        name = quantization if quantization in SUPPORTED else None
    if name is None:
        raise ValueError(
            f"quantization: {quantization!r} is not supported by the torch backend; "
            "expected 'int8' or 'fp8' (or {'bits': 8}, {'bits': 8, 'mode': 'fp8'})"
        )
    return name


def quantize_model(model: Model, quantization: dict[str, Any] | str) -> Model:
    """Swap the model's Linear layers and experts for quantized ones, in place."""
    mode = check_mode(quantization)
    linear, experts = LINEAR[mode], EXPERTS[mode]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not name.endswith("router"):
                setattr(module, child_name, linear(child))
            elif isinstance(child, Experts) and not isinstance(child, ScaledExperts):
                setattr(module, child_name, experts(child))
    return model

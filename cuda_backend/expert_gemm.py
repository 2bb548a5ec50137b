"""The experts' grouped GEMM: rows sorted by expert times each expert's weight.

An MoE layer sorts its (token, pick) rows by expert; `offs[e]` is the end row of
expert e's group (int32, on the device). The group sizes change every step and live
on the device, so a path that reads them on the host stalls the GPU on every call
(twice per layer, ~60 times a step at the released shape) and breaks a compiled
graph. Paths, tried in this order by `choose`:

- "grouped_mm": `F.grouped_mm` (torch >= 2.10): CPU in any float dtype, CUDA in bf16
  on SM80+.
- "_grouped_mm": `torch._grouped_mm` (torch 2.8-2.9, before it was public): CUDA bf16
  on SM90 (Hopper), the one target every release of it supports.
- "triton": this file's kernels (Triton ships with every CUDA torch): a per-tile table
  built on the device says which expert and rows each program takes, so the grid is
  fixed by the shapes alone; gate-up, activation and the gate*up product are one
  kernel, down is a second. Any float dtype, accumulation in float32. On the CPU
  only under `TRITON_INTERPRET=1` (tests).
- "loop": one matmul per expert that got rows; reads `offs` on the host (one sync
  per call). Works everywhere; the slow path.

Training (autograd on the weights) skips "triton", which has no backward: a float32
model training on a GPU takes the loop.

`DIFFGEM_EXPERT_GEMM=<path>` forces one (a path that cannot run there raises).
`host_syncs()` counts the loop path's host reads since import, for step records.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

PATHS = ("grouped_mm", "_grouped_mm", "triton", "loop")
SLOW = frozenset({"loop"})
NO_BACKWARD = frozenset({"triton"})  # custom ops without an autograd formula
ENV = "DIFFGEM_EXPERT_GEMM"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # what the paths multiply
_syncs = [0]


def host_syncs() -> int:
    """Host reads of group ends made by the loop path since import."""
    return _syncs[0]


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runnable(path: str, w: torch.Tensor) -> bool:
    """Whether `path` can multiply by weights like `w` here."""
    dev, bf16 = w.device, w.dtype == torch.bfloat16
    cuda = dev.type == "cuda"
    if path == "grouped_mm":
        if not hasattr(F, "grouped_mm"):
            return False
        return dev.type == "cpu" or (cuda and bf16 and _capability(dev) >= (8, 0))
    if path == "_grouped_mm":
        return (
            hasattr(torch, "_grouped_mm")
            and cuda
            and bf16
            and _capability(dev) >= (9, 0)
        )
    if path == "triton":
        usable = cuda or (dev.type == "cpu" and interpreting())
        return usable and w.dtype in FLOATS and has_triton()
    return path == "loop"


def training(w: torch.Tensor) -> bool:
    """Whether this call records gradients for `w` (training: the Triton kernels
    have no backward, the other paths do)."""
    return torch.is_grad_enabled() and w.requires_grad


def _on_gpu(w: torch.Tensor) -> bool:
    # Where reading fewer bytes pays; the interpreter (tests) only costs time.
    return w.device.type == "cuda"


def choose(w: torch.Tensor, quantized: bool = False) -> str:
    """The path for weights like `w`: the forced one, else the first that runs
    (under autograd, the first with a backward: not Triton). `quantized`: `w`
    stands for int8 / fp8 weights, which Triton reads as stored (the other paths
    widen them first), so on a GPU Triton goes first where it runs."""
    forced = os.environ.get(ENV)
    grad = training(w)
    if forced:
        if forced not in PATHS:
            raise ValueError(
                f"{ENV}: expected one of {', '.join(PATHS)}, got {forced!r}"
            )
        if not runnable(forced, w) or (grad and forced in NO_BACKWARD):
            why = " under autograd" if runnable(forced, w) else ""
            raise ValueError(
                f"{ENV}={forced}: cannot run for {w.dtype} weights on {w.device}"
                f"{why} with torch {torch.__version__}"
            )
        return forced
    if quantized and not grad and _on_gpu(w) and runnable("triton", w):
        return "triton"
    return next(p for p in PATHS if runnable(p, w) and not (grad and p in NO_BACKWARD))


def slow_note(path: str, device: torch.device) -> str | None:
    """One line for the user when `path` is the slow one on a GPU, else None."""
    if path not in SLOW or device.type != "cuda":
        return None
    return (
        f"expert GEMMs run the per-expert loop on {device} (one host sync per call, "
        f"~60 a step at the released shape): torch {torch.__version__} offers no "
        "grouped GEMM for these weights and Triton is not importable; a torch >= 2.10, "
        "bf16 weights, or `pip install triton` gives the fast path"
    )


@torch.library.custom_op("diffgem::grouped_mm", mutates_args=())
def opaque_grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """`F.grouped_mm` hidden from torch.compile, which traces it only in bf16: in
    float32 on CPU the compiled decoder calls the eager kernel instead of breaking
    its graph (and syncing) twice per layer in the loop fallback."""
    return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)


@opaque_grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


def grouped_linear(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, path: str | None = None
) -> torch.Tensor:
    """Rows of x sorted by expert times each expert's w[e]^T ([E, out, in]) -> [R, out].

    `path` as chosen once for the weights (`choose`); None chooses now, and so does
    a path without a backward when `w` is being trained.
    """
    if path is None or (path in NO_BACKWARD and training(w)):
        path = choose(w)
    if path == "grouped_mm":
        if torch.compiler.is_compiling() and w.dtype != torch.bfloat16:
            return opaque_grouped_mm(x, w, offs)
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
    if path == "_grouped_mm":
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    if path == "triton":
        return triton_grouped(x, w, offs, False)
    return _loop(x, w, offs)


def _loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[1])
    _syncs[0] += 1
    ends = offs.tolist()
    for e, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        if hi > lo:
            out[lo:hi] = x[lo:hi] @ w[e].T
    return out


# -- the Triton path ----------------------------------------------------------------

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 32


def tile_table(offs: torch.Tensor, rows: int, block_m: int = BLOCK_M) -> torch.Tensor:
    """[3, T] int32 on offs' device: expert (-1: idle program), first row, end row of
    each of T = ceil(rows / block_m) + E row tiles; built without a host sync.

    Expert e's group takes ceil(n_e / block_m) tiles, which sum to at most T, so the
    grid depends on the shapes alone (what CUDA graphs need)."""
    E = offs.numel()
    ends = offs.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    per = (ends - starts + block_m - 1) // block_m
    last = torch.cumsum(per, 0)  # one past each expert's last tile
    t = torch.arange(-(-rows // block_m) + E, device=offs.device)
    e = torch.searchsorted(last, t, right=True)
    ec = e.clamp(max=E - 1)
    lo = starts[ec] + (t - (last[ec] - per[ec])) * block_m
    return torch.stack([torch.where(e < E, ec, -1), lo, ends[ec]]).to(torch.int32)


@torch.library.custom_op("diffgem::triton_grouped", mutates_args=())
def triton_grouped(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    gate_up: bool,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [R, K] sorted by expert times w[e]^T; with gate_up, w is [E, 2I, K] and the
    result is gelu_tanh(x w_gate^T) * (x w_up^T), [R, I], in one kernel. `scales`
    [E, rows of w] float32: w is int8 or fp8, each row times its scale (read as
    stored: a quantized weight is never widened in memory)."""
    x, w = x.contiguous(), w.contiguous()
    R, K = x.shape
    N = w.shape[1] // 2 if gate_up else w.shape[1]
    out = x.new_empty(R, N)
    if R == 0:
        return out
    table = tile_table(offs, R)
    from .expert_kernels import grouped as kernel  # imports Triton

    grid = (table.shape[1], -(-N // BLOCK_N))
    scaled = scales is not None
    kernel[grid](
        x, w, scales.contiguous() if scaled else w, out, table, K, N, w.shape[1],
        GATE_UP=gate_up,
        SCALED=scaled,
        # float32 weights: no TF32 rounding, to match the other paths
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        # Triton 3.9's interpreter gets tl.dot on 16-bit operands wrong (values ~1e10):
        # interpreted runs multiply in float32, compiled ones on the tensor cores.
        UPCAST=interpreting() and x.dtype != torch.float32,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )  # fmt: skip
    return out


@triton_grouped.register_fake
def _(x, w, offs, gate_up: bool, scales=None):
    return x.new_empty(x.shape[0], w.shape[1] // 2 if gate_up else w.shape[1])

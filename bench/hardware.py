"""Hardware table for the roofline: memory bandwidth, dense matmul rate, memory size.

Every figure says where it comes from. `basis="datasheet"` is a vendor peak (or one
derived from vendor figures, said so in `source`); `basis="measured"` is a published
measurement from `reference/anchors.md` (ranges there are stored as their midpoint) or
this machine's own `measure_this_machine()`. The roofline floor uses the peaks; the
"measured" basis uses measurements where they exist and falls back to the peaks.

Apple GPUs (M1-M4) run FP16 FMAs at the FP32 rate, so their peak is GPU cores x 128
lanes x 2 FLOP x clock; Apple published that figure for M1 and M2 and not since.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

DATASHEET = "datasheet"
MEASURED = "measured"
ANCHORS = "reference/anchors.md"


@dataclass(frozen=True)
class Figure:
    """One number with its provenance."""

    value: float
    basis: str  # DATASHEET or MEASURED
    source: str


@dataclass(frozen=True)
class Device:
    """An accelerator: peak figures plus published measurements where known."""

    name: str
    memory_gb: Figure
    bandwidth_gbs: Figure  # peak memory bandwidth, GB/s (1e9 bytes)
    matmul_tflops: Figure  # peak dense fp16/bf16 matmul, TFLOP/s
    measured_bandwidth_gbs: Figure | None = None
    measured_matmul_tflops: Figure | None = None
    aliases: tuple[str, ...] = ()

    def rates(self, basis: str = "peak") -> tuple[float, float]:
        """(matmul FLOP/s, bytes/s) on `basis` 'peak' or 'measured' (falls back)."""
        if basis not in ("peak", "measured"):
            raise ValueError(f"basis must be 'peak' or 'measured', got {basis!r}")
        flops, bw = self.matmul_tflops, self.bandwidth_gbs
        if basis == "measured":
            flops = self.measured_matmul_tflops or flops
            bw = self.measured_bandwidth_gbs or bw
        return flops.value * 1e12, bw.value * 1e9

    def bases(self) -> list[str]:
        """The bases with figures of their own: peak, and measured where known."""
        measured = self.measured_bandwidth_gbs or self.measured_matmul_tflops
        return ["peak", "measured"] if measured else ["peak"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("aliases")
        return d


def _ds(value: float, source: str) -> Figure:
    return Figure(value, DATASHEET, source)


def _anchor(value: float, note: str) -> Figure:
    return Figure(value, MEASURED, f"{ANCHORS}: {note}")


def _apple(
    name: str, cores: int, gbs: float, mem: float, tflops: float, how: str, **kw
) -> Device:
    return Device(
        name,
        memory_gb=_ds(mem, f"Apple: max unified memory of {name}"),
        bandwidth_gbs=_ds(gbs, f"Apple: {name} unified memory bandwidth"),
        matmul_tflops=_ds(tflops, f"{name}, {cores}-core GPU: {how}"),
        **kw,
    )


_PUBLISHED = "Apple's published FP32 TFLOPS (FP16 runs at the same rate)"


def _clock(ghz: float) -> str:
    return f"derived: cores x 256 FLOP/clock x {ghz} GHz (Apple publishes no figure)"


_M5 = "derived: Apple's '4x M4 peak GPU AI compute' (GPU neural accelerators)"

_M_SERIES = [
    _apple("M1", 8, 68.25, 16, 2.6, _PUBLISHED),
    _apple("M1 Pro", 16, 200, 32, 5.2, _PUBLISHED),
    _apple("M1 Max", 32, 400, 64, 10.4, _PUBLISHED),
    _apple("M1 Ultra", 64, 800, 128, 21.2, _PUBLISHED),
    _apple("M2", 10, 100, 24, 3.6, _PUBLISHED),
    _apple("M2 Pro", 19, 200, 32, 6.8, _PUBLISHED),
    _apple("M2 Max", 38, 400, 96, 13.6, _PUBLISHED),
    _apple(
        "M2 Ultra",
        76,
        800,
        192,
        27.2,
        _PUBLISHED,
        measured_bandwidth_gbs=_anchor(636, "M2 Ultra 636 GB/s"),
        measured_matmul_tflops=_anchor(27, "M2 Ultra ~27 TFLOP/s"),
    ),
    _apple("M3", 10, 100, 24, 3.6, _clock(1.4)),
    _apple("M3 Pro", 18, 150, 36, 6.5, _clock(1.4)),
    _apple("M3 Max", 40, 400, 128, 14.3, _clock(1.4)),
    _apple("M3 Ultra", 80, 819, 512, 28.7, _clock(1.4)),
    _apple("M4", 10, 120, 32, 4.0, _clock(1.58)),
    _apple("M4 Pro", 20, 273, 64, 8.1, _clock(1.58)),
    _apple(
        "M4 Max",
        40,
        546,
        128,
        16.2,
        _clock(1.58),
        measured_matmul_tflops=_anchor(14, "M4 Max 13-15 TFLOP/s"),
    ),
    _apple("M5", 10, 153, 32, 16, _M5),
    _apple("M5 Pro", 20, 307, 64, 32, _M5),
    _apple(
        "M5 Max",
        40,
        614,
        128,
        65,
        _M5,
        measured_bandwidth_gbs=_anchor(480, "M5 Max ~480 GB/s (GEMV)"),
        measured_matmul_tflops=_anchor(56.5, "M5 Max 53-60 TFLOP/s (MLX)"),
    ),
]

_NVIDIA = [
    Device(
        "RTX 4090",
        memory_gb=_ds(24, "NVIDIA: 24 GB GDDR6X"),
        bandwidth_gbs=_ds(1008, "NVIDIA: 1008 GB/s"),
        matmul_tflops=_ds(330.3, "Ada whitepaper: dense FP16 tensor (165.2 FP32-acc)"),
        measured_bandwidth_gbs=_anchor(1000, "RTX 4090 1.0 TB/s"),
        measured_matmul_tflops=_anchor(161.5, "RTX 4090 150-173 TFLOP/s"),
        aliases=("4090",),
    ),
    Device(
        "RTX 5090",
        memory_gb=_ds(32, "NVIDIA: 32 GB GDDR7"),
        bandwidth_gbs=_ds(1792, "NVIDIA: 1792 GB/s"),
        matmul_tflops=_ds(419, "NVIDIA: 838 TFLOPS sparse FP16 tensor, halved"),
        measured_bandwidth_gbs=_anchor(1800, "RTX 5090 1.8 TB/s"),
        measured_matmul_tflops=_anchor(233, "RTX 5090 224-242 TFLOP/s"),
        aliases=("5090",),
    ),
    Device(
        "H100 SXM",
        memory_gb=_ds(80, "NVIDIA: 80 GB HBM3"),
        bandwidth_gbs=_ds(3350, "NVIDIA: 3.35 TB/s"),
        matmul_tflops=_ds(989, "NVIDIA: 989 TFLOPS dense BF16"),
        measured_bandwidth_gbs=_anchor(3175, "H100 3.0-3.35 TB/s"),
        measured_matmul_tflops=_anchor(775, "H100 760-790 TFLOP/s"),
        aliases=("H100",),
    ),
    Device(
        "H200",
        memory_gb=_ds(141, "NVIDIA: 141 GB HBM3e"),
        bandwidth_gbs=_ds(4800, "NVIDIA: 4.8 TB/s"),
        matmul_tflops=_ds(989, "NVIDIA: 989 TFLOPS dense BF16"),
        measured_bandwidth_gbs=_anchor(4550, "H200 4.3-4.8 TB/s"),
        measured_matmul_tflops=_anchor(775, "H200 760-790 TFLOP/s"),
    ),
    Device(
        "DGX Spark",
        memory_gb=_ds(128, "NVIDIA: 128 GB LPDDR5x"),
        bandwidth_gbs=_ds(273, "NVIDIA: 273 GB/s"),
        matmul_tflops=_ds(125, "derived: 1 PFLOP sparse FP4 / 2 (dense) / 4 (FP16)"),
        measured_bandwidth_gbs=_anchor(227, "DGX Spark ~220-234 GB/s"),
        measured_matmul_tflops=_anchor(92, "DGX Spark ~92 TFLOP/s"),
        aliases=("Spark", "GB10"),
    ),
]

DEVICES: dict[str, Device] = {d.name: d for d in _M_SERIES + _NVIDIA}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_device(name: str, extra: dict[str, Device] | None = None) -> Device:
    """The device called `name` (case, spaces and dashes ignored; aliases allowed).

    `extra` adds devices such as the measured "this-machine".
    """
    table = {**DEVICES, **(extra or {})}
    for dev in table.values():
        if _key(name) in {_key(n) for n in (dev.name, *dev.aliases)}:
            return dev
    known = ", ".join(table)
    raise ValueError(f"unknown device {name!r}; known devices: {known}")


def measure_this_machine(repeats: int = 5) -> Device:
    """This machine's own rates with numpy: fp32 matmul and memory copy bandwidth.

    Matmul: best of `repeats` 2048x2048 fp32 products (2 n^3 FLOP each). Bandwidth:
    best of `repeats` copies of a 512 MB array, counting the read and the write (1 GB
    of traffic per copy). These are CPU figures unless numpy runs elsewhere.
    """
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    t_mm = _best_time(lambda: a @ a, repeats)
    src = np.ones(512 * 10**6, dtype=np.uint8)
    dst = np.empty_like(src)
    t_cp = _best_time(lambda: np.copyto(dst, src), repeats)
    how = f"bench.hardware.measure_this_machine, best of {repeats}"
    return Device(
        "this-machine",
        memory_gb=Figure(_memory_gb(), MEASURED, "os.sysconf physical pages"),
        bandwidth_gbs=Figure(2 * src.nbytes / t_cp / 1e9, MEASURED, how),
        matmul_tflops=Figure(2 * n**3 / t_mm / 1e12, MEASURED, how + " (fp32)"),
    )


def measure_torch(device, repeats: int = 5) -> Device:
    """A torch device's own rates: a large matmul and a device-to-device copy.

    On CUDA: bf16 8192^3 products on random data (zeros run faster) and copies of a
    1 GiB buffer counting the read and the write, each timed with a synchronize,
    best of `repeats` after a warm-up; on CPU the same in float32 at 2048 (tests).
    """
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    src = torch.empty(2**30 if cuda else 2**27, dtype=torch.uint8, device=device)
    src.random_(0, 256, generator=gen)
    dst = torch.empty_like(src)

    def synced(fn):
        def run():
            fn()
            if cuda:
                torch.cuda.synchronize(device)

        return run

    t_mm = _best_time(synced(lambda: a @ b), repeats)
    t_cp = _best_time(synced(lambda: dst.copy_(src)), repeats)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    how = f"bench.hardware.measure_torch on {name}, best of {repeats}"
    memory = (
        torch.cuda.get_device_properties(device).total_memory / 1e9
        if cuda
        else _memory_gb()
    )
    return Device(
        "this-machine",
        memory_gb=Figure(memory, MEASURED, how),
        bandwidth_gbs=Figure(2 * src.numel() / t_cp / 1e9, MEASURED, how),
        matmul_tflops=Figure(2 * n**3 / t_mm / 1e12, MEASURED, f"{how} ({dtype})"),
    )


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, BLAS thread start
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _memory_gb() -> float:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return float("nan")

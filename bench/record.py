"""What every benchmark record carries: machine, versions, git state, statistics, floor.

A record is one JSON object per run (schema `SCHEMA`); `bench/report.py` builds every
table and plot from these files only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "mlx-diffgem-bench/1"
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("numpy", "mlx", "torch", "transformers", "mlx-vlm", "safetensors")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# -- environment -----------------------------------------------------------------------


def _run(*cmd: str) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip()


def cpu_name() -> str:
    """The CPU (or Apple chip) model name."""
    if sys.platform == "darwin":
        return _run("sysctl", "-n", "machdep.cpu.brand_string") or platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gb() -> float | None:
    if sys.platform == "darwin":
        out = _run("sysctl", "-n", "hw.memsize")
        return round(int(out) / 1e9, 1) if out.isdigit() else None
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine(accelerator: str, blas: list[str] | None = None) -> dict[str, Any]:
    """Where the run happened. `accelerator`: what ran the model (chip/GPU/CPU)."""
    threads = {k: os.environ.get(k) for k in THREAD_VARS}
    if "torch" in sys.modules:
        threads["torch_threads"] = sys.modules["torch"].get_num_threads()
    return {
        "platform": platform.platform(),
        "os": platform.system(),
        "os_release": platform.release(),
        "arch": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "ram_gb": ram_gb(),
        "accelerator": accelerator,
        "threads": threads,
        "blas_preloaded": blas or [],
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in (*PACKAGES, "mlx-diffgem"):
        try:
            out[pkg.replace("-", "_")] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    return out


_PINNED: dict[str, Any] | None = None  # the code's state at the run's start


def pin_git() -> None:
    """Read the code's state now, at a run's start: records are written at its end,
    an hour or more later, and must name the code that ran, not what the tree holds
    by then. Every later `git()` of this process returns this."""
    global _PINNED
    _PINNED = None
    _PINNED = git()


def git() -> dict[str, Any]:
    """The commit and whether tracked files differ from it (a hash of the diff), as
    pinned at the run's start (`pin_git`), else as the tree is now."""
    if _PINNED is not None:
        return dict(_PINNED)
    diff = _run("git", "diff", "HEAD")
    return {
        "sha": _run("git", "rev-parse", "HEAD") or None,
        "dirty": bool(_run("git", "status", "--porcelain", "--untracked-files=no")),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
        # code files not in git yet: the measured code is not fully in `sha`
        "untracked_code": _run(
            "git", "ls-files", "--others", "--exclude-standard", "--",
            "mlx_diffgem", "cuda_backend", "bench", "drafter",
        ).split(),
    }  # fmt: skip


def device_slug(accelerator: str) -> str:
    """A short file-name-safe label: 'apple-m4-max', 'nvidia-h100-80gb-hbm3', ..."""
    name = re.sub(r"\((r|tm)\)", "", accelerator.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40].strip("-") or "unknown"


# -- statistics ------------------------------------------------------------------------


def spread(samples_s: list[float], scale: float = 1e3) -> dict[str, float | int]:
    """Median, p10/p90 and quartiles of timings (seconds in, ms out by default)."""
    a = np.asarray(samples_s, dtype=np.float64) * scale
    if a.size == 0:
        return {"n": 0}
    p10, q25, med, q75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {
        "median": round(float(med), 4),
        "p10": round(float(p10), 4),
        "p90": round(float(p90), 4),
        "iqr": round(float(q75 - q25), 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
        "n": int(a.size),
    }


# -- cost-model floor ------------------------------------------------------------------

QUANT_FOR_COST = {None: "bf16", "8bit": "8bit", "4bit": "4bit", "mixed": "mixed"}
QUANT_FOR_COST["int8"] = "8bit"
QUANT_FOR_COST["fp8"] = "8bit"  # one byte per weight, as int8


def floor_device(accelerator: str, measured: Any = None) -> Any:
    """The cost model's device for this run: the table entry named in `accelerator`
    (longest name first, so 'M4 Max' wins over 'M4'), else this machine as measured
    by `bench.hardware.measure_this_machine` (a CPU run with --measure), else None."""
    from .hardware import DEVICES

    key = re.sub(r"[^a-z0-9]", "", accelerator.lower())
    names = [(n, d) for d in DEVICES.values() for n in (d.name, *d.aliases)]
    for n, dev in sorted(names, key=lambda x: -len(x[0])):
        if re.sub(r"[^a-z0-9]", "", n.lower()) in key:
            return dev
    return measured


def step_floor(
    cfg: Any,
    context: int,
    *,
    batch: int,
    dtype: str,
    quantization: str | None,
    device: Any,
) -> dict[str, Any] | None:
    """The roofline floor of one decoder step on `device` (bench.roofline), in ms."""
    if device is None:
        return None
    from .pass_cost import decoder_cost
    from .roofline import floor

    cost = decoder_cost(
        cfg, context, batch=batch, quant=QUANT_FOR_COST.get(quantization, "bf16")
    )
    if quantization is None and dtype == "float32":
        # The cost model counts 2-byte weights and KV; float32 moves twice that.
        for k in ("weights", "embedding_reread", "kv_read"):
            cost.bytes[k] *= 2
    basis = "measured" if device.name == "this-machine" else "peak"
    f = floor(cost, device, basis)
    flops, bw = device.rates(basis)
    return {
        "device": device.name,
        "basis": basis,
        "matmul_tflops": flops / 1e12,
        "bandwidth_gbs": bw / 1e9,
        "flops": cost.total_flops,
        "bytes": cost.total_bytes,
        "floor_ms": round(f.floor_s * 1e3, 6),
        "bound": f.bound,
    }


# -- the record ------------------------------------------------------------------------


def envelope(suite: str, accelerator: str, blas: list[str] | None = None) -> dict:
    """The fields every record starts with."""
    return {
        "schema": SCHEMA,
        "suite": suite,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(accelerator, blas),
        "versions": versions(),
        "git": git(),
    }


def write(record: dict, out: str | Path) -> Path:
    """Write `record` as <out>/<suite>-<backend>-<preset>-<device>-<time>.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = record["created"].replace(":", "").replace("-", "")[:15]
    parts = [
        record["suite"],
        record.get("backend") or "none",
        record["model"]["preset"],
        device_slug(record["machine"]["accelerator"]),
        stamp,
    ]
    path = out / ("-".join(parts) + ".json")
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path

"""The short table `bench/device_check.sh` prints last, from the records it wrote.

    python -m bench.device_table OUT_FOLDER

One row per record and context: what ran (suite, compilation, expert-GEMM path,
sampler), the step's median and share of the floor, host syncs per step, compile
time, and tokens/s for generation; spec-cost rows give the target's pass and each
drafter's, with its ratio to the target's; peers rows give each implementation's
step (timed one per process at the released shape) and ours over transformers'.
Nothing is measured here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = ["run", "context", "ms", "% floor", "syncs/step", "compile s", "tok/s"]


def _run_label(rec: dict) -> str:
    bits = [rec["suite"], rec.get("compile") or "eager"]
    if rec.get("compile_scope"):
        bits[-1] += f"/{rec['compile_scope']}"
    if rec.get("cuda_graphs"):
        bits.append(f"graphs/{rec['cuda_graphs']['bucket_tokens']}")
    if rec.get("quantization"):
        bits.append(rec["quantization"])
    bits.append(rec.get("expert_gemm") or "-")
    bits.append("fused" if rec.get("fused_sampler") else "torch-sampler")
    return " ".join(bits)


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _peer_rows(rec: dict) -> list[list[str]]:
    out = []
    for p in rec["results"]:
        floor = (p.get("floor") or {}).get("floor_ms")
        for name, v in p["impls"].items():
            ms = v["step_ms"]["median"]
            pct = None if floor is None else 100 * floor / ms
            row = [f"peers {name}", str(p["context"]), _f(ms, 2), _f(pct)]
            out.append(row + ["-"] * 3)
    for rec_info in (rec.get("peers") or {}).values():
        if rec_info.get("status") != "ok":
            out.append(["peers: " + rec_info.get("reason", "?")[:80]] + ["-"] * 6)
    return out


def paired_peers(recs: list[dict]) -> list[list[str]]:
    """ours / transformers per context, from records timed one per process."""
    ms: dict[tuple[int, str], float] = {}
    for rec in recs:
        if rec["suite"] == "peers":
            for p in rec["results"]:
                for name, v in p["impls"].items():
                    ms[p["context"], name] = v["step_ms"]["median"]
    out = []
    for (ctx, name), ours in sorted(ms.items()):
        theirs = ms.get((ctx, "transformers"))
        if name.startswith("mlx_diffgem") and theirs:
            ratio = f"x{ours / theirs:.3f}"
            out.append([f"peers {name}/transformers", str(ctx), ratio] + ["-"] * 4)
    return out


def rows(rec: dict) -> list[list[str]]:
    if rec["suite"] == "peers":
        return _peer_rows(rec)
    label, out = _run_label(rec), []
    for p in rec.get("results", []):
        syncs = (p.get("host_syncs_per_step") or {}).get("per_step")
        ms = (p.get("step_ms") or {}).get("median")
        if rec["suite"] == "spec-cost":
            target = _f(p["target_ms"]["median"], 2)
            out.append([label + " target", str(p["context"]), target] + ["-"] * 4)
            for name, d in p["drafters"].items():
                ms = f"{_f(d['drafter_ms']['median'], 2)} (x{d['measured_ratio']})"
                out.append([f"  drafter {name}", str(p["context"]), ms] + ["-"] * 4)
            continue
        out.append(
            [
                label,
                str(p.get("context", "-")),
                _f(ms, 2),
                _f(p.get("pct_of_floor")),
                _f(syncs, 2),
                _f(rec.get("compile_s")),
                _f(p.get("tokens_per_s")),
            ]
        )
    return out


def table(folder: Path) -> str:
    recs = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    recs = [r for r in recs if isinstance(r, dict) and "suite" in r]
    body = [row for rec in recs for row in rows(rec)] + paired_peers(recs)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m bench.device_table OUT_FOLDER")
    print(table(Path(sys.argv[1])))

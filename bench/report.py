"""Merge benchmark records (from any number of machines) into tables and plots.

    python -m bench.report bench/results/ --out bench/results/ --readme bench/README.md

Reads every `*.json` record of schema `mlx-diffgem-bench/1` (other JSON files are
skipped), keeps the newest record per (suite, device, backend, preset, precision,
batch), and writes REPORT.md, tokens_per_s.png and step_vs_context.png. Everything
comes from the JSON files: nothing is measured here. With --readme, the tables also
replace the block between the report markers of that file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

SCHEMA = "mlx-diffgem-bench/1"  # == bench.record.SCHEMA (kept import-free)
START, END = "<!-- report:start -->", "<!-- report:end -->"
DASH = "–"


# -- loading ---------------------------------------------------------------------------


def load_records(paths: Iterable[str | Path]) -> list[dict]:
    """Records from files and folders (folders: their *.json), newest per key."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    latest: dict[tuple, dict] = {}
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            continue
        rec["_file"] = f.name
        k = key(rec)
        if k not in latest or rec["created"] > latest[k]["created"]:
            latest[k] = rec
    return sorted(latest.values(), key=key)


def device_label(rec: dict) -> str:
    """'AMD EPYC, 2 cores (cpu)', 'Apple M4 Max (gpu)', 'NVIDIA H100 ... (cuda)'."""
    m = rec["machine"]
    name = m["accelerator"]
    if rec["device"] == "cpu":
        threads = m.get("threads", {}).get("OMP_NUM_THREADS")
        name += f", {m['cpu_count']} cores" + (f", {threads} thread" if threads else "")
    return f"{name} ({rec['device']})"


def backend_label(rec: dict) -> str:
    """The backend, with the torch.compile mode when the run compiled the step."""
    mode = rec.get("compile")
    return rec["backend"] + (f"+compile({mode})" if mode else "")


def precision(rec: dict) -> str:
    return rec.get("quantization") or rec["dtype"]


def key(rec: dict) -> tuple:
    return (
        rec["suite"],
        device_label(rec),
        backend_label(rec),
        rec["model"]["preset"],
        precision(rec),
        rec["settings"]["batch"],
    )


# -- tables ----------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    if x is None:
        return DASH
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if abs(x) >= 1 or x == 0 else f"{x:.{digits + 2}g}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _points(records: list[dict], suite: str) -> dict[tuple, dict]:
    """(device, backend, preset, precision, context) -> the suite's result point."""
    out = {}
    for rec in records:
        if rec["suite"] != suite:
            continue
        for r in rec["results"]:
            k = (device_label(rec), backend_label(rec), rec["model"]["preset"])
            out[(*k, precision(rec), r["context"])] = r
    return out


def main_table(records: list[dict]) -> str:
    """Per device/backend/preset/context: tok/s, ms per step, steps, % of floor."""
    suites = {s: _points(records, s) for s in ("step", "generate", "prefill")}
    keys = sorted({k for pts in suites.values() for k in pts})
    rows = []
    for k in keys:
        st, ge, pf = (suites[s].get(k) for s in ("step", "generate", "prefill"))
        rows.append(
            [*k[:4], str(k[4])]
            + [
                _f(ge and ge["tokens_per_s"]),
                _f(st and st["step_ms"]["median"], 2),
                _f(ge and ge["steps_per_canvas"]),
                _f(ge and ge["tokens_per_forward"], 2),
                _f(pf and pf["tokens_per_s"], 0),
                _f(st and st["pct_of_floor"], 2),
                _f(ge and ge.get("pct_of_floor"), 2),
            ]
        )
    header = ["device", "backend", "preset", "precision", "context", "gen tok/s"]
    header += ["ms/step", "steps/canvas", "tok/forward", "prefill tok/s"]
    header += ["step % of floor", "gen % of floor"]
    return _md(header, rows)


def _ours(point: dict) -> str:
    """The name of our implementation among a peers point's implementations."""
    return next(k for k in point["impls"] if k.startswith("mlx_diffgem["))


def peers_table(records: list[dict]) -> str:
    """Per-step time of ours vs each peer, same process, interleaved."""
    rows = []
    for (dev, backend, preset, prec, ctx), r in _points(records, "peers").items():
        ours = r["impls"][_ours(r)]["step_ms"]
        for peer, ratio in r["ratios"].items():
            theirs = r["impls"][peer]["step_ms"]
            lo, hi = ratio["paired_min_max"]
            rows.append(
                [dev, preset, prec, str(ctx), f"{backend} vs {peer}"]
                + [_f(ours["median"], 2), _f(theirs["median"], 2)]
                + [f"{ratio['step_ours_over_peer']:.3f}"]
                + [f"{ratio['paired_median']:.3f}", f"{lo:.2f}-{hi:.2f}"]
                + ["yes" if ratio["meets_goal"] else "no"]
            )
    header = ["device", "preset", "precision", "context", "ours vs peer"]
    header += ["ours ms/step", "peer ms/step", "ratio", "paired median"]
    header += ["paired range", "<= 0.5x"]
    return _md(header, rows)


def context_table(records: list[dict]) -> str:
    """Step time (ms) by context length, one row per device/backend/preset."""
    series = step_series(records)
    ctxs = sorted({c for pts in series.values() for c in pts})
    rows = [
        [*k, *(_f(pts.get(c), 2) for c in ctxs)] for k, pts in sorted(series.items())
    ]
    return _md(["device", "implementation", "preset", *map(str, ctxs)], rows)


def step_series(records: list[dict]) -> dict[tuple, dict[int, float]]:
    """(device, implementation, preset) -> {context: median ms per step}.

    Our backends come from `step` records (a warm cache); peers and ours again from
    `peers` records, where every timed canvas is the first after a fresh prefill."""
    out: dict[tuple, dict[int, float]] = {}
    for (dev, backend, preset, prec, ctx), r in _points(records, "step").items():
        if r["batch"] == 1:
            impl = f"mlx_diffgem[{backend}], step suite ({prec})"
            out.setdefault((dev, impl, preset), {})[ctx] = r["step_ms"]["median"]
    for (dev, backend, preset, prec, ctx), r in _points(records, "peers").items():
        for name, e in r["impls"].items():
            name = f"mlx_diffgem[{backend}]" if name == _ours(r) else name
            impl = f"{name}, peers suite ({prec})"
            out.setdefault((dev, impl, preset), {})[ctx] = e["step_ms"]["median"]
    return out


def sources(records: list[dict]) -> str:
    rows = [
        [
            r["_file"],
            r["created"],
            (r["git"]["sha"] or DASH)[:10] + (" (dirty)" if r["git"]["dirty"] else ""),
            r["machine"]["threads"].get("OMP_NUM_THREADS") or DASH,
            " ".join(f"{x:.1f}" for x in r["machine"]["loadavg"][:1]),
        ]
        for r in records
    ]
    return _md(["record", "created (UTC)", "git", "OMP threads", "load avg"], rows)


# -- plots -----------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_tokens(records: list[dict], path: Path) -> Path | None:
    """Bars: tokens/s per device and backend, one bar per mode (log scale)."""
    modes = {"generate": "generate (native)", "prefill": "prefill"}
    bars: dict[str, dict[tuple, float]] = {}
    for suite, label in modes.items():
        for (dev, backend, preset, prec, ctx), r in _points(records, suite).items():
            group = f"{dev}\n{backend} {prec}, {preset}"
            bars.setdefault(group, {})[(label, ctx)] = r["tokens_per_s"]
    if not bars:
        return None
    plt = _plt()
    series = sorted({s for b in bars.values() for s in b})
    fig, ax = plt.subplots(figsize=(max(8, 2.6 * len(bars)), 5.5))
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs = [g + i * width for g in range(len(bars))]
        ys = [b.get(s, 0) for b in bars.values()]
        rects = ax.bar(xs, ys, width, label=f"{s[0]}, context {s[1]}")
        ax.bar_label(rects, labels=[_f(y, 0) if y else "" for y in ys], fontsize=7)
    ticks = [g + 0.4 - width / 2 for g in range(len(bars))]
    ax.set_xticks(ticks, list(bars), fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_title("Tokens/s by device and mode (random weights)")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_context(records: list[dict], path: Path) -> Path | None:
    """Lines: ms per step vs context, one panel per preset (peers dashed)."""
    series = step_series(records)
    presets = sorted({k[2] for k in series})
    if not presets:
        return None
    plt = _plt()
    # one colour per implementation and device, the same in every panel
    names = sorted({(k[0], k[1]) for k in series})
    colour = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(
        1, len(presets), figsize=(7 * len(presets), 6.5), squeeze=False
    )
    for ax, preset in zip(axes[0], presets, strict=True):
        mine = {k: v for k, v in sorted(series.items()) if k[2] == preset}
        devices = {k[0] for k in mine}
        for (dev, impl, _), pts in mine.items():
            xs = sorted(pts)
            label = impl if len(devices) == 1 else f"{impl}\n{dev}"
            style = "--" if "peers suite" in impl else "-"
            ys = [pts[x] for x in xs]
            ax.plot(xs, ys, style, marker="o", color=colour[dev, impl], label=label)
        _context_axes(ax, sorted({c for pts in mine.values() for c in pts}))
        where = f"\n{next(iter(devices))}" if len(devices) == 1 else ""
        ax.set_title(f"Step time vs context: {preset}{where}", fontsize=10)
    return _save(fig, path)


def _context_axes(ax, contexts: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = ax.get_ylim()
    if hi / max(lo, 1e-9) > 10:  # a decade or more: log, 2x and 5x labelled
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor))
    ax.set_xlabel("context (cached tokens)")
    ax.set_ylabel("ms per denoising step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)


def _minor(y: float, _pos: int) -> str:
    # label only 2x and 5x of each decade, so labels do not collide
    lead = y / 10 ** math.floor(math.log10(y)) if y > 0 else 0
    return f"{y:g}" if round(lead) in (2, 5) else ""


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


# -- report ----------------------------------------------------------------------------


def tables(records: list[dict]) -> str:
    """The Markdown tables (also spliced into the README)."""
    parts = [
        "### Side by side (medians; % of floor = cost-model floor / measured time)",
        main_table(records),
        "### Ours vs peers, per denoising step (same process, interleaved; ratio = "
        "ours / peer of the pooled medians, paired = per repeat)",
        peers_table(records),
        "### Step time (ms) vs context length",
        context_table(records),
    ]
    return "\n\n".join(parts) + "\n"


def build(paths: Sequence[str | Path], out: str | Path, readme: Path | None = None):
    """Write REPORT.md and the PNGs into `out`; returns the paths written."""
    records = load_records(paths)
    if not records:
        raise ValueError(f"no {SCHEMA} records in {', '.join(map(str, paths))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [
        plot_tokens(records, out / "tokens_per_s.png"),
        plot_context(records, out / "step_vs_context.png"),
    ]
    pngs = [p for p in pngs if p is not None]
    body = [
        "# Benchmark report",
        "Generated by `python -m bench.report` from the JSON records below; do not "
        "edit. Weights are random (see bench/README.md for the protocol).",
        tables(records),
        *(f"![{p.stem}]({p.name})" for p in pngs),
        "### Records",
        sources(records),
    ]
    report = out / "REPORT.md"
    report.write_text("\n\n".join(body) + "\n")
    if readme is not None:
        splice(readme, tables(records))
    return [report, *pngs]


def splice(readme: Path, text: str) -> None:
    """Replace the block between the report markers of `readme`."""
    src = readme.read_text()
    if START not in src or END not in src:
        raise ValueError(f"{readme}: expected the markers {START} and {END}")
    head, rest = src.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n\n{text}\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.splitlines()[0]
    )
    p.add_argument("paths", nargs="*", default=["bench/results"], help="files/folders")
    p.add_argument("--out", default="bench/results", help="folder for REPORT.md, PNGs")
    p.add_argument("--readme", type=Path, default=None, help="splice the tables here")
    args = p.parse_args(argv)
    try:
        written = build(args.paths, args.out, args.readme)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"written": [str(w) for w in written]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

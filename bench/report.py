"""Merge benchmark records (from any number of machines) into tables and plots.

    python -m bench.report bench/results/ --out bench/results/ --readme bench/README.md

Reads every `*.json` record of schema `mlx-diffgem-bench/1` (other JSON files are
skipped), keeps the newest record per (suite, device, backend, preset, precision,
batch, drafter), and writes REPORT.md, tokens_per_s.png, step_vs_context.png and, with
spec records, speculative.png. Everything
comes from the JSON files: nothing is measured here. With --readme, the tables also
replace the block between the report markers of that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

SCHEMA = "mlx-diffgem-bench/1"  # == bench.record.SCHEMA (kept import-free)
START, END = "<!-- report:start -->", "<!-- report:end -->"
DASH = "–"
# The suites this report renders (bench.backends, bench.serve_bench and the hygiene
# suite's records share the schema but have their own summaries).
REPORTED = ("step", "prefill", "generate", "peers", "spec", "spec-cost")


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
        if rec.get("suite") not in REPORTED:  # e.g. backends, serve: their own tools
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
        model_label(rec),
        precision(rec),
        rec["settings"]["batch"],
        drafter_label(rec),
    )


def model_label(rec: dict) -> str:
    """The preset, and for trained weights a short hash of them (the embedded
    default model changes between releases; its records must not merge)."""
    m = rec["model"]
    h = m.get("weights_sha256") if m.get("weights", "").startswith("trained") else None
    return m["preset"] + (f" ({h[:6]})" if h else "")


def drafter_label(rec: dict) -> str:
    """The drafter, with the speculative settings that differ from the defaults and
    the number of prompts (spec records of different settings stay apart)."""
    d = rec.get("drafter") or {}
    if not d:
        return ""
    from mlx_diffgem.core.speculative import VERIFY_OPTIONS, SpecPolicy

    policy = rec.get("spec_policy") or {}
    # records made before the verify setting had the plain verify
    verify = policy.get("verify", "plain")
    base = dataclasses.asdict(SpecPolicy(verify=verify))
    base["verify"] = SpecPolicy().verify
    unread = {k for k, verifies in VERIFY_OPTIONS.items() if verify not in verifies}
    changed = [
        f"{k}={v}"
        for k, v in policy.items()
        if k in base and k not in unread and v != base[k]
    ]
    prompts = rec["settings"].get("prompts")
    return ", ".join(
        [_drafter_name(d), *changed] + ([f"{prompts} prompts"] * bool(prompts))
    )


def _drafter_name(d: dict) -> str:
    """The drafter argument; a plain "self" with the cuts it meant when the record
    was made (SelfDraftPlan.auto changes between releases)."""
    name = d.get("name", "")
    if name != "self":
        return name
    cuts = [
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
        for k in ("layers", "top_k", "sc_top_k", "head_vocab")
        if (v := d.get(k)) is not None
    ]
    return f"self ({' '.join(cuts)})" if cuts else name


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
            key = (*k, precision(rec), r["context"])
            out[key] = _join_solo(out.get(key), r) if rec.get("solo") else r
    return out


def _join_solo(prev: dict | None, point: dict) -> dict:
    """One peers point from records that timed one implementation each (--solo):
    their implementations side by side, ours over the peer's ratio."""
    impls = {**(prev or {}).get("impls", {}), **point["impls"]}
    joined = dict(point, impls=impls, ratios={}, solo=True)
    ours = [k for k in impls if k.startswith("mlx_diffgem[")]
    for peer in (k for k in impls if ours and k not in ours):
        a, b = impls[ours[0]], impls[peer]
        runs = zip(
            a["per_run_step_median_ms"], b["per_run_step_median_ms"], strict=False
        )
        paired = [x / y for x, y in runs]  # repeat i of each process
        ratio = a["step_ms"]["median"] / b["step_ms"]["median"]
        joined["ratios"][peer] = {
            "step_ours_over_peer": round(ratio, 4),
            "paired_median": round(statistics.median(paired), 4),
            "paired_min_max": [round(min(paired), 4), round(max(paired), 4)],
            "meets_goal": ratio <= 0.5,
        }
    return joined


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
    return next((k for k in point["impls"] if k.startswith("mlx_diffgem[")), None)


def peers_table(records: list[dict]) -> str:
    """Per-step time of ours vs each peer, same process, interleaved."""
    rows = []
    for (dev, backend, preset, prec, ctx), r in _points(records, "peers").items():
        if _ours(r) is None:
            continue  # a peer timed alone, ours not (yet) beside it
        ours = r["impls"][_ours(r)]["step_ms"]
        for peer, ratio in r["ratios"].items():
            theirs = r["impls"][peer]["step_ms"]
            lo, hi = ratio["paired_min_max"]
            apart = " (one per process)" if r.get("solo") else ""
            rows.append(
                [dev, preset, prec, str(ctx), f"{backend} vs {peer}{apart}"]
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


# -- speculative decoding --------------------------------------------------------------


def _by_suite(records: list[dict], suite: str) -> list[dict]:
    return [r for r in records if r["suite"] == suite]


def _pair(a: float | None, b: float | None, digits: int = 2) -> str:
    return f"{_f(a, digits)} / {_f(b, digits)}"


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.0f}%"


def parse_interval(rec: dict) -> str:
    """The paired 95% interval of a spec record's parse-rate difference, in points
    ("-8 to +7"); "" for a record without one."""
    p = rec.get("parse_paired")
    if not p:
        return ""
    lo, hi = p["difference_95"]
    return f"{100 * lo:+.0f} to {100 * hi:+.0f}"


def _ci(rec: dict) -> str:
    ci = parse_interval(rec)
    return f" ({ci})" if ci else ""


def spec_table(records: list[dict]) -> str:
    """Native vs speculative decoding, one row per spec record (backend, drafter)."""
    rows = []
    for rec in _by_suite(records, "spec"):
        n, s, r = rec["native"], rec["speculative"], rec["ratios"]
        tp = "target_passes_per_canvas"
        lo, hi = r["paired_min_max"]
        rows.append(
            [device_label(rec), backend_label(rec), model_label(rec)]
            + [drafter_label(rec)]
            + [_f(n[tp]["mean"], 2), _f(s[tp]["mean"], 2)]
            + [_f(s["drafter_passes_per_canvas"]["mean"], 2)]
            + [_f(s["verify_rounds_per_canvas"]["mean"], 2)]
            + [_pct(s["draft_kept_share"])]
            + [_pair(n["tokens_per_target_pass"], s["tokens_per_target_pass"])]
            + [_f(n["tokens_per_s"]), _f(s["tokens_per_s"])]
            + [f"{r['tokens_per_s_spec_over_native']:.3f} ({lo:.2f}-{hi:.2f})"]
            + [_flop_speedup(rec), _released_share(rec), _byte_regimes(rec)]
            + [f"{_pct(n['parse_rate'])} / {_pct(s['parse_rate'])}{_ci(rec)}"]
            + [_pair(n["committed_entropy"], s["committed_entropy"])]
            + [_pair(n.get("distinct_bigram_share"), s.get("distinct_bigram_share"))]
        )
    header = ["device", "backend", "model", "drafter", "target passes/canvas native"]
    header += ["spec", "drafter passes/canvas", "verifies/canvas", "draft kept"]
    header += ["tok/target pass native / spec", "tok/s native", "tok/s spec"]
    header += ["spec/native tok/s (paired range)"]
    header += ["if passes cost their FLOPs (drafter / target FLOPs)"]
    header += ["drafter pass, released shape: bytes / FLOPs of a model pass"]
    header += [
        "where bytes bind: model pass-equivalents native / spec (Mac 4-bit; H200)"
    ]
    header += ["parse rate native / spec (paired 95% interval of the difference)"]
    header += ["committed entropy native / spec", "distinct bigrams native / spec"]
    return _md(header, rows)


def _released_share(rec: dict) -> str:
    rel = (rec.get("cost") or {}).get("released")
    if not rel:
        return DASH
    return f"{rel['bytes_ratio']:.3f} / {rel['flops_ratio']:.3f}"


def _byte_regimes(rec: dict) -> str:
    """Native / speculative model pass-equivalents per canvas, each pass at its bytes
    on the released shape (bench.drafter_cost.byte_regime; records since 2026-12-05)."""
    regimes = rec.get("byte_regimes")
    if not regimes:
        return DASH
    return "; ".join(
        f"{r['native_pass_equivalents']:.1f} / {r['spec_pass_equivalents']:.1f} "
        f"(x{r['native_over_spec']:.2f})"
        for r in (regimes["mac-4bit"], regimes["h200-bf16"])
    )


def _flop_speedup(rec: dict) -> str:
    """The speedup the record's pass counts allow if a drafter pass cost its FLOP
    ratio of a target pass (bench.drafter_cost.pass_speedup); records before
    2026-12-05 left a trained drafter's own layers out of the cost model (a "note"),
    so none for them."""
    from .drafter_cost import pass_speedup

    here = (rec.get("cost") or {}).get("this_model")
    if not here or "note" in rec["cost"]:
        return DASH
    x = pass_speedup(
        *spec_passes(rec["native"], rec["speculative"]), here["flops_ratio"]
    )
    return f"{x:.2f} ({here['flops_ratio']:.2f})"


def spec_passes(native: dict, spec: dict) -> tuple[float, float, float]:
    """Mean passes per canvas of a spec record's entries: native target passes,
    speculative target passes, speculative drafter passes."""
    tp = "target_passes_per_canvas"
    return (
        native[tp]["mean"],
        spec[tp]["mean"],
        spec["drafter_passes_per_canvas"]["mean"],
    )


def spec_cost_table(records: list[dict]) -> str:
    """Measured self-drafter pass / target pass next to the cost model's ratios."""
    rows = []
    for rec in _by_suite(records, "spec-cost"):
        for point in rec["results"]:
            for name, d in point["drafters"].items():
                lo, hi = d["paired_min_max"]
                rows.append(
                    [device_label(rec), backend_label(rec), rec["model"]["preset"]]
                    + [precision(rec), str(point["context"]), name]
                    + [_plan(d["plan"])]
                    + [_f(point["target_ms"]["median"], 3)]
                    + [_f(d["drafter_ms"]["median"], 3)]
                    + [f"{d['measured_ratio']:.3f} ({lo:.2f}-{hi:.2f})"]
                    + [f"{d['predicted_flops_ratio']:.3f}"]
                    + [_f(d.get("predicted_floor_ratio"), 3)]
                )
    header = ["device", "backend", "preset", "precision", "context", "drafter"]
    header += ["plan", "target ms", "drafter ms", "measured ratio (paired range)"]
    header += ["predicted FLOP ratio", "predicted floor ratio"]
    return _md(header, rows)


def _plan(plan: dict) -> str:
    parts = []
    for k, v in plan.items():
        if v is None:
            continue
        v = ",".join(map(str, v)) if isinstance(v, list | tuple) else v
        parts.append(f"{k}={v}")
    return " ".join(parts) or "no cuts"


def projection_table(records: list[dict]) -> str:
    """The released model's projected tokens/s from each spec record's pass counts."""
    rows = []
    for rec in _by_suite(records, "spec"):
        proj = rec.get("projection")
        if not proj:
            continue
        for dev, d in proj["devices"].items():
            e = d["floor"]["peak"]
            pubs = d["published"] or [{}]
            for p in pubs:
                rows.append(
                    [device_label(rec), backend_label(rec), rec["drafter"]["name"]]
                    + [dev, proj["quant"], f"{e['drafter_cost']:.3f}"]
                    + [_f(e["native_tokens_per_s"]), _f(e["speculative_tokens_per_s"])]
                    + [f"{e['speedup']:.3f}"]
                    + [_published(p), _f(p.get("autoregressive_tokens_per_s"))]
                    + [_f(p.get("scaled_by_speedup"))]
                )
    header = ["measured on", "backend", "drafter", "projected device", "quant"]
    header += ["drafter pass / target step", "native tok/s (floor)"]
    header += ["spec tok/s (floor)", "speedup", "published native tok/s"]
    header += ["published AR tok/s", "published native x speedup"]
    return _md(header, rows)


def _published(p: dict) -> str:
    if not p:
        return "none published"
    return f"{_f(p['tokens_per_s'])} ({p['engine']}, {p['quant']})"


def released_cost_lines(records: list[dict]) -> str:
    """The cost model's self-drafter ratio on the released shape (spec-cost records)."""
    seen, lines = set(), []
    for rec in _by_suite(records, "spec-cost"):
        rel = rec.get("released")
        if not rel:
            continue
        line = (
            f"- Released shape ({rel['quant']}, context {rel['context']}), plan "
            f"`{_plan(rel['plan'])}`: a self-drafter pass is {rel['flops_ratio']:.3f} "
            f"of a target step's FLOPs and {rel['bytes_ratio']:.3f} of its bytes "
            "(cost model)."
        )
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def spec_tables(records: list[dict]) -> str:
    """The "Speculative decoding" section ("" without spec / spec-cost records)."""
    if not (_by_suite(records, "spec") or _by_suite(records, "spec-cost")):
        return ""
    parts = [
        "### Speculative decoding (trained default model, held-out function prompts; "
        "native and speculative interleaved in one process, same prompts and seeds)",
        spec_table(records),
        "### Self-drafter pass cost (random-weight presets; measured / target pass, "
        "interleaved, next to the cost model)",
        spec_cost_table(records),
    ]
    released = released_cost_lines(records)
    if released:
        parts.append(released)
    parts += [
        "### Projection to the released model (roofline floor, peak rates, from the "
        "measured passes per canvas; published figures from reference/anchors.md)",
        projection_table(records),
    ]
    return "\n\n".join(parts)


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


def plot_spec(records: list[dict], path: Path) -> Path | None:
    """Bars: target passes per canvas native vs speculative (+ drafter passes), per
    spec record (device, backend, drafter)."""
    recs = _by_suite(records, "spec")
    if not recs:
        return None
    plt = _plt()
    tp = "target_passes_per_canvas"
    series = [
        ("native: target passes", lambda r: r["native"][tp]["mean"], None),
        ("speculative: target passes", lambda r: r["speculative"][tp]["mean"], None),
        (
            "speculative: drafter passes",
            lambda r: r["speculative"]["drafter_passes_per_canvas"]["mean"],
            "//",
        ),
    ]
    groups = [
        f"{device_label(r)}\n{backend_label(r)}, {r['model']['preset']}\n"
        f"drafter {r['drafter']['name']}"
        for r in recs
    ]
    fig, ax = plt.subplots(figsize=(max(7, 3.2 * len(recs)), 5.5))
    width, top = 0.8 / len(series), 0.0
    for i, (label, get, hatch) in enumerate(series):
        xs = [g + i * width for g in range(len(recs))]
        ys = [get(r) for r in recs]
        rects = ax.bar(
            xs, ys, width, label=label, hatch=hatch, alpha=0.6 if hatch else 1
        )
        ax.bar_label(rects, labels=[_f(y, 1) for y in ys], fontsize=7)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(recs))], groups, fontsize=7)
    ax.set_ylim(0, 1.3 * top or 1)  # room for the legend above the bars
    ax.set_ylabel("passes per canvas (mean)")
    ax.set_title("Target passes per canvas: native vs speculative, per drafter")
    ax.legend(fontsize=8, loc="upper right", ncol=3)
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
    spec = spec_tables(records)
    return "\n\n".join(parts + ([spec] if spec else [])) + "\n"


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
        plot_spec(records, out / "speculative.png"),
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


def main(
    argv: Sequence[str] | None = None, prog: str = "python -m bench.report"
) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
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

"""Sampler settings of a trained model, chosen on validation prompts, not the test ones.

A small model's best temperatures and entropy bound differ from the release's; this
grid measures, for each setting, what `bench.quality` reports (passes per canvas, share
stopped before the cap, tokens per forward, parse rate) on held-out function headers
that `bench.quality` does not use (its prompts are drawn with seed 0; these are the
rest, drawn with seed 1), so that settings picked here are then tested on fresh prompts.

    python -m bench.sampler_sweep --model runs/r4/export --json-out sweep.json \\
        --grid '{"t_min": [0.4, 0.2], "t_max": [0.8, 0.4], "entropy_bound": [0.1, 1.0]}'
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from . import quality
from . import record as rec

SCHEMA = "mlx-diffgem-sampler-sweep/1"


def validation_prompts(texts: list[str], n: int, test_n: int = 40) -> list:
    """Function prompts disjoint from `bench.quality`'s default test prompts."""
    test = set(quality.function_prompts(texts, test_n, 0))
    rest = [p for p in quality.function_prompts(texts, 10**9, 0) if p not in test]
    return [rest[i] for i in _pick(len(rest), n)]


def _pick(total: int, n: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(1)
    return sorted(rng.choice(total, size=min(n, total), replace=False).tolist())


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination; combinations with t_max <= t_min are left out."""
    keys = sorted(grid)
    points = [
        dict(zip(keys, vals, strict=True))
        for vals in itertools.product(*(grid[k] for k in keys))
    ]
    return [p for p in points if p.get("t_max", 1) > p.get("t_min", 0)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.sampler_sweep", description=__doc__
    )
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--backend", default="torch", choices=["mlx", "torch"])
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--grid", required=True, help="JSON {setting: [values]}")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    try:
        grid = json.loads(a.grid)
    except json.JSONDecodeError as e:
        p.error(f"--grid: expected a JSON object of lists ({e})")
    if not isinstance(grid, dict) or not all(
        isinstance(v, list) for v in grid.values()
    ):
        p.error('--grid: expected a JSON object of lists, e.g. {"t_min": [0.2, 0.4]}')
    import mlx_diffgem as dg
    from cuda_backend import corpus

    model, tokenizer = dg.load(a.model, backend=a.backend)
    root = corpus.stdlib_root()
    _, held = corpus.split_files(corpus.source_files(root))
    prompts = validation_prompts(corpus.read_texts(root, held), a.prompts)
    results = []
    for point in grid_points(grid):
        out = quality.completions(model, tokenizer, prompts, a.max_tokens, 0, **point)
        out.pop("samples")
        results.append({"settings": point, **out})
        dist = out["passes_per_canvas"]
        print(
            f"{point}: passes {dist['mean']:.1f} (p50 {dist['p50']:.0f}, "
            f"{dist['stopped_before_cap']:.0%} before cap), tok/fwd "
            f"{out['tokens_per_forward']:.2f}, parse {out['parse_rate']:.0%}",
            flush=True,
        )
    record = {
        **rec.envelope("sampler-sweep", "cpu"),
        "schema": SCHEMA,
        "model": str(Path(a.model)),
        "backend": a.backend,
        "settings": {"prompts": a.prompts, "max_tokens": a.max_tokens, "grid": grid},
        "results": results,
    }
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()

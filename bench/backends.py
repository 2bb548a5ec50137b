"""MLX vs torch generation on this machine: the measurement behind `backend="auto"`.

    OMP_NUM_THREADS=1 python -m bench.backends --max-tokens 256 --repeats 5

Loads the embedded default model (or --model) with both backends in one process and
generates --max-tokens tokens (EOS off, so every run commits the same number of whole
canvases) from a few prompts, alternating the backends run by run so that drift and
background load hit both alike. Writes one JSON record (bench/record.py) with the
medians of tok/s and of ms per decoder pass and the torch / MLX ratios; the last stdout
line is a JSON summary with the record's path.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import numpy as np

PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef read_lines(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def parse_args(argv=None):\n    parser = ",
)
BACKENDS = ("mlx", "torch")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: embedded)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over prompts")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="folder of the JSON record")
    return p


def _load(args: argparse.Namespace) -> dict:
    import mlx_diffgem as dg

    # MLX first: its BLAS must be preloaded before anything imports mlx.core.
    return {b: dg.load(args.model, backend=b) for b in BACKENDS}


def _run_once(model, tokenizer, prompt: str, args, seed: int) -> dict:
    import mlx_diffgem as dg
    from mlx_diffgem.core.tokenizer import format_prompt

    ids = np.asarray([format_prompt(tokenizer, prompt, False)], np.int32)
    t0 = time.perf_counter()
    _, st = dg.generate_ids(
        model, ids, seed=seed, max_new_tokens=args.max_tokens, eos_token_id=[]
    )
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "tok_s": st.generated_tokens / wall,
        "generation_tok_s": st.generation_tps,
        "ms_per_pass": 1e3 * st.generation_time / max(1, st.target_passes),
        "tokens": st.generated_tokens,
        "passes": st.target_passes,
        "peak_memory_bytes": st.peak_memory,
    }


def _rounds(models: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for r in range(args.warmup + args.repeats):
        for i, prompt in enumerate(PROMPTS):
            # alternate which backend goes first, so neither always runs "second"
            order = BACKENDS if (r + i) % 2 == 0 else BACKENDS[::-1]
            for b in order:
                res = _run_once(*models[b], prompt, args, args.seed + i)
                if r >= args.warmup:
                    runs[b].append(res)
    return runs


def _entry(runs: list[dict]) -> dict:
    from .record import spread

    def med(key: str) -> float:
        return float(np.median([r[key] for r in runs]))

    return {
        "tok_s": spread([r["tok_s"] for r in runs], scale=1.0),
        "generation_tok_s_median": med("generation_tok_s"),
        "ms_per_pass": spread([r["ms_per_pass"] for r in runs], scale=1.0),
        "passes_median": med("passes"),
        "tokens_median": med("tokens"),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
    }


def record(args: argparse.Namespace) -> dict:
    from mlx_diffgem.mlx_backend import _blas

    from . import record as rec_mod
    from .record import spread

    models = _load(args)
    rec = rec_mod.envelope("backends", rec_mod.cpu_name(), list(_blas.loaded))
    rounds = _rounds(models, args)
    res = {b: _entry(rounds[b]) for b in BACKENDS}
    # each torch run next to the MLX run of the same prompt and round: drift in the
    # background load cancels in the ratio
    runs = zip(rounds["mlx"], rounds["torch"], strict=True)
    pairs = [t["tok_s"] / m["tok_s"] for m, t in runs]
    ratio = res["torch"]["tok_s"]["median"] / res["mlx"]["tok_s"]["median"]
    pass_ratio = (
        res["mlx"]["ms_per_pass"]["median"] / res["torch"]["ms_per_pass"]["median"]
    )
    rec.update(
        backend="mlx-vs-torch",
        model={"preset": "default", "path": str(models["mlx"][0].path)},
        settings={
            "max_tokens": args.max_tokens,
            "eos": "off",
            "prompts": list(PROMPTS),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "dtype": "float32",
            "order": "interleaved per prompt, first backend alternating",
        },
        results=res,
        ratio_torch_over_mlx_tok_s=round(ratio, 3),
        paired_ratio_torch_over_mlx=spread(pairs, scale=1.0),
        ratio_mlx_over_torch_ms_per_pass=round(pass_ratio, 3),
        faster="torch" if ratio > 1 else "mlx",
    )
    rec["machine"]["loadavg_after"] = list(os.getloadavg())
    return rec


def main(
    argv: Sequence[str] | None = None, prog: str = "python -m bench.backends"
) -> int:
    args = _parser(prog).parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .record import write

    rec = record(args)
    path = write(rec, args.out)
    summary = {
        "record": str(path),
        "mlx_tok_s": rec["results"]["mlx"]["tok_s"]["median"],
        "torch_tok_s": rec["results"]["torch"]["tok_s"]["median"],
        "ratio_torch_over_mlx": rec["ratio_torch_over_mlx_tok_s"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

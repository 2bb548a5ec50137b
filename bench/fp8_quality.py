"""FP8 weights against float on the embedded model: cross-entropy and parse deltas.

The torch backend's `quantization="fp8"` (cuda_backend/quantize.py) stores
float8_e4m3fn weights with per-output-channel scales; its Linear layers also
quantize their inputs per row. This measures what that costs in quality, on this
CPU, against the same model in float32:

1. Held-out denoising cross-entropy at noise levels 0.25 / 0.5 / 0.75 / 1.0
   (`bench.quality.denoising_ce`: fixed windows, the same seeded noise for every
   variant, one pass without self-conditioning and the two-pass self-conditioned
   one). Three variants: float32, fp8 as it runs here (through `torch._scaled_mm`
   where it runs, the CPU included), and fp8 through the emulation that GPUs without
   fp8 kernels use, which must agree with it up to rounding.
2. The parse rate of completions of held-out function headers
   (`bench.quality.completions`, each model with the shipped sampler settings),
   float32 and fp8 interleaved prompt by prompt with the same seeds, paired.

The fp8 emulation multiplies the raw fp8 values in the compute dtype (float32 here:
bf16 matmuls are slow on CPUs) and scales the output; fp8 values are exact in both
bf16 and float32, so a bf16 GPU sees the same fp8 rounding of weights and inputs.

    python -m bench.fp8_quality                      # ~5 min on one core
    python -m bench.fp8_quality --prompts 8 --windows 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import quality
from . import record as rec

SUITE = "fp8-quality"
LEVELS = (0.25, 0.5, 0.75, 1.0)
BATCH = 8  # windows per batch of quality.denoising_ce
OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fp8_quality", description=__doc__)
    p.add_argument("--model", default=None, help="model folder (default: embedded)")
    p.add_argument("--data", default="runs/corpus3", help="folder with heldout.npy")
    p.add_argument("--windows", type=int, default=24, help="held-out windows (x8)")
    p.add_argument("--prompts", type=int, default=40, help="held-out function headers")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT), help="folder for the JSON record")
    a = p.parse_args(argv)
    if a.windows < BATCH or a.windows % BATCH:
        p.error(f"--windows: expected a positive multiple of {BATCH}, got {a.windows}")
    if a.prompts < 1:
        p.error(f"--prompts: expected a positive count, got {a.prompts}")
    return a


def heldout_stream(data: str | Path) -> np.ndarray:
    path = Path(data) / "heldout.npy"
    if not path.is_file():
        raise SystemExit(f"--data: {path} is missing (python -m cuda_backend.corpus)")
    return np.load(path).astype(np.int64)


def set_emulated(model, emulated: bool) -> str:
    """Route every fp8 Linear through the emulation (or back to `torch._scaled_mm`
    where it runs); the path the Linear layers take now."""
    from cuda_backend import quantize

    paths = set()
    for m in model.modules():
        if isinstance(m, quantize.Fp8Linear):
            runs = quantize.scaled_mm_runs(m.weight.device, model.dtype)
            m.scaled_mm = runs and not emulated
            paths.add("torch._scaled_mm" if m.scaled_mm else "emulated")
    return "+".join(sorted(paths))


def ce_deltas(float_model, fp8_model, stream: np.ndarray, windows: int) -> dict:
    """Denoising CE per level of float32, fp8 and emulated fp8, with the deltas."""
    batches = windows // BATCH
    out = {"float32": quality.denoising_ce(float_model, stream, LEVELS, batches)}
    for name, emulated in (("fp8", False), ("fp8_emulated", True)):
        path = set_emulated(fp8_model, emulated)
        out[name] = quality.denoising_ce(fp8_model, stream, LEVELS, batches)
        out[name + "_linear_path"] = path
    set_emulated(fp8_model, False)
    out["delta"] = _minus(out["fp8"], out["float32"])
    out["emulation_delta"] = _minus(out["fp8_emulated"], out["fp8"])
    return out


def _minus(a: dict, b: dict) -> dict:
    """a - b for {level: {no_sc, sc}} cross-entropies."""
    return {t: {k: a[t][k] - v for k, v in ce.items()} for t, ce in b.items()}


def parse_pairs(models: dict, tokenizer, prompts, a: argparse.Namespace) -> dict:
    """Completions of each prompt by each model in turn (same seed per prompt):
    parse rates, target passes per canvas, identical completions, paired delta."""
    from .spec_suites import parse_paired

    runs = {name: [] for name in models}
    for i, prompt in enumerate(prompts):
        for name, model in models.items():
            r = quality.completions(
                model, tokenizer, [prompt], a.max_tokens, a.seed + i
            )
            runs[name].append(r)
    out = {}
    for name, rs in runs.items():
        canvases = sum(r["passes_per_canvas"]["canvases"] for r in rs)
        steps = sum(
            r["steps_per_canvas"] * r["passes_per_canvas"]["canvases"] for r in rs
        )
        out[name] = {
            "parsed": sum(round(r["parse_rate"]) for r in rs),
            "prompts": len(rs),
            "parse_rate": float(np.mean([r["parse_rate"] for r in rs])),
            "passes_per_canvas": steps / canvases,
            "seconds": sum(r["seconds"] for r in rs),
            "samples": [r["samples"][0] for r in rs[:3]],
        }
    base, fp8 = runs["float32"], runs["fp8"]
    texts = [
        (x["samples"][0]["completion"], y["samples"][0]["completion"])
        for x, y in zip(base, fp8, strict=True)
    ]
    out["identical_completions"] = sum(x == y for x, y in texts)
    paired = parse_paired(*(_outcomes(r) for r in (base, fp8)))
    names = {"native_only": "float32_only", "speculative_only": "fp8_only"}
    out["paired"] = {names.get(k, k): v for k, v in paired.items()}
    return out


def _outcomes(runs: list[dict]) -> list[SimpleNamespace]:
    # parse_paired pairs runs by (prompt, repeat).
    return [
        SimpleNamespace(prompt=i, repeat=0, parses=bool(r["parse_rate"]))
        for i, r in enumerate(runs)
    ]


def model_bytes(model) -> int:
    """Bytes of every parameter and buffer (fp8 weights: 1 per value + scales)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def held_out_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """bench.quality's held-out function headers (the stdlib files held out of
    training)."""
    from cuda_backend import corpus

    root = corpus.stdlib_root()
    _, held = corpus.split_files(corpus.source_files(root))
    return quality.function_prompts(corpus.read_texts(root, held), n, seed)


def run(a: argparse.Namespace) -> dict:
    import torch

    from cuda_backend import quantize
    from cuda_backend.backend import load
    from mlx_diffgem.core.checkpoint import default_model_path
    from mlx_diffgem.core.tokenizer import load_tokenizer

    torch.set_num_threads(a.threads)
    path = Path(a.model) if a.model else Path(default_model_path())
    stream = heldout_stream(a.data)
    models = {
        name: load(path, device="cpu", dtype="float32", quantization=q)
        for name, q in (("float32", None), ("fp8", "fp8"))
    }
    record = rec.envelope(SUITE, rec.cpu_name())
    C = models["float32"].config.canvas_length
    t0 = time.perf_counter()
    ce = ce_deltas(models["float32"].model, models["fp8"].model, stream, a.windows)
    ce_seconds = time.perf_counter() - t0
    prompts = held_out_prompts(a.prompts, a.seed)
    parse = parse_pairs(models, load_tokenizer(path), prompts, a)
    record.update(
        backend="torch",
        model={"path": str(path), "preset": "default" if a.model is None else None},
        settings={
            "dtype": "float32",
            "quantization": "fp8",
            "fp8_format": "float8_e4m3fn, float32 scales per output channel",
            "fp8_emulation": "raw fp8 values multiplied in the compute dtype "
            "(float32 here), both scales applied to the output",
            "scaled_mm_runs_on_cpu": quantize.scaled_mm_runs(
                torch.device("cpu"), torch.float32
            ),
            "levels": list(LEVELS),
            "windows": a.windows,
            "window_tokens": 4 * C + C // 2,  # quality.denoising_ce's windows
            "prompts": len(prompts),
            "max_tokens": a.max_tokens,
            "seed": a.seed,
            "data": str(a.data),
            "heldout_tokens": int(len(stream)),
        },
        model_bytes={k: model_bytes(m.model) for k, m in models.items()},
        fp8_values=sum(
            b.numel() for b in models["fp8"].model.buffers() if b.dtype == quantize.FP8
        ),
        denoising_ce=ce,
        denoising_seconds=ce_seconds,
        parse=parse,
    )
    return record


def summary(r: dict) -> str:
    ce, p = r["denoising_ce"], r["parse"]
    lines = ["noise  CE float32  CE fp8  delta  (no SC / SC)  emulation - fp8"]
    for t, d in ce["delta"].items():
        f, q, e = ce["float32"][t], ce["fp8"][t], ce["emulation_delta"][t]
        lines.append(
            f"{t}   {f['no_sc']:.4f}/{f['sc']:.4f}  {q['no_sc']:.4f}/{q['sc']:.4f}  "
            f"{d['no_sc']:+.4f}/{d['sc']:+.4f}  {e['no_sc']:+.5f}/{e['sc']:+.5f}"
        )
    pr = p["paired"]
    lo, hi = pr["difference_95"]
    lines.append(
        f"parse: float32 {p['float32']['parsed']}/{p['float32']['prompts']}, "
        f"fp8 {p['fp8']['parsed']}/{p['fp8']['prompts']}; fp8 - float32 "
        f"{pr['difference']:+.1%} (95% paired {lo:+.1%} to {hi:+.1%}); "
        f"identical completions {p['identical_completions']}/{pr['pairs']}"
    )
    b = r["model_bytes"]
    lines.append(
        f"model bytes: float32 {b['float32']:,}, fp8 {b['fp8']:,} "
        f"({r['fp8_values']:,} values in fp8)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    record = run(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = record["created"].replace(":", "").replace("-", "")[:15]
    slug = rec.device_slug(record["machine"]["accelerator"])
    path = out / f"{SUITE}-torch-{slug}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(summary(record))
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()

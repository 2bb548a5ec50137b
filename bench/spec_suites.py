"""The speculative-decoding suites behind `python -m bench.run`: spec and spec-cost.

- spec: native decoding and speculative decoding (one per `--drafter`) of the trained
  default model on held-out function prompts, interleaved in this process: target and
  drafter passes per canvas, tokens/s and their ratio, parse rate and the target's
  entropy on the committed canvases, the self-drafter's cost-model ratio and a
  projection to the released model on Apple GPUs. One record per drafter.
- spec-cost: one self-drafter pass (decode with its SelfDraftPlan) vs one target pass
  on a random-weight preset, interleaved, next to the cost model's predicted ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_diffgem import api
from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.generate import prefill

from . import record
from .drafter_cost import (
    byte_regime,
    pass_speedup,
    released_plan,
    self_draft_cost,
    self_draft_plan,
)
from .pass_cost import decoder_cost, load_preset, param_counts
from .projection import project_speculative
from .roofline import floor
from .suites import Setup, dtype_name, force, prompt_ids, where

SPEC_PROMPTS = (
    "bench.quality.function_prompts: one-line `def ...:` headers with up to 30 lines "
    "of context from the held-out stdlib files (cuda_backend.corpus.split_files)"
)
ENTROPY_SOURCE = (
    "one extra target decode pass per committed canvas (its last target argmax, "
    "temperature 1, no self-conditioning), replayed on a fresh cache after all "
    "timed runs: prefill the prompt, then per canvas decode it and encode it"
)
LAST_PASS_ENTROPY = (
    "CanvasResult.step_stats['mean_entropy'] of the canvas's last target pass, at "
    "that pass's temperature (speculative passes sit later on the schedule, so "
    "their temperature is lower): not comparable across modes, see committed_entropy"
)


@dataclass
class SpecRun:
    """One generation of one prompt by one implementation (native or a drafter)."""

    prompt: int
    repeat: int
    stats: Any  # mlx_diffgem.core.stats.Stats
    canvases: list  # per canvas: (raw argmax [1, C], committed [1, C], counts)
    text: str
    parses: bool
    distinct_bigrams: float  # distinct / all token bigrams of the new tokens


def spec_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """The held-out function prompts bench.quality uses (context, header indent)."""
    from cuda_backend import corpus

    from .quality import function_prompts

    root = corpus.stdlib_root()
    _, held = corpus.split_files(corpus.source_files(root))
    return function_prompts(corpus.read_texts(root, held), n, seed)


def spec_policy(args: argparse.Namespace, defaults: dict | None = None) -> Any:
    """The SpecPolicy of the --spec-* flags given, over a trained drafter's
    recommended `defaults` (what a user of dg.load gets)."""
    from mlx_diffgem.core.speculative import SpecPolicy

    given = {
        "draft_steps": args.spec_draft_steps,
        "refine_steps": args.spec_refine_steps,
        "max_rounds": args.spec_max_rounds,
        "draft_confidence": args.spec_draft_confidence,
        "draft_entropy_bound": args.spec_draft_entropy_bound,
        "verify_on": args.spec_verify_on,
        "verify": args.spec_verify,
        "verify_groups": args.spec_verify_groups,
        "accept_threshold": args.spec_accept_threshold,
        "verify_sure": args.spec_verify_sure,
        "min_commit": args.spec_min_commit,
    }
    given = {k: v for k, v in given.items() if v is not None}
    return SpecPolicy(**SpecPolicy.over(defaults or {}, given))


def _spec_load(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    path = Path(args.model) if args.model else api.default_model_path()
    opts = {"device": args.device} if args.device else {}
    target, tokenizer = api.load(
        path,
        backend=args.backend,
        dtype=args.dtype,
        quantization=args.quantization,
        **opts,
    )
    if tokenizer is None:
        raise ValueError(f"spec: {path} has no tokenizer (the prompts are text)")
    return target, tokenizer, path


def _spec_generate(model: Any, ids: np.ndarray, seed: int, gen_overrides: dict):
    """generate_ids, keeping every canvas's CanvasResult (same loop, same timing)."""
    from mlx_diffgem.core.generate import generate_canvases, generation_config
    from mlx_diffgem.core.noise import make_noise
    from mlx_diffgem.core.stats import Stats

    stats = Stats()
    events = generate_canvases(
        model,
        ids,
        gen=generation_config(model, gen_overrides),
        noise=make_noise(None, seed),
        stats=stats,
    )
    canvases = [(e.result.tokens, e.tokens, _counts(e.result)) for e in events]
    return stats, canvases


def _counts(res: Any) -> dict:
    """What the record needs of a CanvasResult (not its device state: the last
    processed logits alone are C x V floats)."""
    return {
        "steps": res.steps,
        "drafter_steps": res.drafter_steps,
        "first_draft_steps": res.first_draft_steps,
        "verify_rounds": res.verify_rounds,
        # None: a hidden verify committed the whole canvas, no pass of the target's
        # own ran on it
        "last_entropy": float(ent[-1][0])
        if (ent := res.step_stats.get("mean_entropy")) is not None
        else None,
    }


def _spec_runs(args, target, tokenizer, impls: dict, prompts: list) -> dict:
    """Per repeat, per prompt: native, then each drafter (same prompt, same seed)."""
    from .quality import function_source, parses

    overrides = {"max_new_tokens": args.max_tokens}
    if args.steps_override is not None:
        overrides["max_denoising_steps"] = args.steps_override
    encoded = [
        np.asarray([[tokenizer.bos_token_id, *tokenizer.encode(c)]], np.int32)
        for c, _ in prompts
    ]
    for _ in range(args.warmup):  # untimed: first-call compilation and allocations
        for model in impls.values():
            _spec_generate(model, encoded[0], args.seed, overrides)
    runs: dict[str, list[SpecRun]] = {name: [] for name in impls}
    for r in range(args.repeats):
        for i, ((context, indent), ids) in enumerate(
            zip(prompts, encoded, strict=True)
        ):
            seed = args.seed + i + 1000 * r
            for name, model in impls.items():
                stats, canvases = _spec_generate(model, ids, seed, overrides)
                new = np.concatenate([c[1] for c in canvases], axis=1)[0]
                text = tokenizer.decode(new.tolist())
                ok = parses(function_source(context, text, indent))
                distinct = _distinct_bigrams(new, target.generation_config.pad_token_id)
                runs[name].append(SpecRun(i, r, stats, canvases, text, ok, distinct))
    return {"runs": runs, "ids": encoded}


def _distinct_bigrams(tokens: np.ndarray, pad: int | None) -> float:
    """Distinct token bigrams / bigrams: low values flag repetition ("methodmethod"),
    which also lowers the target's entropy on the canvas."""
    t = tokens if pad is None else tokens[tokens != pad]
    pairs = list(zip(t[:-1].tolist(), t[1:].tolist(), strict=True))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def _entropy(logits: Any, tokens: np.ndarray) -> tuple[float, float]:
    """(mean entropy in nats, share of positions whose argmax is the token), row 0."""
    z = np.asarray(api.to_numpy(logits), np.float64)[0]
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    h = -(np.exp(logp) * logp).sum(axis=-1)
    return float(h.mean()), float((z.argmax(-1) == tokens[0]).mean())


def _committed_entropy(target: Any, ids: np.ndarray, run: SpecRun) -> list:
    """(entropy, argmax agreement) per canvas of `run` (see ENTROPY_SOURCE)."""
    cache = target.new_cache(1)
    prefill(target, ids, cache)
    out = []
    for raw, committed, _ in run.canvases:
        out.append(_entropy(target.decode(raw, cache), raw))
        target.encode(committed, cache)
    return out


def _per_canvas(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return {"mean": 0.0, "p50": 0.0, "min": 0.0, "max": 0.0, "n": 0}
    return {
        "mean": round(float(a.mean()), 4),
        "p50": round(float(np.median(a)), 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
        "n": int(a.size),
    }


def _repeat_tps(runs: list[SpecRun], repeats: int) -> list[float]:
    """Per repeat: generated tokens / generation seconds over all prompts."""
    out = []
    for r in range(repeats):
        mine = [x.stats for x in runs if x.repeat == r]
        out.append(
            sum(st.generated_tokens for st in mine)
            / sum(st.generation_time for st in mine)
        )
    return out


def _spec_entry(runs: list[SpecRun], entropies: list, repeats: int) -> dict:
    counts = [c[2] for x in runs for c in x.canvases]
    stats = [x.stats for x in runs]
    generated = sum(st.generated_tokens for st in stats)
    target_passes = sum(st.target_passes for st in stats)
    drafted = sum(st.drafted_tokens for st in stats)
    tps = _repeat_tps(runs, repeats)
    flat = [e for per_run in entropies for e in per_run]
    last = [c["last_entropy"] for c in counts if c["last_entropy"] is not None]
    parsed = sum(x.parses for x in runs)
    return {
        "canvases": len(counts),
        "target_passes_per_canvas": _per_canvas([c["steps"] for c in counts]),
        "drafter_passes_per_canvas": _per_canvas([c["drafter_steps"] for c in counts]),
        # the drafter's passes to its first draft (its own stop rule or draft_steps)
        "first_draft_passes_per_canvas": _per_canvas(
            [c["first_draft_steps"] for c in counts]
        ),
        "verify_rounds_per_canvas": _per_canvas([c["verify_rounds"] for c in counts]),
        "draft_kept_share": round(
            sum(st.drafted_kept for st in stats) / drafted if drafted else 0.0, 4
        ),
        "generated_tokens": generated,
        "target_passes": target_passes,
        "drafter_passes": sum(st.drafter_passes for st in stats),
        "tokens_per_target_pass": round(generated / target_passes, 4),
        "tokens_per_forward": round(generated / sum(st.row_passes for st in stats), 4),
        "tokens_per_s": round(float(np.median(tps)), 3),
        "tokens_per_s_per_repeat": [round(t, 3) for t in tps],
        "tokens_per_s_spread": record.spread(tps, 1),
        "completions": len(runs),
        "parsed": parsed,
        "parse_rate": round(parsed / len(runs), 4),
        "committed_entropy": round(float(np.mean([e[0] for e in flat])), 4),
        "committed_argmax_agreement": round(float(np.mean([e[1] for e in flat])), 4),
        "last_target_pass_entropy": round(float(np.mean(last)), 4) if last else None,
        "distinct_bigram_share": round(
            float(np.mean([x.distinct_bigrams for x in runs])), 4
        ),
        "samples": [
            {"prompt": x.prompt, "completion": x.text, "parses": x.parses}
            for x in runs[:2]
        ],
    }


def _spec_ratios(native: dict, spec: dict) -> dict:
    paired = np.asarray(spec["tokens_per_s_per_repeat"]) / np.asarray(
        native["tokens_per_s_per_repeat"]
    )
    n_tp = native["target_passes_per_canvas"]["mean"]
    s_tp = spec["target_passes_per_canvas"]["mean"]
    return {
        "tokens_per_s_spec_over_native": round(
            spec["tokens_per_s"] / native["tokens_per_s"], 4
        ),
        "paired_median": round(float(np.median(paired)), 4),
        "paired_min_max": [
            round(float(paired.min()), 4),
            round(float(paired.max()), 4),
        ],
        "target_passes_native_over_spec": round(n_tp / s_tp, 4) if s_tp else None,
        "tokens_per_target_pass_spec_over_native": round(
            spec["tokens_per_target_pass"] / native["tokens_per_target_pass"], 4
        ),
    }


def _drafter_info(name: str, model: Any) -> dict:
    return {"name": name, **model.drafter.plan.describe()}


def _released_plan(name: str, cfg: ModelConfig) -> tuple[Any, str]:
    """The plan a drafter argument means on the released config, and how."""
    kind, _, settings = name.partition(":")
    if kind == "target" or settings.strip() == "full":
        return self_draft_plan(cfg, "full"), "no cuts (the target at full cost)"
    if kind == "self" and settings.strip() in ("", "auto"):
        return self_draft_plan(cfg, "auto"), "SelfDraftPlan.auto of the released config"
    try:
        return self_draft_plan(cfg, name), "the same settings on the released config"
    except ValueError:
        return self_draft_plan(cfg, "auto"), "SelfDraftPlan.auto (settings do not fit)"


def _spec_cost(
    target: Any, name: str, model: Any, native: dict, spec: dict, context: int
) -> dict:
    """The cost model's drafter/target pass ratios (FLOPs and bytes) on this model
    (at the mean prompt length) and on the released shape (context 512), the
    projection, and the measured passes at their bytes in the bandwidth regimes."""
    from .report import spec_passes

    released = load_preset("diffusiongemma-26b-a4b")
    plan = model.drafter.plan
    if plan.adapter is not None:  # a trained drafter: its design, at release width
        there_plan = released_plan(plan, target.config, released)
        how = (
            "the trained drafter's design on the released shape (bench.drafter_cost."
            "released_plan): its layers, experts and soft-embedding rows, a head over "
            "the same vocabulary share, its own layers at the released width"
        )
    else:
        there_plan, how = _released_plan(name, released)
    passes = spec_passes(native, spec)
    here = self_draft_cost(target.config, plan, context=context)
    here["speedup_at_flops_ratio"] = pass_speedup(*passes, here["flops_ratio"])
    there = self_draft_cost(released, there_plan, context=512)
    if there_plan.adapter is not None:
        there["adapter"] = dataclasses.asdict(there_plan.adapter)
    proj = project_speculative(*passes, plan=there_plan)
    proj["drafter_plan_source"] = how
    for d in (here, there):
        d.pop("floor_ratio")
    counts = {
        "native_target": passes[0],
        "spec_target": passes[1],
        "verifies": spec["verify_rounds_per_canvas"]["mean"],
        "drafter": passes[2],
    }
    hidden = model.spec.verify != "plain"  # a verify over two canvases
    regimes = byte_regime(released, there_plan, counts, hidden=hidden)
    return {
        "cost": {"this_model": here, "released": there},
        "projection": proj,
        "byte_regimes": regimes,
    }


def spec(args: argparse.Namespace) -> list[dict]:
    """Native decoding and speculative decoding with each drafter, interleaved in one
    process on the held-out function prompts; one record per drafter."""
    from drafter import load_drafter, recommended
    from mlx_diffgem.core.speculative import SpeculativeModel

    target, tokenizer, path = _spec_load(args)
    impls: dict[str, Any] = {"native": target}
    for name in args.drafter:
        policy = spec_policy(args, recommended(target, name))
        impls[name] = SpeculativeModel(target, load_drafter(target, name), policy)
    prompts = spec_prompts(args.prompts, args.seed)
    if not prompts:
        raise ValueError("spec: no held-out function prompts found")
    out = _spec_runs(args, target, tokenizer, impls, prompts)
    runs, ids = out["runs"], out["ids"]
    entropies = {  # outside the timed region
        name: [_committed_entropy(target, ids[x.prompt], x) for x in rs]
        for name, rs in runs.items()
    }
    native = _spec_entry(runs["native"], entropies["native"], args.repeats)
    accel, device = where(target)
    model_entry = _spec_model_entry(args, target, path)
    context = round(float(np.mean([a.shape[1] for a in ids])))
    records = []
    created = None  # one time stamp for the run: its records sort together by name
    for name in args.drafter:
        entry = _spec_entry(runs[name], entropies[name], args.repeats)
        rec = record.envelope("spec", accel, _blas_list())
        created = rec["created"] = created or rec["created"]
        rec.update(
            backend=args.backend,
            device=device,
            dtype=dtype_name(target.model.dtype),
            quantization=args.quantization,
            compile=None,
            model=model_entry,
            drafter=_drafter_info(name, impls[name]),
            spec_policy=dataclass_dict(impls[name].spec),
            settings=_spec_settings(args, prompts, ids),
            native=native,
            speculative=entry,
            ratios=_spec_ratios(native, entry),
            parse_paired=parse_paired(runs["native"], runs[name]),
            entropy_source=ENTROPY_SOURCE,
            last_target_pass_entropy_source=LAST_PASS_ENTROPY,
            **_spec_cost(target, name, impls[name], native, entry, context),
        )
        rec["machine"]["loadavg_after"] = list(os.getloadavg())
        records.append(rec)
    return records


def parse_paired(native: list[SpecRun], spec: list[SpecRun]) -> dict:
    """The parse outcomes of native and speculative runs paired by prompt and repeat
    (same seed), and the difference of their parse rates with a 95% interval.

    Pairing removes the prompts' own difficulty from the comparison, so the interval
    (the paired normal approximation, McNemar's counts) is what says whether a gap
    of a few points is real at this number of prompts."""
    by_key = {(x.prompt, x.repeat): x.parses for x in native}
    pairs = [(by_key[x.prompt, x.repeat], x.parses) for x in spec]
    n = len(pairs)
    lost = sum(a and not b for a, b in pairs)  # native parses, speculative does not
    won = sum(b and not a for a, b in pairs)
    diff = (won - lost) / n if n else 0.0
    half = 1.96 * np.sqrt(max(0.0, (won + lost) / n - diff**2) / n) if n else 0.0
    return {
        "pairs": n,
        "both": sum(a and b for a, b in pairs),
        "native_only": lost,
        "speculative_only": won,
        "neither": sum(not (a or b) for a, b in pairs),
        "difference": round(diff, 4),
        "difference_95": [round(diff - half, 4), round(diff + half, 4)],
    }


def dataclass_dict(x: Any) -> dict:
    from dataclasses import asdict

    return asdict(x)


def _blas_list() -> list[str]:
    from mlx_diffgem.mlx_backend import _blas

    return list(_blas.loaded)


def _spec_model_entry(args: argparse.Namespace, target: Any, path: Path) -> dict:
    cfg = target.config
    params = param_counts(cfg)
    folder = Path(target.path)
    raw = json.loads((folder / "config.json").read_text())
    default = not args.model
    return {
        "preset": "default" if default else folder.name,
        "weights": "trained (the embedded default model)" if default else "trained",
        "checkpoint": str(path),
        "config_hash": hashlib.sha256(
            json.dumps(raw, sort_keys=True).encode()
        ).hexdigest()[:12],
        "weights_sha256": _weights_hash(folder),
        "canvas_length": cfg.canvas_length,
        "params_total": params.total,
        "params_active_per_token": params.active_per_token,
        "text_config": raw.get("text_config", raw),
    }


def _weights_hash(folder: Path, limit: int = 2**31) -> str | None:
    """sha256 (12 hex) of the folder's safetensors files; None above `limit` bytes."""
    files = sorted(folder.glob("*.safetensors"))
    if not files or sum(f.stat().st_size for f in files) > limit:
        return None
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def _spec_settings(args: argparse.Namespace, prompts: list, ids: list) -> dict:
    lengths = [a.shape[1] for a in ids]
    return {
        "prompts": len(prompts),
        "prompt_source": SPEC_PROMPTS,
        "prompt_tokens": {"mean": float(np.mean(lengths)), "max": max(lengths)},
        "max_tokens": args.max_tokens,
        "steps_override": args.steps_override,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "seeds": "seed + prompt index + 1000 x repeat, the same for every mode",
        "batch": 1,
        "threads": args.threads,
        "drafters": list(args.drafter),
        "protocol": "per repeat, per prompt: native generate_ids, then each drafter's "
        "speculative generate_ids (same prompt, same seed); tokens/s = generated "
        "tokens / generation seconds (Stats, prefill excluded) over all prompts of a "
        "repeat, median over repeats; pass counts pooled over every canvas; "
        "completions cut at the function's end and parsed with ast (bench.quality)",
    }


# -- spec-cost -------------------------------------------------------------------------


def spec_cost_points(s: Setup, args: argparse.Namespace) -> list[dict]:
    """Per context: the target's decoder pass and each drafter's planned pass on the
    same canvas, cache and self-conditioning, interleaved pass by pass."""
    from drafter import load_drafter

    plans = {name: load_drafter(s.target, name).plan for name in args.drafter}
    model = s.target.model
    impls = {"target": None, **plans}
    caches, inputs = {}, {}
    rng = np.random.default_rng(args.seed)
    for n in args.context:
        ids = prompt_ids(s.cfg, args.batch, n, args.seed)
        caches[n] = s.target.new_cache(args.batch)
        prefill(s.target, ids, caches[n], chunk=args.prefill_chunk)
        canvas = rng.integers(
            5, s.cfg.vocab_size - 8, (args.batch, s.cfg.canvas_length)
        )
        canvas = _as_backend(s.target, canvas.astype(np.int32))
        sc = s.target.decode(canvas, caches[n])  # fp32 logits: a realistic SC input
        force(s.target, sc)
        inputs[n] = (canvas, sc)
    times = {(n, k): [] for n in args.context for k in impls}
    for r in range(args.warmup + args.repeats):
        for n in args.context:
            canvas, sc = inputs[n]
            for _ in range(args.steps):
                for k, plan in impls.items():
                    t0 = time.perf_counter()
                    force(s.target, model.decode(canvas, caches[n], sc, plan=plan))
                    if r >= args.warmup:
                        times[n, k].append(time.perf_counter() - t0)
    return [_spec_cost_entry(s, args, n, times, plans) for n in args.context]


def _as_backend(target: Any, ids: np.ndarray) -> Any:
    if target.backend == "mlx":
        from mlx_diffgem.mlx_backend._blas import import_mlx

        return import_mlx().array(ids)
    import torch

    return torch.as_tensor(ids, device=target.device).long()


def _spec_cost_entry(s: Setup, args, n: int, times: dict, plans: dict) -> dict:
    quant = record.QUANT_FOR_COST.get(args.quantization, "bf16")
    base = times[n, "target"]
    target_cost = decoder_cost(s.cfg, n, batch=args.batch, quant=quant)
    out = {
        "context": n,
        "batch": args.batch,
        "canvas": s.cfg.canvas_length,
        "target_ms": record.spread(base),
        "drafters": {},
    }
    for name, plan in plans.items():
        mine = times[n, name]
        per = np.asarray(mine).reshape(-1, args.steps).mean(axis=1)
        ref = np.asarray(base).reshape(-1, args.steps).mean(axis=1)
        paired = per / ref
        cost = decoder_cost(s.cfg, n, batch=args.batch, quant=quant, plan=plan)
        entry = {
            "plan": plan.to_dict(),
            "drafter_ms": record.spread(mine),
            "measured_ratio": round(float(np.median(mine) / np.median(base)), 4),
            "paired_median": round(float(np.median(paired)), 4),
            "paired_min_max": [
                round(float(paired.min()), 4),
                round(float(paired.max()), 4),
            ],
            "predicted_flops_ratio": round(
                cost.total_flops / target_cost.total_flops, 4
            ),
            "predicted_bytes_ratio": round(
                cost.total_bytes / target_cost.total_bytes, 4
            ),
            "predicted_floor_ratio": None,
        }
        if s.floor_device is not None:
            basis = "measured" if s.floor_device.name == "this-machine" else "peak"
            f_d = floor(cost, s.floor_device, basis).floor_s
            f_t = floor(target_cost, s.floor_device, basis).floor_s
            entry["predicted_floor_ratio"] = round(f_d / f_t, 4)
        out["drafters"][name] = entry
    return out


def spec_cost_released(args: argparse.Namespace) -> dict:
    """The cost model's ratio for SelfDraftPlan.auto on the released shape (too big to
    time here), at the first context."""
    cfg = load_preset("diffusiongemma-26b-a4b")
    rep = self_draft_cost(cfg, context=args.context[0])
    rep.pop("floor_ratio")
    return rep

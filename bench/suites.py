"""The timing suites behind `python -m bench.run`: step, prefill, generate, peers.

Every suite loads one random-weight preset on one backend, measures each requested
context length, and returns one record (bench/record.py). Timings: `warmup` untimed
repeats first, then `repeats` timed ones; medians with p10/p90 and IQR.

- step: one denoising step (decoder pass + sampler) on a prefilled cache, timed as
  the interval between consecutive decoder-call starts (steps 3..S-1 of S-step
  canvases that never stop early); the decoder pass alone next to it.
- prefill: chunked encoding of a P-token prompt, tokens/s.
- generate: end-to-end `generate_ids` with the checkpoint's generation config.
- peers: the same one-canvas generation through our loop and through transformers /
  mlx-vlm, in this process, interleaved (ours, peer, ours, peer, ...); the per-step
  ratio ours/peer.

The speculative-decoding suites (spec, spec-cost) are in bench/spec_suites.py, the
step-hygiene one (hygiene) in bench/step_hygiene.py; they share `setup` and the
helpers here.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_diffgem import api
from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.generate import prefill
from mlx_diffgem.core.noise import SeededNoise

from . import checkpoints, impls, record
from .pass_cost import encoder_cost, param_counts

GOAL_RATIO = 0.5  # the target: our step at most half the peer's
DECODES_PER_CANVAS = 2  # step suite: lone decoder passes timed after each canvas
DEFAULT_PEERS = {"torch": ["transformers"], "mlx": ["mlx_vlm"]}


@dataclass
class Setup:
    """A loaded preset and where it runs."""

    path: Path
    target: Any
    cfg: ModelConfig
    accelerator: str  # chip / GPU / CPU name
    device: str  # cpu | gpu | cuda | mps
    dtype: str
    floor_device: Any  # bench.hardware.Device or None
    measured: dict | None  # this machine's measured rates (--measure)
    model: dict  # the record's "model" entry


def dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def where(target: Any) -> tuple[str, str]:
    """(accelerator name, device kind) of a loaded target."""
    if target.backend == "mlx":
        from mlx_diffgem.mlx_backend._blas import import_mlx

        mx = import_mlx()
        # On a Mac the CPU name is the chip's ("Apple M4 Max"), which runs the GPU.
        return record.cpu_name(), "gpu" if mx.default_device() == mx.gpu else "cpu"
    dev = target.device
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev), "cuda"
    return record.cpu_name(), dev.type


def _model_entry(args: argparse.Namespace, path: Path | None, cfg: ModelConfig) -> dict:
    raw = checkpoints.preset_config(args.preset, args.canvas)
    params = param_counts(cfg)
    return {
        "preset": args.preset,
        "weights": "random-on-device" if path is None else "random",
        "seed": args.seed,
        "config_hash": checkpoints.config_hash(raw, args.seed),
        "checkpoint": None if path is None else str(path),
        "canvas_length": cfg.canvas_length,
        "params_total": params.total,
        "params_active_per_token": params.active_per_token,
        "text_config": raw["text_config"],
    }


def _load(args: argparse.Namespace) -> tuple[Path | None, Any]:
    """(checkpoint folder or None, target): the preset's checkpoint loaded on the
    backend, or with --weights device its random weights made on the torch device."""
    if args.weights == "device":
        from .device_weights import torch_target

        target = torch_target(
            args.preset,
            device=args.device or "cuda",
            dtype=args.dtype,
            seed=args.seed,
            canvas=args.canvas,
            compile=args.compile or False,
            quantization=args.quantization,
        )
        return None, target
    path = checkpoints.build(
        args.preset, root=args.checkpoint_dir, seed=args.seed, canvas=args.canvas
    )
    opts = {"device": args.device} if args.device else {}
    if args.compile:
        opts["compile"] = args.compile
    target, _ = api.load(
        path,
        backend=args.backend,
        dtype=args.dtype,
        quantization=args.quantization,
        **opts,
    )
    return path, target


def _measure(target: Any, device: str):
    """This machine's rates: the GPU's through torch on CUDA, else numpy's (CPU)."""
    from .hardware import measure_this_machine, measure_torch

    return measure_torch(target.device) if device == "cuda" else measure_this_machine()


def peer_alone(args: argparse.Namespace) -> bool:
    """A peers run that times a peer alone: our model is not loaded."""
    return args.suite == "peers" and args.solo not in (None, "ours")


def setup(args: argparse.Namespace) -> Setup:
    """Build (or reuse) the preset's checkpoint and load it on the backend (for a
    peer timed alone, only what it needs: the checkpoint, unless on the device)."""
    if peer_alone(args):
        return _peer_setup(args)
    path, target = _load(args)
    accel, device = where(target)
    measured = _measure(target, device) if args.measure else None
    # The table's figures describe a chip's GPU (a Mac's GPU is not measured here); a
    # CPU run, or a CUDA run with --measure, uses the measured rates.
    if device == "cuda" and measured is not None:
        floor_dev = measured
    else:
        floor_dev = record.floor_device(accel if device != "cpu" else "", measured)
    return Setup(
        path,
        target,
        target.config,
        accel,
        device,
        dtype_name(target.model.dtype),
        floor_dev,
        measured.to_dict() if measured else None,
        _model_entry(args, path, target.config),
    )


def _peer_setup(args: argparse.Namespace) -> Setup:
    import torch

    from cuda_backend.backend import _device, resolve_dtype

    path = None
    if args.weights != "device":
        path = checkpoints.build(
            args.preset, root=args.checkpoint_dir, seed=args.seed, canvas=args.canvas
        )
    cfg = ModelConfig.from_dict(checkpoints.preset_config(args.preset, args.canvas))
    dev = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, dev)
    if dev.type == "cuda":
        from .hardware import measure_torch

        accel = torch.cuda.get_device_name(dev)
        measured = measure_torch(dev) if args.measure else None
        floor_dev = (
            measured if measured is not None else record.floor_device(accel, None)
        )
    else:
        from .hardware import measure_this_machine

        accel = record.cpu_name()
        measured = measure_this_machine() if args.measure else None
        floor_dev = record.floor_device("", measured)
    entry = _model_entry(args, path, cfg)
    return Setup(
        path,
        None,
        cfg,
        accel,
        dev.type,
        dtype,
        floor_dev,
        measured.to_dict() if measured else None,
        entry,
    )


def prompt_ids(cfg: ModelConfig, batch: int, length: int, seed: int) -> np.ndarray:
    # Below the image/boi/eoi ids (the last ids of the layout): mlx-vlm embeds those
    # as multimodal tokens, which would make the implementations' work differ.
    rng = np.random.default_rng(seed)
    return rng.integers(5, cfg.vocab_size - 8, (batch, length)).astype(np.int32)


def force(target: Any, x: Any) -> None:
    """Wait until `x` is computed (MLX is lazy; CUDA is asynchronous)."""
    if target.backend == "mlx":
        from mlx_diffgem.mlx_backend._blas import import_mlx

        import_mlx().eval(x)
    target.sync()


def _floor(s: Setup, context: int, batch: int, quant: str | None) -> dict | None:
    return record.step_floor(
        s.cfg,
        context,
        batch=batch,
        dtype=s.dtype,
        quantization=quant,
        device=s.floor_device,
    )


def _pct(floor: dict | None, measured_ms: float) -> float | None:
    """Measured speed as a percentage of the roofline floor's speed."""
    return None if floor is None else round(100 * floor["floor_ms"] / measured_ms, 3)


# -- step ------------------------------------------------------------------------------


def _denoise_canvas(s: Setup, cache: Any, steps: int, seed: int) -> tuple[list, Any]:
    policy = DenoisePolicy(max_steps=steps, confidence_threshold=impls.NEVER_CONFIDENT)
    with impls.StepClock(s.target.model, "decode") as clock:
        res = s.target.denoise(CanvasState(), cache, policy, SeededNoise(seed))
    if res.steps != steps:
        raise RuntimeError(f"denoise ran {res.steps} steps, expected {steps}")
    return list(np.diff(clock.marks)[impls.STEADY]), res.state.self_conditioning


def _decode_times(s: Setup, cache: Any, sc: Any, n: int) -> list[float]:
    canvas = np.full((cache.batch_size, s.cfg.canvas_length), 5, np.int32)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        force(s.target, s.target.decode(canvas, cache, sc))
        times.append(time.perf_counter() - t0)
    return times


def step_points(s: Setup, args: argparse.Namespace) -> dict:
    """Every context's step; contexts take turns per repeat, so a burst of background
    load hits all of them alike instead of bending the step-vs-context curve.

    Also: the wall time of the first canvas beyond a timed one's (`compile_s`: the
    compilation, when --compile) and the host syncs of one extra canvas per context."""
    caches = {}
    for n in args.context:
        ids = prompt_ids(s.cfg, args.batch, n, args.seed)
        caches[n] = s.target.new_cache(args.batch)
        prefill(s.target, ids, caches[n], chunk=args.prefill_chunk)
    s.target.sync()
    steps = {n: [] for n in args.context}
    decode = {n: [] for n in args.context}
    walls = []
    for r in range(args.warmup + args.repeats):
        for n, cache in caches.items():
            t0 = time.perf_counter()
            times, sc = _denoise_canvas(s, cache, args.steps, args.seed + r)
            walls.append(time.perf_counter() - t0)
            # decoder passes alone right after each canvas: drift hits both alike
            passes = _decode_times(s, cache, sc, DECODES_PER_CANVAS)
            if r >= args.warmup:
                steps[n] += times
                decode[n] += passes
    points = [_step_entry(s, args, n, steps[n], decode[n]) for n in args.context]
    for point, cache in zip(points, caches.values(), strict=True):
        point["host_syncs_per_step"] = syncs_per_step(s, cache, args.steps)
    first = walls[0] - float(np.median(walls[len(caches) * args.warmup :]))
    return {"results": points, "compile_s": round(first, 3) if args.compile else None}


def syncs_per_step(s: Setup, cache: Any, steps: int) -> dict | None:
    """Host syncs per step (torch): (syncs of a `steps`-step canvas - those of a
    half-length one) / the step difference, so the canvas's prologue and epilogue
    cancel. Counted by CUDA's sync debug mode on a GPU; on a CPU, where nothing
    waits, the expert GEMM's host reads (expert_gemm.host_syncs)."""
    if s.target.backend != "torch" or steps < 2:
        return None
    short = steps // 2
    n = _canvas_syncs(s, cache, steps) - _canvas_syncs(s, cache, short)
    method = "torch.cuda sync debug mode" if s.device == "cuda" else "expert-GEMM reads"
    return {"per_step": round(n / (steps - short), 3), "method": method}


def _canvas_syncs(s: Setup, cache: Any, steps: int) -> int:
    import warnings

    import torch

    from cuda_backend import expert_gemm

    if s.device != "cuda":
        before = expert_gemm.host_syncs()
        _denoise_canvas(s, cache, steps, 0)
        return expert_gemm.host_syncs() - before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _denoise_canvas(s, cache, steps, 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _step_entry(s: Setup, args, context: int, steps: list, decode: list) -> dict:
    step_ms, decode_ms = record.spread(steps), record.spread(decode)
    floor = _floor(s, context, args.batch, args.quantization)
    return {
        "context": context,
        "batch": args.batch,
        "canvas": s.cfg.canvas_length,
        "step_ms": step_ms,
        "decode_ms": decode_ms,
        "sampler_and_loop_ms": round(step_ms["median"] - decode_ms["median"], 4),
        "canvas_tokens_per_step_s": round(
            1e3 * args.batch * s.cfg.canvas_length / step_ms["median"], 3
        ),
        "floor": floor,
        "pct_of_floor": _pct(floor, step_ms["median"]),
    }


# -- prefill ---------------------------------------------------------------------------


def _prefill_floor(s: Setup, args: argparse.Namespace, length: int) -> float | None:
    """Sum of the encoder-pass floors of the prompt's chunks (ms)."""
    if s.floor_device is None:
        return None
    from .roofline import floor

    total, dev = 0.0, s.floor_device
    basis = "measured" if dev.name == "this-machine" else "peak"
    quant = record.QUANT_FOR_COST.get(args.quantization, "bf16")
    for start in range(0, length, args.prefill_chunk):
        n = min(args.prefill_chunk, length - start)
        cost = encoder_cost(s.cfg, n, start, batch=args.batch, quant=quant)
        if args.quantization is None and s.dtype == "float32":
            for k in ("weights", "kv_read", "kv_write"):
                cost.bytes[k] *= 2  # the cost model counts 2-byte weights and KV
        total += floor(cost, dev, basis).floor_s
    return round(total * 1e3, 6)


def prefill_point(s: Setup, args: argparse.Namespace, context: int) -> dict:
    ids = prompt_ids(s.cfg, args.batch, context, args.seed)
    times = []
    for r in range(args.warmup + args.repeats):
        cache = s.target.new_cache(args.batch)
        t0 = time.perf_counter()
        prefill(s.target, ids, cache, chunk=args.prefill_chunk)
        s.target.sync()
        if r >= args.warmup:
            times.append(time.perf_counter() - t0)
        del cache
    ms = record.spread(times)
    floor_ms = _prefill_floor(s, args, context)
    return {
        "context": context,
        "batch": args.batch,
        "prefill_ms": ms,
        "tokens_per_s": round(1e3 * args.batch * context / ms["median"], 3),
        "floor_ms": floor_ms,
        "pct_of_floor": None
        if floor_ms is None
        else round(100 * floor_ms / ms["median"], 3),
        "peak_memory_bytes": s.target.peak_memory(),
    }


# -- generate --------------------------------------------------------------------------


def generate_point(s: Setup, args: argparse.Namespace, context: int) -> dict:
    from mlx_diffgem.core.generate import generate_ids

    ids = prompt_ids(s.cfg, args.batch, context, args.seed)
    C = s.cfg.canvas_length
    overrides = {"max_new_tokens": args.canvases * C}
    if args.steps_override is not None:
        overrides["max_denoising_steps"] = args.steps_override
    runs = []
    for r in range(args.warmup + args.repeats):
        _, stats = generate_ids(s.target, ids, seed=args.seed + r, **overrides)
        if r >= args.warmup:
            runs.append(stats)
    return _generate_entry(s, args, context, runs)


def _generate_entry(s: Setup, args, context: int, runs: list) -> dict:
    med = lambda xs: round(float(np.median(xs)), 4)  # noqa: E731
    spc = med([st.mean_steps_per_canvas for st in runs])
    ms_per_step = [1e3 * st.generation_time / st.target_passes for st in runs]
    out = {
        "context": context,
        "batch": args.batch,
        "canvases": args.canvases,
        "tokens_per_s": med([st.generation_tps for st in runs]),
        "tokens_per_s_spread": record.spread([st.generation_tps for st in runs], 1),
        "prompt_tokens_per_s": med([st.prompt_tps for st in runs]),
        "steps_per_canvas": spc,
        "tokens_per_forward": med([st.tokens_per_forward for st in runs]),
        "ms_per_step_incl_commit": record.spread(ms_per_step, 1),
        "generated_tokens": runs[0].generated_tokens,
        "peak_memory_bytes": max(st.peak_memory for st in runs),
        "finish_reasons": sorted({st.finish_reason for st in runs}),
    }
    floor = _floor(s, context, args.batch, args.quantization)
    if floor is not None:  # a canvas = S steps + 1 commit (~ one step's weight stream)
        canvas_ms = (spc + 1) * floor["floor_ms"]
        out["floor_tokens_per_s"] = round(
            1e3 * args.batch * s.cfg.canvas_length / canvas_ms, 3
        )
        out["pct_of_floor"] = round(
            100 * out["tokens_per_s"] / out["floor_tokens_per_s"], 3
        )
    out["floor"] = floor
    return out


# -- peers -----------------------------------------------------------------------------


def load_peers(s: Setup, args: argparse.Namespace) -> tuple[list, dict]:
    if args.solo == "ours":
        return [], {}
    names = args.peers or DEFAULT_PEERS[args.backend]
    device = args.device or ("cuda" if s.device == "cuda" else "cpu")
    loaded, info = [], {}
    for name in names:
        if args.weights == "device":
            peer, info[name] = _device_peer(s, args, device)
        else:
            peer, info[name] = impls.load_peer(
                name, s.path, s.dtype, device, args.prefill_chunk
            )
        if peer is not None:
            loaded.append(peer)
    return loaded, info


def _device_peer(s: Setup, args: argparse.Namespace, device: str) -> tuple:
    """transformers with our random weights made on the device (bench.peer_weights)."""
    import torch

    from .peer_weights import transformers_model

    try:
        model = transformers_model(
            args.preset,
            device=device,
            dtype=getattr(torch, s.dtype),
            seed=args.seed,
            canvas=args.canvas,
        )
    except Exception as e:  # noqa: BLE001 - a peer that fails to build is a result
        return None, {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    peer = impls.Transformers(model, device, "random-on-device (bench.peer_weights)")
    return peer, peer.info


def peers_points(s: Setup, args: argparse.Namespace, peers: list) -> list[dict]:
    """Per repeat, per context: ours, then each peer. Drift and bursts of background
    load hit every implementation and every context alike. With --solo, the one
    implementation this process holds."""
    ours = None if s.target is None else impls.Ours(s.target)
    impl_list = [ours] if ours is not None else []
    impl_list += peers
    if not impl_list:
        return []  # the peer failed to load: the record says why (its "peers")
    prompts = {n: prompt_ids(s.cfg, 1, n, args.seed) for n in args.context}
    runs = {(n, i.name): [] for n in args.context for i in impl_list}
    for r in range(args.warmup + args.repeats):
        for n, ids in prompts.items():
            for impl in impl_list:
                run = impl.generate(ids, args.steps, args.seed + r)
                if r >= args.warmup:
                    runs[n, impl.name].append(run)
    out = []
    for n in args.context:
        entries = {i.name: _peer_entry(runs[n, i.name]) for i in impl_list}
        ratios = {}
        if ours is not None:
            ratios = {p.name: _ratio(entries, ours.name, p.name) for p in peers}
        out.append(
            {"context": n, "batch": 1, "canvas": s.cfg.canvas_length}
            | {"impls": entries, "ratios": ratios}
            | {"floor": _floor(s, n, 1, args.quantization)}
        )
    return out


def _peer_entry(runs: list) -> dict:
    return {
        "step_ms": record.spread([x for run in runs for x in run.step_intervals()]),
        "call_ms": record.spread([run.end - run.start for run in runs]),
        "per_run_step_median_ms": [
            round(float(np.median(run.step_intervals())) * 1e3, 4) for run in runs
        ],
    }


def _ratio(entries: dict, ours: str, peer: str) -> dict:
    a, b = entries[ours], entries[peer]
    paired = np.asarray(a["per_run_step_median_ms"]) / np.asarray(
        b["per_run_step_median_ms"]
    )
    ratio = round(a["step_ms"]["median"] / b["step_ms"]["median"], 4)
    return {
        "step_ours_over_peer": ratio,
        "paired_median": round(float(np.median(paired)), 4),
        "paired_min_max": [
            round(float(paired.min()), 4),
            round(float(paired.max()), 4),
        ],
        "goal": GOAL_RATIO,
        "meets_goal": bool(ratio <= GOAL_RATIO),
    }

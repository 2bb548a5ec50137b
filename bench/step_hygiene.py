"""Performance hygiene of one denoising step: host syncs, prefix copies, vs mlx-vlm.

    OMP_NUM_THREADS=1 python -m bench.step_hygiene --shape small \
        --contexts 64,512,2048 --json-out bench/results/step_hygiene_cpu_<date>.json

For each context length N (N random prompt ids, prefilled) on a seeded random
checkpoint loaded by our MLX backend, in float32:

1. Host syncs per step of the MLX `canvas.denoise` (`SyncCounter`). While active
   it wraps mlx.core.eval / async_eval / synchronize, the mx.array methods that read
   values on the host (item, tolist, __bool__, __int__, __float__, __index__) and
   numpy.array / numpy.asarray of an mx.array (numpy reads mlx arrays through the
   buffer protocol, which cannot be wrapped). A read is a sync when its array was not
   evaluated before (a new graph the host waits for); reads of evaluated arrays are
   counted apart. Per step = (events of an S-step canvas - events of an S0-step
   canvas) / (S - S0): the per-canvas prologue and epilogue cancel.
2. Step time: a policy that never stops (confidence threshold 0), S steps per canvas,
   R canvases. A step ends when the loop's mx.eval returns; steps 3..S are the steady
   state (mlx-vlm evaluates its first step lazily inside its second). Next to it: the
   decoder pass alone, its attention calls replayed alone on the very arrays they
   received, and the cost model's attention FLOPs. Decoder minus attention must not
   grow with N (judged on minima, and only when the run got >= 90% of a core).
   Every timing runs round-robin over implementations and contexts, so that other
   processes' load spreads evenly over them.
3. Prefix copies per decoder pass: bytes written through mx.concatenate and slice
   assignment, plus every cache buffer whose data pointer moved (a copied buffer).
   Flat in N = the cached prefix is not copied per step.
4. mlx-vlm's DiffusionGemma on the same checkpoint, in the same process, interleaved
   with ours canvas by canvas. Its step is the entropy-bound branch of
   `stream_diffusion_generate`, driven here through its own functions (decoder
   logits, linear schedule, sampling, entropy, acceptance, renoise, stop test,
   self-conditioning). Ratio = median over rounds of our canvas's median step time
   over that of the mlx-vlm canvas run right after it.

One JSON record per run (--json-out); the last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from bench.run import int_list
from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
from mlx_diffgem.core.generate import prefill
from mlx_diffgem.core.noise import SeededNoise
from mlx_diffgem.core.tiny import build_tiny_checkpoint
from mlx_diffgem.mlx_backend import _blas
from mlx_diffgem.mlx_backend.backend import MLXTarget, load

from .cost import decoder_cost

mx = (
    _blas.import_mlx()
)  # after OpenBLAS is preloaded (mlx_diffgem/mlx_backend/_blas.py)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")

SMALL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    num_experts=8,
    top_k_experts=2,
    sliding_window=128,
)  # layer types: the tiny default's [sliding, full, sliding, full]
SHAPES = {"small": (64, SMALL), "tiny": (8, {})}  # name -> (canvas, text overrides)
STEADY_FROM = 2  # index of the first steady-state step (steps 3..S)
FLAT_TOLERANCE = 1.25  # max / min of decoder-minus-attention across contexts
QUIET = 0.9  # share of a core the run must get for the flatness verdict


# -- host sync counting --------------------------------------------------------------

_WAITS = ("eval", "async_eval", "synchronize")
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@dataclass(frozen=True)
class SyncEvent:
    kind: str  # eval | async_eval | synchronize | item | ... | numpy.array
    where: str  # the caller, "folder/file.py:line"
    fresh: bool  # some array was not evaluated before: the host waits for a graph

    @property
    def is_sync(self) -> bool:
        # async_eval returns at once; a read of evaluated data only copies.
        if self.kind == "async_eval":
            return False
        return self.kind in _WAITS or self.fresh

    @property
    def label(self) -> str:
        return f"{self.kind}{'' if self.fresh else ' (read)'} @ {self.where}"


def _arrays(tree):
    """The mx.arrays of an eval argument tree (arrays, lists, tuples, dicts)."""
    if isinstance(tree, mx.array):
        yield tree
    elif isinstance(tree, (list, tuple, dict)):
        for leaf in tree.values() if isinstance(tree, dict) else tree:
            yield from _arrays(leaf)


def _where(frame) -> str:
    path = Path(frame.f_code.co_filename)
    return f"{path.parent.name}/{path.name}:{frame.f_lineno}"


class _Patch:
    """Replace attributes while active; record what the replacements see."""

    def __init__(self):
        self.records: list = []
        self._undo: list = []

    def patch(self, obj, name: str, make) -> None:
        orig = getattr(obj, name)
        self._undo.append((obj, name, orig))
        setattr(obj, name, make(orig))

    def __exit__(self, *exc) -> None:
        while self._undo:
            obj, name, orig = self._undo.pop()
            setattr(obj, name, orig)


class SyncCounter(_Patch):
    """Records every host synchronisation while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.events: list[SyncEvent] = self.records
        self._evaluated: dict[int, mx.array] = {}  # strong refs keep the ids unique

    def __enter__(self) -> SyncCounter:
        for name in _WAITS:
            self.patch(mx, name, partial(self._wait, name=name))
        for name in _READS:
            self.patch(mx.array, name, partial(self._read, name=name))
        for name in ("array", "asarray"):
            self.patch(np, name, partial(self._numpy, name=name))
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._evaluated.clear()

    def _note(self, kind: str, arrays: list) -> None:
        fresh = any(id(a) not in self._evaluated for a in arrays)
        self._evaluated.update((id(a), a) for a in arrays)
        self.events.append(SyncEvent(kind, _where(sys._getframe(2)), fresh))

    def _wait(self, orig, name: str):
        def wrapper(*args, **kwargs):
            self._note(name, list(_arrays(args)))
            return orig(*args, **kwargs)

        return wrapper

    def _read(self, orig, name: str):
        def wrapper(arr, *args, **kwargs):
            self._note(name, [arr])
            return orig(arr, *args, **kwargs)

        return wrapper

    def _numpy(self, orig, name: str):
        def wrapper(obj, *args, **kwargs):
            if isinstance(obj, mx.array):
                self._note(f"numpy.{name}", [obj])
            return orig(obj, *args, **kwargs)

        return wrapper


def per_step_syncs(short: list[SyncEvent], long: list[SyncEvent], extra: int) -> dict:
    """Sync counts per step from canvases of S0 and S0 + extra steps."""

    def rate(pick) -> float:
        return (sum(map(pick, long)) - sum(map(pick, short))) / extra

    sites = Counter(e.label for e in long)
    sites.subtract(Counter(e.label for e in short))
    return {
        "host_syncs": rate(lambda e: e.is_sync),
        "evals": rate(lambda e: e.kind == "eval"),
        "host_reads": rate(lambda e: not e.is_sync and e.kind != "async_eval"),
        "by_site": {k: v / extra for k, v in sorted(sites.items()) if v},
        "per_canvas_total": sum(e.is_sync for e in long),
    }


# -- decoder probes ------------------------------------------------------------------


class CopyProbe(_Patch):
    """Bytes written by mx.concatenate and slice assignment (one record per call)."""

    def __enter__(self) -> CopyProbe:
        def concat(orig):
            def wrapper(arrays, *args, **kwargs):
                n = sum(a.nbytes for a in arrays if isinstance(a, mx.array))
                self.records.append(("concatenate", _where(sys._getframe(1)), n))
                return orig(arrays, *args, **kwargs)

            return wrapper

        def setitem(orig):
            def wrapper(arr, key, value):
                n = value.nbytes if isinstance(value, mx.array) else arr.itemsize
                self.records.append(("setitem", _where(sys._getframe(1)), n))
                return orig(arr, key, value)

            return wrapper

        self.patch(mx, "concatenate", concat)
        self.patch(mx.array, "__setitem__", setitem)
        return self


class AttentionProbe(_Patch):
    """Keeps the inputs of every fused attention call, to replay them alone."""

    def __enter__(self) -> AttentionProbe:
        def sdpa(orig):
            def wrapper(q, k, v, *args, **kwargs):
                self.records.append((orig, q, k, v, args, kwargs))
                return orig(q, k, v, *args, **kwargs)

            return wrapper

        self.patch(mx.fast, "scaled_dot_product_attention", sdpa)
        return self

    def replay_s(self) -> float:
        """One round: the recorded calls run alone, one by one, times summed."""
        total = 0.0
        for orig, q, k, v, args, kwargs in self.records:
            t0 = time.perf_counter()
            mx.eval(orig(q, k, v, *args, **kwargs))
            total += time.perf_counter() - t0
        return total


def _data_ptr(a: mx.array) -> int:
    view = np.asarray(a)  # buffer protocol: no copy, the address of the mlx data
    ptr = view.__array_interface__["data"][0]
    del view  # a live export would keep the buffer from being updated in place
    return ptr


def copies_per_pass(decode, buffers) -> dict:
    """What one decoder pass writes, and which cache buffers it reallocates.

    decode: runs one pass and returns its logits; buffers: returns the cache arrays.
    """
    mx.eval(decode())  # settles any one-off growth of the cache's spare rows
    before = [(_data_ptr(b), b.nbytes) for b in buffers()]
    with CopyProbe() as probe:
        logits = decode()
    mx.eval(logits)
    after = [_data_ptr(b) for b in buffers()]
    moved = [n for (p, n), q in zip(before, after, strict=True) if p != q]
    sites = Counter()
    for kind, where, n in probe.records:
        sites[f"{kind} @ {where}"] += n
    return {
        "written_bytes": sum(n for _, _, n in probe.records),
        "moved_buffers": len(moved),
        "moved_bytes": sum(moved),
        "by_site_bytes": dict(sorted(sites.items())),
    }


def capture_attention(decode) -> AttentionProbe:
    """The attention calls of one evaluated decoder pass, ready to replay."""
    with AttentionProbe() as probe:
        logits = decode()
    mx.eval(logits)
    return probe


# -- the two implementations ---------------------------------------------------------


class EvalClock(_Patch):
    """Timestamps every return of mx.eval while active (the ends of our steps)."""

    def __enter__(self) -> EvalClock:
        def timed(orig):
            def wrapper(*args, **kwargs):
                orig(*args, **kwargs)
                self.records.append(time.perf_counter())

            return wrapper

        self.records.append(time.perf_counter())
        self.patch(mx, "eval", timed)
        return self


class Ours:
    """Our MLX backend, driven through `denoise` (canvas.py) as generation does."""

    name = "mlx_diffgem"

    def __init__(self, target: MLXTarget, seed: int):
        self.target, self.seed = target, seed

    def prefill(self, ids: np.ndarray):
        cache = self.target.new_cache(1)
        prefill(self.target, ids, cache)
        return cache

    def canvas(self, cache, steps: int) -> tuple[list[float], float]:
        """Step times and the canvas time of one canvas of exactly `steps` steps."""
        with EvalClock() as clock:
            self.denoise(cache, steps)
            end = time.perf_counter()
        return list(np.diff(clock.records)), end - clock.records[0]

    def denoise(self, cache, steps: int) -> None:
        self.seed += 1
        policy = DenoisePolicy(max_steps=steps, confidence_threshold=0.0)
        noise = SeededNoise(self.seed)
        res = self.target.denoise(CanvasState(), cache, policy, noise)
        if res.steps != steps:
            raise RuntimeError(f"denoise stopped after {res.steps} of {steps} steps")

    def decode(self, cache, sc):
        C = self.target.config.canvas_length
        canvas = mx.zeros((1, C), mx.int32)
        return lambda: self.target.decode(canvas, cache, sc)

    def buffers(self, cache):
        return lambda: [a for s in cache.layers for a in (s.keys, s.values)]


class Theirs:
    """mlx-vlm's DiffusionGemma: its model and step functions, our driver loop."""

    name = "mlx_vlm"
    load_how = (
        "mlx_vlm.utils.load_model(path, strict=False): the seeded checkpoint has no "
        "vision-tower weights; its text weights are checked by logits parity"
    )

    def __init__(self, path: Path, policy: DenoisePolicy):
        from mlx_vlm.generate import diffusion
        from mlx_vlm.utils import load_model

        self.loop = diffusion
        self.model = load_model(Path(path), strict=False)
        self.temps = {"t_min": policy.t_min, "t_max": policy.t_max}
        self.stop = {"stability_threshold": policy.stability_threshold}
        self.stop["confidence_threshold"] = 0.0  # never stops, as ours
        self.bound = policy.entropy_bound
        cfg = self.model.config
        self.C, self.V = int(cfg.canvas_length), int(cfg.text_config.vocab_size)

    def prefill(self, ids: np.ndarray, chunk: int = 512):
        cache = self.model.diffusion_prefill_cache(
            mx.array(ids),
            attention_mask=None,
            cache=self.model.make_cache(),
            pixel_values=None,
            mm_token_type_ids=None,
            prefill_step_size=chunk,
            chunk_prefill=ids.shape[1] > chunk,
        )
        mx.eval([c.state for c in cache])
        return cache

    def logits(self, canvas, cache, soft=None):
        masks = self.model.diffusion_decoder_masks(canvas, cache, None)
        return self.model.diffusion_decoder_logits(canvas, cache, soft, masks)

    def canvas(self, cache, steps: int) -> tuple[list[float], float]:
        m, lp, marks = self.model, self.loop, [time.perf_counter()]
        canvas = lp._diffusion_initialize_canvas(1, self.C, self.V, mx.int32)
        ctx, soft, history = m.diffusion_prepare_self_conditioning(), None, []
        for n in range(steps, 0, -1):
            z = self.logits(canvas, cache, soft)
            z = z / lp._diffusion_linear_temperature(n, steps, self.temps)
            arg = mx.argmax(z, axis=-1).astype(mx.int32)
            draft = lp._diffusion_sample_canvas(z, mx.int32, 1.0)
            h = lp._diffusion_token_entropy(z)
            keep = lp._diffusion_entropy_transfer_mask(h, self.bound)
            noise = lp._diffusion_initialize_canvas(1, self.C, self.V, mx.int32)
            canvas = mx.where(keep, draft, noise)
            lp._diffusion_stable_and_confident(arg, z, history, self.stop)  # syncs
            soft = m.diffusion_self_conditioning(z, ctx)
            marks.append(time.perf_counter())
        mx.eval(arg)  # as its loop does once per canvas
        return list(np.diff(marks)), time.perf_counter() - marks[0]

    def denoise(self, cache, steps: int) -> None:
        self.canvas(cache, steps)

    def decode(self, cache, sc):
        canvas = mx.zeros((1, self.C), mx.int32)
        ctx = self.model.diffusion_prepare_self_conditioning()
        soft = lambda: self.model.diffusion_self_conditioning(sc, ctx)  # noqa: E731
        return lambda: self.logits(canvas, cache, soft())

    def buffers(self, cache):
        return lambda: [a for c in cache for a in (c.keys, c.values)]


def load_theirs(path: Path, policy: DenoisePolicy) -> tuple[Theirs | None, dict]:
    """mlx-vlm's model, or None and the reason (a peer failure is a result)."""
    try:
        version = importlib.metadata.version("mlx-vlm")
    except importlib.metadata.PackageNotFoundError:
        return None, {"status": "unavailable", "reason": "mlx-vlm is not installed"}
    try:
        peer = Theirs(path, policy)
        cache = peer.prefill(np.full((1, 4), 5, np.int32))  # smoke: one short pass
        mx.eval(peer.logits(mx.zeros((1, peer.C), mx.int32), cache))
    except Exception as e:  # whatever stops the peer is a result to record
        return None, {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return peer, {"status": "ok", "version": version, "load": Theirs.load_how}


# -- measurements per context --------------------------------------------------------


def sync_profile(impl, cache, steps: int) -> dict:
    """Host syncs per step (difference of an S/2-step and an S-step canvas)."""
    events = {}
    for s in (steps // 2, steps):
        with SyncCounter() as counter:
            impl.denoise(cache, s)
        events[s] = counter.events
    out = per_step_syncs(events[steps // 2], events[steps], steps - steps // 2)
    out["canvas_steps"] = steps
    return out


def _rounds(jobs: dict, rounds: int) -> dict:
    """Run every job once per round, round-robin (round 0 is a warm-up).

    Interleaving the implementations and the contexts spreads the contention of
    other processes evenly over them.
    """
    out = {key: [] for key in jobs}
    for r in range(rounds + 1):
        for key, job in jobs.items():
            result = job()
            if r:
                out[key].append(result)
    return out


def _timed(fn):
    def job() -> float:
        t0 = time.perf_counter()
        mx.eval(fn())
        return time.perf_counter() - t0

    return job


@dataclass
class Setup:
    """One context: prefilled caches of both implementations and fixed inputs."""

    N: int
    caches: dict
    sc: mx.array  # self-conditioning logits of the lone decoder passes
    entry: dict  # the record's entry, filled in as measurements come


def setup_context(ours, theirs, N: int, rng) -> Setup:
    cfg = ours.target.config
    # Below the image/boi/eoi ids (the last ids of the tiny layout): mlx-vlm embeds
    # those as multimodal tokens, which would make the two prompts differ.
    ids = rng.integers(5, cfg.vocab_size - 8, (1, N)).astype(np.int32)
    caches = {ours.name: ours.prefill(ids)}
    entry = {"context": N, "cost_model": _cost(cfg, N)}
    if theirs is not None:
        caches[theirs.name] = theirs.prefill(ids)
        entry["parity_vs_mlx_vlm"] = parity(ours, theirs, caches)
    shape = (1, cfg.canvas_length, cfg.vocab_size)
    sc = mx.random.normal(shape, key=mx.random.key(N))
    return Setup(N, caches, sc, entry)


def measure(ours, theirs, contexts: list[int], args, rng) -> list[dict]:
    """Every measurement of every context; timings interleaved across all of them."""
    impls = [i for i in (ours, theirs) if i is not None]
    setups = [setup_context(ours, theirs, N, rng) for N in contexts]
    before = [snapshot_cache(s.caches[ours.name]) for s in setups]
    keys = [(s, i) for s in setups for i in impls]
    steps = _rounds(
        {
            (s.N, i.name): partial(i.canvas, s.caches[i.name], args.steps)
            for s, i in keys
        },
        args.repeats,
    )
    decode = {(s.N, i.name): i.decode(s.caches[i.name], s.sc) for s, i in keys}
    lone = _rounds({k: _timed(fn) for k, fn in decode.items()}, args.decode_reps)
    probes = {k: capture_attention(fn) for k, fn in decode.items()}
    attn = _rounds({k: p.replay_s for k, p in probes.items()}, args.decode_reps)
    probes.clear()  # drop the references to the cache buffers
    for s, i in keys:
        k, cache = (s.N, i.name), s.caches[i.name]
        s.entry[i.name] = _impl_entry(steps[k], lone[k], attn[k]) | {
            "copies_per_pass": copies_per_pass(decode[k], i.buffers(cache)),
            "syncs_per_step": sync_profile(i, cache, args.steps),
        }
    for s, snap in zip(setups, before, strict=True):
        s.entry[ours.name]["cache_untouched"] = same_snapshot(
            snap, snapshot_cache(s.caches[ours.name])
        )
        if theirs is not None:
            s.entry["ratio_ours_over_mlx_vlm"] = _ratios(s.entry, ours, theirs)
    return [s.entry for s in setups]


def _ms1(seconds: float) -> float:
    return round(float(seconds) * 1e3, 4)


def _ms(samples) -> dict:
    a = np.asarray(samples) * 1e3
    q10, q50, q90 = np.percentile(a, [10, 50, 90])
    return {
        "median": round(float(q50), 4),
        "p10": round(float(q10), 4),
        "p90": round(float(q90), 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
        "n": int(a.size),
    }


def snapshot_cache(cache) -> list:
    """Host copies of every stored slot and the cache's counters."""
    rows = [
        (s.start, s.end, np.array(s.keys[..., s.start : s.end, :]))
        + (np.array(s.values[..., s.start : s.end, :]),)
        for s in cache.layers
        if s.keys is not None
    ]
    mask = None if cache.mask is None else np.array(cache.mask)
    return [cache.offset, mask, rows]


def same_snapshot(a: list, b: list) -> bool:
    (off_a, mask_a, rows_a), (off_b, mask_b, rows_b) = a, b
    if off_a != off_b or (mask_a is None) != (mask_b is None):
        return False
    if mask_a is not None and not np.array_equal(mask_a, mask_b):
        return False
    return len(rows_a) == len(rows_b) and all(
        x[:2] == y[:2] and all(map(np.array_equal, x[2:], y[2:]))
        for x, y in zip(rows_a, rows_b, strict=True)
    )


def parity(ours, theirs, caches) -> dict:
    """Max |our logits - theirs| of a pass without and with self-conditioning."""
    canvas = mx.array(np.arange(ours.target.config.canvas_length)[None] % 97)
    a = ours.target.decode(canvas, caches[ours.name])
    b = theirs.logits(canvas, caches[theirs.name])
    sc = a / 0.7
    soft = theirs.model.diffusion_self_conditioning(
        sc, theirs.model.diffusion_prepare_self_conditioning()
    )
    a2 = ours.target.decode(canvas, caches[ours.name], sc)
    b2 = theirs.logits(canvas, caches[theirs.name], soft)
    return {
        "max_abs_logits": float(mx.abs(a - b).max()),
        "max_abs_logits_self_conditioned": float(mx.abs(a2 - b2).max()),
        "logits_scale": float(mx.abs(a).max()),
    }


def _impl_entry(canvases: list, lone: list, attn: list) -> dict:
    """Step, canvas, lone-pass and attention times of one implementation."""
    steps = [t for step_s, _ in canvases for t in step_s[STEADY_FROM:]]
    lone, attn = np.asarray(lone), np.asarray(attn)
    return {
        "step_ms": _ms(steps),
        "canvas_ms_per_step": _ms([c / len(s) for s, c in canvases]),
        "per_canvas_step_median_ms": [
            _ms1(np.median(s[STEADY_FROM:])) for s, _ in canvases
        ],
        "decode_ms": _ms(lone),
        "attention_ms": _ms(attn),
        # min: contention from other processes only ever adds time
        "decode_minus_attention_ms": {
            "median": _ms1(np.median(lone) - np.median(attn)),
            "min": _ms1(lone.min() - attn.min()),
        },
        "sampler_and_loop_ms": _ms1(np.median(steps) - np.median(lone)),
    }


def _ratios(entry: dict, ours, theirs) -> dict:
    a, b = entry[ours.name], entry[theirs.name]
    # adjacent canvases see about the same load from other processes
    paired = np.asarray(a["per_canvas_step_median_ms"]) / np.asarray(
        b["per_canvas_step_median_ms"]
    )
    return {
        "step_median": round(a["step_ms"]["median"] / b["step_ms"]["median"], 4),
        "step_paired_median": round(float(np.median(paired)), 4),
        "step_paired_min_max": [
            round(float(paired.min()), 4),
            round(float(paired.max()), 4),
        ],
        "decode_median": round(a["decode_ms"]["median"] / b["decode_ms"]["median"], 4),
    }


def _cost(cfg, N: int) -> dict:
    cost = decoder_cost(cfg, N, canvas=cfg.canvas_length)
    return {
        "attention_flops": cost.flops["attention"],
        "total_flops": cost.total_flops,
        "attention_share": round(cost.flops["attention"] / cost.total_flops, 4),
        "kv_read_bytes_bf16": cost.bytes["kv_read"],
    }


def sync_roundtrip_us(reps: int = 200) -> float:
    """Cost of one extra tiny host sync here (a reduction + .item() on [1] bools)."""
    done = mx.zeros((1,), mx.bool_)
    mx.eval(done)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        done.any().item()
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e6, 2)


# -- the record ----------------------------------------------------------------------


def _git() -> dict:
    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        res = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return res.stdout.strip()

    diff = git("diff", "HEAD")
    return {
        "sha": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
        "untracked_code": git(
            "ls-files", "--others", "--exclude-standard", "--", "mlx_diffgem", "bench"
        ).split(),
    }


def _versions() -> dict:
    out = {"python": platform.python_version(), "mlx": mx.__version__}
    for pkg in ("mlx-vlm", "mlx-lm", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "mlx_device": str(mx.default_device()),
        "blas_preloaded": list(_blas.loaded),
        "threads": {k: os.environ.get(k) for k in THREAD_VARS},
    }


def _contention(load: tuple, wall: float, cpu: float) -> dict:
    """Load averages, and the share of a core this process got while measuring."""
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "loadavg_before_after": [load, os.getloadavg()],
        # one busy thread: a share well below 1 means other processes took the core
        "cpu_share_while_measuring": round(cpu / wall, 3),
    }


def _config(path: Path, shape: str, seed: int) -> tuple[dict, str]:
    raw = json.loads((path / "config.json").read_text())
    ident = {"config.json": raw, "seed": seed, "dtype": "float32"}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return {"shape": shape, **ident}, digest[:16]


METHOD = {
    "host_syncs": (
        "SyncCounter wraps mlx.core.eval/async_eval/synchronize, mx.array.item/tolist/"
        "__bool__/__int__/__float__/__index__ and numpy.array/asarray of mx arrays; a "
        "read of an array not yet evaluated is a sync, of an evaluated one a read; "
        "per step = difference of an S-step and an S/2-step canvas over S/2"
    ),
    "step_time": (
        "interval between returns of the loop's step sync (ours: mx.eval in "
        "canvas.py; mlx-vlm: end of its stop test, which syncs); steady state = "
        "steps 3..S of each canvas; canvases interleaved ours, theirs, ...; one "
        "warm-up canvas each"
    ),
    "attention": (
        "every mx.fast.scaled_dot_product_attention call of one decoder pass "
        "replayed alone on the arrays it received; sum of medians"
    ),
    "copies": (
        "bytes passed through mx.concatenate and mx.array.__setitem__ during one "
        "decoder pass, plus cache buffers whose data pointer moved across the pass"
    ),
    "mlx_vlm_step": (
        "entropy-bound branch of mlx_vlm.generate.diffusion.stream_diffusion_generate "
        "driven through its functions: diffusion_decoder_logits, "
        "_diffusion_linear_temperature, _diffusion_sample_canvas(T=1), "
        "_diffusion_token_entropy, _diffusion_entropy_transfer_mask, "
        "_diffusion_initialize_canvas, _diffusion_stable_and_confident, "
        "diffusion_self_conditioning; one mx.eval per canvas"
    ),
}


def _checks(entries: list[dict], ours: str, cpu_share: float) -> dict:
    rows = [e[ours] for e in entries]
    rest = [r["decode_minus_attention_ms"]["min"] for r in rows]
    written = [r["copies_per_pass"]["written_bytes"] for r in rows]
    moved = [r["copies_per_pass"]["moved_bytes"] for r in rows]
    syncs = [r["syncs_per_step"]["host_syncs"] for r in rows]
    return {
        "one_eval_per_step": all(r["syncs_per_step"]["evals"] == 1 for r in rows),
        "one_host_sync_per_step": all(s == 1 for s in syncs),
        "host_syncs_per_step": syncs,
        "decode_minus_attention_min_ms": rest,
        "decode_minus_attention_max_over_min": round(max(rest) / min(rest), 3),
        # Under contention the longer passes rarely run undisturbed, so their
        # minima inflate more: the verdict needs a quiet core.
        "decode_minus_attention_flat": (
            max(rest) <= FLAT_TOLERANCE * min(rest) if cpu_share >= QUIET else None
        ),
        "flat_needs_cpu_share": QUIET,
        "flat_tolerance": FLAT_TOLERANCE,
        "flat_estimator": "min lone decoder pass - min replayed attention, per N",
        "bytes_written_per_pass": written,
        "prefix_not_copied": len(set(written)) == 1 and not any(moved),
        "cache_untouched": all(r["cache_untouched"] for r in rows),
    } | _parity_check(entries)


def _parity_check(entries: list[dict]) -> dict:
    diffs = [e["parity_vs_mlx_vlm"] for e in entries if "parity_vs_mlx_vlm" in e]
    if not diffs:
        return {}
    worst = max(v for d in diffs for k, v in d.items() if k.startswith("max_abs"))
    return {"mlx_vlm_max_abs_logits": worst, "same_logits_as_mlx_vlm": worst < 1e-3}


def run(args) -> dict:
    """Build and load the checkpoint, measure every context, return the record."""
    canvas, text = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="step_hygiene-") as tmp:
        path = build_tiny_checkpoint(
            Path(tmp) / args.shape, seed=args.seed, canvas_length=canvas, **text
        )
        config, config_hash = _config(path, args.shape, args.seed)
        ours = Ours(load(path, dtype="float32"), args.seed)
        policy = DenoisePolicy(max_steps=args.steps, confidence_threshold=0.0)
        theirs, peer = (None, {"status": "skipped"})
        if not args.no_mlx_vlm:
            theirs, peer = load_theirs(path, policy)
        rng = np.random.default_rng(args.seed)
        start = (os.getloadavg(), time.perf_counter(), time.process_time())
        entries = measure(ours, theirs, args.contexts, args, rng)
    machine = _machine() | _contention(*start)
    return {
        "benchmark": "step_hygiene",
        "schema": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": _versions(),
        "git": _git(),
        "config": config,
        "config_hash": config_hash,
        "settings": _settings(args, policy),
        "method": METHOD,
        "mlx_vlm": peer,
        "sync_roundtrip_us": sync_roundtrip_us(),
        "contexts": entries,
        "checks": _checks(entries, Ours.name, machine["cpu_share_while_measuring"]),
    }


def _settings(args, policy: DenoisePolicy) -> dict:
    return {
        "contexts": args.contexts,
        "steps_per_canvas": args.steps,
        "canvases": args.repeats,
        "warmup_canvases": 1,
        "steady_state_steps": f"{STEADY_FROM + 1}..{args.steps}",
        "decode_reps": args.decode_reps,
        "policy": {k: getattr(policy, k) for k in policy.__dataclass_fields__},
        "prompt": "uniform random ids in [5, vocab - 8), batch 1, no padding",
    }


def summary(record: dict) -> dict:
    ours, theirs = Ours.name, Theirs.name
    per = {str(e["context"]): e for e in record["contexts"]}
    out = {
        "benchmark": "step_hygiene",
        "shape": record["config"]["shape"],
        "ms_per_step": {k: e[ours]["step_ms"]["median"] for k, e in per.items()},
        "host_syncs_per_step": record["checks"]["host_syncs_per_step"],
        "mlx_vlm": record["mlx_vlm"]["status"],
        "cpu_share": record["machine"]["cpu_share_while_measuring"],
    }
    if record["mlx_vlm"]["status"] == "ok":
        out["mlx_vlm_ms_per_step"] = {
            k: e[theirs]["step_ms"]["median"] for k, e in per.items()
        }
        out["ratio_ours_over_mlx_vlm"] = {
            k: e["ratio_ours_over_mlx_vlm"]["step_paired_median"]
            for k, e in per.items()
        }
    checks = record["checks"].items()
    out["checks"] = {k: v for k, v in checks if isinstance(v, bool) or v is None}
    return out


def table(record: dict) -> str:
    """A text table of the record (ms; NaN where mlx-vlm did not run)."""
    cols = "context ours_ms p10 p90 vlm_ms ratio decode attn rest_min attn% KiB/pass "
    cols += "syncs vlm_syncs"
    lines = ["".join(f"{c:>9}" for c in cols.split())]
    for e in record["contexts"]:
        lines.append("".join(f"{x:>9.2f}" for x in _row(e)))
    return "\n".join(lines)


def _row(e: dict) -> list[float]:
    o, t, nan = e[Ours.name], e.get(Theirs.name), float("nan")
    s = o["step_ms"]
    return [
        e["context"],
        s["median"],
        s["p10"],
        s["p90"],
        t["step_ms"]["median"] if t else nan,
        e["ratio_ours_over_mlx_vlm"]["step_paired_median"] if t else nan,
        o["decode_ms"]["median"],
        o["attention_ms"]["median"],
        o["decode_minus_attention_ms"]["min"],
        100 * e["cost_model"]["attention_share"],
        o["copies_per_pass"]["written_bytes"] / 1024,
        o["syncs_per_step"]["host_syncs"],
        t["syncs_per_step"]["host_syncs"] if t else nan,
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.step_hygiene", description=__doc__.splitlines()[0]
    )
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--contexts", type=int_list, default=[64, 512, 2048])
    p.add_argument("--steps", type=int, default=8, help="denoising steps per canvas")
    p.add_argument("--repeats", type=int, default=5, help="timed canvases per impl")
    p.add_argument("--decode-reps", type=int, default=15, help="timed lone passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mlx-vlm", action="store_true", help="skip the mlx-vlm peer")
    p.add_argument("--json-out", type=Path, help="write the full record here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.steps < 2 * (STEADY_FROM + 1) or args.repeats < 1:
        p.error(f"--steps must be >= {2 * (STEADY_FROM + 1)}, --repeats >= 1")
    if any(os.environ.get(k) != "1" for k in THREAD_VARS):
        # set before Python starts: OpenBLAS reads them when it loads
        print(
            "warning: timings are noisier without OMP_NUM_THREADS=1 and "
            "OPENBLAS_NUM_THREADS=1",
            file=sys.stderr,
        )
    record = run(args)
    print(table(record))
    if record["mlx_vlm"]["status"] != "ok":
        print(f"mlx-vlm: {record['mlx_vlm']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary(record) | {"json_out": str(args.json_out or "")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

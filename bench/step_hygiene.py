"""Step hygiene of the MLX loop: host syncs per denoising step, prefix copies per pass.

The `hygiene` suite of `python -m bench.run` (MLX backend only), per context length N
on a prefilled cache:

1. Host syncs per step of the MLX `canvas.denoise` (`SyncCounter`). While active
   it wraps mlx.core.eval / async_eval / synchronize, the mx.array methods that read
   values on the host (item, tolist, __bool__, __int__, __float__, __index__) and
   numpy.array / numpy.asarray of an mx.array (numpy reads mlx arrays through the
   buffer protocol, which cannot be wrapped). A read is a sync when its array was not
   evaluated before (a new graph the host waits for); reads of evaluated arrays are
   counted apart. Per step = (events of an S-step canvas - events of an S/2-step
   canvas) / (S - S/2): the per-canvas prologue and epilogue cancel.
2. Prefix copies per decoder pass (`copies_per_pass`): bytes written through
   mx.concatenate and slice assignment, plus every cache buffer whose data pointer
   moved (a copied buffer). Flat in N = the cached prefix is not copied per step.
3. Whether a decoder pass and whole canvases leave the committed cache as it was.

tests/test_step_hygiene.py holds the loop to these (one mx.eval per step, in
mlx_backend/canvas.py). Step times are the `step` suite's; ours vs mlx-vlm, `peers`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
from mlx_diffgem.core.generate import prefill
from mlx_diffgem.core.noise import SeededNoise
from mlx_diffgem.mlx_backend import _blas

from .suites import Setup, prompt_ids

# after OpenBLAS is preloaded (mlx_diffgem/mlx_backend/_blas.py)
mx = _blas.import_mlx()


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


# -- the suite -----------------------------------------------------------------------


def decode_pass(target: Any, cache: Any, sc: mx.array):
    """One decoder pass of `target` on `cache` (a zero canvas), as a callable."""
    canvas = mx.zeros((cache.batch_size, target.config.canvas_length), mx.int32)
    return lambda: target.decode(canvas, cache, sc)


def cache_buffers(cache: Any):
    """The cache's key and value arrays, read at call time."""
    return lambda: [a for s in cache.layers for a in (s.keys, s.values)]


def _denoise(target: Any, cache: Any, steps: int, seed: int) -> None:
    policy = DenoisePolicy(max_steps=steps, confidence_threshold=0.0)  # never stops
    res = target.denoise(CanvasState(), cache, policy, SeededNoise(seed))
    if res.steps != steps:
        raise RuntimeError(f"denoise stopped after {res.steps} of {steps} steps")


def sync_profile(target: Any, cache: Any, steps: int, seed: int = 0) -> dict:
    """Host syncs per step (difference of an S/2-step and an S-step canvas)."""
    events = {}
    for i, s in enumerate((steps // 2, steps)):
        with SyncCounter() as counter:
            _denoise(target, cache, s, seed + i)
        events[s] = counter.events
    out = per_step_syncs(events[steps // 2], events[steps], steps - steps // 2)
    out["canvas_steps"] = steps
    return out


def hygiene_points(s: Setup, args: argparse.Namespace) -> list[dict]:
    """Per context: host syncs per step, what one decoder pass writes, and whether
    the pass and the canvases left the committed cache as it was."""
    if s.target.backend != "mlx":
        raise ValueError("hygiene: MLX backend only (it counts MLX host syncs)")
    out = []
    for n in args.context:
        cache = s.target.new_cache(args.batch)
        ids = prompt_ids(s.cfg, args.batch, n, args.seed)
        prefill(s.target, ids, cache, chunk=args.prefill_chunk)
        before = snapshot_cache(cache)
        shape = (args.batch, s.cfg.canvas_length, s.cfg.vocab_size)
        sc = mx.random.normal(shape, key=mx.random.key(n))  # self-conditioning logits
        copies = copies_per_pass(decode_pass(s.target, cache, sc), cache_buffers(cache))
        syncs = sync_profile(s.target, cache, args.steps, args.seed)
        out.append(
            {
                "context": n,
                "batch": args.batch,
                "canvas": s.cfg.canvas_length,
                "syncs_per_step": syncs,
                "copies_per_pass": copies,
                "cache_untouched": same_snapshot(before, snapshot_cache(cache)),
            }
        )
    return out


def checks(points: list[dict]) -> dict:
    """The record's verdicts over every context."""
    syncs = [p["syncs_per_step"] for p in points]
    written = [p["copies_per_pass"]["written_bytes"] for p in points]
    return {
        "one_eval_per_step": all(x["evals"] == 1 for x in syncs),
        "one_host_sync_per_step": all(x["host_syncs"] == 1 for x in syncs),
        # the same bytes at every context, no buffer moved: the prefix is not copied
        "prefix_not_copied": len(set(written)) == 1
        and not any(p["copies_per_pass"]["moved_bytes"] for p in points),
        "cache_untouched": all(p["cache_untouched"] for p in points),
    }

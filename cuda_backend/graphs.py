"""The decoder pass captured as a CUDA graph per context bucket, replayed every step.

An eager decoder pass at the released shape launches thousands of small kernels
(30 layers of norms, projections, routing, grouped GEMMs, attention): on an H200 the
launches, not the bytes, set its time. A CUDA graph replays them all with one call.
A graph fixes every shape and address, while the cache grows by a canvas each block,
so the pass is rewritten over fixed shapes (`StaticView`):

- the cached length `offset` is a device scalar, not a Python int: positions are
  `offset + arange(C)`, and each layer writes the canvas K/V at those slots with
  `index_copy_` (the eager pass slices at a Python offset);
- full-attention layers attend over the first `bucket + C` slots, `bucket` being the
  cached length rounded up to `BUCKET` tokens; a mask built on the device hides the
  slots between the stored tokens and the canvas, and left padding (`cache.valid`);
  sliding layers always attend over their W-1 + C slots, masked the same way;
- the canvas ids and the self-conditioning logits are copied into fixed input
  buffers; the logits come back as a copy (the canvas loop edits them in place and
  feeds them to the next step, while the next replay overwrites the graph's output).

One graph per (bucket, with or without self-conditioning, batch), captured on first
use after two warm-up passes (which also compile a compiled layer for the shape),
all in one memory pool (replays never overlap). A cache buffer that grows moves, and
the graphs that read it are captured again; a new cache takes the buffers of the last
one that was dropped (`Spares`), so the next generation replays the same graphs. The
first generation of N tokens past a P-token prompt captures about 2 (P + N) / BUCKET
graphs. Passes with a drafter plan or a hidden-verify layout run eagerly.

Host syncs: none inside the pass; the canvas loop keeps its one per step (whether a
row stopped), which waits for the replay to finish.

On the CPU there are no CUDA graphs: `Recorder` runs the same fixed-shape pass with
the same input buffers on every call, which is what the tests check against the
eager pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

BUCKET = 512  # tokens: attention over at most 511 masked slots more than needed


def bucket_of(length: int, size: int = BUCKET) -> int:
    """The cached length `length` rounded up to a multiple of `size` (at least one)."""
    return max(size, -(-length // size) * size)


class SlotWriter:
    """A layer cache as the decoder sees it in a graph: the canvas K/V written at
    device-given slots, attention over a fixed number of slots."""

    def __init__(self, layer_cache, slots: torch.Tensor, upto: int):
        self.layer_cache, self.slots, self.upto = layer_cache, slots, upto

    def with_canvas(self, k: torch.Tensor, v: torch.Tensor):
        c = self.layer_cache
        c.keys.index_copy_(2, self.slots, k)
        c.values.index_copy_(2, self.slots, v)
        return c.keys[:, :, : self.upto], c.values[:, :, : self.upto]


class StaticView:
    """The cache of one bucket, with the cached length as a device scalar; what
    `Model._layers` reads as a cache (`layers`) during a captured pass."""

    def __init__(self, cache, bucket: int, offset: torch.Tensor, canvas: int):
        # Its buffers, not the cache: a graph keeps its view, and a dropped cache
        # must die to hand its buffers on (`Spares`). A buffer that grows is a new
        # address, and a new graph with a new view.
        self.valid, self.window = cache.valid, cache.window
        self.layer_caches = cache.layers
        self.bucket, self.C = bucket, canvas
        self.offset = offset  # [] long: slots cached (pads included)
        self.layers: list[SlotWriter] = []

    def begin(self) -> tuple[torch.Tensor, dict[bool, torch.Tensor]]:
        """Positions [C] and masks of this pass, and the layers' slot writers, all
        from the offset buffer as it is now: inside the graph, so that each replay
        reads the offset loaded before it."""
        dev, C = self.offset.device, self.C
        ar = torch.arange(C, device=dev)
        positions = self.offset + ar
        sliding_len = self.offset.clamp(max=self.window - 1)  # a sliding layer's
        self.layers = [
            SlotWriter(lc, positions, self.bucket + C)  # full: the bucket, the canvas
            if lc.keep is None
            else SlotWriter(lc, sliding_len + ar, lc.keep + C)
            for lc in self.layer_caches
        ]
        return positions, self._masks(sliding_len)

    def _masks(self, sliding_len: torch.Tensor) -> dict[bool, torch.Tensor]:
        """{sliding?: [B, 1, 1, slots] bool}: the stored tokens that are not
        padding, and the canvas."""
        valid, C, dev = self.valid, self.C, self.offset.device
        keys = torch.arange(self.bucket + C, device=dev)
        stored = (keys < self.offset) & valid[:, : self.bucket + C]
        full = stored | ((keys >= self.offset) & (keys < self.offset + C))
        keys = torch.arange(self.window - 1 + C, device=dev)
        # slot j of a sliding layer holds the token at offset - sliding_len + j
        token = (self.offset - sliding_len + keys).clamp(max=valid.shape[1] - 1)
        stored = (keys < sliding_len) & valid[:, token]
        canvas = (keys >= sliding_len) & (keys < sliding_len + C)
        return {False: full[:, None, None], True: (stored | canvas)[:, None, None]}


def static_pass(model, view: StaticView, canvas, sc) -> torch.Tensor:
    """`Model.decode` (no plan, no layout) over the fixed shapes of `view`."""
    with model.grad_off():
        positions, masks = view.begin()
        h = model._decoder_input(canvas, sc)
        h = model._layers(h, positions, masks, view, False)
        return model._head(model.norm(h))


class Recorder:
    """The CPU stand-in for a graph: the same pass on the same buffers each call."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool=None):
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class CudaRecorder:
    """`fn` captured as a CUDA graph after two warm-up runs on a side stream."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool=None):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy inits, autotuning, a compiled layer's compile
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class _Inputs:
    """The fixed input buffers of every graph of one (batch, canvas, sc) shape."""

    def __init__(self, canvas: torch.Tensor, sc: torch.Tensor | None):
        self.canvas = torch.zeros_like(canvas)
        self.sc = None if sc is None else torch.zeros_like(sc)
        self.offset = torch.zeros((), dtype=torch.long, device=canvas.device)

    def load(self, canvas, sc, offset: int) -> None:
        self.canvas.copy_(canvas)
        if sc is not None:
            self.sc.copy_(sc)
        self.offset.fill_(offset)  # a host-to-device write, no sync


def _addresses(cache) -> tuple[int, ...]:
    bufs = [t for lc in cache.layers for t in (lc.keys, lc.values)] + [cache.valid]
    return tuple(t.data_ptr() for t in bufs)


class Spares:
    """The buffers of the last cache that died, for the next cache of its shape:
    graphs are captured over buffer addresses, so a generation that gets the same
    buffers replays the previous one's graphs instead of capturing new ones. At
    most one set is kept (the memory a generation held stays held)."""

    def __init__(self):
        self.key: tuple | None = None
        self.state: dict | None = None

    def watch(self, cache, key: tuple) -> None:
        # The callback holds the cache's attribute dict, not the cache: the
        # buffers (possibly grown) outlive it, the cache does not.
        weakref.finalize(cache, self._keep, key, cache.__dict__)

    def _keep(self, key: tuple, state: dict) -> None:
        self.key, self.state = key, state

    def take(self, key: tuple) -> dict | None:
        """The spare buffers of a dead cache made with `key`, once; else None."""
        if self.key != key:
            return None
        state, self.key, self.state = self.state, None, None
        return state


class GraphedDecode:
    """`Model.decode` for plain passes, one captured graph per context bucket."""

    def __init__(self, model, recorder: type = CudaRecorder, bucket: int = BUCKET):
        self.model, self.recorder, self.size = model, recorder, bucket
        self.pool = torch.cuda.graph_pool_handle() if recorder is CudaRecorder else None
        self.graphs: dict[tuple, Recorder | CudaRecorder] = {}
        self.inputs: dict[tuple, _Inputs] = {}
        self.captures = 0  # graphs captured so far (a record reports it)
        self.spares = Spares()

    def __call__(self, canvas, cache, sc) -> torch.Tensor:
        B, C = canvas.shape
        bucket = bucket_of(cache.offset, self.size)
        for lc in cache.layers:  # grow now, outside any graph (addresses change)
            lc._reserve(bucket + C if lc.keep is None else lc.keep + C)
        cache._reserve_valid(bucket + C)
        shape = (B, C, None if sc is None else (tuple(sc.shape), sc.dtype))
        if shape not in self.inputs:
            self.inputs[shape] = _Inputs(canvas, sc)
        inp = self.inputs[shape]
        inp.load(canvas, sc, cache.offset)
        key = (shape, bucket, _addresses(cache))
        if key not in self.graphs:
            self._forget(cache)
            view = StaticView(cache, bucket, inp.offset, C)
            fn = lambda: static_pass(self.model, view, inp.canvas, inp.sc)  # noqa: E731
            self.graphs[key] = self.recorder(fn, self.pool)
            self.captures += 1
        # The loop edits the logits in place and keeps them past the next replay.
        return self.graphs[key].replay().clone()

    def _forget(self, cache) -> None:
        """Drop graphs over buffers that no longer exist (another cache, or one
        that grew): they would write into freed memory."""
        live = set(_addresses(cache))
        stale = [k for k in self.graphs if not set(k[2]) <= live]
        for k in stale:
            del self.graphs[k]

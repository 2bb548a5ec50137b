"""KV cache of the MLX backend: the prompt and the committed canvases (spec §3.5-3.6).

Full-attention layers keep every slot. Sliding layers keep the last W-1 slots, which is
all the decoder may see and all the next encoder call needs under its window mask.
Only `Model.encode` writes (`_Store.append`); `Model.decode` only reads (`_Store.view`),
so a canvas in flight never enters the cache. Slots are positions: left padding is
stored as slots and masked through `Cache.mask`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlx_diffgem.core.config import ModelConfig

from ._blas import import_mlx

mx = import_mlx()


class _Store:
    """One layer's K/V, [B, kv_heads, capacity, D] buffers grown in steps (as mlx-lm).

    Rows [start, end) hold the last `end - start` slots; `keep` (W-1 on sliding layers,
    None on full ones) bounds what survives an append.
    """

    step = 256

    def __init__(self, keep: int | None):
        self.keep = keep
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.start = 0
        self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def view(self) -> tuple[mx.array, mx.array] | None:
        """The stored K/V (read-only use: the decoder)."""
        if self.keys is None or self.length == 0:
            return None
        rows = slice(self.start, self.end)
        return self.keys[..., rows, :], self.values[..., rows, :]

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store S new slots; return [kept old ; new] K/V for the encoder to attend."""
        S = k.shape[2]
        if self.keys is None or self.end + S > self.keys.shape[2]:
            self._reserve(k, v)
        self.keys[..., self.end : self.end + S, :] = k
        self.values[..., self.end : self.end + S, :] = v
        self.end += S
        out = self.view()
        if self.keep is not None:
            self.start = max(self.start, self.end - self.keep)
            if self.start > max(self.keep, self.step):  # a long prefill: free its rows
                self._reserve(k[..., :0, :], v[..., :0, :])
        return out

    def with_scratch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """[stored ; k] K/V for the decoder, without copying the stored prefix.

        k/v go into the spare rows after the stored slots (in place, as mlx-lm's
        caches update), so the cache's slots are unchanged: the next append
        overwrites those rows. The alternative, concatenating, copies the whole
        prefix every denoising step.
        """
        S = k.shape[2]
        if self.keys is None or self.end + S > self.keys.shape[2]:
            self._reserve(k, v)
        self.keys[..., self.end : self.end + S, :] = k
        self.values[..., self.end : self.end + S, :] = v
        rows = slice(self.start, self.end + S)
        return self.keys[..., rows, :], self.values[..., rows, :]

    def _reserve(self, k: mx.array, v: mx.array) -> None:
        """Move the kept rows to the front of a new buffer with room for k."""
        n, S = self.length, k.shape[2]
        # Headroom amortises the copies: a window's worth on sliding layers, a quarter
        # of the length (at least one step) on growing full layers.
        extra = self.keep if self.keep is not None else max(self.step, n // 4)
        cap = -(-(n + S + extra) // self.step) * self.step
        B, heads, _, D = k.shape
        keys = mx.zeros((B, heads, cap, D), k.dtype)
        values = mx.zeros((B, heads, cap, v.shape[3]), v.dtype)
        if n:
            keys[..., :n, :], values[..., :n, :] = self.view()
        self.keys, self.values, self.start, self.end = keys, values, 0, n

    def copy(self) -> _Store:
        out = _Store(self.keep)
        if self.keys is not None:
            out.keys, out.values = mx.array(self.keys), mx.array(self.values)
        out.start, out.end = self.start, self.end
        return out


class Cache:
    """K/V of every layer plus the padding mask of the cached slots.

    Attributes:
        batch_size: rows.
        offset: slots processed so far, pads included (the next position id).
        pending: the last committed canvas, set by the generation loop (not used here).
        mask: [B, offset] bool, True = real token; None while no slot is padded.
        layers: one `_Store` per layer.
    """

    backend = "mlx"  # generation refuses a cache of another backend

    def __init__(self, layer_types: list[str], window: int, batch_size: int):
        self.batch_size = batch_size
        self.offset = 0
        self.pending: np.ndarray | None = None
        self.mask: mx.array | None = None
        self.window = window
        self.layer_types = list(layer_types)
        self.layers = [
            _Store(window - 1 if t == "sliding_attention" else None)
            for t in layer_types
        ]

    def padding(
        self, n_last: int, new: mx.array | None = None, n_new: int = 0
    ) -> mx.array | None:
        """Key padding [B, n_last + n_new]: the last n_last cached slots, then n_new
        new ones (`new`, 1 = real; None = all real).

        None when none of these slots can be padded (the attention needs no mask).
        """
        if self.mask is None and new is None:
            return None
        B = self.batch_size
        if self.mask is None:
            pad = mx.ones((B, n_last), mx.bool_)
        else:
            pad = self.mask[:, self.offset - n_last : self.offset]
        if n_new:
            new = mx.ones((B, n_new), mx.bool_) if new is None else new
            pad = mx.concatenate([pad, new.astype(mx.bool_)], axis=1)
        return pad

    def advance(self, n: int, attention_mask: mx.array | None = None) -> None:
        """Account for n slots just appended to every layer, with their padding."""
        if attention_mask is not None or self.mask is not None:
            B = self.batch_size
            old = (
                self.mask
                if self.mask is not None
                else mx.ones((B, self.offset), mx.bool_)
            )
            new = (
                mx.ones((B, n), mx.bool_) if attention_mask is None else attention_mask
            )
            self.mask = mx.concatenate([old, new.astype(mx.bool_)], 1)
        self.offset += n

    @property
    def state(self) -> list[mx.array]:
        """Every stored array (to evaluate or measure)."""
        arrays = [
            a for s in self.layers if s.keys is not None for a in (s.keys, s.values)
        ]
        return arrays + ([self.mask] if self.mask is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def copy(self) -> Cache:
        """An independent deep copy: later appends to one do not reach the other."""
        out = Cache(self.layer_types, self.window, self.batch_size)
        out.offset = self.offset
        out.pending = None if self.pending is None else self.pending.copy()
        out.mask = None if self.mask is None else mx.array(self.mask)
        out.layers = [s.copy() for s in self.layers]
        return out


def make_cache(model_or_config: Any, batch_size: int = 1) -> Cache:
    """An empty cache for a `Model` (or its `ModelConfig`) and `batch_size` rows."""
    cfg = model_or_config
    if not isinstance(cfg, ModelConfig):
        cfg = model_or_config.config
    return Cache(cfg.layer_types, cfg.sliding_window, batch_size)

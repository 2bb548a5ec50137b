"""A preallocated KV cache for the encoder prefix (prompt + committed canvases).

Full layers append into one buffer `[B, kv, capacity, D]` that grows by doubling.
Sliding layers keep the last W-1 tokens (spec §3.5): within one encoder call they
attend over [kept ; all new] under the window mask, then the tail is moved to the
front. Each buffer has room for a canvas after the stored tokens: the decoder writes
the canvas K/V there and attends over a slice view, so a denoising step never copies
the cached prefix and never changes what the cache holds.

Positions are slot indices: left padding takes slots (and positions) like any token,
and a padding mask over the slots hides padded keys in the encoder and the decoder.
"""

from __future__ import annotations

import numpy as np
import torch

from mlx_diffgem.core.config import ModelConfig

Masks = dict[bool, torch.Tensor | None]  # keyed by "is a sliding layer"


def _static(t: torch.Tensor, static: bool) -> torch.Tensor:
    """Mark a buffer as living at a fixed address (for a compiled model), as KV
    caches for torch.compile do: CUDA graphs (compile mode "reduce-overhead") may
    then write the canvas K/V into it, which they refuse for ordinary inputs."""
    if static:  # eager runs skip importing torch._dynamo (~1 s)
        torch._dynamo.mark_static_address(t)
    return t


class LayerCache:
    """K/V of one layer: `length` stored tokens at the front of preallocated buffers."""

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        keep: int | None,
        device: torch.device,
        dtype: torch.dtype,
        static: bool = False,
    ):
        self.static = static
        self.keys = _static(torch.zeros(shape, device=device, dtype=dtype), static)
        self.values = _static(torch.zeros(shape, device=device, dtype=dtype), static)
        self.keep = keep  # W - 1 for sliding layers, None for full layers
        self.length = 0

    def _reserve(self, needed: int) -> None:
        cap = self.keys.shape[2]
        if needed <= cap:
            return
        new_cap = max(2 * cap, needed)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], new_cap, old.shape[3]))
            new = _static(new, self.static)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def _write(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Writes after the stored tokens and returns views over [stored ; new].
        end = self.length + k.shape[2]
        self._reserve(end)
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def append(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder: store `k`, `v` [B, kv, S, D]; returns all keys/values to attend."""
        return self._write(k, v)

    def with_canvas(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder: [stored ; canvas] views; the canvas lands in scratch slots that the
        next encoder call overwrites, so `length` does not change."""
        return self._write(k, v)

    def commit(self, n: int) -> None:
        """Count `n` appended tokens; sliding layers drop all but the last W-1."""
        self.length += n
        if self.keep is None or self.length <= self.keep:
            return
        start = self.length - self.keep
        for name in ("keys", "values"):
            buf = getattr(self, name)
            tail = buf[:, :, start : self.length].clone()  # source and target overlap
            buf[:, :, : self.keep] = tail
        self.length = self.keep


class Cache:
    """The encoder prefix of every layer, plus the padding mask over its slots.

    Attributes:
        batch_size: rows of the batch.
        offset: slots processed so far (pads included: positions are slot indices).
        pending: the last committed canvas, encoded at the next call (set by core).

    `static` marks the K/V buffers for torch.compile (see `_static`). `spare`: the
    attributes of a dropped cache of the same shape (`graphs.Spares`), whose buffers
    this one takes over instead of allocating.
    """

    backend = "torch"  # generation refuses a cache of another backend

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int = 4096,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        static: bool = False,
        spare: dict | None = None,
    ):
        self.batch_size = batch_size
        self.offset = 0
        self.pending: np.ndarray | None = None
        self.window = config.sliding_window
        self.device = torch.device(device)
        self.has_padding = False
        if spare is not None:  # a dropped cache's buffers, emptied
            self.layers, self.valid = spare["layers"], spare["valid"].fill_(True)
            for layer in self.layers:
                layer.length = 0
            return
        C = config.canvas_length
        self.layers = []
        for i in range(config.num_hidden_layers):
            sliding = not config.is_full(i)
            cap = (self.window - 1 if sliding else max_len) + C
            shape = (
                batch_size,
                config.layer_kv_heads(i),
                cap,
                config.layer_head_dim(i),
            )
            keep = self.window - 1 if sliding else None
            self.layers.append(LayerCache(shape, keep, self.device, dtype, static))
        # valid[b, j]: slot j of row b holds a real token (0 = left padding).
        self.valid = torch.ones(
            batch_size, max_len + C, dtype=torch.bool, device=self.device
        )

    @property
    def sliding_length(self) -> int:
        """Cached tokens a sliding layer still holds: min(offset, W - 1)."""
        return min(self.offset, self.window - 1)

    def _reserve_valid(self, needed: int) -> None:
        if needed > self.valid.shape[1]:
            grown = self.valid.new_ones(
                self.batch_size, max(2 * self.valid.shape[1], needed)
            )
            grown[:, : self.valid.shape[1]] = self.valid
            self.valid = grown

    def begin_encode(
        self, n: int, attention_mask: np.ndarray | None = None
    ) -> tuple[torch.Tensor, Masks]:
        """Positions and masks of an encoder call over `n` new slots.

        Args:
            n: new tokens per row.
            attention_mask: [B, n] numpy, 1 = token, 0 = padding (None: all tokens).
        Returns:
            (positions [n] long, {sliding?: bool mask [B, 1, n, keys]})
        """
        start, end = self.offset, self.offset + n
        self._reserve_valid(end)
        if attention_mask is not None and not np.asarray(attention_mask).all():
            self.has_padding = True
            mask = torch.as_tensor(np.asarray(attention_mask) != 0, device=self.device)
            self.valid[:, start:end] = mask
        else:
            self.valid[:, start:end] = True
        q = torch.arange(start, end, device=self.device)
        masks = {
            False: self._causal_mask(q, 0, end, None),
            True: self._causal_mask(q, start - self.sliding_length, end, self.window),
        }
        return q, masks

    def _causal_mask(
        self, q: torch.Tensor, lo: int, hi: int, window: int | None
    ) -> torch.Tensor:
        k = torch.arange(lo, hi, device=self.device)
        allowed = k[None, :] <= q[:, None]  # [n, keys]
        if window is not None:
            allowed &= k[None, :] > q[:, None] - window
        # A padded query may see no key at all: the model zeroes such rows.
        return (allowed[None] & self.valid[:, None, lo:hi])[:, None]  # [B, 1, n, keys]

    def end_encode(self, n: int) -> None:
        """Advance past `n` encoded slots (after every layer has appended)."""
        for layer in self.layers:
            layer.commit(n)
        self.offset += n

    def decoder_masks(
        self, n: int, order: np.ndarray | None = None
    ) -> tuple[torch.Tensor, Masks]:
        """Positions [n] of a canvas after the cache, and its key padding masks.

        Without padding the masks are None (plain bidirectional attention).
        `order`: a hidden layout's [B, n, n] mask (core/layout.py): the n slots are
        two copies of a canvas at the same positions, attending as it says.
        """
        if order is not None:
            return self._layout_masks(torch.as_tensor(order, device=self.device))
        q = torch.arange(self.offset, self.offset + n, device=self.device)
        if not self.has_padding:
            return q, {False: None, True: None}
        canvas = self.valid.new_ones(self.batch_size, n)
        masks = {}
        for sliding, lo in ((False, 0), (True, self.offset - self.sliding_length)):
            keys = torch.cat([self.valid[:, lo : self.offset], canvas], dim=1)
            masks[sliding] = keys[:, None, None, :]  # [B, 1, 1, keys]
        return q, masks

    def _layout_masks(self, order: torch.Tensor) -> tuple[torch.Tensor, Masks]:
        B, n, _ = order.shape
        q = torch.arange(self.offset, self.offset + n // 2, device=self.device)
        masks = {}
        for sliding, lo in ((False, 0), (True, self.offset - self.sliding_length)):
            cached = self.valid[:, None, lo : self.offset].expand(B, n, -1)
            masks[sliding] = torch.cat([cached, order], dim=2)[:, None]
        return q.repeat(2), masks

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers."""
        return sum(
            2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers
        )

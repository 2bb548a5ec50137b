"""HiddenLayout: one decoder pass that scores every drafted token without showing it.

The canvas is laid out twice (DESIGN §4, the order-masked verify of SimSD, arXiv
2606.02544): C query slots (noise ids) then C reference slots (the drafted ids), both
at the canvas's positions. `rank` is the draft's commit order (lower first; equal
ranks form one group, decided together). In every layer:

- query slot i sees the cache, itself, and the reference slots j with
  rank[j] < rank[i]: never the drafted token at its own position, nor any token
  committed with or after it;
- reference slot j sees the cache and the reference slots k with rank[k] <= rank[j]
  (never a query slot), so nothing about a later token reaches an earlier query
  through them.

With `others=True` the order is ignored: query slot i sees every reference slot but
its own, and a reference slot sees the cache and itself only (were they to see each
other, token i would reach query i through them). A leave-one-out judgment: each
token is scored in the context of the whole rest of the draft, as a native pass late
in the schedule sees it, but also next to the draft's other errors.

The pass returns the query slots' logits: at each position the model's distribution
given the prompt and the draft's earlier tokens only. On a device bound by its
weight stream a pass over 2C slots costs about one pass over C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .validate import cache_batch, check_cache


@dataclass(frozen=True)
class HiddenLayout:
    rank: np.ndarray  # [B, C] integers: the commit order of the draft
    others: bool = False  # leave-one-out: every query sees all other drafted tokens

    @classmethod
    def checked(cls, rank, batch: int, canvas: int) -> HiddenLayout:
        r = np.asarray(rank)
        if r.shape != (batch, canvas) or not np.issubdtype(r.dtype, np.integer):
            raise ValueError(
                f"layout: expected an integer rank of shape {(batch, canvas)}, got "
                f"{r.dtype} {r.shape}"
            )
        return cls(r.astype(np.int64))

    def check_pass(self, canvas_shape: tuple, has_sc: bool) -> None:
        """A decoder pass under this layout: [B, 2C] ids and no self-conditioning
        (it would show each drafted token to its own query)."""
        B, C = self.rank.shape
        if tuple(canvas_shape) != (B, 2 * C):
            raise ValueError(
                f"canvas: a hidden layout expects shape {(B, 2 * C)} (query slots, "
                f"then reference slots), got {tuple(canvas_shape)}"
            )
        if has_sc:
            raise ValueError("self_conditioning: a hidden layout takes none")

    def mask(self) -> np.ndarray:
        """[B, 2C, 2C] bool over [query slots ; reference slots], True = attends."""
        r = self.rank
        B, C = r.shape
        earlier = r[:, None, :] < r[:, :, None]  # [b, i, j]: rank[j] < rank[i]
        up_to = r[:, None, :] <= r[:, :, None]
        itself = np.broadcast_to(np.eye(C, dtype=bool), (B, C, C))
        if self.others:
            earlier, up_to = ~itself, itself
        query_rows = np.concatenate([itself, earlier], axis=2)
        ref_rows = np.concatenate([np.zeros((B, C, C), bool), up_to], axis=2)
        return np.concatenate([query_rows, ref_rows], axis=1)


def check_hidden(target: Any, canvas_ids: Any, cache: Any, sc: Any, layout: Any):
    """Arguments of `Target.decode` under a layout: a cache of this backend, a
    HiddenLayout for its batch and the model's canvas, ids [B, 2C], no
    self-conditioning. Returns the canvas shape (B, 2C)."""
    B, C = cache_batch(cache), target.config.canvas_length
    check_cache(target, cache, B)
    if not isinstance(layout, HiddenLayout):
        raise ValueError(
            f"layout: expected a HiddenLayout, got {type(layout).__name__}"
        )
    HiddenLayout.checked(layout.rank, B, C)
    layout.check_pass(np.shape(canvas_ids), sc is not None)
    return B, 2 * C

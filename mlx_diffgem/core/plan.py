"""PassPlan: which parts of the model one denoising pass runs (a drafter's view).

A drafter made of the model's own weights is the model run under a plan (DESIGN §4):
a subset of the decoder layers (a skipped layer's output scalar is still applied, so
the residual stream keeps its scale), fewer experts per token, a top-k
self-conditioning soft embedding instead of the vocabulary-wide `softmax(s) @ E`, an
LM head over a sub-vocabulary (the lowest ids: BPE and SentencePiece vocabularies
number tokens roughly by frequency), and, for a trained drafter, small layers of its
own after the kept ones. Both backends' `Model.decode` accept a plan, and
`Target.planned(plan)` is the model-like view the speculative loop drives.

Under a plan with a sub-vocabulary head the pass's logits, and so the sampler's
softmax, entropy and draws, cover that sub-vocabulary only: the drafter never
proposes another token. Its self-conditioning crosses to and from the model at the
vocabulary's width: filled out with a logit of FILL (a probability of exactly 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config import ModelConfig
from .validate import is_int, show


@dataclass(frozen=True)
class PassPlan:
    # Logit of a token outside the head, when a drafter's self-conditioning is
    # handed to the model: exp() underflows to 0, and 0 * FILL stays finite in an
    # entropy (where -inf would give NaN).
    fill: ClassVar[float] = -1.0e4
    layers: tuple[int, ...] | None = None  # decoder layers run (None: all)
    top_k: int | None = None  # experts per token (None: the config's)
    sc_top_k: int | None = None  # soft-embedding support (None: whole vocabulary)
    head_vocab: int | None = None  # LM head rows (None: whole vocabulary)
    # A trained drafter's own layers (a backend module: h [B, C, H] -> h), run on
    # the residual stream after the kept layers and before the final norm and head.
    adapter: Any = field(default=None, compare=False, repr=False)
    source: str | None = field(default=None, compare=False)  # a drafter's folder

    def checked(self, config: ModelConfig) -> PassPlan:
        """Self, after checking every setting against the model's config."""
        L, V = config.num_hidden_layers, config.vocab_size
        layers = self.layers
        if layers is not None and (
            not isinstance(layers, tuple | list)
            or not layers
            or not all(is_int(i) and 0 <= i < L for i in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ValueError(
                f"drafter: layers={show(layers)}: expected distinct integer layer "
                f"indices in [0, {L})"
            )
        _bound("top_k", self.top_k, config.num_experts)
        _bound("sc_top_k", self.sc_top_k, V)
        _bound("head_vocab", self.head_vocab, V)
        return self

    def keeps(self, i: int) -> bool:
        return self.layers is None or i in self.layers

    def to_dict(self) -> dict:
        """The cuts (what the cost model and the records read)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("adapter", "source")
        }

    def describe(self) -> dict:
        """What a record says of the drafter this plan makes."""
        if self.adapter is None:
            return {"kind": "self", **self.to_dict()}
        return {
            "kind": "trained",
            "folder": self.source,
            "adapter_layers": len(self.adapter.layers),
            **self.to_dict(),
        }


def _bound(name: str, value: int | None, hi: int | None) -> None:
    if value is not None and not (is_int(value) and 1 <= value <= (hi or 0)):
        raise ValueError(
            f"drafter: {name}={show(value)}: expected an integer in [1, {hi}]"
        )

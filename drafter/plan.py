"""What a training-free self-drafter cuts from the target (numpy only, no backend).

A self-drafter runs the target's own weights cheaply (DESIGN §4): a subset of the
layers (a skipped layer's output scalar is still applied, so the residual stream
keeps its scale), fewer experts per token, a top-k self-conditioning soft embedding
instead of the vocabulary-wide `softmax(s) @ E`, and an LM head over a
sub-vocabulary (the lowest ids: BPE and SentencePiece vocabularies number tokens
roughly by frequency). The drafter's logits, and so its sampler's softmax, entropy
and draws, cover that sub-vocabulary only: it never proposes another token. When
the target takes over, the drafter's self-conditioning is filled out to the whole
vocabulary with a logit of FILL (a probability of exactly 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mlx_diffgem.core.config import ModelConfig


@dataclass(frozen=True)
class SelfDraftPlan:
    # Logit of a token outside the drafter's head, when its self-conditioning is
    # handed to the target: exp() underflows to 0, and 0 * FILL stays finite in an
    # entropy (where -inf would give NaN).
    fill: ClassVar[float] = -1.0e4
    layers: tuple[int, ...] | None = None  # decoder layers run (None: all)
    top_k: int | None = None  # experts per token (None: the config's)
    sc_top_k: int | None = None  # soft-embedding support (None: whole vocabulary)
    head_vocab: int | None = None  # LM head rows (None: whole vocabulary)
    # A trained drafter's own layers (drafter/adapter_*.py), run on the residual
    # stream after the kept target layers and before the final norm and head.
    adapter: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def auto(cls, config: ModelConfig) -> SelfDraftPlan:
        """The default cuts: the two vocabulary-wide costs only (a 32-token soft
        embedding, an LM head over the first quarter of the vocabulary, at least
        1024 ids); every layer and every routed expert kept.

        These are the cuts that cost no quality on the embedded model (600 held-out
        prompts, torch, bench/results/spec-torch-default-*-20261201T22*.json, with
        draft_steps 24): 40% of completions parse against 39% natively (paired 95%
        interval -4 to +6 points). Half the experts per token (the previous default)
        took it to 30% with draft_steps 16 and 33% with 32; a 16-token soft
        embedding and a 512-id head to 31%; skipping one layer of six to 2%.
        `top_k=`, `layers=` still cut for a model that tolerates it."""
        return cls(
            sc_top_k=min(32, config.vocab_size),
            head_vocab=min(config.vocab_size, max(1024, config.vocab_size // 4)),
        ).checked(config)

    @classmethod
    def parse(cls, text: str, config: ModelConfig) -> SelfDraftPlan:
        """ "auto", "full" (no cuts: the target at full cost) or settings such as
        "layers=0,1,5 top_k=1 sc_top_k=32 head_vocab=1024" (unset: no cut)."""
        text = text.strip()
        if text in ("", "auto"):
            return cls.auto(config)
        if text == "full":
            return cls().checked(config)
        fields = {f.name for f in dataclasses.fields(cls)} - {"adapter"}
        values: dict = {}
        for item in text.replace(";", " ").split():
            key, sep, val = item.partition("=")
            if not sep or key not in fields:
                raise ValueError(
                    f"drafter: bad self-drafter setting {item!r}; expected "
                    f"KEY=VALUE with KEY one of {sorted(fields)}"
                )
            try:
                ints = tuple(int(v) for v in val.split(",") if v)
            except ValueError:
                raise ValueError(f"drafter: {key}={val!r}: expected integers") from None
            values[key] = ints if key == "layers" else _one(key, ints)
        return cls(**values).checked(config)

    def checked(self, config: ModelConfig) -> SelfDraftPlan:
        """Self, after checking every setting against the target's config."""
        L, V = config.num_hidden_layers, config.vocab_size
        if self.layers is not None and (
            not self.layers
            or len(set(self.layers)) != len(self.layers)
            or min(self.layers) < 0
            or max(self.layers) >= L
        ):
            raise ValueError(
                f"drafter: layers={self.layers}: expected distinct layer indices "
                f"in [0, {L})"
            )
        _bound("top_k", self.top_k, config.num_experts)
        _bound("sc_top_k", self.sc_top_k, V)
        _bound("head_vocab", self.head_vocab, V)
        return self

    def keeps(self, i: int) -> bool:
        return self.layers is None or i in self.layers

    def to_dict(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "adapter"
        }


def _one(key: str, ints: tuple[int, ...]) -> int:
    if len(ints) != 1:
        raise ValueError(f"drafter: {key}: expected one integer, got {ints}")
    return ints[0]


def _bound(name: str, value: int | None, hi: int) -> None:
    if value is not None and not 1 <= value <= hi:
        raise ValueError(f"drafter: {name}={value}: expected an integer in [1, {hi}]")

"""The self-drafter's plans: the default cuts, and cuts parsed from a `self:` string.

A self-drafter is the target run under a `PassPlan` (mlx_diffgem/core/plan.py): the
target's weights and KV cache, cheaper. `SelfDraftPlan` adds how such a plan is
chosen: `auto` (the cuts that cost no quality on the embedded model) and `parse`.
"""

from __future__ import annotations

import dataclasses
import re

from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.plan import PassPlan

_INT = re.compile(r"-?[0-9]{1,18}")  # ASCII digits; bounds come from checked()


@dataclasses.dataclass(frozen=True)
class SelfDraftPlan(PassPlan):
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
        "layers=0,1,5 top_k=1 sc_top_k=32 head_vocab=1024" (unset: no cut; each
        key at most once)."""
        text = text.strip()
        if text in ("", "auto"):
            return cls.auto(config)
        if text == "full":
            return cls().checked(config)
        fields = set(cls().to_dict())
        values: dict = {}
        for item in text.replace(";", " ").split():
            key, sep, val = item.partition("=")
            if not sep or key not in fields:
                raise ValueError(
                    f"drafter: bad self-drafter setting {item!r}; expected "
                    f"KEY=VALUE with KEY one of {sorted(fields)}"
                )
            if key in values:  # not "the last one wins": say which was meant
                raise ValueError(f"drafter: self-drafter setting {key!r} given twice")
            items = [v for v in val.split(",") if v]
            if not all(_INT.fullmatch(v) for v in items):  # int() takes "1_0" too
                raise ValueError(f"drafter: {key}={val!r}: expected integers")
            ints = tuple(int(v) for v in items)
            values[key] = ints if key == "layers" else _one(key, ints)
        return cls(**values).checked(config)


def _one(key: str, ints: tuple[int, ...]) -> int:
    if len(ints) != 1:
        raise ValueError(f"drafter: {key}: expected one integer, got {ints}")
    return ints[0]

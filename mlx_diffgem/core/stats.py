"""Typed results of generation: `Stats` counters and the `Response` a stream yields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Stats:
    """Counters of one generation call (all rows of the batch together)."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0  # seconds spent encoding the prompt
    generation_time: float = 0.0  # seconds from the first denoising step to the end
    canvases: int = 0
    target_passes: int = 0  # decoder passes of the target (batched passes count once)
    drafter_passes: int = 0  # speculative decoding: the drafter's passes
    verify_rounds: int = 0  # target passes that checked a drafted canvas
    drafted_tokens: int = 0  # tokens of first drafts (live rows)
    drafted_kept: int = 0  # of those, the ones the committed canvas kept
    generated_tokens: int = 0  # new tokens that are not pad, summed over rows
    row_passes: int = 0  # decoder passes counted per row (the reference's denominator)
    steps_per_canvas: list[int] = field(default_factory=list)  # target passes
    drafter_steps_per_canvas: list[int] = field(default_factory=list)
    peak_memory: int = 0  # bytes
    finish_reason: str | None = None

    @property
    def tokens_per_forward(self) -> float:
        """Generated non-pad tokens per counted decoder pass (spec §4.3)."""
        return self.generated_tokens / self.row_passes if self.row_passes else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        t = self.generation_time
        return self.generated_tokens / t if t > 0 else 0.0

    @property
    def peak_memory_gb(self) -> float:
        return self.peak_memory / 1e9

    @property
    def mean_steps_per_canvas(self) -> float:
        s = self.steps_per_canvas
        return sum(s) / len(s) if s else 0.0

    @property
    def speculative(self) -> bool:
        return self.drafter_passes > 0

    @property
    def draft_kept_share(self) -> float:
        """Share of the first drafts' tokens that the committed canvases kept."""
        return self.drafted_kept / self.drafted_tokens if self.drafted_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("peak_memory")
        for name in (
            "tokens_per_forward",
            "prompt_tps",
            "generation_tps",
            "peak_memory_gb",
            "mean_steps_per_canvas",
            "draft_kept_share",
        ):
            d[name] = getattr(self, name)
        return d

    def summary(self) -> str:
        """The one-line stats a CLI prints."""
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
            f"generation: {self.generated_tokens} tokens, "
            f"{self.generation_tps:.1f} tok/s | "
            f"steps/canvas: {self.mean_steps_per_canvas:.1f} | "
            f"tokens/forward: {self.tokens_per_forward:.2f} | "
            + self._draft_summary()
            + f"peak memory: {self.peak_memory_gb:.3f} GB"
        )

    def _draft_summary(self) -> str:
        if not self.speculative:
            return ""
        n = max(1, self.canvases)
        return (
            f"drafter passes/canvas: {self.drafter_passes / n:.1f}, "
            f"verifies/canvas: {self.verify_rounds / n:.1f}, "
            f"draft kept: {100 * self.draft_kept_share:.0f}% | "
        )


@dataclass
class Response:
    """One item of `stream_generate`: a committed canvas, or a live draft after a step.

    text: newly committed text (empty for draft updates); draft: the live argmax canvas
    decoded (only for draft updates); tokens: the ids behind `text` or `draft`.
    """

    text: str
    tokens: np.ndarray
    stats: Stats
    canvas_index: int
    step: int | None = None  # set on draft updates
    draft: str | None = None
    finished: bool = False
    finish_reason: str | None = None
    source: str | None = None  # draft updates: "target" or "drafter" (speculative)

    @property
    def is_draft(self) -> bool:
        return self.step is not None

"""What `diffgem generate` and `infill` show on a terminal: progress, the stats.

Progress goes to stderr and only when stderr is a terminal (tqdm), so pipes and logs
stay clean. The stats block says what each number means, since a diffusion model's
counters (whole canvases, passes per canvas) differ from an autoregressive one's.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ..core.stats import Stats

# Prompts shorter than this encode in well under a second: no bar.
PREFILL_BAR_MIN = 2048


def tty() -> bool:
    return sys.stderr.isatty()


def bar(total: int, desc: str, unit: str, enabled: bool | None = None) -> Any:
    """A tqdm bar on stderr, disabled unless stderr is a terminal."""
    from tqdm import tqdm

    on = tty() if enabled is None else enabled
    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=not on
    )


class PrefillProgress:
    """The model (a Target), with a bar that counts the prompt's encoded tokens.

    The block loop encodes the prompt in chunks and then one committed canvas at a
    time; only the first `total` tokens are the prompt, so the bar closes there.
    """

    def __init__(self, target: Any, total: int, enabled: bool | None = None):
        self.target, self.total, self.done = target, total, 0
        self.config = target.config
        self.generation_config = target.generation_config
        self.backend = target.backend
        self.path = target.path
        self.bar = bar(total, "prompt", "tok", enabled)

    def encode(self, ids: Any, cache: Any, attention_mask: Any = None) -> None:
        self.target.encode(ids, cache, attention_mask)
        if self.done < self.total:
            n = min(len(ids[0]), self.total - self.done)
            self.done += n
            self.bar.update(n)
            if self.done >= self.total:
                self.bar.close()

    def new_cache(self, batch_size: int) -> Any:
        return self.target.new_cache(batch_size)

    def decode(self, canvas_ids: Any, cache: Any, self_conditioning: Any = None):
        return self.target.decode(canvas_ids, cache, self_conditioning)

    def denoise(self, state, cache, policy, noise, on_step=None):
        return self.target.denoise(state, cache, policy, noise, on_step)

    def denoise_steps(self, state, cache, policy, noise):
        return self.target.denoise_steps(state, cache, policy, noise)

    def sync(self) -> None:
        self.target.sync()

    def peak_memory(self) -> int:
        return self.target.peak_memory()


def memory_label(model: Any) -> str:
    """What the backend's `peak_memory()` measures: not the same quantity everywhere."""
    target = getattr(model, "target", model)  # a SpeculativeModel's target
    if target.backend == "mlx":
        return "MLX allocator peak"
    kind = target.device.type
    return {
        "cuda": "CUDA allocator peak",
        "mps": "MPS driver memory",
    }.get(kind, "process peak RSS")


def stats_lines(
    stats: Stats,
    *,
    canvas: int,
    max_tokens: int | None,
    memory: str,
    compile_s: float | None = None,
) -> list[str]:
    """The stats block of `diffgem generate`, one fact per line with its meaning."""
    n = stats.canvases
    lines = [
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s"
        + (" (includes warm-up)" if compile_s is None else ""),
        f"generation: {stats.generated_tokens} tokens, {stats.generation_tps:.1f} "
        f"tok/s ({n} canvas{'es' if n != 1 else ''} of {canvas} tokens"
        + _rounding(max_tokens, canvas)
        + "; EOS and padding are not counted)",
        f"steps/canvas: {stats.mean_steps_per_canvas:.1f} (denoising passes of the "
        "model per canvas, mean)",
        f"tokens/forward: {stats.tokens_per_forward:.2f} (generated tokens per "
        "denoising pass)",
    ]
    if stats.speculative:
        k = max(1, n)
        lines.append(
            f"speculative: {stats.drafter_passes / k:.1f} drafter passes and "
            f"{stats.verify_rounds / k:.1f} verifies per canvas, "
            f"{100 * stats.draft_kept_share:.0f}% of the first draft kept (steps and "
            "tokens/forward above count the model's passes only)"
        )
    lines.append(f"peak memory: {stats.peak_memory_gb:.3f} GB ({memory})")
    if compile_s is not None:
        lines.append(f"compile: {compile_s:.1f} s (warm-up run, not in the rates)")
    return lines


def print_stats(stats: Stats, **kw: Any) -> None:
    """The stats block on stderr, under a rule (`stats_lines`' keyword arguments)."""
    print("=" * 10, *stats_lines(stats, **kw), sep="\n", file=sys.stderr)


def _rounding(max_tokens: int | None, canvas: int) -> str:
    if not max_tokens or max_tokens % canvas == 0:
        return ""
    whole = math.ceil(max_tokens / canvas) * canvas
    return (
        f"; the model writes whole canvases, so --max-tokens {max_tokens} "
        f"became {whole}"
    )


def canvases_for(max_tokens: int | None, default: int, canvas: int) -> int:
    """Canvases a call will generate (for the progress bar's total)."""
    return max(1, math.ceil((max_tokens or default) / canvas))

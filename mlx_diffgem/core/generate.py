"""The block generation loop, once, over the Backend protocol (spec §4.2).

Per call:
1. Prefill: encode the pending canvas of a kept cache plus the prompt, in chunks.
2. For each canvas (whole canvases covering max_new_tokens):
   a. encode the canvas committed last (never the last one: it stays `cache.pending`);
   b. denoise a fresh canvas on the device (`Target.denoise`);
   c. commit the argmax; rows that emit EOS or cross max_length finish; tokens after
      the first EOS, and whole canvases of rows finished earlier, become pad.
3. Stop when every row has finished or the canvases run out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import validate as V
from .backend import (
    CanvasResult,
    CanvasState,
    DenoisePolicy,
    StepView,
    Target,
)
from .config import GenerationConfig
from .noise import NoiseSource
from .stats import Stats
from .validate import check_cache, check_call

PREFILL_CHUNK = 512


@dataclass
class CanvasEvent:
    """A committed canvas: `tokens` after EOS -> pad, `finished` rows after it."""

    index: int
    tokens: np.ndarray  # [B, C] int32
    finished: np.ndarray  # [B] bool
    result: CanvasResult
    last: bool = False  # no canvas follows (stats.finish_reason is set)


def generation_config(target: Target, overrides: dict[str, Any]) -> GenerationConfig:
    """The model's generation config with call overrides (AR-only keys raise)."""
    gen = target.generation_config.update(source="generate", **overrides)
    gen.check_vocab(target.config.vocab_size, "generate")
    return gen


def prefill(
    target: Target,
    ids: np.ndarray,
    cache: Any,
    attention_mask: np.ndarray | None = None,
    chunk: int = PREFILL_CHUNK,
) -> None:
    """Encode `ids` into `cache` in chunks so that peak memory stays bounded."""
    if chunk <= 0:
        raise ValueError(f"prefill_chunk: expected a positive integer, got {chunk}")
    for s in range(0, ids.shape[1], chunk):
        mask = None if attention_mask is None else attention_mask[:, s : s + chunk]
        target.encode(ids[:, s : s + chunk], cache, mask)


def _finish(
    tokens: np.ndarray, finished: np.ndarray, now: np.ndarray, gen: GenerationConfig
) -> np.ndarray:
    """EOS -> pad on a committed canvas, as the reference's finalize step."""
    if gen.pad_token_id is None or not (finished | now).any():
        return tokens
    tokens = tokens.copy()
    tokens[finished] = gen.pad_token_id  # rows that finished on an earlier canvas
    if gen.eos_token_id and now.any():
        is_eos = np.isin(tokens, gen.eos_token_id)
        cs = np.cumsum(is_eos, axis=1)
        tokens[(cs > 0) & ~((cs == 1) & is_eos)] = gen.pad_token_id
    return tokens


def generate_canvases(
    target: Target,
    prompt_ids: np.ndarray,
    *,
    gen: GenerationConfig,
    noise: NoiseSource,
    stats: Stats,
    cache: Any = None,
    attention_mask: np.ndarray | None = None,
    first_canvas: np.ndarray | None = None,
    drafts: bool = False,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[CanvasEvent | StepView]:
    """Run the block loop; yields one CanvasEvent per committed canvas and, with
    `drafts`, a StepView (live argmax canvas) after every denoising step."""
    B, C = prompt_ids.shape[0], target.config.canvas_length
    if cache is None:
        cache = target.new_cache(B)
    else:
        check_cache(target, cache, B)
    ids, mask = prompt_ids, attention_mask
    if cache.pending is not None:  # the last canvas of the previous call (multi-turn)
        ids = np.concatenate([cache.pending, ids], axis=1)
        if mask is not None:
            mask = np.concatenate([np.ones_like(cache.pending), mask], axis=1)
        cache.pending = None
    out_len = prompt_ids.shape[1]
    n_canvases = gen.num_canvases(C, cache.offset + ids.shape[1])
    policy = DenoisePolicy.from_generation(gen)

    # 1. prefill
    t0 = time.perf_counter()
    prefill(target, ids, cache, mask, prefill_chunk)
    target.sync()
    stats.prompt_tokens += int(ids.size if mask is None else mask.sum())
    stats.prompt_time += time.perf_counter() - t0

    # 2. canvases
    t0 = time.perf_counter()
    finished = np.zeros(B, bool)
    committed = None
    for k in range(n_canvases):
        if committed is not None:  # 2a
            target.encode(committed, cache)
        state = CanvasState(
            canvas=first_canvas if k == 0 else None, finished=finished.copy()
        )
        if drafts:  # 2b
            res = yield from target.denoise_steps(state, cache, policy, noise)
        else:
            res = target.denoise(state, cache, policy, noise)
        out_len += C  # 2c
        now = np.zeros(B, bool)
        if gen.max_length is not None:
            now |= out_len >= gen.max_length
        if gen.eos_token_id:
            now |= np.isin(res.tokens, gen.eos_token_id).any(axis=1)
        committed = _finish(res.tokens, finished, now, gen)
        finished = finished | now
        _count(stats, committed, res, gen)
        stats.generation_time = time.perf_counter() - t0
        stats.peak_memory = max(stats.peak_memory, target.peak_memory())
        last = bool(finished.all()) or k == n_canvases - 1  # 3
        if last:
            stats.finish_reason = "stop" if finished.all() else "length"
            cache.pending = committed
        # Yielded as soon as committed: a stream shows it before the next canvas.
        yield CanvasEvent(k, committed, finished.copy(), res, last)
        if last:
            return
    stats.finish_reason = "stop" if finished.all() else "length"
    cache.pending = committed


def count_passes(stats: Stats, res: CanvasResult) -> None:
    """Add one committed canvas's target and drafter passes to `stats`."""
    stats.canvases += 1
    stats.target_passes += res.steps
    stats.row_passes += int(res.passes.sum())
    stats.steps_per_canvas.append(res.steps)
    if res.drafter_steps:
        stats.drafter_passes += res.drafter_steps
        stats.drafter_steps_per_canvas.append(res.drafter_steps)
        stats.verify_rounds += res.verify_rounds


def _count(
    stats: Stats, tokens: np.ndarray, res: CanvasResult, gen: GenerationConfig
) -> None:
    count_passes(stats, res)
    if res.drafter_steps:
        finished = res.state.finished
        live = len(res.tokens) if finished is None else int((~finished).sum())
        stats.drafted_tokens += live * res.tokens.shape[1]
        stats.drafted_kept += res.drafted_kept
    real = tokens if gen.pad_token_id is None else tokens[tokens != gen.pad_token_id]
    stats.generated_tokens += int(real.size)


def generate_ids(
    model: Target,
    prompt_ids: Any,
    attention_mask: Any = None,
    noise: NoiseSource | None = None,
    seed: int | None = None,
    *,
    cache: Any = None,
    decoder_input_ids: Any = None,
    prefill_chunk: int = PREFILL_CHUNK,
    **generation_overrides: Any,
) -> tuple[np.ndarray, Stats]:
    """Generate whole canvases from token ids; the reference's `sequences` semantics.

    Args:
        model: a loaded Target (any backend).
        prompt_ids: [B, P] (or [P]) int token ids; rows may be left padded.
        attention_mask: [B, P], 1 for tokens and 0 for left padding.
        noise: a NoiseSource (e.g. ReplayNoise of draws recorded from transformers).
        seed: seed of the default on-device noise (when `noise` is None): None
            (fresh entropy) or any Python/numpy integer, reduced modulo 2**64 (-1 is
            2**64 - 1) the same way on both backends; bools and floats raise.
        cache: a cache from `model.new_cache(B)` to keep across calls (multi-turn); the
            last canvas committed by the previous call is encoded first.
        decoder_input_ids: [B, C] starting canvas of the first canvas (warm start).
        **generation_overrides: GenerationConfig fields (max_new_tokens <= 2**20,
            max_denoising_steps <= 10,000, t_min, ...; see GenerationConfig).
            Autoregressive-only options raise.

    Every argument is validated before the first side effect: a call that raises
    leaves `cache` (offset, pending canvas, contents) exactly as it was.

    Returns:
        (sequences [B, P + k*C] int32, Stats)
    """
    call = check_call(
        model,
        prompt_ids,
        attention_mask=attention_mask,
        noise=noise,
        seed_value=seed,
        cache=cache,
        decoder_input_ids=decoder_input_ids,
        overrides=generation_overrides,
    )
    V.integer(prefill_chunk, "prefill_chunk", lo=1)
    stats = Stats()
    events = generate_canvases(
        model,
        call.ids,
        gen=call.gen,
        noise=call.noise,
        stats=stats,
        cache=cache,
        attention_mask=call.mask,
        first_canvas=call.first_canvas,
        prefill_chunk=prefill_chunk,
    )
    canvases = [e.tokens for e in events]
    return np.concatenate([call.ids, *canvases], axis=1), stats

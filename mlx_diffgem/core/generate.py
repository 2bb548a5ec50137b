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
from dataclasses import dataclass, replace
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
from .noise import NoiseSource, make_noise
from .stats import Stats
from .validate import PREFILL_CHUNK, Call, check_cache, check_call


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


def make_call(
    model: Target,
    prompt_ids: Any,
    *,
    attention_mask: Any = None,
    noise: NoiseSource | None = None,
    seed: int | None = None,
    cache: Any = None,
    decoder_input_ids: Any = None,
    overrides: dict[str, Any] | None = None,
) -> Call:
    """The validated Call of a generation request, built once at the public boundary:
    `validate.check_call`, then the noise source (`noise.make_noise`), in that order,
    all before the first side effect (nothing is encoded, nothing is drawn)."""
    call = check_call(
        model,
        prompt_ids,
        attention_mask=attention_mask,
        cache=cache,
        decoder_input_ids=decoder_input_ids,
        overrides=overrides,
    )
    return replace(call, noise=make_noise(noise, seed))


def canvas_loop(
    target: Target, call: Call, stats: Stats
) -> Iterator[CanvasEvent | StepView]:
    """Run the block loop for `call`; yields one CanvasEvent per committed canvas
    and, with `call.drafts`, a StepView (live argmax canvas) after every denoising
    step. Counters go to `stats`."""
    gen, C = call.gen, target.config.canvas_length
    cache, ids, mask = _open_cache(target, call)
    n_canvases = gen.num_canvases(C, cache.offset + ids.shape[1])
    policy = DenoisePolicy.from_generation(gen)

    # 1. prefill
    _timed_prefill(target, ids, cache, mask, call.prefill_chunk, stats)

    # 2. canvases
    t0 = time.perf_counter()
    finished = np.zeros(call.ids.shape[0], bool)
    out_len, committed = call.ids.shape[1], None
    for k in range(n_canvases):
        if committed is not None:  # 2a
            target.encode(committed, cache)
        state = CanvasState(
            canvas=call.first_canvas if k == 0 else None,
            finished=finished.copy(),
            heal_ids=call.heal_ids if k == 0 else None,
        )
        if call.drafts:  # 2b
            res = yield from target.denoise_steps(state, cache, policy, call.noise)
        else:
            res = target.denoise(state, cache, policy, call.noise)
        out_len += C  # 2c
        committed, finished = _commit(res.tokens, finished, out_len, gen)
        _count(stats, committed, res, gen)
        stats.generation_time = time.perf_counter() - t0
        stats.peak_memory = max(stats.peak_memory, target.peak_memory())
        last = bool(finished.all()) or k == n_canvases - 1  # 3
        if last:
            _end(stats, cache, committed, finished)
        # Yielded as soon as committed: a stream shows it before the next canvas.
        yield CanvasEvent(k, committed, finished.copy(), res, last)
        if last:
            return
    _end(stats, cache, committed, finished)


def generate_canvases(
    target: Target,
    prompt_ids: np.ndarray,
    *,
    gen: GenerationConfig,
    noise: NoiseSource,
    stats: Stats,
    **options: Any,
) -> Iterator[CanvasEvent | StepView]:
    """`canvas_loop` from loose, already valid pieces (for callers that build their
    own GenerationConfig and noise). `options`: the other Call fields (cache,
    attention_mask, first_canvas, drafts, prefill_chunk)."""
    call = Call(gen, prompt_ids, noise=noise, **options)
    return canvas_loop(target, call, stats)


def _open_cache(target: Target, call: Call) -> tuple[Any, np.ndarray, Any]:
    """The cache to fill, and the ids and mask to prefill into it: a kept cache's
    pending canvas (the last one of the previous call, multi-turn) comes first."""
    B, cache = call.ids.shape[0], call.cache
    if cache is None:
        cache = target.new_cache(B)
    else:
        check_cache(target, cache, B)
    ids, mask = call.ids, call.attention_mask
    if cache.pending is not None:
        ids = np.concatenate([cache.pending, ids], axis=1)
        if mask is not None:
            mask = np.concatenate([np.ones_like(cache.pending), mask], axis=1)
        cache.pending = None
    return cache, ids, mask


def _timed_prefill(
    target: Target,
    ids: np.ndarray,
    cache: Any,
    mask: np.ndarray | None,
    chunk: int,
    stats: Stats,
) -> None:
    t0 = time.perf_counter()
    prefill(target, ids, cache, mask, chunk)
    target.sync()
    stats.prompt_tokens += int(ids.size if mask is None else mask.sum())
    stats.prompt_time += time.perf_counter() - t0


def _commit(
    tokens: np.ndarray, finished: np.ndarray, out_len: int, gen: GenerationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A denoised canvas -> (committed tokens, rows finished after it): rows that
    emit EOS or reach max_length finish now."""
    now = np.zeros(len(finished), bool)
    if gen.max_length is not None:
        now |= out_len >= gen.max_length
    if gen.eos_token_id:
        now |= np.isin(tokens, gen.eos_token_id).any(axis=1)
    return _finish(tokens, finished, now, gen), finished | now


def _end(stats: Stats, cache: Any, committed: Any, finished: np.ndarray) -> None:
    stats.finish_reason = "stop" if finished.all() else "length"
    cache.pending = committed  # encoded first by the next call (multi-turn)


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
        stats.drafted_tokens += res.drafted
        stats.drafted_kept += res.drafted_kept


def _count(
    stats: Stats, tokens: np.ndarray, res: CanvasResult, gen: GenerationConfig
) -> None:
    count_passes(stats, res)
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
            Autoregressive-only options raise. Also `prefill_chunk`: prompt tokens
            per encode pass (default 512; bounds the prefill's peak memory).

    Every argument is validated before the first side effect: a call that raises
    leaves `cache` (offset, pending canvas, contents) exactly as it was.

    Returns:
        (sequences [B, P + k*C] int32, Stats)
    """
    chunk = generation_overrides.pop("prefill_chunk", PREFILL_CHUNK)
    call = make_call(
        model,
        prompt_ids,
        attention_mask=attention_mask,
        noise=noise,
        seed=seed,
        cache=cache,
        decoder_input_ids=decoder_input_ids,
        overrides=generation_overrides,
    )
    call = replace(call, prefill_chunk=V.integer(chunk, "prefill_chunk", lo=1))
    stats = Stats()
    canvases = [e.tokens for e in canvas_loop(model, call, stats)]
    return np.concatenate([call.ids, *canvases], axis=1), stats

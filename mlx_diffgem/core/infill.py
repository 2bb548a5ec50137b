"""Infill and edit-in-place: denoise only the holes of a text (Backend protocol).

A text is laid out as one token sequence, <bos> + fixed tokens + hole positions, and
filled left to right, one canvas window at a time:
1. Find the first unfilled hole position q after the cache's end p.
2. Place a canvas window [s, s + C) with p <= s <= q, as late as the text allows
   (s = q when at least C tokens follow), so the window holds the hole and as much
   of the text after it (the suffix, later holes) as fits: the encoder is causal, so
   text after the canvas is invisible to it; inside the canvas it is seen both ways.
3. Encode the known tokens [p, s) into the cache (in chunks); denoise the window
   with every known token pinned (CanvasState.fixed) and every hole position free.
   Past the end of the text the window is pinned to <eos> then <pad> (the text ends
   there). Pinned positions are kept with zero entropy; the stop rule's mean
   entropy is over the holes only.
4. The window's hole positions take the committed argmax. A hole of chosen length
   ends at its first <eos>/<pad>: that token and the hole's remaining positions are
   removed, so the text after it moves up. Repeat until no hole is left.
A hole longer than C spans several windows; only its last window sees the suffix.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import validate as V
from .backend import CanvasState, DenoisePolicy, Target
from .config import MAX_NEW_TOKENS, GenerationConfig
from .generate import count_passes, generation_config, prefill
from .noise import NoiseSource, make_noise
from .stats import Stats

HOLE = "<|hole|>"  # a hole of chosen length (up to max_hole_tokens tokens)
# Every "<|hole" in a text must open one of the two markers: N in ASCII digits
# (\d would read "<|hole:\u0663|>" as 3); anything else is refused, not kept as text.
_OPEN = "<|hole"
_MARKER = re.compile(r"<\|hole(?::([0-9]+))?\|>")


def hole(tokens: int | None = None) -> str:
    """The marker of a hole: `hole()` == HOLE (chosen length), `hole(12)` ==
    "<|hole:12|>" (exactly 12 tokens)."""
    return HOLE if tokens is None else f"<|hole:{_length(tokens, 'hole')}|>"


@dataclass(frozen=True)
class Hole:
    """A hole in a list of parts: `tokens` exactly, or chosen (None: up to N)."""

    tokens: int | None = None


@dataclass
class FillResult:
    """What `fill` returns: the full text, each hole's text, the ids, the counters."""

    text: str
    holes: list[str]
    ids: np.ndarray  # [L] int32: <bos> + the filled text's tokens
    filled: np.ndarray  # [L] bool: positions the model wrote
    stats: Stats

    def __str__(self) -> str:
        return self.text


def _length(n: Any, name: str) -> int:
    """A hole's length: an integer in [1, MAX_NEW_TOKENS] (as max_new_tokens)."""
    return V.integer(n, name, lo=1, hi=MAX_NEW_TOKENS)


def parse_holes(text: str) -> list[str | Hole]:
    """Split a text at its hole markers (HOLE, or "<|hole:N|>" for N tokens, N in
    [1, MAX_NEW_TOKENS]). Any other "<|hole" (malformed, unterminated, nested) is
    refused: to keep that string as text, pass a list of parts instead."""
    V.text(text, "text_with_holes")
    parts: list[str | Hole] = []
    end = 0
    while (start := text.find(_OPEN, end)) >= 0:
        m = _MARKER.match(text, start)
        if m is None:
            close = text.find("|>", start)
            bad = text[start : close + 2 if close >= 0 else start + len(_OPEN)]
            raise ValueError(
                f"text_with_holes: malformed hole marker {V.show(bad)} at index "
                f"{start}; expected {HOLE!r} or '<|hole:N|>' with N in [1, "
                f"{MAX_NEW_TOKENS}] (for the text itself, pass a list of parts)"
            )
        parts.append(text[end:start])
        parts.append(Hole(None if m[1] is None else _marker_length(m)))
        end = m.end()
    parts.append(text[end:])
    if len(parts) == 1:
        raise ValueError(
            f"text_with_holes: no hole marker; mark holes with {HOLE!r} or "
            "'<|hole:N|>' (N tokens)"
        )
    return parts


def _marker_length(m: re.Match) -> int:
    digits = m[1]
    n = int(digits) if len(digits) <= 18 else 0  # int() refuses 4300+ digits
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise ValueError(
            f"text_with_holes: hole marker {V.show(m[0])}: expected a length in "
            f"[1, {MAX_NEW_TOKENS}] tokens"
        )
    return n


class _Layout:
    """The token sequence being filled: ids (-1 where unfilled) and hole numbers."""

    def __init__(self, tokenizer: Any, parts: list[str | Hole], max_hole: int):
        ids, owner, self.chosen = [tokenizer.bos_token_id], [-1], []
        # The user's text, literally: "<eos>" in it is text, not the special token.
        encode = getattr(tokenizer, "encode_plain", tokenizer.encode)
        for part in parts:
            if isinstance(part, Hole):
                n = max_hole if part.tokens is None else part.tokens
                ids += [-1] * n
                owner += [len(self.chosen)] * n
                self.chosen.append(part.tokens is None)
            else:
                tok = encode(part)
                ids += tok
                owner += [-1] * len(tok)
        if ids[0] is None:
            raise ValueError("tokenizer: no <bos> token; infill needs one")
        self.ids = np.asarray(ids, np.int64)
        self.owner = np.asarray(owner, np.int64)

    def window(self, p: int, C: int, tail: np.ndarray) -> tuple[int, np.ndarray] | None:
        """(start s, pinned ids [C] with -1 at holes) of the next window, or None."""
        free = np.flatnonzero(self.ids[p:] < 0)
        if free.size == 0:
            return None
        L = len(self.ids)
        s = max(p, 1, min(p + int(free[0]), L - C))
        win = self.ids[s : s + C]
        return s, np.concatenate([win, tail[: C - len(win)]])

    def commit(self, s: int, tokens: np.ndarray, ends: set[int]) -> int:
        """Write a window's argmax into its holes; end chosen holes at <eos>/<pad>.
        Returns the number of hole tokens kept."""
        span = slice(s, s + len(tokens))
        n = len(self.ids[span])
        hole = self.ids[span] < 0
        self.ids[span][hole] = tokens[:n][hole]
        kept = int(hole.sum())
        for k in np.unique(self.owner[span][hole]):
            kept -= self._end_chosen(int(k), ends)
        return kept

    def _end_chosen(self, k: int, ends: set[int]) -> int:
        if not self.chosen[k]:
            return 0
        at = np.flatnonzero(self.owner == k)
        stop = [i for i in at if self.ids[i] in ends]
        if not stop:
            return 0
        drop = at[at >= stop[0]]
        gone = int((self.ids[drop] >= 0).sum())
        self.ids, self.owner = np.delete(self.ids, drop), np.delete(self.owner, drop)
        return gone

    def hole_ids(self, k: int) -> list[int]:
        return self.ids[self.owner == k].tolist()


def _tail(gen: GenerationConfig, C: int) -> np.ndarray:
    """What pins the canvas past the end of the text: <eos>, then <pad>."""
    eos = gen.eos_token_id[0] if gen.eos_token_id else gen.pad_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else eos
    if eos is None:
        raise ValueError(
            "generation_config: infill of a text shorter than one canvas needs "
            "eos_token_id or pad_token_id"
        )
    return np.asarray([eos] + [pad] * (C - 1), np.int64)


def _fill_windows(
    target: Target,
    layout: _Layout,
    gen: GenerationConfig,
    noise: NoiseSource,
    stats: Stats,
) -> None:
    """Steps 1-4 of the module docstring."""
    C = target.config.canvas_length
    cache, policy, p = target.new_cache(1), DenoisePolicy.from_generation(gen), 0
    tail, ends = _tail(gen, C), {*(gen.eos_token_id or []), gen.pad_token_id}
    while (win := layout.window(p, C, tail)) is not None:  # 1-2
        s, pinned = win
        if s > p:  # 3
            t0 = time.perf_counter()
            prefill(target, layout.ids[None, p:s].astype(np.int32), cache)
            stats.prompt_time += time.perf_counter() - t0
        p = s
        state = CanvasState(fixed=pinned[None].astype(np.int32))
        res = target.denoise(state, cache, policy, noise)
        stats.generated_tokens += layout.commit(s, res.tokens[0], ends)  # 4
        count_passes(stats, res)
        stats.peak_memory = max(stats.peak_memory, target.peak_memory())


def fill(
    model: Target,
    tokenizer: Any,
    text_with_holes: str | list[str | Hole],
    *,
    max_hole_tokens: int | None = None,
    seed: int | None = None,
    noise: NoiseSource | None = None,
    **generation_overrides: Any,
) -> FillResult:
    """Fill the holes of a text; every other token stays as given.

    The text around the holes is the user's, literally: encoded as plain text
    (a special-token string such as "<eos>" in it is text, not that token), and
    returned byte for byte (`text` is the given text with each hole's text put in).

    Args:
        text_with_holes: a string with hole markers (HOLE, or "<|hole:N|>" for
            exactly N tokens, N in [1, MAX_NEW_TOKENS]; any other "<|hole" is
            refused), or a list of literal strings and Hole objects.
        max_hole_tokens: the most tokens a chosen-length hole gets (default: one
            canvas; at most MAX_NEW_TOKENS); it ends at the first <eos>/<pad> the
            model puts in it. All holes together: at most MAX_NEW_TOKENS tokens.
        seed / noise: randomness, as in generate_ids.
        **generation_overrides: sampler settings (max_denoising_steps, t_min, ...).

    Returns:
        FillResult (text, holes, ids, filled, stats).
    """
    if tokenizer is None:
        raise ValueError("tokenizer: infill needs a tokenizer; this model has none")
    parts = (
        parse_holes(text_with_holes)
        if isinstance(text_with_holes, str)
        else _check_parts(text_with_holes)
    )
    C = model.config.canvas_length
    max_hole = (
        C if max_hole_tokens is None else _length(max_hole_tokens, "max_hole_tokens")
    )
    _check_total(parts, max_hole)
    gen = generation_config(model, generation_overrides)
    layout = _Layout(tokenizer, parts, max_hole)
    stats = Stats(prompt_tokens=int((layout.ids >= 0).sum()))
    t0 = time.perf_counter()
    _fill_windows(model, layout, gen, make_noise(noise, seed), stats)
    stats.generation_time = time.perf_counter() - t0 - stats.prompt_time
    stats.finish_reason = "stop"
    holes = [tokenizer.decode(layout.hole_ids(k)) for k in range(len(layout.chosen))]
    filled = iter(holes)
    # The fixed text as given, not as decoded: a tokenizer's round trip may not
    # be exact (normalizers, a literal "\u2581" in a SentencePiece vocabulary).
    text = "".join(next(filled) if isinstance(p, Hole) else p for p in parts)
    ids = layout.ids.astype(np.int32)
    return FillResult(text, holes, ids, layout.owner >= 0, stats)


def _check_total(parts: list[str | Hole], max_hole: int) -> None:
    total = sum(max_hole if p.tokens is None else p.tokens for p in _holes(parts))
    if total > MAX_NEW_TOKENS:
        raise ValueError(
            f"text_with_holes: the holes add up to {total} tokens; expected at most "
            f"{MAX_NEW_TOKENS}"
        )


def _holes(parts: list[str | Hole]) -> list[Hole]:
    return [p for p in parts if isinstance(p, Hole)]


def _check_parts(parts: Any) -> list[str | Hole]:
    if not isinstance(parts, list | tuple) or not any(
        isinstance(p, Hole) for p in parts
    ):
        raise ValueError("text_with_holes: expected a string or a list with a Hole")
    for i, p in enumerate(parts):
        if isinstance(p, str):
            V.text(p, f"text_with_holes[{i}]")
        elif not isinstance(p, Hole):
            raise ValueError(
                f"text_with_holes: expected str or Hole parts, got {type(p).__name__}"
            )
        elif p.tokens is not None:
            _length(p.tokens, "Hole.tokens")
    return list(parts)


def edit(
    model: Target,
    tokenizer: Any,
    text_with_holes: str | list[str | Hole],
    **kwargs: Any,
) -> str:
    """The text with its holes filled (see `fill` for the options)."""
    return fill(model, tokenizer, text_with_holes, **kwargs).text


def infill(
    model: Target,
    tokenizer: Any,
    prefix: str,
    suffix: str,
    *,
    max_tokens: int | None = None,
    length: int | None = None,
    **kwargs: Any,
) -> str:
    """The text between `prefix` and `suffix` (both taken literally).

    Args:
        max_tokens: the most tokens of a chosen-length middle (default: one canvas);
            it ends at the first <eos>/<pad> the model writes.
        length: exactly this many tokens instead (then max_tokens must be None).
        **kwargs: as `fill` (seed, noise, sampler settings).
    """
    for name, value in (("prefix", prefix), ("suffix", suffix)):
        V.text(value, name)
    if length is not None and max_tokens is not None:
        raise ValueError("length: give either length= (exact) or max_tokens=, not both")
    n = None if length is None else _length(length, "length")
    if max_tokens is not None:
        _length(max_tokens, "max_tokens")
    parts = [prefix, Hole(n), suffix]
    return fill(model, tokenizer, parts, max_hole_tokens=max_tokens, **kwargs).holes[0]

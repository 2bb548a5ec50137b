"""Validation of every value that crosses the public boundary, in one place.

Numbers: Python and numpy integers/floats are accepted (numpy scalars become Python
ones), an int is accepted where a float is meant, bools are refused where a number
is meant, NaN and infinities are refused. Every error is one line that names the
option, key or file, the value, and what was expected.

`check_call` validates a whole generation call before its first side effect, so a
call that is going to fail leaves a kept cache, the noise source and the device
generator exactly as they were. It does not build the noise source: `core.noise`
depends on this module (for the seed), never the other way; its caller
(`core.generate.make_call`) adds the source, still before any side effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SEED_MODULUS = 2**64


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def show(value: Any) -> str:
    """repr for a one-line message, cut short (a 400-digit int stays readable)."""
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def is_number(value: Any) -> bool:
    """A Python or numpy int or float, not a bool."""
    return is_int(value) or isinstance(value, (float, np.floating))


def integer(
    value: Any,
    name: str,
    *,
    lo: int | None = None,
    hi: int | None = None,
    source: str | None = None,
    error: type[Exception] = ValueError,
) -> int:
    """`value` as a Python int in [lo, hi] (either bound optional)."""
    ok = is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise error(
            f"{_where(source)}{name} must be {_int_want(lo, hi)}, got {show(value)}"
        )
    return int(value)


def _int_want(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    if lo == 1:
        return "a positive integer"
    return "an integer" + ("" if lo is None else f" >= {lo}")


def number(
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    lo_open: bool = False,
    hi: float | None = None,
    source: str | None = None,
    error: type[Exception] = ValueError,
) -> float:
    """`value` as a finite Python float (finite in float32 too: the backends compute in
    float32), >= lo (> lo when `lo_open`) and <= hi."""
    f = _as_float(value)
    ok = math.isfinite(f) and abs(f) <= _F32_MAX
    if ok and lo is not None:
        ok = f > lo if lo_open else f >= lo
    if ok and hi is not None:
        ok = f <= hi
    if not ok:
        want = "a finite number"
        if lo is not None:
            want += f" {'>' if lo_open else '>='} {lo}"
        if hi is not None:
            want += f" and <= {hi}"
        raise error(f"{_where(source)}{name} must be {want}, got {show(value)}")
    return f


_F32_MAX = float(np.finfo(np.float32).max)


def _as_float(value: Any) -> float:
    """A Python float of a number (NaN for non-numbers and ints too big for a float);
    comparing a numpy float16 with a Python bound would overflow in numpy."""
    if not is_number(value):
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.nan


def token_id(
    value: Any,
    name: str,
    vocab_size: int | None,
    *,
    source: str | None = None,
    error: type[Exception] = ValueError,
) -> int:
    """A token id inside the vocabulary [0, vocab_size) (when it is known)."""
    if (
        not is_int(value)
        or value < 0
        or (vocab_size is not None and value >= vocab_size)
    ):
        want = f"[0, vocab_size={vocab_size})" if vocab_size is not None else ">= 0"
        raise error(
            f"{_where(source)}{name} must be a token id in {want}, got {show(value)}"
        )
    return int(value)


def token_ids(
    value: Any,
    name: str,
    vocab_size: int | None,
    *,
    source: str | None = None,
    error: type[Exception] = ValueError,
) -> list[int]:
    """None, one id or a list of ids -> a list of ids inside the vocabulary."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    items = value if isinstance(value, (list, tuple)) else [value]
    return [token_id(v, name, vocab_size, source=source, error=error) for v in items]


def text(value: Any, name: str) -> str:
    """A str that is valid Unicode: a lone surrogate ("\\ud800", from a bad
    decode) cannot be encoded to UTF-8, and the tokenizer would raise a TypeError."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name}: a lone surrogate {value[e.start]!r} at index {e.start}; "
            "expected valid Unicode text"
        ) from None
    return value


def seed(value: Any) -> int | None:
    """A generator seed: None (fresh entropy) or any Python/numpy integer.

    Integers are reduced modulo 2**64 (so -1 is 2**64 - 1), the same way for every
    backend; both seed their device generator with the reduced value. Bools, floats
    and strings are refused.
    """
    if value is None:
        return None
    if not is_int(value):
        raise ValueError(f"seed: expected an integer or None, got {show(value)}")
    return int(value) % SEED_MODULUS


# --------------------------------------------------------------------------------------
# Token ids and masks
# --------------------------------------------------------------------------------------


def as_array(value: Any, name: str) -> np.ndarray:
    """np.asarray with a named error for ragged lists and None."""
    if value is None:
        raise ValueError(f"{name}: expected token ids, got None")
    try:
        return np.asarray(value)
    except (ValueError, TypeError):
        raise ValueError(
            f"{name}: rows of different lengths; expected a rectangular (batch, "
            "length) array (left-pad shorter rows and pass an attention_mask)"
        ) from None


def check_ids(ids: Any, vocab_size: int, name: str = "input_ids") -> np.ndarray:
    """Validate token ids at the boundary: 2-D, integer, non-empty, inside the vocab."""
    arr = as_array(ids, name)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape (batch, length), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: empty prompt; expected at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})"
        )
    return arr.astype(np.int32)


def check_mask(
    mask: Any, ids: np.ndarray, whole_prompt: bool = True
) -> np.ndarray | None:
    """An attention mask [B, P] of 0 (pad) / 1 (token) entries; with `whole_prompt`,
    every row has a token (a chunk of a prefill may be all padding)."""
    if mask is None:
        return None
    arr = as_array(mask, "attention_mask")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.shape != ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {ids.shape} (one entry per prompt token), "
            f"got {arr.shape}"
        )
    if arr.dtype == object or not np.isin(arr, (0, 1)).all():
        raise ValueError("attention_mask: expected 0 (pad) / 1 (token) entries")
    empty = np.flatnonzero(arr.sum(axis=1) == 0)
    if whole_prompt and empty.size:
        raise ValueError(
            f"attention_mask: row {int(empty[0])} masks every token; expected at "
            "least one 1 per row"
        )
    # Padding after a token (right padding, or a hole in a row) would put the
    # canvas after pad slots the model never saw in training: refused, not run.
    row, col = np.nonzero(np.diff(arr.astype(np.int8), axis=1) < 0)
    if row.size:
        raise ValueError(
            f"attention_mask: row {int(row[0])} has padding after a token (position "
            f"{int(col[0]) + 1}); only left padding is supported (pad at the start)"
        )
    return arr.astype(np.int32)


# --------------------------------------------------------------------------------------
# A whole generation call
# --------------------------------------------------------------------------------------


# Prompt tokens per encode pass of the prefill (bounds its peak memory).
PREFILL_CHUNK = 512


@dataclass(frozen=True, eq=False)
class Call:
    """A validated generation call: what the block loop needs, built once at the
    public boundary (`core.generate.make_call`) and passed down unchanged."""

    gen: Any  # GenerationConfig, with the call's overrides
    ids: np.ndarray  # [B, P] int32 prompt ids
    attention_mask: np.ndarray | None = None  # [B, P]: 1 token, 0 left padding
    first_canvas: np.ndarray | None = None  # [B, C] warm start of the first canvas
    noise: Any = None  # NoiseSource (added by make_call)
    cache: Any = None  # a cache kept across calls (multi-turn); None: a fresh one
    drafts: bool = False  # also yield a StepView after every denoising step
    prefill_chunk: int = PREFILL_CHUNK
    heal_ids: np.ndarray | None = None  # token healing: the first position's ids


def check_call(
    target: Any,
    prompt_ids: Any,
    *,
    attention_mask: Any = None,
    cache: Any = None,
    decoder_input_ids: Any = None,
    overrides: dict[str, Any] | None = None,
) -> Call:
    """Validate every argument of a generation call but the randomness (noise, seed:
    `core.generate.make_call` adds the noise source); nothing is touched yet."""
    gen = target.generation_config.update(source="generate", **(overrides or {}))
    gen.check_vocab(target.config.vocab_size, "generate")
    ids = check_ids(prompt_ids, target.config.vocab_size)
    mask = check_mask(attention_mask, ids)
    first = None
    if decoder_input_ids is not None:
        first = check_ids(
            decoder_input_ids, target.config.vocab_size, "decoder_input_ids"
        )
        want = (ids.shape[0], target.config.canvas_length)
        if first.shape != want:
            raise ValueError(
                f"decoder_input_ids: expected shape {want}, got {first.shape}"
            )
    if cache is not None:
        check_cache(target, cache, ids.shape[0])
    return Call(gen, ids, mask, first, cache=cache)


def check_cache(target: Any, cache: Any, batch_size: int) -> None:
    """A cache made by `target.new_cache(batch_size)` (this backend, this batch)."""
    backend = getattr(cache, "backend", None)
    if backend != target.backend:
        what = f"a {backend} cache" if backend else type(cache).__name__
        raise ValueError(
            f"cache: expected a cache from model.new_cache({batch_size}) of the "
            f"{target.backend} backend, got {what}"
        )
    if cache.batch_size != batch_size:
        raise ValueError(
            f"cache: built for batch {cache.batch_size}, prompt has batch {batch_size}"
        )
    pending = cache.pending
    if pending is not None and pending.shape[0] != batch_size:
        raise ValueError(f"cache: its pending canvas has batch {pending.shape[0]}")


def check_decode(
    target: Any, canvas_ids: Any, cache: Any, self_conditioning: Any
) -> tuple[int, int]:
    """Arguments of `Target.decode`: a cache of this backend, a canvas of the model's
    canvas_length ([C] or [B, C]) and self-conditioning logits [B, C, V] or None
    (numpy or the backend's arrays). Returns the canvas shape (B, C)."""
    B, C = cache_batch(cache), target.config.canvas_length
    check_cache(target, cache, B)
    shape = _shape(canvas_ids, "canvas_ids")
    if shape not in ((B, C),) + (((C,),) if B == 1 else ()):
        raise ValueError(
            f"canvas_ids: expected shape {(B, C)} (the cache's batch, the model's "
            f"canvas_length), got {shape}"
        )
    sc = self_conditioning
    if sc is None:
        return B, C
    want = (B, C, target.config.vocab_size)
    if _shape(sc, "self_conditioning") != want:
        raise ValueError(
            f"self_conditioning: expected logits of shape {want}, got "
            f"{_shape(sc, 'self_conditioning')}"
        )
    if isinstance(sc, np.ndarray) and not np.issubdtype(sc.dtype, np.floating):
        raise ValueError(
            f"self_conditioning: expected float logits, got dtype {sc.dtype}"
        )
    return B, C


def check_pass_sc(sc_shape: Any, canvas_shape: Any, vocab: int, plan: Any) -> None:
    """Self-conditioning of one model pass (a plan: a drafter's pass): logits
    [B, C, V], or [B, C, plan.head_vocab] when the plan cuts the head (a drafter's
    own logits, at its head's width)."""
    widths = {vocab}
    if plan is not None and plan.head_vocab is not None:
        widths.add(plan.head_vocab)
    sc_shape, canvas_shape = tuple(sc_shape), tuple(canvas_shape)
    if sc_shape[:-1] != canvas_shape or sc_shape[-1] not in widths:
        raise ValueError(
            f"self_conditioning: expected logits of shape "
            f"{(*canvas_shape, vocab)}, got {sc_shape}"
        )


def _shape(x: Any, name: str) -> tuple[int, ...]:
    # numpy, mlx and torch arrays all have .shape; lists go through numpy.
    return tuple(x.shape) if hasattr(x, "shape") else as_array(x, name).shape


def cache_batch(cache: Any) -> int:
    """The batch size of something that should be a cache (named error if not)."""
    B = getattr(cache, "batch_size", None)
    if not is_int(B):
        raise ValueError(
            f"cache: expected a cache from model.new_cache(batch_size), got "
            f"{type(cache).__name__}"
        )
    return int(B)

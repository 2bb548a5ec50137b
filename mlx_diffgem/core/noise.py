"""Randomness of the sampler, behind one small protocol.

The reference draws, from one generator and in this order (spec §4.4): per canvas one
uniform `initial_canvas`; per denoising step one `sample` (multinomial over the
temperature-scaled distribution) and one `renoise` (uniform ids). Every backend makes
the same three calls in the same order, so a test can replay draws recorded from
transformers and demand token-identical output.

A call returning None means "draw on the device": the seeded default keeps the
generator inside the backend (no host round trip per step); a replay returns the
recorded int32 arrays of shape (batch, canvas_length).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import validate as V

KINDS = ("initial_canvas", "sample", "renoise")


@runtime_checkable
class NoiseSource(Protocol):
    """Where the sampler's random draws come from."""

    seed: int | None

    def initial_canvas(
        self, shape: tuple[int, int], vocab: int
    ) -> np.ndarray | None: ...

    def sample(self, shape: tuple[int, int]) -> np.ndarray | None: ...

    def renoise(self, shape: tuple[int, int], vocab: int) -> np.ndarray | None: ...


class SeededNoise:
    """The default: the backend draws on the device from a generator seeded with `seed`.

    `state` belongs to the backend that consumes this source (its device generator);
    core code never reads it.
    """

    def __init__(self, seed: int | None = 0):
        # Any integer, reduced modulo 2**64 (validate.seed): both backends then seed
        # their device generator with the same value.
        self.seed = V.seed(seed)
        self.state: Any = None

    def initial_canvas(self, shape: tuple[int, int], vocab: int) -> None:
        return None

    def sample(self, shape: tuple[int, int]) -> None:
        return None

    def renoise(self, shape: tuple[int, int], vocab: int) -> None:
        return None


class ReplayNoise:
    """Replays recorded draws in call order; raises when they run out or mismatch."""

    seed = None

    def __init__(self, draws: Iterable[np.ndarray]):
        self._draws = [np.asarray(d) for d in draws]
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self._draws) - self._next

    def _pop(self, kind: str, shape: tuple[int, int], vocab: int | None) -> np.ndarray:
        if self._next >= len(self._draws):
            raise ValueError(
                f"ReplayNoise: ran out of draws at call {self._next} ({kind}); "
                f"{len(self._draws)} were recorded"
            )
        draw = self._draws[self._next]
        if tuple(draw.shape) != tuple(shape):
            raise ValueError(
                f"ReplayNoise: draw {self._next} ({kind}) has shape "
                f"{tuple(draw.shape)}, "
                f"expected {tuple(shape)}"
            )
        if vocab is not None and draw.size and (draw.min() < 0 or draw.max() >= vocab):
            raise ValueError(
                f"ReplayNoise: draw {self._next} ({kind}) is outside [0, {vocab})"
            )
        self._next += 1
        return draw.astype(np.int32)

    def initial_canvas(self, shape: tuple[int, int], vocab: int) -> np.ndarray:
        return self._pop("initial_canvas", shape, vocab)

    def sample(self, shape: tuple[int, int]) -> np.ndarray:
        return self._pop("sample", shape, None)

    def renoise(self, shape: tuple[int, int], vocab: int) -> np.ndarray:
        return self._pop("renoise", shape, vocab)


def make_noise(noise: NoiseSource | None, seed: int | None) -> NoiseSource:
    """`noise` if given (a seed then is an error), else a seeded device source.

    `seed`: None (fresh entropy) or any Python/numpy integer, reduced modulo 2**64
    (so -1 means 2**64 - 1) the same way on every backend; bools are refused.
    """
    if noise is not None:
        if seed is not None:
            raise ValueError("seed: give either noise= or seed=, not both")
        if not isinstance(noise, NoiseSource):
            raise ValueError(
                "noise: expected a NoiseSource (SeededNoise, ReplayNoise), got "
                f"{type(noise).__name__}"
            )
        if noise.seed is not None and V.seed(noise.seed) != noise.seed:
            raise ValueError(
                f"noise.seed: expected None or [0, 2**64), got {noise.seed}"
            )
        return noise
    return SeededNoise(seed)

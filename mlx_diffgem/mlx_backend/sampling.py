"""The native DiffusionGemma sampler pieces, on the MLX device (spec §4.3).

Each function is one piece of the reference's trio (accept / renoise / stop) plus the
entropy they share; `canvas.py` runs them in the reference's order. The torch twin is
`cuda_backend/sampling.py`.
"""

from __future__ import annotations

from ._blas import import_mlx

mx = import_mlx()


def softmax_tail(z: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The parts of softmax(z) that entropy and sampling share (one exp pass).

    Returns d = z - max, w = exp(d) off the max entries (0 on them), the tail sum
    sum(w) and the number of max entries. MLX's CPU reductions add sequentially, so
    in sum(exp(z - max)) the max's 1 swallows a tail of tiny terms (a peaked
    262k-way distribution loses its whole entropy); keeping the tail apart keeps it.
    """
    d = z - mx.max(z, axis=-1, keepdims=True)
    tail = d < 0
    w = mx.where(tail, mx.exp(d), 0.0)
    return d, w, mx.sum(w, axis=-1), mx.sum(~tail, axis=-1).astype(z.dtype)


def entropy(z: mx.array, parts: tuple | None = None) -> mx.array:
    """Entropy in nats of softmax(z) over the vocab, [..., V] -> [...] (float32).

    With t = tail sum + (number of maxima - 1): H = log1p(t) - sum(w * d) / (1 + t).
    """
    d, w, tail, n_max = softmax_tail(z) if parts is None else parts
    t = tail + n_max - 1.0
    return mx.log1p(t) - mx.sum(w * d, axis=-1) / (1.0 + t)


def accept_mask(h: mx.array, bound: float) -> mx.array:
    """Entropy-bound acceptance: keep the k lowest-entropy positions with
    sum(H_1..H_k) - max(H_1..H_k) <= bound (at least one per row). [B, C] -> bool."""
    order = mx.argsort(h, axis=-1)
    h_sorted = mx.take_along_axis(h, order, axis=-1)
    keep_sorted = (mx.cumsum(h_sorted, axis=-1) - h_sorted) <= bound
    return mx.put_along_axis(mx.zeros(h.shape, mx.bool_), order, keep_sorted, axis=-1)


def renoise(keep: mx.array, draft: mx.array, noise: mx.array) -> mx.array:
    """Next canvas: accepted positions take the sampled draft, all others noise."""
    return mx.where(keep, draft, noise)


def sample_tokens(z: mx.array, key: mx.array, parts: tuple | None = None) -> mx.array:
    """One draw per position from softmax(z): [B, C, V] -> [B, C] int32.

    Inverse CDF with one uniform per position (a Gumbel draw needs V of them, which
    costs more than the whole sampler on a CPU). The tail is searched on its own
    cumulative sum so its tiny terms are not lost next to the max's 1; the mass of
    the max entries goes to the first of them.
    """
    _, w, tail, n_max = softmax_tail(z) if parts is None else parts
    u = mx.random.uniform(shape=tail.shape, key=key) * (tail + n_max)
    pick = mx.sum(mx.cumsum(w, axis=-1) < u[..., None], axis=-1)
    pick = mx.minimum(pick, z.shape[-1] - 1)  # rounding: u just below the tail sum
    return mx.where(u < tail, pick, mx.argmax(z, axis=-1)).astype(mx.int32)


def stop_update(
    history: mx.array | None,
    new_arg: mx.array,
    mean_entropy: mx.array,
    stability_threshold: int,
    confidence_threshold: float,
) -> tuple[mx.array, mx.array | None]:
    """Stable-and-confident test: (stop [B] bool, updated argmax history [S, B, C]).

    Stable = the argmax equals each of the previous `stability_threshold` argmaxes (the
    history starts at -1, so a canvas needs at least threshold + 1 steps).
    """
    confident = mean_entropy < confidence_threshold
    if stability_threshold == 0:
        return confident, history
    if history is None:
        history = mx.full((stability_threshold, *new_arg.shape), -1, new_arg.dtype)
    stable = mx.all(history == new_arg[None], axis=(0, 2))
    history = mx.concatenate([history[1:], new_arg[None]], axis=0)
    return stable & confident, history

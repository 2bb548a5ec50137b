"""Triton kernel of the fused sampler step (see sampling.fused_step, which imports
this module on first use: Triton reads TRITON_INTERPRET when a kernel is defined)."""

import triton
import triton.language as tl


@triton.jit
def fused_step(
    z, temperature, seed, arg, ent, draw, V,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One row of [rows, V] logits per program, read once: z /= T in place, the
    argmax, the entropy of softmax(z / T) and a Gumbel-max draw from it.

    Each of BLOCK lanes keeps a running max m, s = sum exp(x - m) and
    t = sum exp(x - m) (x - m) of its elements; H = log S - T / S after the lanes
    are merged. Both terms are >= 0, so nothing cancels when one token dominates."""
    row = tl.program_id(0).to(tl.int64)
    base = z + row * V
    temp = tl.load(temperature)
    key = tl.load(seed)
    lanes = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = tl.zeros((BLOCK,), tl.int32)
    drawn = tl.full((BLOCK,), float("-inf"), tl.float32)
    drawn_i = tl.zeros((BLOCK,), tl.int32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + lanes
        ok = cols < V
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) / temp
        tl.store(base + cols, x, mask=ok)
        up = ok & (x > best)  # strict: the first index wins a tie, as torch.argmax
        best_i = tl.where(up, cols, best_i)
        best = tl.where(up, x, best)
        u = tl.rand(key, row * V + cols)
        g = x - tl.log(-tl.log(tl.maximum(u, 1e-20)))
        up = ok & (g > drawn)
        drawn_i = tl.where(up, cols, drawn_i)
        drawn = tl.where(up, g, drawn)
        m_new = tl.where(ok, tl.maximum(m, x), m)
        empty = m == float("-inf")  # nothing in this lane yet: s = t = 0
        scale = tl.where(empty, 0.0, tl.exp(m - m_new))
        t = tl.where(empty, 0.0, scale * (t + (m - m_new) * s))
        s = s * scale
        e = tl.where(ok, tl.exp(x - m_new), 0.0)
        t += tl.where(ok, e * (x - m_new), 0.0)
        s += e
        m = m_new
    top = tl.max(m, axis=0)
    empty = m == float("-inf")
    w = tl.where(empty, 0.0, tl.exp(m - top))
    S = tl.sum(s * w, axis=0)
    T = tl.sum(tl.where(empty, 0.0, w * (t + (m - top) * s)), axis=0)
    tl.store(ent + row, tl.log(S) - T / S)
    vmax = tl.max(best, axis=0)
    tl.store(arg + row, tl.min(tl.where(best == vmax, best_i, V), axis=0))
    gmax = tl.max(drawn, axis=0)
    tl.store(draw + row, tl.min(tl.where(drawn == gmax, drawn_i, V), axis=0))

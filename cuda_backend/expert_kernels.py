"""Triton kernels of the experts' grouped GEMM (see expert_gemm.py, which imports
this module on first use: Triton reads TRITON_INTERPRET when a kernel is defined)."""

import triton
import triton.language as tl


@triton.jit
def grouped(
    x, w, scales, out, table, K, N, W_ROWS,
    GATE_UP: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    T = tl.num_programs(0)
    e = tl.load(table + t)
    if e >= 0:
        rows = tl.load(table + T + t) + tl.arange(0, BM)
        rmask = rows < tl.load(table + 2 * T + t)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        cmask = cols < N
        base = w + e.to(tl.int64) * W_ROWS * K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            a = tl.load(
                x + rows[:, None].to(tl.int64) * K + ks[None, :],
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            )
            wmask = kmask[:, None] & cmask[None, :]
            b = tl.load(base + cols[None, :] * K + ks[:, None], mask=wmask, other=0.0)
            if SCALED:  # int8 / fp8 weights: exact in the activations' dtype
                b = b.to(a.dtype)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
            if GATE_UP:  # the up half of gate_up_proj: rows N..2N-1
                b = tl.load(
                    base + (N + cols[None, :]) * K + ks[:, None],
                    mask=wmask,
                    other=0.0,
                )
                if SCALED:
                    b = b.to(a.dtype)
                if UPCAST:
                    b = b.to(tl.float32)
                up += tl.dot(a, b, input_precision=PRECISION)
        if SCALED:  # per output row of the weight: applied once, after the sum
            srow = scales + e.to(tl.int64) * W_ROWS
            acc *= tl.load(srow + cols, mask=cmask, other=0.0)[None, :]
            if GATE_UP:
                up *= tl.load(srow + N + cols, mask=cmask, other=0.0)[None, :]
        if GATE_UP:
            # gelu, tanh approximation: 0.5 g (1 + tanh(u)) = g sigmoid(2u)
            u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(2.0 * u) * up
        dst = out + rows[:, None].to(tl.int64) * N + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        tl.store(dst, acc.to(out.dtype.element_ty), mask=mask)

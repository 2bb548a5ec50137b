"""The experts' grouped GEMM paths (cuda_backend/expert_gemm.py) on the CPU.

The Triton kernels run under TRITON_INTERPRET=1 (Triton's interpreter executes the
same kernel source with numpy), against the loop over experts; the path choice is
checked for every torch feature it depends on, and a whole decoder pass must give the
same logits on every path.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_torch

torch = pytest.importorskip("torch")
pytestmark = needs_torch

triton = pytest.importorskip("triton", reason="the test extra installs triton")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DIFFGEM_EXPERT_GEMM", raising=False)


def _groups(sizes, K, N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    R, E = sum(sizes), len(sizes)
    x = torch.randn(R, K, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) / K**0.5).to(dtype)
    offs = torch.tensor(np.cumsum(sizes), dtype=torch.int32)
    return x, w, offs


def _reference(x, w, offs):
    out, lo = [], 0
    for e, hi in enumerate(offs.tolist()):
        out.append(x[lo:hi].double() @ w[e].double().T)
        lo = hi
    return torch.cat(out)


SIZES = [
    [3, 0, 17, 1, 0, 40, 5, 14],  # empty experts, groups across tile edges
    [0, 0, 0, 33],  # everything on the last expert
    [16, 16, 16, 16],  # exact tiles
    [0, 0, 0],  # no rows at all
]


@pytest.mark.parametrize("sizes", SIZES)
def test_tile_table_covers_each_row_once_within_its_expert(sizes):
    from cuda_backend.expert_gemm import tile_table

    offs = torch.tensor(np.cumsum(sizes), dtype=torch.int32)
    R, E, bm = sum(sizes), len(sizes), 16
    table = tile_table(offs, R, bm)
    assert table.dtype == torch.int32 and table.shape == (3, -(-R // bm) + E)
    owner = np.repeat(np.arange(E), sizes)
    seen = np.zeros(R, int)
    for e, lo, hi in table.T.tolist():
        if e < 0:
            continue
        rows = np.arange(lo, min(lo + bm, hi))
        assert len(rows) > 0, "a tile with no rows"
        assert (owner[rows] == e).all(), f"tile of expert {e} takes another's rows"
        seen[rows] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("sizes", SIZES)
def test_triton_grouped_matches_the_experts_loop(interpret, sizes):
    from cuda_backend.expert_gemm import grouped_linear

    # K and N off the block sizes (32, 64): the masks at both edges are exercised.
    x, w, offs = _groups(sizes, K=72, N=80)
    got = grouped_linear(x, w, offs, "triton")
    assert got.shape == (sum(sizes), 80) and got.dtype == torch.float32
    if got.numel():
        torch.testing.assert_close(
            got.double(), _reference(x, w, offs), atol=2e-5, rtol=0
        )
        torch.testing.assert_close(
            got, grouped_linear(x, w, offs, "loop"), atol=2e-5, rtol=0
        )


def test_fused_gate_up_is_gelu_gate_times_up(interpret):
    from cuda_backend.expert_gemm import grouped_linear, triton_grouped

    x, w, offs = _groups(SIZES[0], K=48, N=2 * 40, seed=1)
    h = grouped_linear(x, w, offs, "loop")
    gate, up = h.chunk(2, dim=-1)
    want = torch.nn.functional.gelu(gate, approximate="tanh") * up
    got = triton_grouped(x, w, offs, True)
    assert got.shape == (x.shape[0], 40)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_triton_bfloat16_accumulates_in_float32(interpret):
    from cuda_backend.expert_gemm import grouped_linear

    x, w, offs = _groups(SIZES[0], K=64, N=64, seed=2, dtype=torch.bfloat16)
    got = grouped_linear(x, w, offs, "triton")
    assert got.dtype == torch.bfloat16
    want = _reference(x, w, offs).to(torch.bfloat16)
    # one bf16 rounding of a float32 sum: within one bf16 ulp of the exact result
    assert (
        (got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-3
    ).all()


def test_only_the_loop_reads_the_host():
    from cuda_backend.expert_gemm import grouped_linear, host_syncs

    x, w, offs = _groups(SIZES[0], K=16, N=16)
    before = host_syncs()
    grouped_linear(x, w, offs, "grouped_mm")
    assert host_syncs() == before
    grouped_linear(x, w, offs, "loop")
    grouped_linear(x, w, offs, "loop")
    assert host_syncs() == before + 2


# -- choosing a path -------------------------------------------------------------------


def test_choice_follows_what_torch_and_the_device_offer(monkeypatch):
    import torch.nn.functional as F

    from cuda_backend import expert_gemm as eg

    monkeypatch.delenv("DIFFGEM_EXPERT_GEMM", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.zeros(2, 4, 4)
    if hasattr(F, "grouped_mm"):
        assert eg.choose(w) == "grouped_mm"
        monkeypatch.delattr(F, "grouped_mm")
    # torch._grouped_mm is taken on CUDA only (bf16, Hopper); Triton on CPU only
    # under its interpreter: an older torch on a CPU loops.
    assert eg.choose(w) == "loop"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert eg.choose(w) == "triton"
    assert not eg.runnable("_grouped_mm", w.bfloat16())
    assert not eg.runnable("triton", w.to(torch.int8))
    # quantized weights on a GPU: Triton reads them as stored, so it goes first
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DIFFGEM_EXPERT_GEMM", raising=False)
    assert eg.choose(w, quantized=True) == eg.choose(w) != "triton"  # the CPU
    monkeypatch.setattr(eg, "_on_gpu", lambda w: True)
    assert eg.choose(w, quantized=True) == "triton"
    assert eg.choose(w) != "triton"


def test_a_forced_path_that_cannot_run_is_refused(monkeypatch):
    from cuda_backend import expert_gemm as eg

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.zeros(2, 4, 4)
    monkeypatch.setenv("DIFFGEM_EXPERT_GEMM", "fast")
    with pytest.raises(ValueError, match="DIFFGEM_EXPERT_GEMM: expected one of"):
        eg.choose(w)
    monkeypatch.setenv("DIFFGEM_EXPERT_GEMM", "triton")
    with pytest.raises(ValueError, match="DIFFGEM_EXPERT_GEMM=triton: cannot run"):
        eg.choose(w)
    monkeypatch.setenv("DIFFGEM_EXPERT_GEMM", "loop")
    assert eg.choose(w) == "loop"


def test_training_skips_the_kernels_without_a_backward(monkeypatch):
    """A float32 model training on a GPU would otherwise pick Triton, whose custom op
    has no backward: the loop (or grouped_mm) trains, with the loop's gradients."""
    import torch.nn.functional as F

    from cuda_backend import expert_gemm as eg

    monkeypatch.delenv("DIFFGEM_EXPERT_GEMM", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    x, w, offs = _groups(SIZES[0], K=16, N=8)
    assert eg.choose(w) == "triton"
    w.requires_grad_(True)
    assert eg.choose(w) == "loop"
    with torch.no_grad():
        assert eg.choose(w) == "triton"
    # a path fixed for inference ("triton") gives way while the weights train
    eg.grouped_linear(x, w, offs, "triton").square().sum().backward()
    expected = torch.autograd.grad(_reference(x, w, offs).square().sum(), w)[0]
    torch.testing.assert_close(w.grad, expected.float(), atol=1e-3, rtol=1e-4)
    monkeypatch.setenv("DIFFGEM_EXPERT_GEMM", "triton")
    with pytest.raises(ValueError, match="triton: cannot run .* under autograd"):
        eg.choose(w)


# -- a whole decoder pass --------------------------------------------------------------


@pytest.fixture(scope="module")
def passes(tiny_path):
    from cuda_backend.backend import load

    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 128, (2, 11)).astype(np.int32)
    canvas = rng.integers(0, 128, (2, 8)).astype(np.int32)

    def run(path: str, quantization=None):
        mp = pytest.MonkeyPatch()
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("DIFFGEM_EXPERT_GEMM", path)
        try:
            t = load(tiny_path, device="cpu", quantization=quantization)
            assert t.expert_path == path
            cache = t.new_cache(2)
            t.encode(ids, cache)
            return t.decode(canvas, cache).numpy()
        finally:
            mp.undo()

    return run


@pytest.mark.parametrize("path", ["grouped_mm", "triton"])
def test_decoder_logits_agree_on_every_path(passes, path):
    np.testing.assert_allclose(passes(path), passes("loop"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_quantized_experts_take_the_chosen_path(passes, quant):
    np.testing.assert_allclose(
        passes("triton", quant), passes("loop", quant), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_the_kernel_reads_quantized_weights_as_stored(interpret, qdtype):
    """int8 / fp8 weights times per-row scales inside the kernel (gate-up fused
    too), against the dequantized float64 product."""
    from cuda_backend.expert_gemm import triton_grouped

    torch.manual_seed(0)
    x, w, offs = _groups(SIZES[0], K=40, N=2 * 24)
    q = (w * 20).clamp(-100, 100).to(qdtype)
    scales = torch.rand(w.shape[:2]) + 0.5
    deq = q.double() * scales.double()[..., None]
    want = _reference(x, deq, offs)
    got = triton_grouped(x, q, offs, False, scales)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    gate, up = want[:, :24], want[:, 24:]
    fused = torch.nn.functional.gelu(gate, approximate="tanh") * up
    got = triton_grouped(x, q, offs, True, scales)
    # float32 accumulation of products up to ~1e2: an error of ~1e-6 of the largest
    # output (a missing scale or activation is off by far more)
    tol = max(1e-4, 1e-6 * float(fused.abs().max()))
    torch.testing.assert_close(got.double(), fused, atol=tol, rtol=1e-5)


def test_the_slow_path_on_a_gpu_is_named_once_to_the_user():
    from cuda_backend.expert_gemm import slow_note

    note = slow_note("loop", torch.device("cuda", 0))
    assert "per-expert loop" in note and torch.__version__ in note and "\n" not in note
    assert slow_note("triton", torch.device("cuda", 0)) is None
    assert slow_note("loop", torch.device("cpu")) is None  # nothing waits on a CPU

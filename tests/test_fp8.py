"""FP8 weights for the torch backend (cuda_backend/quantize.py, mode "fp8").

The quantizer's round trip against e4m3's rounding bound; the fp8 Linear (both the
`torch._scaled_mm` path, where it runs, and the emulation) and the fp8 experts against
float64 products of their dequantized operands; quantize-on-load of the tiny
checkpoint against float32; generation; refused modes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import needs_torch

torch = pytest.importorskip("torch")

pytestmark = needs_torch

PROMPT = np.random.default_rng(1).integers(3, 128, (2, 13)).astype(np.int32)
CANVAS = np.random.default_rng(2).integers(0, 128, (2, 8)).astype(np.int32)


def _dequantized(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.double() * scales.double()[..., None]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest magnitude."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def target(tiny_path):
    from cuda_backend.backend import load

    torch.set_num_threads(1)
    return load(tiny_path, device="cpu")


# --------------------------------------------------------------------------------------
# the quantizer
# --------------------------------------------------------------------------------------


def test_round_trip_is_within_one_e4m3_rounding():
    from cuda_backend.quantize import FP8, quantize_fp8

    g = torch.Generator().manual_seed(0)
    # Magnitudes spread over six decades inside each row: normals and subnormals.
    w = torch.randn(3, 24, 64, generator=g) * 10 ** (
        -6 * torch.rand(3, 24, 64, generator=g)
    )
    w[1, 5] = 0.0  # a zero row
    q, s = quantize_fp8(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 24) and bool((s > 0).all())
    assert s[1, 5] == 1.0 and not q[1, 5].float().any()
    # Each row's largest magnitude lands on e4m3's largest value: the range is used.
    amax = q.float().abs().amax(-1)
    assert bool((amax[w.abs().amax(-1) > 0] == 448).all())
    err = (_dequantized(q, s) - w.double()).abs()
    # Round to nearest: half a step, 2^-4 of the value for normals (3 mantissa
    # bits), 2^-10 of the scale below e4m3's smallest normal 2^-6 (subnormals).
    bound = torch.maximum(w.double().abs() * 2**-4, s.double()[..., None] * 2**-10)
    assert bool((err <= bound * (1 + 1e-6)).all()), float((err / bound).max())
    # Not just within the bound: most values are well inside it.
    assert float((err / bound).mean()) < 0.6


# --------------------------------------------------------------------------------------
# the modules
# --------------------------------------------------------------------------------------


def _linear(dtype: torch.dtype, out: int = 48, inp: int = 64, gain: float = 0.05):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(inp, out, bias=False)
    lin.weight.data = torch.randn(out, inp, generator=g) * gain
    return lin.to(dtype)


def _linear_reference(qlin, x: torch.Tensor) -> torch.Tensor:
    """The product of the fp8 input and weight, dequantized, in float64."""
    from cuda_backend.quantize import quantize_fp8

    rows = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_fp8(rows)
    y = _dequantized(xq, xs) @ _dequantized(qlin.weight, qlin.scales).T
    return y.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("scaled_mm", [True, False], ids=["scaled_mm", "emulated"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_matches_its_dequantized_operands(scaled_mm, dtype):
    from cuda_backend.quantize import Fp8Linear, scaled_mm_runs

    dt = getattr(torch, dtype)
    if scaled_mm and not scaled_mm_runs(torch.device("cpu"), dt):
        pytest.skip(f"torch._scaled_mm does not run on this CPU in {dtype}")
    lin = _linear(dt)
    qlin = Fp8Linear(lin)
    assert qlin.scaled_mm == scaled_mm_runs(torch.device("cpu"), dt)
    qlin.scaled_mm = scaled_mm
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)).to(dt)
    with torch.no_grad():
        got, want = qlin(x), _linear_reference(qlin, x)
        plain = lin(x)
    assert got.dtype == dt and got.shape == (2, 5, 48)
    # float32: accumulation rounding only; bf16: one output rounding (2^-9).
    assert _rel(got, want) < (1e-5 if dt == torch.float32 else 8e-3)
    # And the fp8 rounding of both operands stays near the float product.
    assert _rel(got, plain) < 0.08


def test_emulated_float16_does_not_overflow():
    """Raw fp8 products reach 448^2 per term, past float16's 65504: the emulation
    multiplies them in float32 and casts the scaled result."""
    from cuda_backend.quantize import Fp8Linear

    qlin = Fp8Linear(_linear(torch.float16, gain=0.01))
    qlin.scaled_mm = False
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).half()
    with torch.no_grad():
        got = qlin(x)
    assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
    assert _rel(got, _linear_reference(qlin, x)) < 2e-3


def _twin(experts, qexperts):
    """The float experts with their weights replaced by the dequantized fp8 ones."""
    twin = copy.deepcopy(experts).double()
    twin.path = "loop"  # the grouped GEMMs take no float64
    for name in ("gate_up_proj", "down_proj"):
        q, s = getattr(qexperts, name), getattr(qexperts, name + "_scales")
        getattr(twin, name).data = _dequantized(q, s)
    return twin


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_experts_match_their_dequantized_weights(target, dtype):
    from cuda_backend.quantize import Fp8Experts

    layer = target.model.layers[1]
    dt = getattr(torch, dtype)
    # x100: in float16 the raw fp8 products would overflow (see above).
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4)) * 100
    with torch.no_grad():
        w, idx = layer.router(x)
        experts = copy.deepcopy(layer.experts).to(dt)
        qexperts = Fp8Experts(experts)
        assert qexperts.path == layer.experts.path == target.expert_path
        assert qexperts.gate_up_proj.dtype == torch.float8_e4m3fn
        assert qexperts.down_proj_scales.shape == (4, 32)
        got = qexperts(x.to(dt), w, idx)
        want = _twin(layer.experts, qexperts)(x.double(), w.double(), idx)
        plain = layer.experts(x, w, idx)
    assert got.dtype == dt and bool(torch.isfinite(got).all())
    assert _rel(got, want) < (1e-5 if dt == torch.float32 else 2e-3)
    assert _rel(got, plain) < 0.08


# --------------------------------------------------------------------------------------
# quantize on load
# --------------------------------------------------------------------------------------


def _logits(target) -> np.ndarray:
    cache = target.new_cache(2)
    target.encode(PROMPT, cache)
    return target.decode(CANVAS, cache).numpy()


@pytest.fixture(scope="module")
def fp8_target(tiny_path):
    from cuda_backend.backend import load

    return load(tiny_path, device="cpu", quantization="fp8")


def test_load_swaps_the_modules(fp8_target, target):
    from cuda_backend.quantize import Fp8Experts, Fp8Linear

    layer = fp8_target.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear)
    assert layer.self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert isinstance(fp8_target.model.self_conditioning.gate_proj, Fp8Linear)
    assert isinstance(layer.experts, Fp8Experts)
    assert type(layer.router.proj) is torch.nn.Linear  # routing stays in float
    assert fp8_target.model.dtype == torch.float32  # the embedding stays too
    assert fp8_target.expert_path == target.expert_path


def test_logits_stay_close_to_float32(fp8_target, target):
    """Measured on this checkpoint: max |diff| 14.5% of the logits' range,
    correlation 0.986 (int8: 9.5%, 0.997). Top-2-of-4 routing is discontinuous: a
    token whose two best experts are within fp8 noise of each other flips, and
    bidirectional attention carries that to every canvas position (with top_k = E
    the same comparison gives 7.9% and 0.993)."""
    ref, got = _logits(target), _logits(fp8_target)
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    rel = np.abs(got - ref).max() / np.ptp(ref)
    assert corr > 0.975 and rel < 0.2, (corr, rel)


def test_generate_ids_runs_and_is_seeded(fp8_target):
    from mlx_diffgem.core.generate import generate_ids

    seqs, stats = generate_ids(fp8_target, PROMPT[:1], seed=0, max_new_tokens=16)
    assert seqs.shape == (1, 29) and stats.canvases == 2
    again, _ = generate_ids(fp8_target, PROMPT[:1], seed=0, max_new_tokens=16)
    assert (seqs == again).all()


def test_fp8_experts_take_the_chosen_path(tiny_path, monkeypatch):
    """As int8 (test_expert_gemm): the Triton kernels (interpreted here) multiply the
    fp8 experts as the loop does. On the CPU "grouped_mm" takes any dtype, so this
    is the one path that shows the choice."""
    from cuda_backend.backend import load

    logits = {}
    for p in ("triton", "loop"):
        monkeypatch.setenv("DIFFGEM_EXPERT_GEMM", p)
        t = load(tiny_path, device="cpu", quantization="fp8")
        assert t.expert_path == p
        logits[p] = _logits(t)
    np.testing.assert_allclose(logits["triton"], logits["loop"], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, mode",
    [
        ("fp8", "fp8"),
        ({"bits": 8, "mode": "fp8"}, "fp8"),
        ("int8", "int8"),
        ({"bits": 8}, "int8"),
    ],
)
def test_accepted_modes(spec, mode):
    from cuda_backend.quantize import check_mode

    assert check_mode(spec) == mode


@pytest.mark.parametrize(
    "spec",
    ["fp4", "FP8", "e4m3", {"bits": 8, "mode": "mxfp8"}, {"bits": 4, "mode": "fp8"}, 8],
)
def test_bad_modes_are_refused_in_one_line(tiny_path, spec):
    from cuda_backend.backend import load

    with pytest.raises(ValueError, match="^quantization: ") as e:
        load(tiny_path, device="cpu", quantization=spec)
    assert "'int8' or 'fp8'" in str(e.value) and "\n" not in str(e.value)

"""The fused sampler step (cuda_backend/sampling.fused_step, a Triton kernel) on the
CPU under TRITON_INTERPRET=1: the same z / T, argmax and entropy as the torch ops,
categorical draws with softmax(z / T)'s frequencies, and a canvas loop that runs it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import needs_torch

torch = pytest.importorskip("torch")
pytestmark = [
    needs_torch,
    # the interpreter evaluates masked-off lanes too (-inf - -inf), then drops them
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
pytest.importorskip("triton", reason="the test extra installs triton")


def _logits(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


@pytest.mark.parametrize("V", [5, 300, 2048, 3000])  # below, across, at, off the block
def test_fused_step_matches_the_torch_ops(V, monkeypatch):
    from cuda_backend import sampling

    monkeypatch.setattr(sampling, "FUSED_BLOCK", 256)
    z = _logits((2, 6, V))
    z[0, 0, V // 2] = (
        60.0  # one token dominates: entropy ~1e-25, kept to relative accuracy
    )
    z[1, 1] = 0.5  # every token ties: argmax is the first, entropy log V
    T = torch.tensor(0.7)
    want = z.clone()
    arg, h = sampling.score(want, T)
    got = z.clone()
    arg2, h2, draw = sampling.fused_step(got, T, torch.tensor([7]))
    assert torch.equal(got, want)  # z / T in place, the same division
    assert torch.equal(arg2, arg) and arg2[1, 1] == 0
    torch.testing.assert_close(h2, h, rtol=1e-5, atol=1e-6)
    assert abs(h2[1, 1].item() - np.log(V)) < 1e-5
    assert draw.dtype == torch.int64 and ((draw >= 0) & (draw < V)).all()


def test_fused_draws_follow_softmax():
    from cuda_backend import sampling

    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    T = torch.tensor(0.5)
    z = (probs.log() * 0.5).expand(1, 1200, 5).contiguous()  # softmax(z / T) = probs
    _, _, draw = sampling.fused_step(z.clone(), T, torch.tensor([11]))
    freq = torch.bincount(draw.flatten(), minlength=5).float() / draw.numel()
    # 1,200 draws: ~0.014 standard error at p = 0.5; at T = 1 it would be off by 0.15
    assert (freq - probs).abs().max() < 0.05, freq
    few = z[:, :60].contiguous()
    again = sampling.fused_step(few.clone(), T, torch.tensor([11]))[2]
    other = sampling.fused_step(few.clone(), T, torch.tensor([12]))[2]
    assert torch.equal(again, draw[:, :60]) and not torch.equal(other, again)


def test_choosing_the_fused_sampler(monkeypatch):
    from cuda_backend.sampling import use_fused

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("DIFFGEM_FUSED_SAMPLER", raising=False)
    assert not use_fused(cpu)  # the CPU keeps torch's ops unless asked
    assert use_fused(gpu)  # Triton is installed here
    monkeypatch.setenv("DIFFGEM_FUSED_SAMPLER", "0")
    assert not use_fused(gpu)
    monkeypatch.setenv("DIFFGEM_FUSED_SAMPLER", "1")
    assert use_fused(cpu)  # TRITON_INTERPRET=1 (conftest)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="DIFFGEM_FUSED_SAMPLER=1: needs Triton"):
        use_fused(cpu)
    monkeypatch.setenv("DIFFGEM_FUSED_SAMPLER", "yes")
    with pytest.raises(ValueError, match="DIFFGEM_FUSED_SAMPLER: expected 0 or 1"):
        use_fused(cpu)


def test_the_canvas_loop_runs_the_fused_step(tiny_path, monkeypatch):
    """One kernel call per pass; seeded runs repeat; the kernel's own random stream
    gives valid tokens, other than torch's multinomial draws."""
    from cuda_backend import sampling
    from cuda_backend.backend import load
    from mlx_diffgem.core.generate import generate_ids

    torch.set_num_threads(1)
    plain = load(tiny_path, device="cpu")
    monkeypatch.setenv("DIFFGEM_FUSED_SAMPLER", "1")
    fused = load(tiny_path, device="cpu")
    assert fused.model.fused_sampler and not plain.model.fused_sampler
    calls = []
    real = sampling.fused_step
    monkeypatch.setattr(sampling, "fused_step", lambda *a: calls.append(1) or real(*a))
    prompt = np.random.default_rng(5).integers(3, 128, (1, 9)).astype(np.int32)
    kw = dict(seed=3, max_new_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a, stats = generate_ids(fused, prompt, **kw)
        b, _ = generate_ids(fused, prompt, **kw)
    assert len(calls) == 2 * stats.target_passes
    assert np.array_equal(a, b) and a.shape == (1, 17)
    assert ((a >= 0) & (a < fused.config.vocab_size)).all()
    want, _ = generate_ids(plain, prompt, **kw)
    assert not np.array_equal(a, want)  # another random stream: other tokens

"""The PyTorch backend against transformers on the tiny checkpoint (fp32, CPU).

Parity chain, first link: logits of the encoder/decoder passes (prefill beyond the
window, self-conditioning, a commit, left padding, chunked prefill), then the sampler
token for token with transformers' random draws replayed, then `generate_ids`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import needs_mlx, needs_torch, needs_transformers

torch = pytest.importorskip("torch")

pytestmark = needs_torch

TOL = 1e-4


def assert_close(got, want, tol: float = TOL, what: str = "logits") -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = np.abs(got - want)
    assert diff.max() <= tol, (
        f"{what}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"
    )


@pytest.fixture(scope="module")
def target(tiny_path):
    from cuda_backend.backend import load

    torch.set_num_threads(1)
    # A tiny initial K/V capacity so that the prefill and the commits grow the buffers.
    return load(tiny_path, device="cpu", max_len=5)


def _ids(seed: int, shape: tuple[int, int], low: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, 128, shape).astype(np.int32)


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x)).long()


# --------------------------------------------------------------------------------------
# Logits parity with transformers
# --------------------------------------------------------------------------------------


@needs_transformers
def test_prefill_beyond_window_then_decode(target, hf_model):
    ids, canvas = (
        _ids(1, (2, 13)),
        _ids(2, (2, 8), 0),
    )  # 13 > W = 8: sliding cache holds 7
    with torch.no_grad():
        want = hf_model(input_ids=_t(ids), decoder_input_ids=_t(canvas)).logits
    cache = target.new_cache(2)
    target.encode(ids, cache)
    got = target.decode(canvas, cache)
    assert got.dtype == torch.float32 and cache.offset == 13
    assert_close(got, want)
    assert got.abs().max() <= 30.0  # softcapped


@needs_transformers
def test_self_conditioned_step(target, hf_model):
    ids, canvas = _ids(3, (2, 13)), _ids(4, (2, 8), 0)
    sc = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        want = hf_model(
            input_ids=_t(ids), decoder_input_ids=_t(canvas), self_conditioning_logits=sc
        ).logits
    cache = target.new_cache(2)
    target.encode(ids, cache)
    assert_close(target.decode(canvas, cache, sc), want)


@needs_transformers
def test_second_canvas_after_commit(target, hf_model):
    from transformers.cache_utils import DynamicCache

    ids, first, second = _ids(5, (2, 13)), _ids(6, (2, 8), 0), _ids(7, (2, 8), 0)
    hf_cache = DynamicCache(config=hf_model.config.text_config)
    with torch.no_grad():
        hf_model(
            input_ids=_t(ids), decoder_input_ids=_t(first), past_key_values=hf_cache
        )
        want = hf_model(
            input_ids=_t(first), decoder_input_ids=_t(second), past_key_values=hf_cache
        ).logits
    cache = target.new_cache(2)
    target.encode(ids, cache)
    target.decode(second, cache)  # decoder passes must leave the cache unchanged
    target.encode(first, cache)
    target.decode(first, cache)
    assert_close(target.decode(second, cache), want)
    assert cache.offset == 21


@needs_transformers
def test_left_padded_batch(target, hf_model):
    ids, canvas = _ids(8, (2, 13)), _ids(9, (2, 8), 0)
    mask = np.ones((2, 13), np.int32)
    mask[1, :4] = 0  # row 1 is left padded: positions still count the pads
    ids[1, :4] = 0
    dmask = np.concatenate([mask, np.ones((2, 8), np.int32)], axis=1)
    with torch.no_grad():
        want = hf_model(
            input_ids=_t(ids),
            attention_mask=_t(mask),
            position_ids=torch.arange(13)[None],
            decoder_input_ids=_t(canvas),
            decoder_attention_mask=_t(dmask).bool(),
        ).logits
    cache = target.new_cache(2)
    target.encode(ids, cache, mask)
    got = target.decode(canvas, cache)
    assert torch.isfinite(got).all()
    assert_close(got, want)


@needs_transformers
def test_fully_padded_sliding_window_has_no_nan(target, hf_model):
    # Row 1's padding fills the whole window of its first real tokens' predecessors.
    ids, canvas = _ids(10, (2, 13)), _ids(11, (2, 8), 0)
    mask = np.ones((2, 13), np.int32)
    mask[1, :11] = 0
    dmask = np.concatenate([mask, np.ones((2, 8), np.int32)], axis=1)
    with torch.no_grad():
        want = hf_model(
            input_ids=_t(ids),
            attention_mask=_t(mask),
            position_ids=torch.arange(13)[None],
            decoder_input_ids=_t(canvas),
            decoder_attention_mask=_t(dmask).bool(),
        ).logits
    cache = target.new_cache(2)
    target.encode(ids, cache, mask)
    for layer in cache.layers:
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    assert_close(target.decode(canvas, cache), want)


@needs_transformers
def test_chunked_prefill_equals_one_shot(target, hf_model):
    from transformers.cache_utils import DynamicCache

    ids, canvas = _ids(12, (2, 21)), _ids(13, (2, 8), 0)
    mask = np.ones((2, 21), np.int32)
    mask[0, :3] = 0
    one = target.new_cache(2)
    target.encode(ids, one, mask)
    chunked, hf_cache = (
        target.new_cache(2),
        DynamicCache(config=hf_model.config.text_config),
    )
    for s in range(0, 21, 5):  # chunks of 5 < W, and across the window boundary
        target.encode(ids[:, s : s + 5], chunked, mask[:, s : s + 5])
        with torch.no_grad():  # the reference, fed the same chunks
            want = hf_model(
                input_ids=_t(ids[:, s : s + 5]),
                attention_mask=_t(mask[:, : s + 5]),
                position_ids=torch.arange(s, min(s + 5, 21))[None],
                decoder_input_ids=_t(canvas),
                decoder_attention_mask=_t(
                    np.pad(mask[:, : s + 5], ((0, 0), (0, 8)), constant_values=1)
                ).bool(),
                past_key_values=hf_cache,
            ).logits
    assert chunked.offset == one.offset == 21
    assert_close(target.decode(canvas, chunked), want)
    # Chunked and one-shot differ only by float32 rounding (other GEMM shapes), which
    # this random tiny model amplifies from ~1e-6 in K/V to ~1e-4 in the logits.
    for a, b in zip(one.layers, chunked.layers, strict=True):
        assert a.length == b.length
        assert_close(a.keys[:, :, : a.length], b.keys[:, :, : b.length], 1e-5, "keys")
        assert_close(
            a.values[:, :, : a.length], b.values[:, :, : b.length], 1e-5, "values"
        )
    assert_close(target.decode(canvas, chunked), target.decode(canvas, one), tol=2e-3)


@needs_transformers
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_attention_layout_on_cpu(target, hf_model, monkeypatch, padded):
    """The decoder's GPU path (query groups folded onto the KV heads) on the CPU."""
    from cuda_backend import model as model_mod

    ids, canvas = _ids(18, (2, 13)), _ids(19, (2, 8), 0)
    mask = np.ones((2, 13), np.int32)
    if padded:
        mask[0, :5] = 0
    dmask = np.concatenate([mask, np.ones((2, 8), np.int32)], axis=1)
    with torch.no_grad():
        want = hf_model(
            input_ids=_t(ids),
            attention_mask=_t(mask),
            position_ids=torch.arange(13)[None],
            decoder_input_ids=_t(canvas),
            decoder_attention_mask=_t(dmask).bool(),
        ).logits
    monkeypatch.setattr(model_mod, "FOLD_GQA", True)
    cache = target.new_cache(2)
    target.encode(ids, cache, mask)
    # Other GEMM shapes: float32 rounding only, amplified by the tiny random model.
    assert_close(target.decode(canvas, cache), want, tol=1e-3)


@needs_transformers
def test_bfloat16_matches_transformers(tiny_path, hf_model):
    """The GPU dtype flow (bf16 weights, fp32 norms/softmax/expert sums, embed scale
    rounded to bf16, bf16 self-conditioning) on the CPU: bit-exact in practice."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from cuda_backend.backend import load

    bf = load(tiny_path, device="cpu", dtype="bfloat16")
    assert bf.model.dtype == torch.bfloat16
    assert bf.model.embed_scale() == float(torch.tensor(math.sqrt(32)).bfloat16())
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(tiny_path), dtype=torch.bfloat16, experts_implementation="grouped_mm"
    ).eval()
    ids, canvas = _ids(16, (2, 13)), _ids(17, (2, 8), 0)
    sc = (
        torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(2)) * 3
    ).bfloat16()
    with torch.no_grad():
        want = hf(
            input_ids=_t(ids), decoder_input_ids=_t(canvas), self_conditioning_logits=sc
        ).logits
    cache = bf.new_cache(2)
    bf.encode(ids, cache)
    # transformers' eager attention rounds the scores to bf16 (sdpa does not), which
    # this tiny random model amplifies to ~3 in the logits: compare with sdpa.
    assert_close(bf.decode(canvas, cache, sc), want, tol=1e-3)


# --------------------------------------------------------------------------------------
# Sampler pieces (the upstream unit tests, spec §7.1)
# --------------------------------------------------------------------------------------


def _peaked_logits(
    peaks: dict[int, float], V: int = 10_000, C: int = 256
) -> torch.Tensor:
    z = torch.zeros(1, C, V)
    for pos, value in peaks.items():
        z[0, pos, 7] = value
    return z


def test_entropy_anchors():
    from cuda_backend.sampling import entropy

    h = entropy(_peaked_logits({0: 18.0, 1: 14.5, 2: 14.5}))[0]
    assert h[0] == pytest.approx(2.9e-3, rel=0.05)
    assert h[1] == pytest.approx(7.8e-2, rel=0.05)
    assert h[3] == pytest.approx(math.log(10_000), rel=1e-5)


@pytest.mark.parametrize("bound, accepted", [(0.1, 3), (0.01, 2)])
def test_accept_entropy_bound(bound, accepted):
    from cuda_backend.sampling import accept_mask, entropy

    keep = accept_mask(entropy(_peaked_logits({0: 18.0, 1: 14.5, 2: 14.5})), bound)
    assert int(keep.sum()) == accepted
    assert keep[0, :accepted].all()


def test_accept_keeps_at_least_one():
    from cuda_backend.sampling import accept_mask

    keep = accept_mask(torch.full((2, 5), 9.0), 0.1)
    assert keep.sum(dim=-1).tolist() == [1, 1]


def test_renoise_keeps_zero_entropy_positions():
    from cuda_backend.sampling import accept_mask, entropy, renoise

    z = _peaked_logits({i: 1e6 for i in range(9)})
    keep = accept_mask(entropy(z), 0.1)
    draft = torch.full((1, 256), 5, dtype=torch.long)
    noise = torch.randint(
        100, 10_000, (1, 256), generator=torch.Generator().manual_seed(0)
    )
    out = renoise(keep, draft, noise)
    assert int((out == draft).sum()) >= 10  # the 9 sure positions + the first uncertain
    assert (out[0, :9] == 5).all()


def test_stop_confidence():
    from cuda_backend.sampling import stop_update

    mean_h = torch.tensor([math.log(10_000), 7.8e-2, 2.9e-3])
    arg = torch.zeros(3, 4, dtype=torch.long)
    stop, _ = stop_update(None, arg, mean_h, 0, 0.005)
    assert stop.tolist() == [False, False, True]
    stop, _ = stop_update(None, arg, mean_h, 0, 0.1)
    assert stop.tolist() == [False, True, True]


@pytest.mark.parametrize("threshold", [1, 2])
def test_stop_stability(threshold):
    from cuda_backend.sampling import stop_update

    low = torch.tensor([1e-4])
    a, b = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    history, seen = None, []
    for arg in [a] * (threshold + 1) + [b] + [b] * threshold:
        stop, history = stop_update(history, arg, low, threshold, 0.005)
        seen.append(bool(stop))
    # threshold + 1 equal argmaxes to stop; a change resets the count.
    want = [False] * threshold + [True] + [False] * threshold + [True]
    assert seen == want
    assert history.shape == (threshold, 1, 4)


def test_sample_tokens_follows_the_distribution():
    from cuda_backend.sampling import sample_tokens

    z = torch.full((1, 2, 6), -1e4)
    z[0, 0, 3] = 0.0
    z[0, 1, 5] = 0.0
    assert sample_tokens(z, torch.Generator().manual_seed(0)).tolist() == [[3, 5]]


# --------------------------------------------------------------------------------------
# Token-identical denoising and generation (transformers' draws replayed)
# --------------------------------------------------------------------------------------


class Recorder:
    """Records transformers' randint / multinomial outputs during `generate`."""

    def __init__(self, monkeypatch, canvas_length: int):
        self.draws: list[np.ndarray] = []
        self.samples = 0
        randint, multinomial = torch.randint, torch.multinomial

        def rec_randint(*args, **kwargs):
            out = randint(*args, **kwargs)
            self.draws.append(out.numpy().copy())
            return out

        def rec_multinomial(*args, **kwargs):
            out = multinomial(*args, **kwargs)  # [B*C, 1]
            self.draws.append(out.reshape(-1, canvas_length).numpy().copy())
            self.samples += 1
            return out

        monkeypatch.setattr(torch, "randint", rec_randint)
        monkeypatch.setattr(torch, "multinomial", rec_multinomial)


def _hf_generate(hf_model, monkeypatch, ids, mask=None, **kw):
    rec = Recorder(monkeypatch, hf_model.config.canvas_length)
    torch.manual_seed(0)
    args = {} if mask is None else {"attention_mask": _t(mask)}
    with torch.no_grad():
        out = hf_model.generate(_t(ids), **args, **kw)
    monkeypatch.undo()
    return out, rec


def _early_bound(target, ids, mask=None, steps: int = 12) -> dict:
    """Settings under which one row stops before the others, for this tiny model.

    With stability 0 a row stops once its mean entropy is under the bound. A seeded
    run (the same stream as torch.manual_seed(0) on the CPU) gives the per-step mean
    entropies; a bound just above the lowest one before the last step stops that row
    there, while the others go on.
    """
    from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
    from mlx_diffgem.core.noise import SeededNoise

    cache = target.new_cache(ids.shape[0])
    target.encode(ids, cache, mask)
    policy = DenoisePolicy(
        max_steps=steps, stability_threshold=0, confidence_threshold=1e-9
    )
    res = target.denoise(CanvasState(), cache, policy, SeededNoise(0))
    bound = float(res.step_stats["mean_entropy"][:-1].min()) * (1 + 1e-4)
    return {"stability_threshold": 0, "confidence_threshold": bound}


@needs_transformers
@pytest.mark.parametrize("early", [False, True])
def test_denoise_matches_transformers(target, hf_model, monkeypatch, early):
    from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
    from mlx_diffgem.core.noise import ReplayNoise

    ids = _ids(20, (2, 13))
    kw = dict(max_new_tokens=8, max_denoising_steps=12, eos_token_id=None)
    if early:
        kw.update(_early_bound(target, ids))
    out, rec = _hf_generate(hf_model, monkeypatch, ids, **kw)
    cache = target.new_cache(2)
    target.encode(ids, cache)
    noise = ReplayNoise(rec.draws)
    policy = DenoisePolicy.from_generation(target.generation_config.update(**kw))
    seen = []
    res = target.denoise(CanvasState(), cache, policy, noise, on_step=seen.append)
    np.testing.assert_array_equal(res.tokens, out.sequences[:, 13:].numpy())
    assert res.steps == rec.samples == len(seen) and noise.remaining == 0
    np.testing.assert_array_equal(seen[-1].argmax, res.tokens)
    passes = 8 / out.tokens_per_forward.numpy()  # the reference's per-row passes
    np.testing.assert_allclose(res.passes, passes, rtol=1e-6)
    assert res.step_stats["accepted"].shape == (res.steps, 2)
    assert (res.step_stats["accepted"] >= 1).all()
    if early:
        assert res.passes.min() < res.steps  # a row stopped and was frozen
        assert seen[-1].done.all() or res.steps == 12


@needs_transformers
def test_seeded_noise_reproduces_transformers_seed(target, hf_model):
    from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
    from mlx_diffgem.core.noise import SeededNoise

    ids = _ids(21, (2, 13))
    torch.manual_seed(123)  # CPU: our generator and torch's global one share a stream
    with torch.no_grad():
        out = hf_model.generate(
            _t(ids), max_new_tokens=8, max_denoising_steps=6, eos_token_id=None
        )
    cache = target.new_cache(2)
    target.encode(ids, cache)
    policy = DenoisePolicy(max_steps=6)
    res = target.denoise(CanvasState(), cache, policy, SeededNoise(123))
    np.testing.assert_array_equal(res.tokens, out.sequences[:, 13:].numpy())


@needs_transformers
def test_warm_start_state_continues(target, hf_model, monkeypatch):
    """A given canvas + self-conditioning (the speculative hand-over), draws aligned."""
    from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
    from mlx_diffgem.core.noise import ReplayNoise

    ids, start = _ids(22, (2, 13)), _ids(23, (2, 8), 0)
    sc = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, max_denoising_steps=5, eos_token_id=None)
    out, rec = _hf_generate(
        hf_model,
        monkeypatch,
        ids,
        decoder_input_ids=_t(start),
        self_conditioning_logits=sc,
        **kw,
    )
    cache = target.new_cache(2)
    target.encode(ids, cache)
    state = CanvasState(canvas=start, self_conditioning=sc)
    res = target.denoise(
        state, cache, DenoisePolicy(max_steps=5), ReplayNoise(rec.draws)
    )
    np.testing.assert_array_equal(res.tokens, out.sequences[:, 13:].numpy())
    assert res.state.self_conditioning.shape == (2, 8, 128)


@needs_transformers
@pytest.mark.parametrize("case", ["canvases", "early", "stability0"])
def test_generate_ids_matches_transformers(target, hf_model, monkeypatch, case):
    """Left-padded batch, several canvases, EOS -> pad, rows stopping early."""
    from mlx_diffgem.core.generate import generate_ids
    from mlx_diffgem.core.noise import ReplayNoise

    ids = _ids(30, (2, 11))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    kw = {
        "canvases": dict(max_new_tokens=24, max_denoising_steps=6),
        "early": dict(max_new_tokens=24, max_denoising_steps=12),
        "stability0": dict(
            max_new_tokens=16, max_denoising_steps=4, stability_threshold=0
        ),
    }[case]
    if case == "early":
        kw.update(_early_bound(target, ids, mask))
    # EOS: a token that row 0 emits in its second canvas, so that the row finishes.
    first, _ = _hf_generate(hf_model, monkeypatch, ids, mask, eos_token_id=None, **kw)
    eos = int(first.sequences[0, 11 + 8 + 2])
    out, rec = _hf_generate(hf_model, monkeypatch, ids, mask, eos_token_id=[eos], **kw)
    noise = ReplayNoise(rec.draws)
    seqs, stats = generate_ids(target, ids, mask, noise=noise, eos_token_id=[eos], **kw)
    np.testing.assert_array_equal(seqs, out.sequences.numpy())
    assert noise.remaining == 0
    tail = seqs[0, 11:]
    after = tail[int(np.argmax(tail == eos)) + 1 :]
    assert (after == 0).all() and after.size > 0  # EOS kept, the rest is pad
    real = (seqs[:, 11:] != 0).sum(axis=1)
    if real.all():  # the reference's per-row passes = real tokens / tokens_per_forward
        passes = real / out.tokens_per_forward.numpy()
        assert stats.row_passes == pytest.approx(passes.sum(), rel=1e-6)


def test_target_protocol_and_errors(target, tiny_path):
    from cuda_backend.backend import load, to_numpy
    from mlx_diffgem.core.backend import Target, get_backend

    assert isinstance(target, Target)
    assert get_backend("torch").load is load
    cache = target.new_cache(1)
    assert cache.pending is None and cache.batch_size == 1
    with pytest.raises(ValueError, match="ids: batch 2"):
        target.encode(_ids(0, (2, 4)), cache)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target.encode(np.array([[1, 999]]), cache)
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_path, device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="device"):
        load(tiny_path, device="tpu")
    assert to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
    assert target.peak_memory() > 0
    target.sync()


@needs_mlx
def test_loads_an_unquantized_mlx_conversion(tiny_path, target, tmp_path):
    """`diffgem convert` without quantization writes the experts as `.weight`: the
    torch backend reads them as the HF tensors, the same values bit for bit."""
    from cuda_backend.backend import load
    from mlx_diffgem.mlx_backend.convert import convert

    out = convert(tiny_path, tmp_path / "mlx", dtype="float32")
    converted = load(out, device="cpu")
    ids, canvas = _ids(43, (1, 12)), _ids(44, (1, 8), 0)
    got = []
    for model in (converted, target):
        cache = model.new_cache(1)
        model.encode(ids, cache)
        got.append(model.decode(canvas, cache).numpy())
    assert np.array_equal(got[0], got[1])


# --------------------------------------------------------------------------------------
# Weight-only int8, torch.compile
# --------------------------------------------------------------------------------------


def test_int8_round_trip():
    from cuda_backend.quantize import quantize_int8

    w = torch.randn(6, 10, 32, generator=torch.Generator().manual_seed(3))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (6, 10)
    assert ((q.float() * s[..., None] - w).abs() <= s[..., None] / 2 + 1e-7).all()


def test_int8_modules_track_float(target):
    from cuda_backend.quantize import Int8Experts, Int8Linear

    layer = target.model.layers[1]
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lin, qlin = layer.mlp.gate_proj, Int8Linear(layer.mlp.gate_proj)
        assert_close(qlin(x), lin(x), 0.02 * lin(x).abs().max().item(), "linear")
        w, idx = layer.router(x)
        ref = layer.experts(x, w, idx)
        got = Int8Experts(layer.experts)(x, w, idx)
        assert_close(got, ref, 0.02 * ref.abs().max().item(), "experts")


def test_int8_load_and_generate(tiny_path):
    from cuda_backend.backend import load
    from cuda_backend.quantize import Int8Linear
    from mlx_diffgem.core.generate import generate_ids

    q8 = load(tiny_path, device="cpu", quantization="int8")
    attn = q8.model.layers[0].self_attn
    assert (
        isinstance(attn.q_proj, Int8Linear) and attn.q_proj.weight.dtype == torch.int8
    )
    assert q8.model.layers[0].experts.gate_up_proj.dtype == torch.int8
    assert not isinstance(q8.model.layers[0].router.proj, Int8Linear)
    seqs, stats = generate_ids(q8, _ids(40, (1, 9)), seed=0, max_new_tokens=16)
    assert seqs.shape == (1, 25) and stats.canvases >= 1
    with pytest.raises(ValueError, match="quantization"):
        load(tiny_path, device="cpu", quantization={"bits": 4, "group_size": 64})


@pytest.mark.parametrize("scope", ["layer", "decoder"])
def test_compiled_step_matches_eager(tiny_path, target, scope, monkeypatch):
    """compile=True: each decoder layer (or the whole decoder) is one graph (no
    breaks, so no host syncs), the cache can grow without recompiling, and
    generation gives the eager tokens."""
    from torch._dynamo.utils import counters

    from cuda_backend.backend import load
    from mlx_diffgem.core.generate import generate_ids

    monkeypatch.setenv("DIFFGEM_COMPILE_SCOPE", scope)
    breaks = sum(counters["graph_break"].values())

    # "reduce-overhead" takes the CUDA-graph branch on CUDA; on CPU it compiles as
    # "default", so this runs the same code path here.
    compiled = load(tiny_path, device="cpu", compile="reduce-overhead")
    assert compiled.model.compiled and not target.model.compiled
    assert compiled.new_cache(1).layers[0].static
    assert not target.new_cache(1).layers[0].static
    ids, canvas = _ids(41, (2, 13)), _ids(42, (2, 8), 0)
    got = {}
    for model in (target, compiled):
        cache = model.new_cache(2)
        model.encode(ids, cache)
        first = model.decode(canvas, cache)
        model.encode(canvas, cache)  # a new cache length
        got[model is compiled] = (first, model.decode(canvas, cache))
    # Inductor fuses differently: float32 rounding only.
    assert_close(got[True][0], got[False][0], tol=1e-3)
    assert_close(got[True][1], got[False][1], tol=1e-3)

    assert sum(counters["graph_break"].values()) == breaks
    if scope == "decoder":
        cache = compiled.new_cache(2)
        compiled.encode(ids, cache)
        t = torch.as_tensor(canvas).long()
        with torch.no_grad():
            explained = torch._dynamo.explain(type(compiled.model).decode)(
                compiled.model, t, cache, None
            )
        assert explained.graph_break_count == 0

    prompt = _ids(45, (1, 9))
    kw = dict(seed=3, max_new_tokens=24)
    want, _ = generate_ids(target, prompt, **kw)
    seqs, stats = generate_ids(compiled, prompt, **kw)
    assert np.array_equal(seqs, want) and stats.canvases == 3
    # A few variants get their own graph (self-conditioning or not, cache states
    # before and after the sliding window fills); after that, other prompt lengths
    # and more canvases (every cache length) reuse them.
    generate_ids(compiled, _ids(46, (1, 30)), seed=4, max_new_tokens=40)
    graphs = counters["stats"]["unique_graphs"]
    for n, new in ((60, 48), (3, 8), (17, 24)):
        generate_ids(compiled, _ids(n, (1, n)), seed=5, max_new_tokens=new)
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["graph_break"].values()) == breaks


def test_compile_scope_is_checked(monkeypatch):
    from cuda_backend.compile import scope

    assert scope() == "layer"
    monkeypatch.setenv("DIFFGEM_COMPILE_SCOPE", "model")
    with pytest.raises(ValueError, match="DIFFGEM_COMPILE_SCOPE: expected one of"):
        scope()


def test_compile_argument_errors(tiny_path):
    from cuda_backend.backend import load

    with pytest.raises(ValueError, match="compile: expected True, False or one of"):
        load(tiny_path, device="cpu", compile="fast")

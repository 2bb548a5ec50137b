"""Boundary behaviour of issue 11 / issue 9 item 3 on both backends: a failed call
leaves a kept cache as it was, seeds, decode arguments, prompts, streaming latency,
and the test gaps a mutation run found (sampler bound, frozen rows, masks, stats)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH, needs_mlx, needs_torch

import mlx_diffgem as dg
from mlx_diffgem.core.generate import generate_ids
from mlx_diffgem.core.noise import SeededNoise

BACKENDS = [
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx")),
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
]
IDS = np.array([[2, 10, 11, 12, 13]], np.int32)
FAST = {"max_new_tokens": 8, "max_denoising_steps": 4}


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_path):
    return dg.load(tiny_path, backend=request.param, dtype="float32")[0]


def _snapshot(model, cache):
    canvas = np.arange(3, 3 + model.config.canvas_length)[None]
    logits = dg.to_numpy(model.decode(canvas, cache))  # reads every cached K/V
    pending = None if cache.pending is None else cache.pending.copy()
    return cache.offset, pending, logits


# --------------------------------------------------------------------------------------
# A failed call leaves the kept cache exactly as it was
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"seed": True},
        {"seed": 1.5},
        {"stability_threshold": 10**9},
        {"t_max": float("nan")},
        {"pad_token_id": 999999},
        {"prompt_ids": [[2, 3], [4]]},
        {"prompt_ids": [2, 128]},
        {"attention_mask": [1, 2, 1, 1, 1]},
        {"prefill_chunk": 0},
        {"decoder_input_ids": [[1, 2]]},
    ],
)
def test_failed_call_leaves_kept_cache_intact(model, bad):
    cache, twin = model.new_cache(1), model.new_cache(1)
    for c in (cache, twin):
        generate_ids(model, IDS, seed=0, cache=c, **FAST)
    before = _snapshot(model, cache)
    kwargs = {"prompt_ids": [2, 14, 15, 16, 17], "seed": 1, **FAST, **bad}
    with pytest.raises(ValueError):
        generate_ids(model, cache=cache, **kwargs)
    after = _snapshot(model, cache)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[2], before[2])
    # A retry answers as if the failed call had never happened.
    retry = [2, 14, 15, 16, 17]
    got = generate_ids(model, retry, seed=1, cache=cache, **FAST)[0]
    want = generate_ids(model, retry, seed=1, cache=twin, **FAST)[0]
    np.testing.assert_array_equal(got, want)


def test_stream_generate_validates_before_the_first_side_effect(model):
    cache = model.new_cache(1)
    generate_ids(model, IDS, seed=0, cache=cache, **FAST)
    before = _snapshot(model, cache)
    with pytest.raises(ValueError, match="seed"):
        dg.stream_generate(model, None, [2, 3, 4], seed="3", cache=cache)
    np.testing.assert_array_equal(_snapshot(model, cache)[2], before[2])


def test_foreign_cache_is_refused_by_name(model):
    with pytest.raises(ValueError, match="cache: expected a cache from"):
        generate_ids(model, IDS, cache=object(), **FAST)
    with pytest.raises(ValueError, match="cache: built for batch 2"):
        generate_ids(model, IDS, cache=model.new_cache(2), **FAST)


@needs_mlx
@needs_torch
def test_cache_of_the_other_backend_is_refused(tiny_path):
    mlx_model = dg.load(tiny_path, backend="mlx", dtype="float32")[0]
    torch_model = dg.load(tiny_path, backend="torch", dtype="float32")[0]
    with pytest.raises(ValueError, match="torch backend, got a mlx cache"):
        generate_ids(torch_model, IDS, cache=mlx_model.new_cache(1), **FAST)
    with pytest.raises(ValueError, match="mlx backend, got a torch cache"):
        mlx_model.decode(np.zeros((1, 8), np.int32), torch_model.new_cache(1))


# --------------------------------------------------------------------------------------
# Seeds: any integer, reduced modulo 2**64 the same way on both backends
# --------------------------------------------------------------------------------------


def test_seed_reduction():
    assert SeededNoise(-1).seed == 2**64 - 1
    assert SeededNoise(2**64 + 5).seed == 5
    assert SeededNoise(np.uint64(7)).seed == 7 and SeededNoise(None).seed is None
    for bad in (True, np.bool_(False), 1.5, "3", np.float32(2)):
        with pytest.raises(ValueError, match="seed: expected an integer"):
            SeededNoise(bad)


def test_equivalent_seeds_give_the_same_tokens(model):
    def run(seed):
        return generate_ids(model, IDS, seed=seed, **FAST)[0]

    np.testing.assert_array_equal(run(-1), run(2**64 - 1))
    np.testing.assert_array_equal(run(np.int64(5)), run(2**64 + 5))
    assert not np.array_equal(run(1), run(2))  # the seed does reach the generator


# --------------------------------------------------------------------------------------
# decode, prompts, dtype
# --------------------------------------------------------------------------------------


def test_decode_takes_numpy_self_conditioning(model):
    cache = model.new_cache(1)
    model.encode(IDS, cache)
    C = model.config.canvas_length
    canvas = np.arange(3, 3 + C)[None]
    sc = dg.to_numpy(model.decode(canvas, cache))
    want = dg.to_numpy(model.decode(canvas, cache, model.decode(canvas, cache)))
    got = dg.to_numpy(model.decode(canvas, cache, sc))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, sc)  # self-conditioning changed the logits


@pytest.mark.parametrize(
    "canvas, sc, match",
    [
        (np.arange(3, 7)[None], None, r"canvas_ids: expected shape \(1, 8\)"),
        (np.arange(3, 12)[None], None, "canvas_ids: expected shape"),
        (np.arange(3, 11)[None], np.zeros((1, 4, 128)), "self_conditioning: expected"),
        (np.arange(3, 11)[None], np.zeros((1, 8, 128), np.int32), "float logits"),
        ([[3, 4], [5]], None, "canvas_ids"),
    ],
)
def test_decode_refuses_bad_shapes(model, canvas, sc, match):
    cache = model.new_cache(1)
    model.encode(IDS, cache)
    with pytest.raises(ValueError, match=match):
        model.decode(canvas, cache, sc)


@pytest.mark.parametrize(
    "prompt, match",
    [
        (None, "prompt: expected text, chat messages or token ids, got None"),
        ([[2, 10, 11], [2, 12, 13]], "2 rows of ids.*use generate_ids"),
        ([2.7, 10.2], "prompt: expected integer token ids"),
        ([[2, 10], [3]], "prompt: rows of different lengths"),
        ([], "prompt: empty prompt"),
    ],
)
def test_generate_prompt_errors(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        dg.generate(model, None, prompt, max_tokens=8)


@needs_mlx
def test_mlx_cpu_refuses_half_dtypes_up_front(tiny_path):
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("MLX runs on a GPU here")
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match=f"^dtype: {dtype} is not supported by"):
            dg.load(tiny_path, backend="mlx", dtype=dtype)


def test_cli_bad_option_is_one_line_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_diffgem", "generate", "--prompt", "x"]
        + ["--t-max", "nan", "--backend", "torch" if HAS_TORCH else "mlx"],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "t_max" in out.stderr


# --------------------------------------------------------------------------------------
# Streaming: each canvas is yielded as soon as it is committed
# --------------------------------------------------------------------------------------


def test_stream_yields_each_canvas_before_the_next_is_computed():
    from test_loop import FakeTarget

    script = [[[5, 6, 7, 8]], [[9, 10, 11, 12]], [[13, 14, 15, 16]]]
    target = FakeTarget(script, max_new_tokens=12)
    seen = []
    for r in dg.stream_generate(target, None, [2, 3]):
        seen.append((r.canvas_index, target.k, r.finished))
    # When canvas k is received, only k + 1 canvases have been denoised.
    assert seen == [(0, 1, False), (1, 2, False), (2, 3, True)]


# --------------------------------------------------------------------------------------
# Mutation-run gaps (issue 11 item 5)
# --------------------------------------------------------------------------------------


def _samplers():
    out = []
    if HAS_MLX:
        from mlx_diffgem.mlx_backend import sampling as m

        out.append(("mlx", m))
    if HAS_TORCH:
        from cuda_backend import sampling as t

        out.append(("torch", t))
    return out


def _arr(name, x, dtype="float32"):
    if name == "mlx":
        import mlx.core as mx

        return mx.array(np.asarray(x, dtype))
    import torch

    return torch.tensor(np.asarray(x, dtype))


@pytest.mark.parametrize("name, sampling", _samplers())
def test_acceptance_bound_hit_exactly_is_kept(name, sampling):
    # Sorted: 1/16, 1/16, 1/16, 1 -> sums of the smaller ones 0, 1/16, 1/8, 3/16 (exact
    # in float32): `<=` keeps three positions, `<` would keep two.
    keep = sampling.accept_mask(_arr(name, [[0.0625, 1.0, 0.0625, 0.0625]]), 0.125)
    assert dg.to_numpy(keep).tolist() == [[True, False, True, True]]


@pytest.mark.parametrize("name, sampling", _samplers())
def test_renoise_puts_noise_on_every_rejected_position(name, sampling):
    keep = _arr(name, [[True, False, True, False]], "bool")
    draft = _arr(name, [[10, 11, 12, 13]], "int32")
    noise = _arr(name, [[90, 91, 92, 93]], "int32")
    got = dg.to_numpy(sampling.renoise(keep, draft, noise)).tolist()
    assert got == [[10, 91, 12, 93]]


@needs_mlx
def test_mlx_sampler_draws_follow_the_distribution_and_ties():
    import mlx.core as mx

    from mlx_diffgem.mlx_backend.sampling import sample_tokens

    # Not one-hot: an argmax would put every draw on index 0.
    p = np.array([0.5, 0.3, 0.2, 0.0], np.float32)
    z = mx.array(np.log(np.maximum(p, 1e-30)))[None, None].astype(mx.float32)
    z = mx.broadcast_to(z, (1, 4000, 4))
    draws = np.array(sample_tokens(z, mx.random.key(0)))[0]
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, p, atol=0.03)
    # Tied maxima: the max mass goes to the first of them, never to a non-max entry.
    t = mx.array([[[-30.0, 5.0, -30.0, 5.0]]] * 1)
    draws = np.array(sample_tokens(mx.broadcast_to(t, (1, 500, 4)), mx.random.key(1)))
    assert set(draws.ravel().tolist()) <= {1, 3} and (draws == 1).mean() > 0.95


def test_prompt_tokens_do_not_count_pads(model):
    ids = np.array([[0, 0, 2, 10], [2, 10, 11, 12]], np.int32)
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int32)
    _, stats = generate_ids(model, ids, attention_mask=mask, seed=0, **FAST)
    assert stats.prompt_tokens == 6


def _denoise_one_canvas(model, finished, done=None, sc=None):
    from mlx_diffgem.core.backend import CanvasState, DenoisePolicy

    cache = model.new_cache(2)
    model.encode(np.array([[2, 10, 11], [2, 12, 13]], np.int32), cache)
    state = CanvasState(finished=np.array(finished))
    if done is not None:
        C = model.config.canvas_length
        canvas = np.full((2, C), 7, np.int32)
        state = CanvasState(
            canvas=canvas,
            self_conditioning=sc,
            finished=np.array(finished),
            argmax=canvas,
            done=np.array(done),
            mean_entropy=np.zeros(2, np.float32),
        )
    policy = DenoisePolicy(max_steps=3, stability_threshold=3)  # runs all 3 steps
    return model.denoise(state, cache, policy, SeededNoise(0))


def test_rows_finished_earlier_are_not_counted(model):
    res = _denoise_one_canvas(model, finished=[True, False])
    assert res.steps == 3 and res.passes.tolist() == [0, 3]


def test_a_stopped_rows_self_conditioning_stays_frozen(model):
    C, V = model.config.canvas_length, model.config.vocab_size
    cache = model.new_cache(2)
    model.encode(np.array([[2, 10, 11], [2, 12, 13]], np.int32), cache)
    sc = model.decode(np.full((2, C), 7, np.int32), cache)  # a backend array
    res = _denoise_one_canvas(model, [False, False], done=[True, False], sc=sc)
    got = dg.to_numpy(res.state.self_conditioning)
    assert got.shape == (2, C, V)
    np.testing.assert_array_equal(got[0], dg.to_numpy(sc)[0])  # frozen
    assert not np.allclose(got[1], dg.to_numpy(sc)[1])  # the live row moved on
    assert res.passes.tolist() == [0, 3]


def test_encode_masks(model):
    cache = model.new_cache(2)
    ids = np.array([[0, 0, 0], [2, 10, 11]], np.int32)
    # A prefill chunk of a long left pad is all padding in one row: allowed here.
    model.encode(ids, cache, np.array([[0, 0, 0], [1, 1, 1]]))
    assert cache.offset == 3
    with pytest.raises(ValueError, match="attention_mask: expected 0 .pad. / 1"):
        model.encode(ids, cache, np.array([[0, 0, 2], [1, 1, 1]]))
    assert cache.offset == 3


def test_long_left_pad_prefills_in_chunks(model):
    ids = np.full((2, 12), 0, np.int32)
    ids[0, 9:] = [2, 10, 11]
    ids[1] = np.arange(2, 14)
    mask = (ids != 0).astype(np.int32)
    mask[1] = 1
    seqs, _ = generate_ids(
        model, ids, attention_mask=mask, seed=0, prefill_chunk=4, **FAST
    )
    assert seqs.shape == (2, 12 + model.config.canvas_length)


# --------------------------------------------------------------------------------------
# Issue 21: right padding refused by name, text that is not valid Unicode
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],  # right padding
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
        [[0, 1, 1, 1, 1], [1, 0, 1, 1, 1]],  # padding inside a row
    ],
)
def test_padding_after_a_token_is_refused(model, mask):
    """Only left padding is supported: a right-padded row agreed with its unpadded
    run on 17-39% of tokens. Refused at the call and at Target.encode."""
    ids = np.array([[2, 10, 11, 12, 13], [2, 14, 15, 16, 17]], np.int32)
    match = r"^attention_mask: row \d has padding after a token .*only left padding"
    with pytest.raises(ValueError, match=match):
        generate_ids(model, ids, attention_mask=mask, seed=0, **FAST)
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match=match):
        model.encode(ids, cache, np.array(mask))
    assert cache.offset == 0


def test_lone_surrogate_in_a_prompt_is_named(model, tmp_path):
    from mlx_diffgem.core.tiny import build_char_tokenizer
    from mlx_diffgem.core.tokenizer import load_tokenizer

    tok = load_tokenizer(build_char_tokenizer(tmp_path))
    for prompt, name in [
        ("ab\ud800", "prompt"),
        ([{"role": "user", "content": "\udc00"}], "messages"),
    ]:
        if name == "messages" and not tok.has_chat_template:
            tok.chat_template = "{{ bos_token }}{{ messages[0].content }}"
        with pytest.raises(ValueError, match=f"^{name}: a lone surrogate"):
            dg.generate(model, tok, prompt, max_tokens=8)

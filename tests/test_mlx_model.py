"""MLX model and cache vs transformers 5.23.0 on the tiny checkpoint (fp32, CPU).

The tiny model has every feature on (spec §6.2): a 13-token prompt is longer than the
window W = 8, so the sliding layers' cache is truncated to W-1 = 7 slots.
"""

import numpy as np
import pytest
from conftest import HAS_MLX, needs_mlx, needs_transformers

from mlx_diffgem.core.backend import Cache as CacheProtocol

pytestmark = [pytest.mark.mlx, needs_mlx]

if HAS_MLX:
    from mlx_diffgem.mlx_backend._blas import import_mlx

    mx = import_mlx()

# fp32 rounding is amplified ~1000x by this random tiny model: transformers fp32 itself
# differs from transformers fp64 by up to 3e-4 on these logits (|logits| <= 30), and
# MLX fp32 is as far from fp64 as transformers fp32 is. The K/V agree to ~1e-6.
TOL = 1e-4
C = 8  # canvas length of the tiny model
V = 128


def _assert_close(got, want, tol=TOL, what="logits"):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = np.abs(got - want)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    assert diff.max() <= tol, (
        f"{what}: max diff {diff.max():.2e}, mean {diff.mean():.2e}"
    )


def _ids(seed, *shape):
    return np.random.default_rng(seed).integers(3, V, shape).astype(np.int32)


@pytest.fixture(scope="module")
def model(tiny_path):
    from mlx_diffgem.core.config import ModelConfig
    from mlx_diffgem.mlx_backend.model import Model

    m = Model(ModelConfig.from_file(tiny_path / "config.json"))
    weights = mx.load(str(tiny_path / "model.safetensors"))
    m.load_weights(list(m.sanitize(weights).items()), strict=True)
    mx.eval(m.parameters())
    return m


def _hf(hf_model, **kw):
    """transformers' forward on numpy inputs; returns (fp32 logits, cache)."""
    import torch

    args = {k: torch.from_numpy(np.asarray(v)) for k, v in kw.items() if k != "cache"}
    for k in ("input_ids", "decoder_input_ids"):
        if k in args:
            args[k] = args[k].long()
    with torch.no_grad():
        out = hf_model(past_key_values=kw.get("cache"), **args)
    return out.logits.numpy(), out.past_key_values


def _prefill(model, ids, mask=None):
    from mlx_diffgem.mlx_backend.cache import make_cache

    cache = make_cache(model, ids.shape[0])
    m = None if mask is None else mx.array(mask)
    model.encode(mx.array(ids), cache, attention_mask=m)
    return cache


@needs_transformers
def test_prefill_decode_sc_and_commit(hf_model, model):
    """(a) prefill 13 > W then decode, (b) a self-conditioned step, (c) a commit."""
    prompt, canvas = _ids(1, 1, 13), _ids(2, 1, C)
    ref, hf_cache = _hf(hf_model, input_ids=prompt, decoder_input_ids=canvas)
    cache = _prefill(model, prompt)
    got = model.decode(mx.array(canvas), cache)
    _assert_close(got, ref)
    # The cached K/V themselves: the encoder's output, sliding layers truncated to W-1.
    for i, store in enumerate(cache.layers):
        k, v = store.view()
        _assert_close(k, hf_cache.layers[i].keys.numpy(), 1e-5, f"layer {i} keys")
        _assert_close(v, hf_cache.layers[i].values.numpy(), 1e-5, f"layer {i} values")
    assert [s.length for s in cache.layers] == [7, 13, 7, 13]

    sc, canvas2 = np.array(got) / 0.8, _ids(3, 1, C)
    ref2, _ = _hf(
        hf_model,
        decoder_input_ids=canvas2,
        self_conditioning_logits=sc,
        cache=hf_cache,
    )
    _assert_close(model.decode(mx.array(canvas2), cache, mx.array(sc)), ref2)

    commit, canvas3 = _ids(4, 1, C), _ids(5, 1, C)
    ref3, hf_cache = _hf(
        hf_model, input_ids=commit, decoder_input_ids=canvas3, cache=hf_cache
    )
    model.encode(mx.array(commit), cache)
    assert cache.offset == 21
    _assert_close(model.decode(mx.array(canvas3), cache), ref3)


@needs_transformers
def test_left_padded_batch(hf_model, model):
    """(d) left padding: positions are slots, pads masked in encoder and decoder."""
    P, n_pad = 10, 4  # the decoder's sliding window (last 7 slots) still holds a pad
    prompt = _ids(6, 2, P)
    prompt[1, :n_pad] = 0
    mask = np.ones((2, P), np.int32)
    mask[1, :n_pad] = 0
    canvas = _ids(7, 2, C)
    dmask = np.concatenate([mask, np.ones((2, C), np.int32)], 1)
    ref, hf_cache = _hf(
        hf_model,
        input_ids=prompt,
        attention_mask=mask,
        decoder_input_ids=canvas,
        decoder_attention_mask=dmask,
    )
    cache = _prefill(model, prompt, mask)
    _assert_close(model.decode(mx.array(canvas), cache), ref)
    assert all(np.isfinite(np.array(a)).all() for a in cache.state)

    # Commit a canvas, then denoise the next one: the pad mask follows the slots.
    commit, canvas2 = _ids(8, 2, C), _ids(9, 2, C)
    ref2, _ = _hf(
        hf_model,
        input_ids=commit,
        attention_mask=dmask,
        decoder_input_ids=canvas2,
        decoder_attention_mask=np.concatenate([dmask, np.ones((2, C), np.int32)], 1),
        cache=hf_cache,
    )
    model.encode(mx.array(commit), cache)
    _assert_close(model.decode(mx.array(canvas2), cache), ref2)


@needs_transformers
@pytest.mark.parametrize("n_pad", [0, 20])
def test_chunked_prefill_matches_one_shot(hf_model, model, n_pad):
    """(e) a 40-token prompt in chunks of 16 equals one shot (and transformers).

    With 20 pads, the first chunk of row 1 is all padding (fully masked queries).
    """
    P = 40
    prompt = _ids(10, 2, P)
    mask = np.ones((2, P), np.int32)
    mask[1, :n_pad] = 0
    prompt[mask == 0] = 0
    canvas = _ids(11, 2, C)
    one = _prefill(model, prompt, mask)
    chunked = _prefill(model, prompt[:, :16], mask[:, :16])
    for s in (16, 32):
        m = mx.array(mask[:, s : s + 16])
        model.encode(mx.array(prompt[:, s : s + 16]), chunked, attention_mask=m)
    assert chunked.offset == one.offset == P
    got_one = np.array(model.decode(mx.array(canvas), one))
    for a, b in zip(one.layers, chunked.layers, strict=True):
        _assert_close(b.view()[0], a.view()[0], 1e-5, "chunked keys")
        _assert_close(b.view()[1], a.view()[1], 1e-5, "chunked values")
    _assert_close(model.decode(mx.array(canvas), chunked), got_one)
    dmask = np.concatenate([mask, np.ones((2, C), np.int32)], 1)
    kw = dict(attention_mask=mask, decoder_attention_mask=dmask) if n_pad else {}
    ref, _ = _hf(hf_model, input_ids=prompt, decoder_input_ids=canvas, **kw)
    _assert_close(got_one, ref)


def test_cache_growth_and_compaction(model):
    """Appends across the 256-slot growth step, and a long prefill's sliding rows
    freed, keep exactly the slots that one shot keeps."""
    prompt = _ids(16, 1, 600)
    one = _prefill(model, prompt)
    grown = _prefill(model, prompt[:, :250])
    for a, b in ((250, 258), (258, 600)):  # the full layers' buffers grow at 512
        model.encode(mx.array(prompt[:, a:b]), grown)
    assert [s.length for s in grown.layers] == [7, 600, 7, 600]
    assert grown.layers[1].keys.shape[2] > 512
    assert one.layers[0].keys.shape[2] < 600  # compacted after the long prefill
    for a, b in zip(one.layers, grown.layers, strict=True):
        _assert_close(b.view()[0], a.view()[0], 1e-4, "grown keys")
        _assert_close(b.view()[1], a.view()[1], 1e-4, "grown values")
    canvas = mx.array(_ids(17, 1, C))
    _assert_close(model.decode(canvas, grown), model.decode(canvas, one))


def test_decode_does_not_change_cache(model):
    """(g) the decoder reads the cache and never writes it; copies are independent."""
    mask = np.ones((2, 13), np.int32)
    mask[0, :3] = 0
    cache = _prefill(model, _ids(12, 2, 13), mask)
    assert isinstance(cache, CacheProtocol)

    # The stored slots (the decoder may use the spare rows after them as scratch).
    def stored(c):
        return [np.array(a) for s in c.layers for a in s.view()] + [np.array(c.mask)]

    before = stored(cache)
    spans = [(s.start, s.end) for s in cache.layers]
    copy = cache.copy()
    logits = model.decode(mx.array(_ids(13, 2, C)), cache)
    sc = mx.softmax(logits, axis=-1)
    model.decode(mx.array(_ids(14, 2, C)), cache, sc)
    model.encode(mx.array(_ids(15, 2, C)), copy)  # grows the copy only
    assert cache.offset == 13 and copy.offset == 21
    assert [(s.start, s.end) for s in cache.layers] == spans
    for a, b in zip(before, stored(cache), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sanitize_maps_checkpoint_names(model):
    """(f) the HF layout maps to module names; the mapping is idempotent."""
    E, Ie, H = 2, 3, 4
    gate_up = mx.arange(E * 2 * Ie * H).reshape(E, 2 * Ie, H)
    down = mx.ones((E, H, Ie))
    raw = {
        "model.decoder.embed_tokens.weight": mx.ones((5, H)),
        "model.decoder.layers.1.self_attn.q_norm.weight": mx.ones((H,)),
        "model.decoder.layers.1.experts.gate_up_proj": gate_up,
        "model.decoder.layers.1.experts.down_proj": down,
        "model.decoder.layers.1.layer_scalar": mx.array([0.5]),
        "model.encoder.language_model.layers.1.layer_scalar": mx.array([0.7]),
        "model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.weight": down,
        "model.encoder.embed_vision.embedding_projection.weight": down,
    }
    out = model.sanitize(raw)
    assert sorted(out) == [
        "embed_tokens.weight",
        "layers.1.encoder_layer_scalar",
        "layers.1.experts.down_proj.weight",
        "layers.1.experts.gate_proj.weight",
        "layers.1.experts.up_proj.weight",
        "layers.1.layer_scalar",
        "layers.1.self_attn.q_norm.weight",
    ]
    assert out["layers.1.encoder_layer_scalar"].item() == pytest.approx(0.7)
    assert mx.array_equal(out["layers.1.experts.gate_proj.weight"], gate_up[:, :Ie])
    assert mx.array_equal(out["layers.1.experts.up_proj.weight"], gate_up[:, Ie:])
    assert out["layers.1.experts.down_proj.weight"] is down
    assert model.sanitize(out).keys() == out.keys()


def test_embed_scale_rounds_to_weight_dtype(model):
    assert model.embed_scale.item() == pytest.approx(32**0.5, abs=1e-6)
    bf16 = mx.array(2816**0.5, mx.bfloat16)
    assert bf16.item() == 53.0  # the release's value (spec §8.9)
    assert model.embed_scale.dtype == model.embed_tokens.weight.dtype

"""The decoder pass over fixed shapes that CUDA graphs capture (cuda_backend/graphs.py).

CUDA graphs need a GPU; here `Recorder` runs the same fixed-shape pass on the same
input buffers every call, so everything but the capture itself is checked: the canvas
K/V written at device-given slots, the masks over the bucket's unused slots, sliding
windows, left padding, self-conditioning, buckets changing as the cache grows, a cache
that grows or is replaced, and a whole generation equal to the eager one.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_torch

torch = pytest.importorskip("torch")
pytestmark = needs_torch


@pytest.fixture(scope="module")
def target(tiny_path):
    from cuda_backend.backend import load

    torch.set_num_threads(1)
    return load(tiny_path, device="cpu", dtype="float32")


def _graphed(target, bucket=8):
    from cuda_backend.graphs import GraphedDecode, Recorder

    return GraphedDecode(target.model, Recorder, bucket=bucket)


@pytest.mark.parametrize("prompt", [1, 5, 8, 13, 30])  # window 8, buckets of 8
@pytest.mark.parametrize("with_sc", [False, True])
def test_the_fixed_shape_pass_equals_the_eager_one(target, prompt, with_sc):
    rng = np.random.default_rng(prompt)
    cfg = target.config
    ids = rng.integers(3, cfg.vocab_size, (2, prompt)).astype(np.int32)
    canvas = torch.as_tensor(rng.integers(0, cfg.vocab_size, (2, cfg.canvas_length)))
    sc = None
    if with_sc:
        sc = torch.as_tensor(rng.normal(size=(2, cfg.canvas_length, cfg.vocab_size)))
        sc = sc.float()
    cache = target.new_cache(2)
    target.encode(ids, cache)
    want = target.model.decode(canvas, cache, sc)
    graphed = _graphed(target)
    for _ in range(2):  # a replay reads the buffers as loaded again
        got = graphed(canvas, cache, sc)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert graphed.captures == 1


def test_left_padding_is_hidden_as_in_the_eager_pass(target):
    rng = np.random.default_rng(0)
    cfg = target.config
    ids = rng.integers(3, cfg.vocab_size, (2, 11)).astype(np.int32)
    mask = np.ones((2, 11), dtype=np.int32)
    mask[1, :4] = 0
    canvas = torch.as_tensor(rng.integers(0, cfg.vocab_size, (2, cfg.canvas_length)))
    cache = target.new_cache(2)
    target.encode(ids, cache, mask)
    want = target.model.decode(canvas, cache, None)
    torch.testing.assert_close(
        _graphed(target)(canvas, cache, None), want, atol=2e-5, rtol=0
    )


def test_a_stale_slot_in_the_bucket_changes_nothing(target):
    """The slots between the stored tokens and the canvas hold old canvases: the
    mask must hide them (a fault that attends to them fails this)."""
    rng = np.random.default_rng(1)
    cfg = target.config
    ids = rng.integers(3, cfg.vocab_size, (1, 3)).astype(np.int32)
    canvas = torch.as_tensor(rng.integers(0, cfg.vocab_size, (1, cfg.canvas_length)))
    cache = target.new_cache(1)
    target.encode(ids, cache)
    graphed = _graphed(target, bucket=16)
    clean = graphed(canvas, cache, None)
    for lc in cache.layers:  # garbage after the canvas, inside the bucket
        lc.keys[:, :, 3 + cfg.canvas_length :] = 1e3
        lc.values[:, :, 3 + cfg.canvas_length :] = 1e3
    torch.testing.assert_close(graphed(canvas, cache, None), clean, atol=0, rtol=0)


def test_buckets_follow_the_cache_and_graphs_follow_its_buffers(target):
    from cuda_backend.graphs import bucket_of

    assert [bucket_of(n, 8) for n in (0, 1, 8, 9, 17)] == [8, 8, 8, 16, 24]
    rng = np.random.default_rng(2)
    cfg = target.config
    canvas = torch.as_tensor(rng.integers(0, cfg.vocab_size, (1, cfg.canvas_length)))
    graphed = _graphed(target)
    cache = target.new_cache(1)
    target.encode(rng.integers(3, 90, (1, 5)).astype(np.int32), cache)
    graphed(canvas, cache, None)
    target.encode(rng.integers(3, 90, (1, 2)).astype(np.int32), cache)  # 7: same bucket
    want = target.model.decode(canvas, cache, None)  # the replay reads the new offset
    torch.testing.assert_close(graphed(canvas, cache, None), want, atol=2e-5, rtol=0)
    assert graphed.captures == 1
    target.encode(rng.integers(3, 90, (1, 4)).astype(np.int32), cache)  # 11: next
    want = target.model.decode(canvas, cache, None)
    torch.testing.assert_close(graphed(canvas, cache, None), want, atol=2e-5, rtol=0)
    assert graphed.captures == 2
    other = target.new_cache(1)  # another cache: other buffers, a new graph
    target.encode(rng.integers(3, 90, (1, 5)).astype(np.int32), other)
    want = target.model.decode(canvas, other, None)
    torch.testing.assert_close(graphed(canvas, other, None), want, atol=2e-5, rtol=0)
    assert graphed.captures == 3 and len(graphed.graphs) == 1  # the old ones dropped


def test_a_generation_through_the_graphs_equals_the_eager_one(target, monkeypatch):
    from mlx_diffgem.core.generate import generate_ids

    rng = np.random.default_rng(3)
    ids = rng.integers(3, target.config.vocab_size, (2, 9)).astype(np.int32)
    kw = dict(seed=5, max_new_tokens=3 * target.config.canvas_length)
    want = generate_ids(target, ids, **kw)
    graphed = _graphed(target, bucket=32)  # 3 canvases at 3 offsets, one bucket
    monkeypatch.setattr(target.model, "graphs", graphed)
    got = generate_ids(target, ids, **kw)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1].steps_per_canvas == want[1].steps_per_canvas
    first = graphed.captures
    assert first == 2  # with and without self-conditioning, one bucket
    # the next generation gets the dropped cache's buffers: no capture, same text
    again = generate_ids(target, ids, **kw)
    np.testing.assert_array_equal(again[0], want[0])
    assert graphed.captures == first
    kept = target.new_cache(2)  # alive: the one after it gets its own buffers
    other = target.new_cache(2)
    assert kept.layers[0].keys.data_ptr() != other.layers[0].keys.data_ptr()


def test_compiled_layers_run_inside_the_fixed_shape_pass(tiny_path):
    """On a GPU, graph modes capture the compiled layers: here the compiled layer
    takes the slot writer in place of its cache and gives the eager logits."""
    from cuda_backend.backend import load
    from cuda_backend.graphs import GraphedDecode, Recorder

    eager = load(tiny_path, device="cpu", dtype="float32")
    compiled = load(tiny_path, device="cpu", dtype="float32", compile="reduce-overhead")
    assert compiled.model.graphs is None  # no CUDA: torch's compile only
    graphed = GraphedDecode(compiled.model, Recorder, bucket=8)
    rng = np.random.default_rng(4)
    ids = rng.integers(3, 90, (1, 10)).astype(np.int32)
    canvas = torch.as_tensor(rng.integers(0, 90, (1, eager.config.canvas_length)))
    caches = eager.new_cache(1), compiled.new_cache(1)
    eager.encode(ids, caches[0])
    compiled.encode(ids, caches[1])
    want = eager.model.decode(canvas, caches[0], None)
    got = graphed(canvas, caches[1], None)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

"""The block loop (core/generate.py) over a FakeBackend: scripted canvases."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_diffgem.core.backend import CanvasResult, CanvasState, StepView
from mlx_diffgem.core.config import GenerationConfig, ModelConfig
from mlx_diffgem.core.generate import generate_canvases, generate_ids
from mlx_diffgem.core.stats import Stats
from mlx_diffgem.core.tiny import tiny_config_dict

C, V = 4, 128


class FakeCache:
    backend = "fake"  # the Cache protocol: generation refuses another backend's cache

    def __init__(self, batch_size):
        self.batch_size, self.offset, self.pending = batch_size, 0, None


class FakeTarget:
    """Scripted denoiser: canvas k of row b is `script[k][b]`; 3 passes per canvas."""

    backend = "fake"

    def __init__(self, script, **gen):
        self.config = ModelConfig.from_dict(tiny_config_dict(canvas_length=C))
        self.generation_config = GenerationConfig(
            eos_token_id=[1], pad_token_id=0
        ).update(**gen)
        self.script, self.encoded, self.k = (
            [np.asarray(s, np.int32) for s in script],
            [],
            0,
        )

    def new_cache(self, batch_size):
        return FakeCache(batch_size)

    def encode(self, ids, cache, attention_mask=None):
        self.encoded.append(np.array(ids))
        cache.offset += ids.shape[1]

    def denoise_steps(self, state, cache, policy, noise):
        for step in range(1, 4):
            yield StepView(step, self.script[self.k], np.zeros(cache.batch_size, bool))
        return self.denoise(state, cache, policy, noise)

    def denoise(self, state, cache, policy, noise, on_step=None):
        tokens = self.script[self.k]
        self.k += 1
        live = ~state.finished
        return CanvasResult(tokens, 3, 3 * live.astype(np.int64), CanvasState())

    def sync(self):
        pass

    def peak_memory(self):
        return 0


def test_whole_canvases_and_last_canvas_pending():
    t = FakeTarget([[[5, 6, 7, 8]], [[9, 10, 11, 12]]])
    seq, stats = generate_ids(t, [[2, 3, 4]], max_new_tokens=5)
    assert seq.tolist() == [[2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert [e.tolist() for e in t.encoded] == [[[2, 3, 4]], [[5, 6, 7, 8]]]
    assert stats.canvases == 2 and stats.target_passes == 6
    assert stats.tokens_per_forward == pytest.approx(8 / 6)
    assert stats.finish_reason == "length"


def test_eos_trims_and_finished_rows_become_pad():
    script = [[[5, 1, 7, 1], [5, 6, 7, 8]], [[9, 9, 9, 9], [1, 6, 1, 8]]]
    t = FakeTarget(script)
    seq, stats = generate_ids(t, [[2, 3], [2, 3]], max_new_tokens=8)
    assert seq[0, 2:].tolist() == [5, 1, 0, 0, 0, 0, 0, 0]
    assert seq[1, 2:].tolist() == [5, 6, 7, 8, 1, 0, 0, 0]
    # the encoder saw the committed canvas with its pads
    assert t.encoded[1].tolist() == [[5, 1, 0, 0], [5, 6, 7, 8]]
    assert stats.finish_reason == "stop"
    # reference denominator: row 0 stops counting passes once finished
    assert stats.row_passes == 3 + 3 + 0 + 3 and stats.generated_tokens == 2 + 5


def test_pad_none_keeps_tokens():
    t = FakeTarget([[[5, 1, 7, 1]]], pad_token_id=None)
    seq, _ = generate_ids(t, [[2]], max_new_tokens=4)
    assert seq[0, 1:].tolist() == [5, 1, 7, 1]


def test_max_length_stops():
    t = FakeTarget([[[5, 6, 7, 8]], [[9, 10, 11, 12]], [[9, 9, 9, 9]]])
    seq, stats = generate_ids(t, [[2, 3]], max_new_tokens=12, max_length=6)
    assert seq.shape == (1, 6) and stats.finish_reason == "stop"


def test_chunked_prefill():
    t = FakeTarget([[[5, 6, 7, 8]]])
    generate_ids(t, [list(range(3, 13))], max_new_tokens=4, prefill_chunk=4)
    assert [e.shape[1] for e in t.encoded] == [4, 4, 2]


def test_kept_cache_encodes_pending_canvas_first():
    t = FakeTarget([[[5, 6, 7, 8]], [[9, 10, 11, 12]]])
    cache = t.new_cache(1)
    generate_ids(t, [[2, 3]], cache=cache, max_new_tokens=4)
    assert cache.pending.tolist() == [[5, 6, 7, 8]]
    seq, _ = generate_ids(t, [[20, 21]], cache=cache, max_new_tokens=4)
    assert seq.tolist() == [[20, 21, 9, 10, 11, 12]]
    assert t.encoded[-1].tolist() == [[5, 6, 7, 8, 20, 21]]


def test_drafts_are_interleaved():
    t = FakeTarget([[[5, 6, 7, 8]], [[9, 10, 11, 12]]])
    gen = t.generation_config.update(max_new_tokens=8)
    events = list(
        generate_canvases(
            t, np.array([[2]]), gen=gen, noise=None, stats=Stats(), drafts=True
        )
    )
    kinds = ["step" if isinstance(e, StepView) else "canvas" for e in events]
    assert kinds == ["step"] * 3 + ["canvas"] + ["step"] * 3 + ["canvas"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_p": 0.9}, "top_p"),
        ({"temperature": 0.7}, "temperature"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"num_beams": 2}, "num_beams"),
        ({"do_sample": True}, "do_sample"),
        ({"bogus_option": 1}, "bogus_option"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_denoising_steps": -1}, "max_denoising_steps"),
    ],
)
def test_bad_options_raise(kwargs, match):
    t = FakeTarget([[[5, 6, 7, 8]]])
    with pytest.raises(ValueError, match=match):
        generate_ids(t, [[2, 3]], **kwargs)


@pytest.mark.parametrize(
    "ids, match",
    [
        ([[]], "empty prompt"),
        ([[2, 999]], "outside the vocabulary"),
        ([[2, -1]], "outside the vocabulary"),
        ([[2.5, 3.0]], "integer token ids"),
    ],
)
def test_bad_ids_raise(ids, match):
    t = FakeTarget([[[5, 6, 7, 8]]])
    with pytest.raises(ValueError, match=match):
        generate_ids(t, ids)


def test_bad_mask_and_noise_args():
    t = FakeTarget([[[5, 6, 7, 8]]])
    with pytest.raises(ValueError, match="attention_mask"):
        generate_ids(t, [[2, 3]], attention_mask=[[1]])
    with pytest.raises(ValueError, match="seed"):
        from mlx_diffgem.core.noise import SeededNoise

        generate_ids(t, [[2, 3]], noise=SeededNoise(1), seed=3)

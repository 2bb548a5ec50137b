"""Step hygiene of the MLX denoise loop: host syncs per step, the decoder's cache use.

The counting method lives in bench/step_hygiene.py (SyncCounter, copies_per_pass),
which is also the `hygiene` suite of bench.run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import needs_mlx

pytestmark = needs_mlx


@pytest.fixture(scope="module")
def hy():
    from bench import step_hygiene

    return step_hygiene


@pytest.fixture(scope="module")
def target(tiny_path):
    from mlx_diffgem.mlx_backend.backend import load

    return load(tiny_path, dtype="float32")


def _prefilled(target, n: int):
    from mlx_diffgem.core.generate import prefill

    ids = np.random.default_rng(n).integers(5, 120, (1, n)).astype(np.int32)
    cache = target.new_cache(1)
    prefill(target, ids, cache)
    return cache


@pytest.fixture
def cache(target):
    return _prefilled(target, 13)  # longer than the window (8): sliding layers roll


def _denoise(target, cache, steps: int, seed: int = 0):
    from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
    from mlx_diffgem.core.noise import SeededNoise

    policy = DenoisePolicy(max_steps=steps, confidence_threshold=0.0)  # never stops
    res = target.denoise(CanvasState(), cache, policy, SeededNoise(seed))
    assert res.steps == steps
    return res


def _events(hy, target, cache, steps: int):
    with hy.SyncCounter() as counter:
        _denoise(target, cache, steps)
    return counter.events


def test_sync_counter_tells_syncs_from_reads(hy):
    mx = hy.mx
    eval_, item = mx.eval, mx.array.item
    a = mx.arange(4)
    with hy.SyncCounter() as counter:
        b = a + 1
        mx.eval(b)
        b.tolist()  # b is evaluated: a read
        (b * 2).sum().item()  # a new graph: the host waits
        np.array(b + 1)
    got = [(e.kind, e.fresh, e.is_sync) for e in counter.events]
    assert got == [
        ("eval", True, True),
        ("tolist", False, False),
        ("item", True, True),
        ("numpy.array", True, True),
    ]
    assert counter.events[0].where.startswith("tests/test_step_hygiene.py:")
    assert mx.eval is eval_ and mx.array.item is item  # patches undone


def test_one_eval_per_denoising_step(hy, target, cache):
    for steps in (3, 6):
        evals = [e for e in _events(hy, target, cache, steps) if e.kind == "eval"]
        assert len(evals) == steps
        where = "mlx_backend/canvas.py:"
        assert all(e.where.startswith(where) for e in evals)


def test_one_host_sync_per_denoising_step(hy, target, cache):
    short, long = _events(hy, target, cache, 3), _events(hy, target, cache, 6)
    per_step = hy.per_step_syncs(short, long, 3)
    # reads of arrays the step's eval already evaluated are free; any other is not
    assert per_step["host_syncs"] == 1, per_step["by_site"]


def test_decode_and_denoise_leave_the_cache_untouched(hy, target, cache):
    mx = hy.mx
    before = hy.snapshot_cache(cache)
    canvas = mx.array(np.arange(8, dtype=np.int32)[None] + 20)
    first = np.array(target.decode(canvas, cache))
    _denoise(target, cache, 4)
    assert hy.same_snapshot(before, hy.snapshot_cache(cache))
    # the canvas K/V a pass leaves in the spare rows never reach a later pass
    np.testing.assert_array_equal(np.array(target.decode(canvas, cache)), first)


def test_pending_decodes_do_not_see_each_other(hy, target, cache):
    mx = hy.mx
    a = mx.array(np.arange(8, dtype=np.int32)[None] + 20)
    b = mx.array(np.arange(8, dtype=np.int32)[None] + 40)
    ref_a = np.array(target.decode(a, cache))
    ref_b = np.array(target.decode(b, cache))
    la, lb = target.decode(a, cache), target.decode(b, cache)  # both lazy
    mx.eval(lb, la)
    np.testing.assert_array_equal(np.array(la), ref_a)
    np.testing.assert_array_equal(np.array(lb), ref_b)


def test_decoder_does_not_copy_the_cached_prefix(hy, target):
    mx = hy.mx
    sc = mx.zeros((1, 8, target.config.vocab_size))
    written = []
    for n in (13, 300):
        cache = _prefilled(target, n)
        decode = hy.decode_pass(target, cache, sc)
        res = hy.copies_per_pass(decode, hy.cache_buffers(cache))
        assert res["moved_buffers"] == 0, res
        written.append(res["written_bytes"])
    assert written[0] == written[1], written


def test_hygiene_suite_writes_a_record(tmp_path, capsys):
    from bench import run

    out = tmp_path / "results"
    argv = ["hygiene", "--backend", "mlx", "--preset", "tiny", "--context", "13,40"]
    argv += ["--steps", "6", "--out", str(out), "--checkpoint-dir", str(tmp_path)]
    assert run.main(argv) == 0
    (path,) = out.glob("hygiene-mlx-tiny-*.json")
    rec = json.loads(path.read_text())
    assert {"machine", "versions", "git", "model", "settings"} <= set(rec)
    assert [p["context"] for p in rec["results"]] == [13, 40]
    for p in rec["results"]:
        assert p["syncs_per_step"]["canvas_steps"] == 6
        assert p["copies_per_pass"]["moved_buffers"] == 0
    assert all(rec["checks"].values()), rec["checks"]
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["host_syncs_per_step"] == {"13": 1.0, "40": 1.0}


def test_hygiene_suite_is_mlx_only(capsys):
    from bench import run

    with pytest.raises(SystemExit):
        run.main(["hygiene", "--backend", "torch"])
    assert "MLX backend only" in capsys.readouterr().err

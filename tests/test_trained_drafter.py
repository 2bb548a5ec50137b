"""The trained drafter (drafter/trained.py, adapter twins, distill.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH, needs_mlx, needs_torch
from test_speculative import HostNoise, _dev, _load

import mlx_diffgem as dg
from drafter import load_drafter
from drafter.plan import SelfDraftPlan
from drafter.trained import AdapterConfig, DrafterSpec, save
from mlx_diffgem.core.generate import generate_ids

BACKENDS = [
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx")),
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
]


def _spec(cfg, layers=(0, 1)) -> DrafterSpec:
    adapter = AdapterConfig(
        hidden_size=cfg.hidden_size,
        num_layers=2,
        num_heads=2,
        head_dim=8,
        intermediate_size=24,
    )
    return DrafterSpec(target_layers=layers, adapter=adapter, top_k=1, sc_top_k=16)


def _random_weights(spec: DrafterSpec, seed: int = 0) -> dict:
    """Non-zero weights for every adapter tensor (an untrained one is the identity)."""

    from drafter.adapter_torch import Adapter

    rng, out = np.random.default_rng(seed), {}
    for k, v in sorted(Adapter(spec.adapter).state_dict().items()):
        base = 1.0 if k.endswith("norm.weight") else 0.0
        out[k] = (base + 0.2 * rng.standard_normal(tuple(v.shape))).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def drafter_dir(tiny_path, tmp_path_factory):
    cfg = dg.load(tiny_path, backend="torch", device="cpu", dtype="float32")[0].config
    spec = _spec(cfg)
    return save(tmp_path_factory.mktemp("drafter"), spec, _random_weights(spec))


@needs_mlx
@needs_torch
def test_adapter_twins_match(tiny_path, drafter_dir):
    """MLX and torch adapters give the same drafter logits from the same files."""
    logits = {}
    for backend in ("mlx", "torch"):
        target, _ = _load(tiny_path, backend)
        drafter = load_drafter(target, str(drafter_dir))
        cache = target.new_cache(1)
        target.encode(np.asarray([[2, 10, 11, 12, 13]], np.int32), cache)
        canvas = _dev(target, np.arange(8, dtype=np.int32)[None] + 20)
        out = target.model.decode(canvas, cache, None, plan=drafter.plan)
        logits[backend] = dg.to_numpy(out)
    np.testing.assert_allclose(logits["mlx"], logits["torch"], atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_untrained_adapter_is_the_cut_target(tiny_path, tmp_path, backend):
    import torch  # noqa: F401  (the adapter initialises in torch)

    from drafter.adapter_torch import Adapter

    target, _ = _load(tiny_path, backend)
    spec = _spec(target.config)
    folder = save(tmp_path / "d", spec, Adapter(spec.adapter).to_numpy())
    trained = load_drafter(target, str(folder))
    cut = SelfDraftPlan(layers=(0, 1), top_k=1, sc_top_k=16)
    cache = target.new_cache(1)
    target.encode(np.asarray([[2, 10, 11, 12]], np.int32), cache)
    canvas = _dev(target, np.arange(8, dtype=np.int32)[None] + 30)
    a = dg.to_numpy(target.model.decode(canvas, cache, None, plan=trained.plan))
    b = dg.to_numpy(target.model.decode(canvas, cache, None, plan=cut))
    np.testing.assert_array_equal(a, b)
    # ... and a trained one is not
    c = dg.to_numpy(
        target.model.decode(
            canvas,
            cache,
            None,
            plan=load_drafter(
                target, str(save(tmp_path / "r", spec, _random_weights(spec)))
            ).plan,
        )
    )
    assert np.abs(c - b).max() > 1e-3


@needs_mlx
@needs_torch
def test_speculative_with_trained_drafter_same_on_both_backends(tiny_path, drafter_dir):
    out = {}
    for backend in ("mlx", "torch"):
        model, _ = _load(
            tiny_path, backend, str(drafter_dir), draft_steps=3, max_rounds=2
        )
        assert model.drafter.plan.describe()["kind"] == "trained"
        seqs, st = generate_ids(
            model,
            [[2, 10, 11, 12]],
            noise=HostNoise(3),
            max_new_tokens=16,
            max_denoising_steps=6,
            confidence_threshold=10.0,
        )
        assert st.drafter_passes > 0
        assert max(st.steps_per_canvas) <= 6  # the target's budget holds
        out[backend] = seqs
    np.testing.assert_array_equal(out["mlx"], out["torch"])


def test_drafter_folder_errors(tiny_path, tmp_path, drafter_dir):
    target, _ = _load(tiny_path, "torch" if HAS_TORCH else "mlx")
    with pytest.raises(ValueError, match="without drafter_config.json"):
        load_drafter(target, str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "drafter_config.json").write_text('{"kind": "other"}')
    with pytest.raises(ValueError, match="drafter_config.json: expected"):
        load_drafter(target, str(bad))
    spec = _spec(target.config)
    weights = _random_weights(spec)
    weights.pop("layers.0.q_proj.weight")
    with pytest.raises(ValueError, match="drafter.safetensors: tensors do not match"):
        load_drafter(target, str(save(tmp_path / "m", spec, weights)))
    wide = DrafterSpec((0,), AdapterConfig(hidden_size=target.config.hidden_size + 1))
    with pytest.raises(ValueError, match="adapter hidden_size"):
        load_drafter(target, str(save(tmp_path / "w", wide, {})))
    with pytest.raises(ValueError, match="no drafter is shipped"):
        load_drafter(target, "default")


@needs_torch
def test_distill_lowers_the_drafter_loss(tmp_path):
    """A few steps on the embedded model move the held-out loss down, and the
    folder it writes loads as a drafter."""
    from drafter.distill import DistillArgs, distill
    from mlx_diffgem.core.checkpoint import default_model_path

    data = _tiny_corpus(tmp_path / "corpus")
    args = DistillArgs(
        out=str(tmp_path / "d"),
        data=str(data),
        layers="0,5",
        steps=8,
        eval_every=8,
        eval_batches=1,
        batch=2,
        seq_len=256,
        lr=3e-3,
        warmup=2,
    )
    import json

    out = distill(args)
    meta = json.loads((out / "distill.json").read_text())
    assert meta["log"][-1]["loss"] < meta["start"]["loss"]
    target, _ = _load(default_model_path(), "torch")
    described = load_drafter(target, str(out)).plan.describe()
    assert described["folder"] == str(out)


def _tiny_corpus(folder):
    """A few stdlib files in the embedded model's tokenizer: two train, one held out."""
    from tokenizers import Tokenizer

    from cuda_backend import corpus
    from mlx_diffgem.core.checkpoint import default_model_path

    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    root = corpus.stdlib_root()
    texts = corpus.read_texts(root, ["json/encoder.py", "json/decoder.py", "shlex.py"])
    folder.mkdir(parents=True)
    np.save(folder / "train.npy", corpus.pack(tok, texts[:2]))
    np.save(folder / "heldout.npy", corpus.pack(tok, texts[2:]))
    return folder

"""Quantization: `diffgem convert`, loading MLX conversions, quantize-on-load, mlx-vlm.

The tiny checkpoints here have hidden, MLP and expert widths of 64 so that the usual
group size of 64 divides them; the sliding layers' o_proj reads 4 x 8 = 32 columns and
so also exercises the fallback to group size 32.
"""

import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import pytest
from conftest import needs_mlx

pytestmark = [needs_mlx, pytest.mark.mlx]

HAS_VLM = importlib.util.find_spec("mlx_vlm") is not None
WIDTHS = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64)
PROMPT = np.array([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18]])  # longer than W = 8
CANVAS = np.arange(8)[None] + 5
KINDS = {
    "8bit": dict(bits=8),
    "4bit": dict(bits=4),
    "mixed": dict(bits=4, recipe="mixed"),
}


def _source(path, **overrides):
    """A tiny HF checkpoint with a tokenizer; no vision tower, so mlx-vlm loads it."""
    from mlx_diffgem.core.tiny import build_char_tokenizer, build_tiny_checkpoint

    build_tiny_checkpoint(path, **WIDTHS, **overrides)
    build_char_tokenizer(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _source(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    from mlx_diffgem.mlx_backend.convert import convert

    root = tmp_path_factory.mktemp("mlx")
    return {
        k: convert(src, root / k, quantize=True, group_size=64, **kw)
        for k, kw in KINDS.items()
    }


def _logits(target) -> np.ndarray:
    import mlx_diffgem as dg

    cache = target.new_cache(1)
    target.encode(PROMPT, cache)
    return dg.to_numpy(target.decode(CANVAS, cache))


def _load(path, **kw):
    import mlx_diffgem as dg

    return dg.load(path, dtype="float32", **kw)[0]


def _tensors(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "numpy") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------


def test_convert_writes_the_release_layout_and_mlx_vlm_names(src, converted):
    out = converted["mixed"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    shapes = _tensors(out)
    e = "model.decoder.layers.0.experts."
    # Fused experts [E, 2 * Ie, H * 4 / 32] with row-wise scales, as mlx-vlm saves.
    assert shapes[e + "gate_up_proj.weight"] == [4, 128, 8]
    assert shapes[e + "gate_up_proj.scales"] == [4, 128, 1]
    assert shapes[e + "down_proj.biases"] == [4, 64, 1]
    assert "model.encoder.language_model.layers.0.layer_scalar" in shapes
    assert not any(".gate_proj" in k and "experts" in k for k in shapes)


def test_convert_records_the_quantization(converted):
    for kind, out in converted.items():
        cfg = json.loads((out / "config.json").read_text())
        q = cfg["quantization"]
        assert cfg["quantization_config"] == q
        assert (q["bits"], q["group_size"], q["mode"]) == (
            KINDS[kind]["bits"],
            64,
            "affine",
        )
        p = "model.decoder.layers.0."
        assert q[p + "self_attn.o_proj"]["group_size"] == 32  # 32 columns: fallback
        if kind != "8bit":
            assert q[p + "router.proj"] == {"group_size": 64, "bits": 8}
        if kind == "mixed":
            for m in ("embed_tokens", "self_conditioning.gate_proj"):
                assert q["model.decoder." + m]["bits"] == 8
            for m in ("self_attn.q_proj", "mlp.down_proj"):
                assert q[p + m]["bits"] == 8
            assert p + "experts.gate_up_proj" not in q  # the default: 4 bits


def test_file_sizes_follow_the_bits(src, converted):
    size = {k: (v / "model.safetensors").stat().st_size for k, v in converted.items()}
    size["float32"] = (src / "model.safetensors").stat().st_size
    assert size["4bit"] < size["mixed"] < size["8bit"] < size["float32"]


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_load_quantizes_each_module_as_recorded(converted, kind):
    import mlx.nn as nn

    m = _load(converted[kind]).model
    bits = KINDS[kind]["bits"]
    other = 8 if kind == "mixed" else bits
    assert isinstance(m.embed_tokens, nn.QuantizedEmbedding)
    assert m.embed_tokens.bits == other
    layer = m.layers[0]
    assert layer.experts.gate_proj.bits == layer.experts.down_proj.bits == bits
    assert layer.router.proj.bits == 8
    assert layer.self_attn.q_proj.bits == layer.mlp.up_proj.bits == other
    assert m.self_conditioning.down_proj.bits == other
    assert layer.self_attn.o_proj.group_size == 32


def test_8bit_logits_are_close_to_float(tmp_path):
    """8 bits barely moves the logits; mixed sits between 8 and 4 bits.

    Top-k routing is discontinuous: in a tiny random model some token always has two
    experts within 8-bit noise of each other, and a flipped choice changes every canvas
    position through bidirectional attention (corr ~0.97 with top-2 of 4). Routing to
    all experts (top_k = E) keeps the model smooth, so the logits then measure the
    quantization error itself.
    """
    from mlx_diffgem.mlx_backend.convert import convert

    src = _source(tmp_path / "hf", top_k_experts=4)
    ref = _logits(_load(src))
    corr, rel = {}, {}
    for kind, kw in KINDS.items():
        got = _logits(_load(convert(src, tmp_path / kind, quantize=True, **kw)))
        corr[kind] = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
        rel[kind] = np.abs(got - ref).max() / np.ptp(ref)
    assert corr["8bit"] > 0.998 and rel["8bit"] < 0.05, (corr, rel)
    assert corr["8bit"] > corr["mixed"] > corr["4bit"] > 0.8, corr


def _dequantized(target):
    """A float twin of a quantized target: each packed weight dequantized."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_diffgem.mlx_backend.backend import MLXTarget
    from mlx_diffgem.mlx_backend.model import Model

    weights = dict(tree_flatten(target.model.parameters()))
    for path, m in target.model.named_modules():
        if hasattr(m, "bits"):
            del weights[path + ".scales"], weights[path + ".biases"]
            weights[path + ".weight"] = mx.dequantize(
                m.weight, m.scales, m.biases, m.group_size, m.bits
            )
    cfg = dataclasses.replace(target.config, quantization=None)
    model = Model(cfg)
    model.load_weights(list(weights.items()), strict=True)
    return MLXTarget(model, cfg, target.generation_config, target.path)


@pytest.mark.parametrize("kind", ["4bit", "mixed"])
def test_quantized_model_equals_its_dequantized_twin(converted, kind):
    # Checks names, expert split and kernels: what is loaded is what was written.
    target = _load(converted[kind])
    got, want = _logits(target), _logits(_dequantized(target))
    assert np.abs(got - want).max() < 1e-4


def test_generation_runs_and_is_seeded(converted):
    import mlx_diffgem as dg

    target = _load(converted["mixed"])
    seqs, stats = dg.generate_ids(target, PROMPT, seed=0, max_new_tokens=16)
    assert seqs.shape == (1, PROMPT.shape[1] + 16)
    again, _ = dg.generate_ids(target, PROMPT, seed=0, max_new_tokens=16)
    assert (seqs == again).all() and stats.canvases == 2


def test_sharded_conversion_loads_the_same(src, converted, tmp_path):
    from mlx_diffgem.mlx_backend.convert import convert

    out = convert(
        src, tmp_path / "s", quantize=True, recipe="mixed", shard_bytes=60_000
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert all((out / f).is_file() for f in files)
    got, want = _logits(_load(out)), _logits(_load(converted["mixed"]))
    assert np.array_equal(got, want)


def test_vision_tensors_are_kept_and_ignored(src, tmp_path):
    from safetensors.numpy import load_file, save_file

    from mlx_diffgem.mlx_backend.convert import convert

    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    w = load_file(str(hf / "model.safetensors"))
    w["model.encoder.vision_tower.patch.weight"] = np.ones((4, 3), np.float32)
    save_file(w, str(hf / "model.safetensors"))
    out = convert(hf, tmp_path / "q", quantize=True, bits=8, dtype="bfloat16")
    assert _tensors(out)["model.encoder.vision_tower.patch.weight"] == [4, 3]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert np.isfinite(_logits(_load(out))).all()


def test_quantize_on_load_matches_convert(src, converted):
    target = _load(src, quantization="mixed")
    q = target.config.quantization
    assert q["bits"] == 4 and q["model.decoder.embed_tokens"]["bits"] == 8
    assert target.model.layers[1].experts.up_proj.bits == 4
    # Same recipe, same float weights: the same packed model either way.
    assert np.array_equal(_logits(target), _logits(_load(converted["mixed"])))
    target = _load(src, quantization={"bits": 8, "group_size": 32})
    assert target.model.embed_tokens.group_size == 32


def test_cli_convert(src, tmp_path, capsys):
    from mlx_diffgem.cli import main

    out = tmp_path / "cli"
    args = ["convert", "--hf-path", str(src), "--mlx-path", str(out), "-q"]
    assert main([*args, "--recipe", "mixed", "--q-group-size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert main([*args]) == 2  # the folder exists now
    assert "exists and is not empty" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# bad input: one-line errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(quantize=True, recipe="q4_k_m"), "recipe: expected 'mixed'"),
        (dict(quantize=True, bits=3), "quantization: bits must be 4 or 8, got 3"),
        (dict(quantize=True, group_size=48), "group_size must be 32, 64 or 128"),
        (dict(recipe="mixed"), "pass quantize=True"),
        (dict(quantize=True, dtype="int8"), "dtype: expected one of"),
    ],
)
def test_convert_bad_arguments(src, tmp_path, kwargs, match):
    from mlx_diffgem.mlx_backend.convert import convert

    with pytest.raises(ValueError, match=match) as e:
        convert(src, tmp_path / "out", **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_quantized_source(converted, tmp_path):
    from mlx_diffgem.mlx_backend.convert import convert

    with pytest.raises(ValueError, match="already quantized"):
        convert(converted["4bit"], tmp_path / "again", quantize=True)


@pytest.mark.parametrize(
    "spec", ["3bit", {"bits": 3}, {"bits": 4, "group_size": 16}, {"mode": "mxfp4"}, 4]
)
def test_quantize_on_load_bad_spec(src, spec):
    with pytest.raises(ValueError, match="quantization: ") as e:
        _load(src, quantization=spec)
    assert "\n" not in str(e.value)


def test_quantize_on_load_of_a_quantized_checkpoint(converted):
    with pytest.raises(ValueError, match="already quantized"):
        _load(converted["8bit"], quantization="4bit")


def _edit_config(folder, dest, edit):
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    edit(cfg["quantization"])
    cfg.pop("quantization_config")
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda q: q.update(bits=4),
            "is packed as 8-bit with group size 64, but config.json's "
            "quantization says 4-bit with group size 64",
        ),
        (lambda q: q.update(group_size=128), "packed as 8-bit with group size 64"),
        (lambda q: q.update(mode="mxfp4"), "mode 'mxfp4' is not supported"),
        (lambda q: q.update(bits=7), r"expected bits in \[2, 3, 4, 5, 6, 8\]"),
        (lambda q: q.update(quant_method="fp8"), "quant_method 'fp8'"),
    ],
)
def test_config_that_does_not_match_the_tensors(converted, tmp_path, edit, match):
    from mlx_diffgem.core.errors import CheckpointError

    bad = _edit_config(converted["8bit"], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=match) as e:
        _load(bad)
    assert "\n" not in str(e.value)


def test_side_tensor_without_a_quantizable_module(converted, tmp_path):
    import mlx.core as mx

    from mlx_diffgem.core.errors import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(converted["8bit"], bad)
    w = mx.load(str(bad / "model.safetensors"))
    w["model.decoder.norm.scales"] = mx.ones((64, 1))
    mx.save_safetensors(str(bad / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match="unexpected tensor model.decoder.norm"):
        _load(bad)


# --------------------------------------------------------------------------------------
# mlx-vlm: its conversions load here, ours load there
# --------------------------------------------------------------------------------------

needs_vlm = pytest.mark.skipif(not HAS_VLM, reason="mlx-vlm not installed")


def _vlm_logits(folder) -> np.ndarray:
    import mlx.core as mx
    from mlx_vlm.utils import load_model

    model = load_model(folder)
    out = model(input_ids=mx.array(PROMPT), canvas_ids=mx.array(CANVAS))
    return np.array(out.logits)


@needs_vlm
def test_mlx_vlm_conversion_loads_here(src, tmp_path):
    from mlx_vlm.convert import convert as vlm_convert

    import mlx_diffgem as dg

    out = tmp_path / "vlm"
    vlm_convert(
        hf_path=str(src), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32
    )
    target = _load(out)
    layer = target.model.layers[0]
    # mlx-vlm's own recipe: 8 bits at group 64 outside the experts, and o_proj (32
    # columns) left in full precision.
    assert layer.experts.gate_proj.bits == 4 and layer.self_attn.q_proj.bits == 8
    assert not hasattr(layer.self_attn.o_proj, "bits")
    assert np.abs(_logits(target) - _vlm_logits(out)).max() < 1e-4
    seqs, _ = dg.generate_ids(target, PROMPT, seed=0, max_new_tokens=8)
    assert seqs.shape == (1, PROMPT.shape[1] + 8)


@needs_vlm
def test_our_conversion_loads_in_mlx_vlm(converted):
    out = converted["mixed"]
    assert np.abs(_logits(_load(out)) - _vlm_logits(out)).max() < 1e-4

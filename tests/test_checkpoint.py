"""Checkpoint files, tensor names and shapes, repo resolution and config parsing."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_diffgem.core import checkpoint as ck
from mlx_diffgem.core.config import FULL, SLIDING, GenerationConfig, ModelConfig
from mlx_diffgem.core.errors import CheckpointError, ConfigError
from mlx_diffgem.core.tiny import build_tiny_checkpoint, tiny_config_dict

# Release text config (spec §1.3), for the shape table and parameter count of §2.1/§2.5.
RELEASE_TEXT = dict(
    model_type="diffusion_gemma_text",
    vocab_size=262144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    sliding_window=1024,
)


@pytest.fixture
def cfg():
    return ModelConfig.from_dict(tiny_config_dict())


@pytest.fixture
def ckpt(tmp_path):
    """A fresh tiny checkpoint that a test may modify."""
    return build_tiny_checkpoint(tmp_path / "ckpt", seed=0)


def _rewrite(folder, edit):
    """Apply `edit(tensors)` to the folder's model.safetensors."""
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _shard(folder, n_first=20):
    """Split model.safetensors into two shards plus an index; returns shard names."""
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    parts = {
        "model-00001-of-00002.safetensors": names[:n_first],
        "model-00002-of-00002.safetensors": names[n_first:],
    }
    weight_map = {}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname))
        weight_map.update(dict.fromkeys(keys, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    return list(parts)


# --------------------------------------------------------------------------------------
# Weight files and headers
# --------------------------------------------------------------------------------------


def test_single_file_checkpoint(tiny_path, cfg):
    assert ck.weight_files(tiny_path) == [tiny_path / "model.safetensors"]
    found = ck.check_checkpoint(tiny_path, cfg)
    assert set(found) == set(ck.expected_shapes(cfg))
    assert found["layers.1.self_attn.k_proj.weight"] == ("F32", (16, 32))
    assert found["layers.0.experts.gate_up_proj"] == ("F32", (4, 32, 32))


def test_sharded_checkpoint(ckpt, cfg):
    single = ck.read_shapes(ck.weight_files(ckpt))
    shards = _shard(ckpt)
    files = ck.weight_files(ckpt)
    assert [f.name for f in files] == shards
    assert ck.read_shapes(files) == single
    assert len(ck.check_checkpoint(ckpt, cfg)) == len(ck.expected_shapes(cfg))


def test_missing_shard_is_named(ckpt):
    shards = _shard(ckpt)
    (ckpt / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard file {shards[1]} is missing"):
        ck.weight_files(ckpt)


def test_corrupt_index(ckpt):
    (ckpt / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="index.json: not a shard index"):
        ck.weight_files(ckpt)


def test_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no weights; expected model.safetensors"):
        ck.weight_files(tmp_path)


def test_tensor_in_two_shards(ckpt):
    shards = _shard(ckpt)
    first = load_file(str(ckpt / shards[0]))
    second = load_file(str(ckpt / shards[1]))
    name = next(iter(first))
    save_file({**second, name: first[name]}, str(ckpt / shards[1]))
    with pytest.raises(CheckpointError, match=f"tensor {name} also appears in"):
        ck.read_shapes(ck.weight_files(ckpt))


def test_corrupt_safetensors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ck.read_shapes([bad])
    bad.write_bytes(b"\xff" * 8)  # header length larger than the file
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ck.read_shapes([bad])


def test_read_shapes_reads_headers_only(ckpt):
    # A truncated data section does not matter: only the header is read.
    path = ckpt / "model.safetensors"
    n = int.from_bytes(path.read_bytes()[:8], "little")
    path.write_bytes(path.read_bytes()[: 8 + n])
    shapes = ck.read_shapes([path])
    assert shapes["model.decoder.embed_tokens.weight"] == ("F32", (128, 32))


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def test_hf_to_internal():
    f = ck.hf_to_internal
    assert f("model.decoder.layers.3.router.scale") == "layers.3.router.scale"
    assert f("model.decoder.embed_tokens.weight") == "embed_tokens.weight"
    enc = "model.encoder.language_model.layers.12.layer_scalar"
    assert f(enc) == "layers.12.encoder_layer_scalar"
    assert f("model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.weight") is None
    assert f("model.encoder.embed_vision.embedding_projection.weight") is None
    assert f("layers.0.self_attn.q_proj.weight") == "layers.0.self_attn.q_proj.weight"
    assert f("lm_head.weight") == "lm_head.weight"  # unknown: reported as unexpected


def test_internal_to_hf_roundtrip(cfg):
    for name in ck.expected_shapes(cfg):
        assert ck.hf_to_internal(ck.internal_to_hf(name)) == name


def test_vision_keys_dropped(ckpt, cfg):
    def add_vision(t):
        t["model.encoder.vision_tower.patch_embedder.weight"] = np.ones((4, 4), "f4")
        t["model.encoder.embed_vision.embedding_projection.weight"] = np.ones(
            (2,), "f4"
        )

    _rewrite(ckpt, add_vision)
    found = ck.check_checkpoint(ckpt, cfg)
    assert not any("vision" in n for n in found)


def test_encoder_layer_scalars_kept_separate(tiny_path, cfg):
    found = ck.check_checkpoint(tiny_path, cfg)
    tensors = load_file(str(tiny_path / "model.safetensors"))
    for i in range(cfg.num_hidden_layers):
        assert found[f"layers.{i}.layer_scalar"] == ("F32", (1,))
        assert found[f"layers.{i}.encoder_layer_scalar"] == ("F32", (1,))
        dec = tensors[ck.internal_to_hf(f"layers.{i}.layer_scalar")]
        enc = tensors[ck.internal_to_hf(f"layers.{i}.encoder_layer_scalar")]
        assert dec[0] != enc[0]  # the tiny builder gives them different values


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


def test_expected_shapes_release_table():
    cfg = ModelConfig.from_dict(RELEASE_TEXT)
    want = ck.expected_shapes(cfg)
    # 661 decoder tensors + 30 encoder scalars (spec §2.1)
    assert len(want) == 661 + 30
    assert want["embed_tokens.weight"] == (262144, 2816)
    assert want["layers.0.self_attn.q_proj.weight"] == (4096, 2816)
    assert want["layers.5.self_attn.q_proj.weight"] == (8192, 2816)
    assert want["layers.0.self_attn.k_proj.weight"] == (2048, 2816)
    assert want["layers.5.self_attn.k_proj.weight"] == (1024, 2816)
    assert "layers.0.self_attn.v_proj.weight" in want
    assert "layers.5.self_attn.v_proj.weight" not in want
    assert want["layers.5.self_attn.o_proj.weight"] == (2816, 8192)
    assert want["layers.0.self_attn.q_norm.weight"] == (256,)
    assert want["layers.29.self_attn.k_norm.weight"] == (512,)
    assert want["layers.0.experts.gate_up_proj"] == (128, 1408, 2816)
    assert want["layers.0.experts.down_proj"] == (128, 2816, 704)
    assert want["layers.0.router.per_expert_scale"] == (128,)
    assert want["self_conditioning.down_proj.weight"] == (2816, 2112)
    # text total incl. the 30 encoder scalars (spec §2.5)
    assert sum(math.prod(s) for s in want.values()) == 25_250_986_812


def test_per_layer_tensor_counts(cfg):
    want = ck.expected_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        n = sum(1 for k in want if k.startswith(f"layers.{i}."))
        assert n == (21 if cfg.is_full(i) else 22) + 1  # + encoder scalar


def _found(cfg):
    return dict(ck.expected_shapes(cfg))


def test_wrong_shape_names_tensor_and_both_shapes(cfg):
    found = _found(cfg)
    found["layers.0.self_attn.k_proj.weight"] = (32, 16)
    msg = (
        r"^src: layers\.0\.self_attn\.k_proj\.weight has shape \(32, 16\), "
        r"expected \(16, 32\)$"
    )
    with pytest.raises(CheckpointError, match=msg):
        ck.check_shapes(found, cfg, "src")


def test_wrong_shape_in_file(ckpt, cfg):
    def transpose(t):
        name = "model.decoder.layers.2.mlp.down_proj.weight"
        t[name] = np.ascontiguousarray(t[name].T)

    _rewrite(ckpt, transpose)
    msg = r"model\.safetensors: layers\.2\.mlp\.down_proj\.weight has shape \(48, 32\)"
    with pytest.raises(CheckpointError, match=msg):
        ck.check_checkpoint(ckpt, cfg)


def test_missing_tensors(cfg):
    found = _found(cfg)
    for i in (3, 2, 1):
        del found[f"layers.{i}.router.scale"]
    msg = r"^x: missing tensor layers\.1\.router\.scale \(and 2 more\)$"
    with pytest.raises(CheckpointError, match=msg):
        ck.check_shapes(found, cfg, "x")


def test_unexpected_tensor(ckpt, cfg):
    def add(t):
        t["model.decoder.layers.1.self_attn.v_proj.weight"] = np.zeros((16, 32), "f4")
        t["lm_head.weight"] = np.zeros((128, 32), "f4")

    _rewrite(ckpt, add)
    msg = r"unexpected tensor (layers\.1\.self_attn\.v_proj\.weight|lm_head\.weight) "
    with pytest.raises(CheckpointError, match=msg + r"\(and 1 more\)"):
        ck.check_checkpoint(ckpt, cfg)


def test_tensor_stored_under_two_names(ckpt, cfg):
    def add(t):
        t["norm.weight"] = t["model.decoder.norm.weight"]

    _rewrite(ckpt, add)
    with pytest.raises(CheckpointError, match="tensor norm.weight is stored twice"):
        ck.check_checkpoint(ckpt, cfg)


def test_several_problems_one_line(cfg):
    found = _found(cfg)
    del found["norm.weight"]
    found["extra"] = (1,)
    found["layers.0.router.scale"] = (3,)
    with pytest.raises(CheckpointError) as e:
        ck.check_shapes(found, cfg, "f")
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing tensor norm.weight" in msg
    assert "unexpected tensor extra" in msg
    assert "layers.0.router.scale has shape (3,), expected (32,)" in msg


def test_quantized_weights(cfg):
    qcfg = ModelConfig.from_dict(
        tiny_config_dict() | {"quantization": {"group_size": 16, "bits": 4}}
    )
    found = {}
    for name, shape in ck.expected_shapes(cfg).items():
        if len(shape) >= 2:  # packed: 8 4-bit values per uint32
            found[name] = (*shape[:-1], shape[-1] // 8)
            stem = name.removesuffix(".weight")
            found[stem + ".scales"] = (*shape[:-1], shape[-1] // 16)
            found[stem + ".biases"] = (*shape[:-1], shape[-1] // 16)
        else:
            found[name] = shape
    ck.check_shapes(found, qcfg, "q")
    # Without a quantization entry the side tensors are unexpected, with a hint.
    with pytest.raises(CheckpointError, match="no 'quantization' in config.json"):
        ck.check_shapes(found, cfg, "q")
    # Only the packed last dim is free.
    found["layers.0.mlp.up_proj.weight"] = (47, 4)
    with pytest.raises(CheckpointError, match="up_proj.weight has shape"):
        ck.check_shapes(found, qcfg, "q")


# --------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, tiny_path):
    """A fake HF cache holding org/tiny, with the hub forced offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny_path, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_resolve_local_folder(tiny_path):
    assert ck.resolve(tiny_path) == tiny_path
    assert ck.resolve(str(tiny_path)) == tiny_path


def test_resolve_repo_from_offline_cache(offline_hub, cfg):
    folder = ck.resolve("org/tiny")
    assert folder.resolve() == (offline_hub / "models--org--tiny/snapshots" / REV)
    assert ck.load_config(folder).hidden_size == cfg.hidden_size
    assert ck.resolve("org/tiny", revision=REV).name == REV
    assert ck.resolve("org/tiny", cache_dir=offline_hub).name == REV


def test_resolve_unknown_repo_offline(offline_hub):
    msg = (
        r"^google/nope: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set$"
    )
    with pytest.raises(CheckpointError, match=msg):
        ck.resolve("google/nope")
    with pytest.raises(CheckpointError, match="^org/tiny: not in the local"):
        ck.resolve("org/tiny", revision="v2")


def test_resolve_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"^\./foo: no such folder or repo id$"):
        ck.resolve("./foo")
    with pytest.raises(CheckpointError, match="no such folder or repo id"):
        ck.resolve("a/b/c")
    with pytest.raises(CheckpointError, match=r"^a/b\.git: not a valid repo id \("):
        ck.resolve("a/b.git")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(
        CheckpointError, match="is a file; expected a checkpoint folder"
    ):
        ck.resolve(f)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def test_corrupt_config_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "diffusion_gemma",')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ck.load_config(ckpt)


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: file not found"):
        ck.load_config(tmp_path)


def test_unknown_model_type(ckpt):
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not DiffusionGemma"):
        ck.load_config(ckpt)


def test_attention_k_eq_v_false_trap(tiny_path):
    default = ModelConfig.from_dict(tiny_config_dict())
    trap = ModelConfig.from_dict(tiny_config_dict(attention_k_eq_v=False))
    for i in (1, 3):  # the full layers
        assert default.layer_kv_heads(i) == 1
        assert trap.layer_kv_heads(i) == trap.num_key_value_heads == 2
        assert trap.layer_head_dim(i) == 16  # the head-dim override survives
    # ... and the checkpoint then no longer matches the config.
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_proj\.weight"):
        ck.check_checkpoint(tiny_path, trap)


def test_layer_types_default_and_last_forced_full():
    text = dict(tiny_config_dict()["text_config"], num_hidden_layers=8)
    del text["layer_types"]
    cfg = ModelConfig.from_dict(text)
    assert cfg.layer_types == [SLIDING] * 5 + [FULL, SLIDING, FULL]
    text["layer_types"] = [SLIDING] * 8
    assert ModelConfig.from_dict(text).layer_types == [SLIDING] * 7 + [FULL]


@pytest.mark.parametrize(
    "key, value",
    [
        ("top_p", 0.9),
        ("do_sample", True),
        ("num_beams", 4),
        ("temperature", 0.7),
        ("repetition_penalty", 1.1),
        ("top_k", 50),
    ],
)
def test_autoregressive_options_raise(key, value):
    with pytest.raises(ValueError, match=f"'{key}' applies to autoregressive decoding"):
        GenerationConfig().update(**{key: value})


def test_generation_config_validation():
    with pytest.raises(ValueError, match="unknown generation option 'foo'"):
        GenerationConfig().update(foo=1)
    # The reference refuses an int bound; we accept it (issue 11) and refuse <= 0.
    gen = GenerationConfig().update(sampler_config={"entropy_bound": 1})
    assert gen.entropy_bound == 1.0 and isinstance(gen.entropy_bound, float)
    with pytest.raises(ValueError, match="entropy_bound must be a finite number > 0"):
        GenerationConfig().update(sampler_config={"entropy_bound": 0})
    with pytest.raises(ValueError, match="t_max must be > t_min"):
        GenerationConfig().update(t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="t_max must be > t_min"):
        GenerationConfig().update(t_min=0.8, t_max=0.4)


def test_load_generation_config(ckpt):
    gen = ck.load_generation_config(ckpt)
    assert (gen.max_new_tokens, gen.eos_token_id, gen.pad_token_id) == (16, [1], 0)
    (ckpt / "generation_config.json").unlink()
    # Absent file: defaults, with eos/pad/bos from config.json (the reference has none).
    gen = ck.load_generation_config(ckpt)
    assert gen.max_new_tokens == 256
    assert (gen.eos_token_id, gen.pad_token_id, gen.bos_token_id) == ([1], 0, 2)
    (ckpt / "generation_config.json").write_text('{"top_p": 0.9}')
    with pytest.raises(ValueError, match=r"generation_config\.json: 'top_p'"):
        ck.load_generation_config(ckpt)
    (ckpt / "generation_config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"generation_config\.json: not valid JSON"):
        ck.load_generation_config(ckpt)


# --------------------------------------------------------------------------------------
# Import hygiene
# --------------------------------------------------------------------------------------


def test_core_imports_without_mlx_or_torch():
    code = (
        "import importlib, pkgutil, sys\n"
        "import mlx_diffgem.core as core\n"
        "names = [m.name for m in pkgutil.iter_modules(core.__path__)]\n"
        "for n in names:\n"
        "    importlib.import_module('mlx_diffgem.core.' + n)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch'))\n"
        "print(len(names), bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split(maxsplit=1)
    assert int(out[0]) >= 6  # config, backend, noise, tiny, checkpoint, tokenizer, ...
    assert out[1].strip() == "[]"

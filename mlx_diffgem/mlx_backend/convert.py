"""`diffgem convert`: a Hugging Face checkpoint -> an MLX one, optionally quantized.

The output keeps the release's folder layout (config.json, generation_config.json,
tokenizer files, model.safetensors or shards with an index) and mlx-vlm's tensor names:
the HF names, with `.weight` / `.scales` / `.biases` on the fused experts. So mlx-vlm
loads our conversions and we load theirs through one code path (`quantize.prepare`).
Vision tensors are copied unchanged: this port ignores them, mlx-vlm needs them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from mlx_diffgem.core import checkpoint
from mlx_diffgem.core.config import ModelConfig, read_json

from ._blas import import_mlx
from .backend import DTYPES, _load_arrays, build_model
from .quantize import Recipe, parse_spec, quantize_model

mx = import_mlx()
from mlx.utils import tree_flatten  # noqa: E402

SHARD_BYTES = 5 * 2**30  # Hugging Face's default shard size
_VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_EXPERT = re.compile(r"(layers\.\d+\.experts\.)(gate|up)_proj\.(\w+)")
_NOT_COPIED = {"config.json", "model.safetensors.index.json"}


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    recipe: str | None = None,
    dtype: str | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write an MLX checkpoint of `hf_path` to the new folder `mlx_path`.

    Args:
        quantize: quantize the weights (affine, `bits` with `group_size`); the router
            stays at 8 bits.
        recipe: "mixed": embeddings, attention, router, dense MLP and
            self-conditioning at 8 bits, experts at `bits`.
        dtype: of the unquantized tensors and the scales (default: the checkpoint's).
        shard_bytes: largest shard; bigger checkpoints get an index.

    Returns:
        the output folder.
    """
    spec = _recipe(quantize, bits, group_size, recipe)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    out = _new_folder(mlx_path)
    folder = checkpoint.resolve(hf_path)
    raw = read_json(folder / "config.json")
    config = ModelConfig.from_dict(raw, str(folder / "config.json"))
    if config.quantization:
        raise ValueError(
            f"{folder / 'config.json'}: already quantized; convert needs an "
            "unquantized (e.g. bf16) checkpoint"
        )
    files = checkpoint.weight_files(folder)
    dtype = dtype or _source_dtype(files)
    model = build_model(config, files, dtype)
    if spec is not None:
        quantize_model(model, config, spec)
    tensors = export_weights(model) | _vision(_load_arrays(files), dtype)
    del model  # the tensors dict holds the only references: shards free as saved
    out.mkdir(parents=True, exist_ok=True)
    _save(tensors, out, shard_bytes)
    _write_config(raw, config.quantization, dtype, out / "config.json")
    _copy_side_files(folder, out)
    return out


def _recipe(
    quantize: bool, bits: int, group_size: int, recipe: str | None
) -> Recipe | None:
    """Validate the quantization arguments before any loading."""
    if recipe not in (None, "mixed"):
        raise ValueError(f"recipe: expected 'mixed' or None, got {recipe!r}")
    spec = parse_spec({"bits": bits, "group_size": group_size})
    if not quantize:
        if recipe is not None:
            raise ValueError("recipe: 'mixed' quantizes; pass quantize=True (-q)")
        return None
    return Recipe(spec.bits, spec.group_size, mixed=recipe == "mixed")


def _new_folder(mlx_path: str | Path) -> Path:
    out = Path(mlx_path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"mlx_path: {out} exists and is not empty; expected a new folder"
        )
    return out


def _source_dtype(files: list[Path]) -> str:
    """The float dtype the checkpoint stores (from the headers; bf16 if none)."""
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    for dt, _ in checkpoint.read_shapes(files).values():
        if dt in names:
            return names[dt]
    return "bfloat16"


def export_weights(model) -> dict[str, mx.array]:
    """The model's parameters under mlx-vlm's names (experts' gate and up fused)."""
    flat = dict(tree_flatten(model.parameters()))
    out = {}
    for name, w in flat.items():
        m = _EXPERT.fullmatch(name)
        if m is None:
            out[checkpoint.internal_to_hf(name)] = w
        elif m[2] == "gate":  # [E, Ie, ...] + [E, Ie, ...] -> [E, 2 * Ie, ...]
            up = flat[f"{m[1]}up_proj.{m[3]}"]
            fused = f"{m[1]}gate_up_proj.{m[3]}"
            out[checkpoint.internal_to_hf(fused)] = mx.concatenate([w, up], axis=1)
    return out


def _vision(arrays: dict[str, mx.array], dtype: str) -> dict[str, mx.array]:
    cast = DTYPES[dtype]
    return {
        k: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in arrays.items()
        if k.startswith(_VISION)
    }


def _save(tensors: dict[str, mx.array], out: Path, shard_bytes: int) -> None:
    """model.safetensors, or shards of <= shard_bytes plus an index."""
    shards = _shard_names(tensors, shard_bytes)
    meta = {"format": "mlx"}
    if len(shards) == 1:
        mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata=meta)
        return
    total = sum(v.nbytes for v in tensors.values())
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # Popping lets each shard's arrays be freed once written.
        shard = {k: tensors.pop(k) for k in names}
        mx.save_safetensors(str(out / file), shard, metadata=meta)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _shard_names(tensors: dict[str, mx.array], shard_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_config(raw: dict[str, Any], quant: dict | None, dtype: str, path: Path):
    """The source config.json with the dtype and, as mlx-vlm writes it, the
    quantization under both "quantization" and "quantization_config"."""
    cfg = dict(raw)
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    if isinstance(cfg.get("text_config"), dict) and "dtype" in cfg["text_config"]:
        cfg["text_config"] = {**cfg["text_config"], "dtype": dtype}
    if quant:
        cfg["quantization"] = dict(quant)
        cfg["quantization_config"] = dict(quant)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _copy_side_files(folder: Path, out: Path) -> None:
    """generation_config.json, tokenizer files, chat template, processor configs."""
    for pattern in checkpoint.ALLOW_PATTERNS:
        for f in folder.glob(pattern):
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _NOT_COPIED:
                shutil.copy2(f, out / f.name)

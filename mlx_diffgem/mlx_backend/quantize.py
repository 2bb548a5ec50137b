"""MLX weight preparation and quantization (name mapping, shape checks, nn.quantize).

Checkpoints come in two name layouts that differ only in the experts:
- Hugging Face: `model.decoder.*`, the experts as bare tensors
  `experts.gate_up_proj` [E, 2 * Ie, H] (gate rows first) and `experts.down_proj`;
- MLX (`diffgem convert` and mlx-vlm): the same names with `.weight` on the experts,
  and `.scales` / `.biases` next to every quantized weight.
Quantized checkpoints follow mlx-vlm: config.json's "quantization" holds the default
group size and bits plus per-module overrides keyed by mlx-vlm's module path, and a
module is quantized iff the checkpoint has its `.scales`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mlx_diffgem.core import checkpoint
from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.errors import CheckpointError

from ._blas import import_mlx

mx = import_mlx()
import mlx.nn as nn  # noqa: E402

BITS = (4, 8)  # what `convert` and quantize-on-load write
GROUP_SIZES = (32, 64, 128)
LOAD_BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine kernels read (other tools' files)
ROUTER_BITS = 8  # routing flips under 4-bit noise: every recipe keeps it at 8
NAMED_SPECS = {"4bit": (4, False), "8bit": (8, False), "mixed": (4, True)}
_SPEC_HINT = (
    "expected '4bit', '8bit', 'mixed' or "
    "{'bits': 4|8, 'group_size': 32|64|128, 'recipe': None|'mixed'}"
)
_EXPERT = re.compile(r"(layers\.\d+\.experts\.)(gate_up_proj|down_proj)(\.\w+)?")
_VLM_EXPERT = re.compile(r"(layers\.\d+\.experts\.)(gate|up|down)_proj")


@dataclass(frozen=True)
class Recipe:
    """Bits per module: `bits` everywhere, 8 for the router; `mixed`: 8 but experts."""

    bits: int = 4
    group_size: int = 64
    mixed: bool = False

    def bits_for(self, path: str) -> int:
        if path.endswith("router.proj"):
            return ROUTER_BITS
        if self.mixed and ".experts." not in path:
            return 8  # embeddings, attention, dense MLP, self-conditioning
        return self.bits


def parse_spec(spec: Any) -> Recipe:
    """A quantization spec ("4bit", "8bit", "mixed" or a dict) as a Recipe.

    Raises:
        ValueError: one line naming `quantization` and what is expected.
    """
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, str) and spec in NAMED_SPECS:
        bits, mixed = NAMED_SPECS[spec]
        return Recipe(bits=bits, mixed=mixed)
    if not isinstance(spec, dict) or not set(spec) <= {"bits", "group_size", "recipe"}:
        raise ValueError(f"quantization: {_SPEC_HINT}, got {spec!r}")
    bits, group = spec.get("bits", 4), spec.get("group_size", 64)
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"quantization: bits must be 4 or 8, got {bits!r}")
    if group not in GROUP_SIZES or isinstance(group, bool):
        raise ValueError(
            f"quantization: group_size must be 32, 64 or 128, got {group!r}"
        )
    recipe = spec.get("recipe")
    if recipe not in (None, "mixed"):
        raise ValueError(
            f"quantization: recipe must be None or 'mixed', got {recipe!r}"
        )
    return Recipe(bits=bits, group_size=group, mixed=recipe == "mixed")


def vlm_module(path: str) -> str:
    """mlx-vlm's module path for one of ours (its experts fuse gate and up)."""
    if m := _VLM_EXPERT.fullmatch(path):
        fused = "down_proj" if m[2] == "down" else "gate_up_proj"
        return f"model.decoder.{m[1]}{fused}"
    return "model.decoder." + path


# --------------------------------------------------------------------------------------
# Quantizing a float model
# --------------------------------------------------------------------------------------


def plan(model: nn.Module, recipe: Recipe) -> dict[str, dict[str, int]]:
    """Module path -> {"group_size", "bits"} for every module the recipe quantizes.

    A module whose input width the group size does not divide falls back to a smaller
    group (64, then 32) instead of staying in full precision; with none it is skipped.
    """
    out = {}
    for path, m in model.named_modules():
        if not hasattr(m, "to_quantized"):
            continue
        in_dims = m.weight.shape[-1]
        sizes = [g for g in (recipe.group_size, 64, 32) if g <= recipe.group_size]
        group = next((g for g in sizes if in_dims % g == 0), None)
        if group is not None:
            out[path] = {"group_size": group, "bits": recipe.bits_for(path)}
    return out


def quantization_config(params: dict[str, dict[str, int]], recipe: Recipe) -> dict:
    """config.json's "quantization": the defaults plus mlx-vlm-keyed overrides."""
    default = {"group_size": recipe.group_size, "bits": recipe.bits}
    out: dict[str, Any] = {**default, "mode": "affine"}
    for path, p in params.items():
        if p != default:
            out[vlm_module(path)] = dict(p)
    return out


def quantize_model(model: nn.Module, config: ModelConfig, spec: Any) -> None:
    """Quantize a loaded float model in place and record it in `config.quantization`.

    Args:
        spec: "4bit", "8bit", "mixed", {"bits": 4|8, "group_size": 32|64|128} or a
            Recipe.
    """
    recipe = parse_spec(spec)
    if config.quantization:
        raise ValueError(
            "quantization: this checkpoint is already quantized "
            f"({config.quantization.get('bits')}-bit in config.json); load it "
            "without quantization="
        )
    params = plan(model, recipe)
    nn.quantize(model, class_predicate=lambda path, _: params.get(path, False))
    config.quantization = quantization_config(params, recipe)


# --------------------------------------------------------------------------------------
# Loading a checkpoint
# --------------------------------------------------------------------------------------


def prepare(model, config: ModelConfig, weights: dict, source: str) -> dict:
    """Checkpoint arrays -> the model's parameter names, checked against the config.

    With `config.quantization` set, the model's modules are swapped for quantized ones
    (per-module bits and group size) so that `load_weights` takes the packed arrays.
    """
    named = _checkpoint_names(weights, source)
    checkpoint.check_shapes(
        {k: tuple(v.shape) for k, v in named.items()}, config, source
    )
    mapped = model.sanitize(_split_experts(named))
    if config.quantization:
        _quantize_like(model, config.quantization, mapped, source)
    return mapped


def _checkpoint_names(weights: dict, source: str) -> dict:
    """Internal names, with the experts as the HF names that check_shapes knows."""
    out = {}
    for name, value in weights.items():
        internal = checkpoint.hf_to_internal(name)
        if internal is None:
            continue  # vision
        if internal in out:
            raise CheckpointError(f"{source}: tensor {name} is stored twice")
        out[internal] = value
    return out


def _split_experts(weights: dict) -> dict:
    """Fused experts -> SwitchGLU's gate_proj / up_proj / down_proj parameters.

    gate_up_proj stacks gate rows over up rows (axis 1, the output rows), so the split
    also holds for packed weights and their scales and biases, which are row-wise.
    """
    out = {}
    for name, w in weights.items():
        m = _EXPERT.fullmatch(name)
        if m is None:
            out[name] = w
            continue
        base, proj, suffix = m[1], m[2], m[3] or ".weight"
        if proj == "down_proj":
            out[f"{base}down_proj{suffix}"] = w
            continue
        half = w.shape[1] // 2
        out[f"{base}gate_proj{suffix}"] = w[:, :half]
        out[f"{base}up_proj{suffix}"] = w[:, half:]
    return out


def _quantize_like(model, quant: dict, weights: dict, source: str) -> None:
    """Swap in quantized modules where the checkpoint has `.scales`, checked."""
    if "quant_method" in quant:  # transformers' formats (fp8, gptq, ...), not MLX's
        raise CheckpointError(
            f"config.json: quantization_config has quant_method "
            f"{quant['quant_method']!r}; only MLX affine quantization is supported "
            "(convert the unquantized checkpoint with `diffgem convert -q`)"
        )
    default = _params(quant, "config.json: quantization", quant)
    quantizable = {p: m for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    for name in weights:
        stem = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and stem not in quantizable:
            hf = checkpoint.internal_to_hf(name)
            raise CheckpointError(f"{source}: unexpected tensor {hf}")
    params = {}
    for path, m in quantizable.items():
        override = quant.get(vlm_module(path))
        if f"{path}.scales" not in weights or override is False:
            continue  # kept in full precision (e.g. a width the group does not divide)
        key = f"config.json: quantization[{vlm_module(path)!r}]"
        p = default if override is None else _params(override, key, quant)
        _check_packed(path, m.weight.shape[-1], p, weights, source)
        params[path] = p
    nn.quantize(model, class_predicate=lambda path, _: params.get(path, False))


def _params(entry: Any, where: str, quant: dict) -> dict[str, int]:
    """{"group_size", "bits"} of one config entry, validated (one-line errors)."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected an object, got {entry!r}")
    mode = entry.get("mode", quant.get("mode", "affine"))
    if mode != "affine":
        raise CheckpointError(
            f"{where}: mode {mode!r} is not supported; expected 'affine'"
        )
    bits, group = entry.get("bits"), entry.get("group_size")
    if bits not in LOAD_BITS or group not in GROUP_SIZES:
        raise CheckpointError(
            f"{where}: expected bits in {list(LOAD_BITS)} and group_size in "
            f"{list(GROUP_SIZES)}, got bits={bits!r}, group_size={group!r}"
        )
    return {"group_size": group, "bits": bits}


def _check_packed(
    path: str, in_dims: int, p: dict[str, int], weights: dict, source: str
) -> None:
    """The packed weight, scales and biases must match the config's bits and group."""
    name = vlm_module(path)
    w, s = weights.get(f"{path}.weight"), weights[f"{path}.scales"]
    b = weights.get(f"{path}.biases")
    if w is None or b is None:
        raise CheckpointError(f"{source}: {name} has scales but no weight or biases")
    if w.dtype != mx.uint32:
        raise CheckpointError(
            f"{source}: {name}.weight is {w.dtype}, expected packed uint32"
        )
    bits, group = p["bits"], p["group_size"]
    packed, groups = in_dims * bits // 32, in_dims // group
    if (
        w.shape[-1] != packed
        or s.shape != (*w.shape[:-1], groups)
        or b.shape != s.shape
    ):
        got_bits = w.shape[-1] * 32 / in_dims
        got_group = in_dims / s.shape[-1] if s.shape[-1] else 0
        raise CheckpointError(
            f"{source}: {name} is packed as {got_bits:g}-bit with group size "
            f"{got_group:g}, but config.json's quantization says {bits}-bit with "
            f"group size {group}"
        )

"""What a trained drafter records of the model it was made for, and the check.

A trained drafter runs some of its target's layers, then layers of its own trained
against what those produce, then the target's norm and head: on another model it
writes garbage, even one of the same shape. So drafter_config.json holds a
fingerprint of the target under "target":

- the target's shapes that the drafter depends on (SHAPES, from config.json), and
- "weights": "sha256:..." over the target's 1-D tensors that a drafter pass reads:
  every norm weight and scalar of its kept layers, the final norm and the
  self-conditioning pre-norm, by name and shape, each value rounded to bfloat16.
  Only those: a conversion (`diffgem convert -q`) quantizes the matrices and the
  embedding but leaves these as floats, so the drafter still loads on its model's
  4-bit copy; rounded to bfloat16, so a float32 or bfloat16 copy hashes alike.

The hash is read from the target's weight files (the bytes of a few small tensors),
so it does not depend on the dtype or quantization the target was loaded with.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from mlx_diffgem.core import checkpoint
from mlx_diffgem.core.errors import CheckpointError, ConfigError

SHAPES = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)
MISMATCH = "drafter made for a different model"
_SHARED = ("norm.weight", "self_conditioning.pre_norm.weight")
_LAYER = re.compile(r"layers\.(\d+)\.")
_FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def fingerprint(folder: str | Path, config: Any, layers: tuple[int, ...]) -> dict:
    """The "target" entry of a drafter that runs `layers` of the model in `folder`
    (its parsed config: `config`)."""
    shapes = {k: getattr(config, k) for k in SHAPES}
    return {**shapes, "weights": weights_hash(folder, layers)}


def weights_hash(folder: str | Path, layers: tuple[int, ...]) -> str:
    """sha256 over the 1-D tensors a drafter of `layers` reads (module docstring)."""
    kept = {int(i) for i in layers}
    found: dict[str, tuple[tuple[int, ...], bytes]] = {}
    for path in checkpoint.weight_files(Path(folder)):
        header, start = _header(path)
        for name, entry in header.items():
            internal = checkpoint.hf_to_internal(name)
            if internal is None or len(entry["shape"]) != 1:
                continue
            m = _LAYER.match(internal)
            if internal in _SHARED or (m and int(m[1]) in kept):
                raw = _read(path, start, entry)
                found[internal] = (tuple(entry["shape"]), _bf16(entry["dtype"], raw))
    h = hashlib.sha256()
    for name in sorted(found):
        shape, data = found[name]
        h.update(f"{name}{list(shape)}".encode())
        h.update(data)
    return "sha256:" + h.hexdigest()


def check(recorded: Any, target: Any, layers: tuple[int, ...], source: Path) -> None:
    """Refuse (ConfigError, naming `source`) a drafter whose recorded fingerprint
    is not that of `target` (a loaded model: its config and checkpoint folder)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("weights"), str):
        raise ConfigError(
            f'{source}: "target" must be an object with the target\'s shapes and '
            '"weights" (as written by drafter.trained.save)'
        )
    for key in SHAPES:
        want, have = recorded.get(key), getattr(target.config, key)
        if key in recorded and want != have:
            raise ConfigError(
                f"{MISMATCH}: {source.parent} was made for a model with {key} "
                f"{want}, {target.path} has {have}"
            )
    have = weights_hash(target.path, layers)
    if recorded["weights"] != have:
        raise ConfigError(
            f"{MISMATCH}: {source.parent} was made for a model with other weights "
            f"({recorded['weights'][:19]}..., {target.path}: {have[:19]}...)"
        )


def _header(path: Path) -> tuple[dict[str, Any], int]:
    try:
        return checkpoint.safetensors_header(path)
    except OSError:
        raise CheckpointError(
            f"{path}: not a safetensors file (unreadable header)"
        ) from None


def _read(path: Path, start: int, entry: dict) -> bytes:
    lo, hi = entry["data_offsets"]
    with path.open("rb") as fh:
        fh.seek(start + lo)
        raw = fh.read(hi - lo)
    if len(raw) != hi - lo:
        raise CheckpointError(f"{path}: truncated (a tensor runs past the end)")
    return raw


def _bf16(dtype: str, raw: bytes) -> bytes:
    """The values as bfloat16 (round to nearest even), little-endian."""
    if dtype == "BF16" or dtype not in _FLOATS:
        return raw
    x = np.frombuffer(raw, _FLOATS[dtype]).astype(np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()

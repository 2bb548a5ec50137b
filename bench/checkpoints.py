"""Random-weight benchmark checkpoints of named shapes, built once into a cache folder.

Presets (text_config overrides of `core.tiny`'s layout; every record says
`"weights": "random"`):

- `tiny`: the test model of spec §6.2 (canvas 8).
- `mid`: 8 layers (5 sliding, 1 full, sliding, full), hidden 512, 16 experts top-2,
  vocab 8192, canvas 64, window 256: big enough that matmuls, not Python, dominate.
- `released`: the 26B-A4B shape of spec §1.3, in bfloat16 (~51 GB). It is written by
  `write_sharded`, which generates each tensor in row chunks and streams it into
  safetensors shards, so building it needs disk space, not memory.

The benchmark checkpoints' generation config is the release one without EOS ids, so
that every run denoises all the canvases it asks for (random weights emit EOS at
random, which would make the work differ between runs and implementations).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_diffgem.core import checkpoint
from mlx_diffgem.core.config import FULL, RELEASE_GENERATION, SLIDING, ModelConfig
from mlx_diffgem.core.tiny import build_tiny_checkpoint, tiny_config_dict

from .pass_cost import RELEASED_TEXT

BENCH_GENERATION = {**RELEASE_GENERATION, "pad_token_id": 0}

MID_TEXT = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    layer_types=[SLIDING] * 5 + [FULL, SLIDING, FULL],
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=1,
    num_experts=16,
    top_k_experts=2,
    sliding_window=256,
    max_position_embeddings=32768,
)

RELEASED = {
    **{k: v for k, v in RELEASED_TEXT.items() if k != "model_type"},
    "layer_types": ([SLIDING] * 5 + [FULL]) * 5,
}


@dataclass(frozen=True)
class Preset:
    canvas: int
    text: dict[str, Any]
    dtype: str = "float32"  # dtype of the written weights
    sharded: bool = False  # stream through write_sharded (too big for one array)


PRESETS = {
    "tiny": Preset(8, {}),
    "mid": Preset(64, MID_TEXT),
    "released": Preset(256, RELEASED, dtype="bfloat16", sharded=True),
}


def preset_config(name: str, canvas: int | None = None) -> dict[str, Any]:
    """The config.json dict of a preset (optionally with another canvas length)."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; expected one of {list(PRESETS)}")
    p = PRESETS[name]
    raw = tiny_config_dict(canvas or p.canvas, **p.text)
    raw["dtype"] = p.dtype
    return raw


def config_hash(raw: dict[str, Any], seed: int) -> str:
    """A short hash of what defines the weights: config.json, seed, generator."""
    ident = {"config": raw, "seed": seed, "generation": BENCH_GENERATION}
    blob = json.dumps(ident, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_root() -> Path:
    home = os.environ.get("DIFFGEM_HOME", Path.home() / ".cache" / "mlx_diffgem")
    return Path(home) / "bench"


def build(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    canvas: int | None = None,
) -> Path:
    """The folder of preset `name`, built on first use (atomically) and reused."""
    raw = preset_config(name, canvas)
    root = Path(root) if root is not None else default_root()
    path = root / f"{name}-{config_hash(raw, seed)}"
    if (path / "config.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    if PRESETS[name].sharded:
        _check_disk(root, weight_bytes(ModelConfig.from_dict(raw), PRESETS[name].dtype))
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        if PRESETS[name].sharded:
            write_sharded(tmp, raw, seed=seed, dtype=PRESETS[name].dtype)
        else:
            text = {k: v for k, v in raw["text_config"].items() if k != "model_type"}
            gen = dict(BENCH_GENERATION)
            build_tiny_checkpoint(
                tmp,
                seed=seed,
                canvas_length=raw["canvas_length"],
                generation=gen,
                **text,
            )
        os.replace(tmp, path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # built by another process first
    return path


def _check_disk(root: Path, nbytes: int) -> None:
    free = shutil.disk_usage(root).free
    if free < 1.1 * nbytes:
        raise ValueError(
            f"preset: the random checkpoint needs {nbytes / 1e9:.1f} GB in {root}, "
            f"only {free / 1e9:.1f} GB are free (set DIFFGEM_HOME elsewhere)"
        )


# -- streaming sharded writer ----------------------------------------------------------

_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


@dataclass(frozen=True)
class TensorSpec:
    """A checkpoint tensor and how `core.tiny.random_weights` initialises it."""

    name: str  # checkpoint (HF) name
    shape: tuple[int, ...]
    init: str  # normal | ones_ish | qk_norm | const
    scale: float = 0.0  # std of `normal`, value of `const`

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def _init(name: str, std: float = 0.02) -> tuple[str, float]:
    """The init of an internal tensor name, with tiny.random_weights' scales."""
    m = name.split(".")
    if name == "embed_tokens.weight":
        return "normal", 0.3
    if name.startswith("self_conditioning.") and "proj" in name:
        return "normal", 0.05
    if m[-1] in ("layer_scalar", "encoder_layer_scalar"):
        i = int(m[1])  # decoder 0.5 + 0.1 i, encoder 0.8 - 0.1 i
        return "const", 0.5 + 0.1 * i if m[-1] == "layer_scalar" else 0.8 - 0.1 * i
    if m[-2:] in (["q_norm", "weight"], ["k_norm", "weight"]):
        return "qk_norm", 0.3
    if m[-1] in ("scale", "per_expert_scale") or name.endswith("norm.weight"):
        return "ones_ish", 0.3
    if name.endswith("router.proj.weight"):
        return "normal", 1.0
    return "normal", std


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every text tensor of `cfg` (the shapes `core.checkpoint` expects)."""
    return [
        TensorSpec(checkpoint.internal_to_hf(k), shape, *_init(k))
        for k, shape in checkpoint.expected_shapes(cfg).items()
    ]


def weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    return sum(s.numel for s in tensor_specs(cfg)) * _DTYPES[dtype][1]


def _chunks(spec: TensorSpec, seed: int, chunk_elems: int):
    """The tensor as float32 row blocks along its first axis (bounded memory)."""
    # A generator per tensor, seeded by its name: shards can be written in any order.
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    row = int(np.prod(spec.shape[1:], dtype=np.int64))
    rows = max(1, chunk_elems // max(row, 1))
    for start in range(0, spec.shape[0], rows):
        shape = (min(rows, spec.shape[0] - start), *spec.shape[1:])
        if spec.init == "const":
            yield np.full(shape, spec.scale, np.float32)
            continue
        x = rng.standard_normal(shape, dtype=np.float32)
        if spec.init == "normal":
            yield x * np.float32(spec.scale)
        else:  # ones_ish: 1 + 0.3 N(0, 1); q/k norms are scaled by 0.3 once more
            y = 1.0 + np.float32(0.3) * x
            yield y * np.float32(0.3) if spec.init == "qk_norm" else y


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return x.astype("<f4").tobytes()
    u = x.astype(np.float32).view(np.uint32)  # bf16: round to nearest even
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def _plan(specs: list[TensorSpec], size: int, shard_bytes: int) -> list[list]:
    shards, cur, used = [], [], 0
    for s in specs:
        n = s.numel * size
        if cur and used + n > shard_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append(s)
        used += n
    return shards + [cur] if cur else shards


def _write_shard(
    path: Path, specs: list[TensorSpec], seed: int, dtype: str, chunk_elems: int
) -> None:
    """One safetensors file, header first, each tensor streamed chunk by chunk."""
    code, size = _DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for s in specs:
        end = offset + s.numel * size
        header[s.name] = {
            "dtype": code,
            "shape": list(s.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for s in specs:
            for x in _chunks(s, seed, chunk_elems):
                fh.write(_encode(x, dtype))


def write_sharded(
    path: str | Path,
    raw_config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_bytes: int = 5 * 2**30,
    chunk_bytes: int = 64 * 2**20,
) -> Path:
    """Write a random checkpoint of any size as safetensors shards + index.

    Peak memory is about one chunk (`chunk_bytes` of float32 values) whatever the
    model size; tensors are split across shards only at tensor boundaries.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got {dtype!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw_config)
    specs = tensor_specs(cfg)
    size = _DTYPES[dtype][1]
    shards = _plan(specs, size, shard_bytes)
    weight_map = {}
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(path / fname, group, seed, dtype, chunk_bytes // 4)
        weight_map.update({s.name: fname for s in group})
    index = {
        "metadata": {"total_size": sum(s.numel for s in specs) * size},
        "weight_map": weight_map,
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(raw_config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(BENCH_GENERATION, indent=2))
    return path

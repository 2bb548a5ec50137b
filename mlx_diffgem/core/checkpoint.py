"""Checkpoint files: repo id or folder -> weight files, tensor names and shape checks.

The release stores the text weights once under `model.decoder.*`, the encoder-mode layer
scalars under `model.encoder.language_model.layers.{i}.layer_scalar`, and a vision tower
this port drops (spec §2.1-2.3). Backends load tensors by the *internal* names that
`hf_to_internal` gives, and `check_checkpoint` validates a folder against the config by
reading safetensors headers only, so a wrong file fails in milliseconds, not after
loading 50 GB.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from .config import GenerationConfig, ModelConfig
from .errors import CheckpointError

# What `resolve` fetches from the Hub: configs, weights, tokenizer and chat template.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer*",
    "*.model",
    "*.txt",
]

_INDEX = "model.safetensors.index.json"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_ENCODER_SCALAR = re.compile(
    r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar"
)
_DROPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# MLX conversions (ours and mlx-vlm's) put `.weight` on the fused expert tensors.
_MLX_EXPERT_WEIGHT = re.compile(r"(.*\.experts\.(?:gate_up|down)_proj)\.weight")
# MLX quantization stores these next to each packed weight.
_QUANT_SIDE_SUFFIXES = (".scales", ".biases")

Shapes = dict[str, tuple[int, ...]]


# --------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------


ASSETS = Path(__file__).resolve().parents[1] / "assets"  # mlx_diffgem/assets


def default_model_path() -> Path:
    """The embedded default model's folder (a DiffusionGemma trained on the Python
    standard library; see its README.md), shipped as package data."""
    path = ASSETS / "default"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: the embedded model is missing from this install; reinstall "
            "mlx-diffgem or pass a model path"
        )
    return path


def resolve(
    path_or_repo: str | Path,
    revision: str | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> Path:
    """A local checkpoint folder for a folder path or a Hugging Face repo id.

    An existing folder is returned as is. A string shaped like `org/name` goes through
    `huggingface_hub.snapshot_download`, which honours HF_HUB_OFFLINE and the local
    cache (`cache_dir` overrides the cache location, for tests).

    Raises:
        CheckpointError: one line naming the path or repo and what was expected.
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path_or_repo}: is a file; expected a checkpoint folder"
        )
    name = str(path_or_repo)
    if not _REPO_ID.fullmatch(name) or ".." in name:
        raise CheckpointError(f"{name}: no such folder or repo id")
    return _download(name, revision, cache_dir)


def _download(repo: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub

    # Order matters: these error classes subclass each other.
    try:
        folder = snapshot_download(
            repo, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS
        )
    except hub.LocalEntryNotFoundError:
        if constants.is_offline_mode():
            msg = "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
        else:
            msg = "not in the local Hugging Face cache, and the Hub cannot be reached"
        raise CheckpointError(f"{repo}: {msg}") from None
    except hub.RevisionNotFoundError:
        raise CheckpointError(f"{repo}: revision {revision!r} not found") from None
    except hub.GatedRepoError:
        raise CheckpointError(
            f"{repo}: gated repo; accept its terms on huggingface.co and log in"
        ) from None
    except hub.RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo}: no such folder, and no such (public) repo on the Hugging Face Hub"
        ) from None
    except hub.HFValidationError as e:
        first_line = str(e).splitlines()[0]
        raise CheckpointError(f"{repo}: not a valid repo id ({first_line})") from None
    except hub.HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{repo}: download failed ({first_line})") from None
    return Path(folder)


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shard index's files, else one file.

    Raises:
        CheckpointError: no weights, a corrupt index, or a shard the index names is
            missing.
    """
    folder = Path(folder)
    index = folder / _INDEX
    if index.is_file():
        return _shards(index)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{folder}: no weights; expected model.safetensors or "
        "model.safetensors.index.json"
    )


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f"{index}: not a shard index; expected a JSON object with a 'weight_map'"
        ) from None
    if not names:
        raise CheckpointError(f"{index}: weight_map lists no shard files")
    files = [index.parent / n for n in names]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index}: shard file {f.name} is missing")
    return files


def read_shapes(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape), from the file headers only."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    seen_in: dict[str, Path] = {}
    for f in files:
        for name, entry in _read_header(Path(f)).items():
            if name in seen_in:
                raise CheckpointError(
                    f"{f}: tensor {name} also appears in {seen_in[name].name}"
                )
            seen_in[name] = Path(f)
            out[name] = entry
    return out


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header (without `__metadata__`) and the offset its
    data starts at; a one-line CheckpointError when the file is not one."""
    # Format: 8-byte little-endian header length, then a JSON header; data follows.
    bad = CheckpointError(f"{path}: not a safetensors file (unreadable header)")
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > path.stat().st_size:
                raise bad
            header = json.loads(fh.read(n))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    header, _ = safetensors_header(path)
    try:
        return {
            k: (str(v["dtype"]), tuple(int(d) for d in v["shape"]))
            for k, v in header.items()
        }
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path}: not a safetensors file (unreadable header)"
        ) from None


# --------------------------------------------------------------------------------------
# Names and shapes
# --------------------------------------------------------------------------------------


def hf_to_internal(name: str) -> str | None:
    """Internal tensor name for a checkpoint name, or None for dropped (vision) tensors.

    Internal names are the decoder names without the `model.decoder.` prefix, plus
    `layers.{i}.encoder_layer_scalar`; the MLX layout's `experts.*_proj.weight` maps
    to the same name as the bare HF tensor. Unknown names come back unchanged so that
    the shape check can report them as unexpected.
    """
    if name.startswith("model.decoder."):
        name = name[len("model.decoder.") :]
        m = _MLX_EXPERT_WEIGHT.fullmatch(name)
        return m[1] if m else name
    m = _ENCODER_SCALAR.fullmatch(name)
    if m:
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    if name.startswith(_DROPPED_PREFIXES):
        return None
    return name


def internal_to_hf(name: str) -> str:
    """The checkpoint name of an internal name (inverse of `hf_to_internal`)."""
    m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    return "model.decoder." + name


def expected_shapes(cfg: ModelConfig) -> Shapes:
    """Every text tensor (internal names) with its shape, as in spec §2.1."""
    H, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    out: Shapes = {
        "embed_tokens.weight": (V, H),
        "norm.weight": (H,),
        "self_conditioning.pre_norm.weight": (H,),
        "self_conditioning.gate_proj.weight": (I, H),
        "self_conditioning.up_proj.weight": (I, H),
        "self_conditioning.down_proj.weight": (H, I),
    }
    for i in range(cfg.num_hidden_layers):
        out.update(_layer_shapes(cfg, i))
    return out


_LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "post_feedforward_layernorm_1",
    "pre_feedforward_layernorm_2",
    "post_feedforward_layernorm_2",
)


def _layer_shapes(cfg: ModelConfig, i: int) -> Shapes:
    H, I = cfg.hidden_size, cfg.intermediate_size
    E, Ie = cfg.num_experts, cfg.moe_intermediate_size
    D, kv, nh = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_attention_heads
    p = f"layers.{i}."
    out: Shapes = {f"{p}{n}.weight": (H,) for n in _LAYER_NORMS}
    out[p + "layer_scalar"] = (1,)
    out[p + "encoder_layer_scalar"] = (1,)
    proj = {"q_proj": (nh * D, H), "k_proj": (kv * D, H)}
    if not cfg.is_full(i):  # full layers derive V from k_proj (k == v)
        proj["v_proj"] = (kv * D, H)
    proj["o_proj"] = (H, nh * D)
    for n, shape in proj.items():
        out[f"{p}self_attn.{n}.weight"] = shape
        if cfg.attention_bias:
            out[f"{p}self_attn.{n}.bias"] = shape[:1]
    out[p + "self_attn.q_norm.weight"] = (D,)
    out[p + "self_attn.k_norm.weight"] = (D,)
    out[p + "mlp.gate_proj.weight"] = (I, H)
    out[p + "mlp.up_proj.weight"] = (I, H)
    out[p + "mlp.down_proj.weight"] = (H, I)
    out[p + "router.proj.weight"] = (E, H)
    out[p + "router.scale"] = (H,)
    out[p + "router.per_expert_scale"] = (E,)
    out[p + "experts.gate_up_proj"] = (E, 2 * Ie, H)
    out[p + "experts.down_proj"] = (E, H, Ie)
    return out


def check_shapes(found: Shapes, cfg: ModelConfig, source: str) -> None:
    """Compare `found` (internal names -> shapes) with what `cfg` needs.

    With `cfg.quantization` set, `.scales`/`.biases` side tensors are skipped and the
    last dim of matrices is not compared (it is packed). Without it, side tensors are
    reported as unexpected: the config then does not describe the checkpoint.

    Raises:
        CheckpointError: one line naming the first missing, unexpected and mis-shaped
            tensors, each with the count of the others.
    """
    want = expected_shapes(cfg)
    quantized = bool(cfg.quantization)
    names = [n for n in found if not (quantized and n.endswith(_QUANT_SIDE_SUFFIXES))]
    missing = [n for n in want if n not in found]
    unexpected = [n for n in names if n not in want]
    wrong = [
        f"{n} has shape {_fmt(found[n])}, expected {_fmt(want[n])}"
        for n in want
        if n in found and not _shape_ok(found[n], want[n], quantized)
    ]
    problems = [
        _first("missing tensor ", missing),
        _first("unexpected tensor ", unexpected),
        _first("", wrong),
    ]
    problems = [p for p in problems if p]
    if not quantized and any(n.endswith(_QUANT_SIDE_SUFFIXES) for n in unexpected):
        problems.append("quantized weights but no 'quantization' in config.json?")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _shape_ok(got: tuple[int, ...], want: tuple[int, ...], quantized: bool) -> bool:
    if quantized and len(want) >= 2:  # packed: the last dim depends on the bit width
        return len(got) == len(want) and got[:-1] == want[:-1]
    return tuple(got) == tuple(want)


def _fmt(shape: tuple[int, ...]) -> str:
    return str(tuple(int(d) for d in shape))


def _first(prefix: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return prefix + items[0] + more


def check_checkpoint(
    folder: str | Path, cfg: ModelConfig
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a folder's weights against `cfg` from the headers alone.

    Returns:
        internal name -> (safetensors dtype, shape), vision tensors dropped.
    """
    files = weight_files(folder)
    source = str(files[0] if len(files) == 1 else files[0].parent / _INDEX)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in read_shapes(files).items():
        internal = hf_to_internal(name)
        if internal in found:  # e.g. both `model.decoder.x` and `x`
            raise CheckpointError(f"{source}: tensor {internal} is stored twice")
        if internal is not None:
            found[internal] = entry
    check_shapes({k: v[1] for k, v in found.items()}, cfg, source)
    check_dtypes(found, source)
    return found


FLOAT_DTYPES = ("F32", "F16", "BF16")
# MLX quantization packs a weight into uint32 words next to its float `.scales`.
_PACKED_DTYPES = ("U32",)


def check_dtypes(found: dict[str, tuple[str, tuple[int, ...]]], source: str) -> None:
    """Every tensor must be float (an int or bool norm weight would load and silently
    change the output); packed quantized weights (with `.scales`) are uint32."""
    for name, (dtype, _) in found.items():
        packed = _scales_name(name) in found
        allowed = _PACKED_DTYPES + FLOAT_DTYPES if packed else FLOAT_DTYPES
        if dtype not in allowed:
            raise CheckpointError(
                f"{source}: tensor {name} has dtype {dtype}; expected one of "
                f"{', '.join(allowed)}"
            )


def _scales_name(name: str) -> str:
    return name.removesuffix(".weight") + ".scales"


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def load_config(folder: str | Path) -> ModelConfig:
    """The folder's config.json as a ModelConfig (ConfigError names the file)."""
    return ModelConfig.from_file(Path(folder) / "config.json")


def load_generation_config(
    folder: str | Path, model_cfg: ModelConfig | None = None
) -> GenerationConfig:
    """The folder's generation_config.json, validated.

    Without that file this returns the defaults with eos/pad/bos taken from the model
    config (`model_cfg`, else the folder's config.json). The reference differs here: a
    model without generation_config.json has no eos and no pad, so it never stops early
    and never pads; we follow what a user of mlx-lm or vLLM expects instead.
    """
    path = Path(folder) / "generation_config.json"
    cfg = model_cfg if model_cfg is not None else load_config(folder)
    if path.is_file():
        gen = GenerationConfig.from_file(path)
        gen.check_vocab(cfg.vocab_size, str(path))  # ids inside the model's vocab
        return gen
    return GenerationConfig(
        eos_token_id=cfg.eos_ids,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
    )

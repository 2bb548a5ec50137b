"""Model and generation configuration, parsed and validated as transformers 5.23.0 does.

`ModelConfig` flattens the release `config.json` (a `diffusion_gemma` top level with a
nested `text_config`, or a bare `diffusion_gemma_text`) and resolves the per-layer
head dims, KV heads and RoPE frequencies once, so that backends never re-derive them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"

DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1e6,
    },
}

MODEL_TYPES = ("diffusion_gemma", "diffusion_gemma_text")


@dataclass
class ModelConfig:
    """The text model of DiffusionGemma (vision is out of scope)."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    use_bidirectional_attention: str | None = None
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    final_logit_softcapping: float = 30.0
    canvas_length: int = 256
    # {layer_idx: {"head_dim": .., "num_key_value_heads": ..}} for the overridden layers
    per_layer_config: dict[int, dict[str, int]] = field(default_factory=dict)
    # MLX quantization as written by `diffgem convert` / mlx-vlm: {"group_size", "bits",
    # "mode", and per-module overrides keyed by path}
    quantization: dict | None = None
    model_type: str = "diffusion_gemma"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse_model_config(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json(path), str(path))

    # -- per-layer views -------------------------------------------------------------
    def is_full(self, i: int) -> bool:
        return self.layer_types[i] == FULL

    def layer_head_dim(self, i: int) -> int:
        return self.per_layer_config.get(i, {}).get("head_dim", self.head_dim)

    def layer_kv_heads(self, i: int) -> int:
        override = self.per_layer_config.get(i, {})
        return override.get("num_key_value_heads", self.num_key_value_heads)

    def rope_inv_freq(self, i: int) -> np.ndarray:
        """Inverse RoPE frequencies of layer i, [head_dim // 2] (zeros: unrotated)."""
        return rope_inv_freq(
            self.rope_parameters[self.layer_types[i]], self.layer_head_dim(i)
        )

    @property
    def eos_ids(self) -> list[int]:
        return _as_id_list(self.eos_token_id)

    def to_text_dict(self) -> dict[str, Any]:
        """The release-style `text_config` dict (per_layer_config keys zero-padded)."""
        d = dataclasses.asdict(self)
        for k in (
            "canvas_length",
            "quantization",
            "model_type",
            "final_logit_softcapping",
        ):
            d.pop(k)
        width = len(str(self.num_hidden_layers - 1))
        d["per_layer_config"] = {
            str(i).zfill(width): v for i, v in sorted(self.per_layer_config.items())
        }
        d["model_type"] = "diffusion_gemma_text"
        return d


def rope_inv_freq(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """RoPE frequencies as transformers computes them (spec §3.1).

    `proportional` rotates int(p * D // 2) pairs with exponent denominator D (the full
    head dim) and leaves the remaining pairs unrotated (frequency 0).
    """
    kind = params.get("rope_type", "default")
    theta = float(params["rope_theta"])
    factor = float(params.get("partial_rotary_factor", 1.0))
    if kind == "default":
        if factor != 1.0:
            raise ConfigError(
                "rope_parameters: partial_rotary_factor with rope_type 'default' "
                "is not "
                "supported; expected 1.0"
            )
        exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        return (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
    if kind == "proportional":
        n_rot = int(factor * head_dim // 2)
        exps = np.arange(0, 2 * n_rot, 2, dtype=np.float32) / np.float32(head_dim)
        inv = 1.0 / (np.float32(theta) ** exps)
        inv = np.concatenate([inv, np.zeros(head_dim // 2 - n_rot, np.float32)])
        return (inv / np.float32(params.get("factor", 1.0))).astype(np.float32)
    raise ConfigError(
        f"rope_parameters: unsupported rope_type {kind!r}; expected 'default' or "
        "'proportional'"
    )


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


_REQUIRED_MOE = ("num_experts", "top_k_experts", "moe_intermediate_size")


def _parse_model_config(raw: dict[str, Any], source: str) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not DiffusionGemma; "
            "expected one of "
            f"{', '.join(MODEL_TYPES)}"
        )
    text = raw.get("text_config", raw) if model_type == "diffusion_gemma" else raw
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: text_config must be an object")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in text.items() if k in names and k != "per_layer_config"}
    kw["model_type"] = model_type
    if model_type == "diffusion_gemma":
        kw["canvas_length"] = raw.get("canvas_length", 256)
    kw["quantization"] = raw.get("quantization", raw.get("quantization_config"))
    cfg = ModelConfig(**kw)
    for key in _REQUIRED_MOE:
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) <= 0:
            raise ConfigError(f"{source}: {key} must be a positive integer")
    if cfg.top_k_experts > cfg.num_experts:
        raise ConfigError(f"{source}: top_k_experts must be <= num_experts")
    if cfg.use_bidirectional_attention == "all":
        raise ConfigError(
            f"{source}: use_bidirectional_attention='all' (bidirectional "
            "encoder) is not "
            "supported; expected None or 'vision'"
        )
    _resolve_layers(cfg, text, source)
    return cfg


def _resolve_layers(cfg: ModelConfig, text: dict[str, Any], source: str) -> None:
    n = cfg.num_hidden_layers
    if cfg.layer_types is None:
        cfg.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    cfg.layer_types = list(cfg.layer_types)
    if len(cfg.layer_types) != n or set(cfg.layer_types) - {SLIDING, FULL}:
        raise ConfigError(
            f"{source}: layer_types must list {n} entries of {SLIDING!r}/{FULL!r}"
        )
    cfg.layer_types[-1] = FULL  # the reference forces the last layer to full attention
    rope = dict(DEFAULT_ROPE if cfg.rope_parameters is None else cfg.rope_parameters)
    for kind in set(cfg.layer_types):
        if not isinstance(rope.get(kind), dict) or "rope_theta" not in rope[kind]:
            raise ConfigError(f"{source}: rope_parameters[{kind!r}] needs a rope_theta")
    cfg.rope_parameters = rope
    cfg.per_layer_config = _per_layer_overrides(cfg, text, source)
    for i in range(n):
        if cfg.num_attention_heads % cfg.layer_kv_heads(i):
            raise ConfigError(
                f"{source}: num_attention_heads must be a multiple of the KV heads of "
                f"layer {i}"
            )
        cfg.rope_inv_freq(i)  # validates the rope type early


def _per_layer_overrides(
    cfg: ModelConfig, text: dict[str, Any], source: str
) -> dict[int, dict[str, int]]:
    if "per_layer_config" in text:
        explicit = text["per_layer_config"] or {}
        if not isinstance(explicit, dict):
            raise ConfigError(f"{source}: per_layer_config must be an object")
        try:
            out = {int(k): dict(v) for k, v in explicit.items()}
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source}: per_layer_config keys must be layer indices"
            ) from None
    else:
        override = {"head_dim": int(text.get("global_head_dim", 512))}
        kv = text.get("num_global_key_value_heads")
        # Trap (spec §1.1): attention_k_eq_v=false drops the KV-head override.
        if kv is not None and text.get("attention_k_eq_v", True):
            override["num_key_value_heads"] = int(kv)
        out = {i: dict(override) for i, t in enumerate(cfg.layer_types) if t == FULL}
    for i, o in out.items():
        if not 0 <= i < cfg.num_hidden_layers:
            raise ConfigError(f"{source}: per_layer_config has unknown layer {i}")
        if o.get("head_dim") == cfg.head_dim:
            o.pop("head_dim")
        if o.get("num_key_value_heads") == cfg.num_key_value_heads:
            o.pop("num_key_value_heads")
    return {i: o for i, o in out.items() if o}


# --------------------------------------------------------------------------------------
# Generation config
# --------------------------------------------------------------------------------------

# The released generation_config.json's sampler settings (spec §1.4), without the
# tokenizer-specific eos/pad ids.
RELEASE_GENERATION = {
    "max_denoising_steps": 48,
    "max_new_tokens": 256,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_max": 0.8,
    "t_min": 0.4,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}

# Settings that only make sense for autoregressive decoding: the reference raises.
AR_ONLY = (
    "do_sample",
    "num_beams",
    "num_beam_groups",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "penalty_alpha",
    "diversity_penalty",
)


@dataclass
class GenerationConfig:
    """`DiffusionGemmaGenerationConfig` with `generate`'s global defaults applied."""

    max_new_tokens: int = 256
    max_length: int | None = None
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source: str = "generation_config"
    ) -> GenerationConfig:
        return cls().update(source=source, **raw)

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationConfig:
        return cls.from_dict(read_json(path), str(path))

    def update(self, source: str = "argument", **overrides: Any) -> GenerationConfig:
        """A validated copy with `overrides` (generate kwargs, config file keys)."""
        kw = dataclasses.asdict(self)
        for key, value in overrides.items():
            if key in _IGNORED_KEYS:
                continue
            if key in AR_ONLY:
                raise ValueError(
                    f"{source}: {key!r} applies to autoregressive decoding and is not "
                    "supported by diffusion decoding"
                )
            if key == "sampler_config":
                kw["entropy_bound"] = _entropy_bound(value, source)
            elif key == "eos_token_id":
                kw[key] = _as_id_list(value)
            elif key in kw:
                if value is not None or key in _NULLABLE:
                    kw[key] = value
            else:
                raise ValueError(f"{source}: unknown generation option {key!r}")
        cfg = GenerationConfig(**kw)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "generation_config") -> None:
        def bad(key: str, want: str) -> ValueError:
            return ValueError(
                f"{source}: {key} must be {want}, got {getattr(self, key)!r}"
            )

        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise bad("max_new_tokens", "a positive integer")
        if self.max_length is not None and (
            not _is_int(self.max_length) or self.max_length <= 0
        ):
            raise bad("max_length", "a positive integer or None")
        if not _is_int(self.max_denoising_steps) or self.max_denoising_steps <= 0:
            raise bad("max_denoising_steps", "a positive integer")
        if not isinstance(self.entropy_bound, float) or self.entropy_bound <= 0:
            raise bad("entropy_bound", "a float > 0")
        for key in ("t_min", "t_max"):
            if (
                not isinstance(getattr(self, key), (int, float))
                or getattr(self, key) < 0
            ):
                raise bad(key, "a number >= 0")
        if not self.t_max > self.t_min:
            raise ValueError(
                f"{source}: t_max must be > t_min, got {self.t_max} <= {self.t_min}"
            )
        if not _is_int(self.stability_threshold) or self.stability_threshold < 0:
            raise bad("stability_threshold", "an integer >= 0")
        if (
            not isinstance(self.confidence_threshold, float)
            or self.confidence_threshold <= 0
        ):
            raise bad("confidence_threshold", "a float > 0")

    def num_canvases(self, canvas_length: int, cur_len: int) -> int:
        """Canvases to generate: whole canvases covering the requested new tokens."""
        if self.max_length is not None and self.max_new_tokens == 256:
            max_new = self.max_length - cur_len
        else:
            max_new = self.max_new_tokens
        return max(0, math.ceil(max_new / canvas_length))


_NULLABLE = ("max_length", "pad_token_id", "bos_token_id")
# Keys the reference stores that do not change the sampler.
_IGNORED_KEYS = (
    "transformers_version",
    "_from_model_config",
    "return_dict_in_generate",
    "cache_implementation",
    "cache_config",
    "disable_compile",
    "output_scores",
    "output_logits",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entropy_bound(value: Any, source: str) -> float:
    if isinstance(value, dict):
        name = value.get("_cls_name", "EntropyBoundSamplerConfig")
        if name != "EntropyBoundSamplerConfig":
            raise ValueError(
                f"{source}: sampler_config {name!r} is not supported; expected "
                "EntropyBoundSamplerConfig"
            )
        unknown = set(value) - {"_cls_name", "entropy_bound"}
        if unknown:
            raise ValueError(
                f"{source}: unknown sampler_config key {sorted(unknown)[0]!r}"
            )
        return value.get("entropy_bound", 0.1)
    if value is None:
        return 0.1
    raise ValueError(f"{source}: sampler_config must be an object with entropy_bound")

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

from . import validate as V
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


# The schema of the text config: every field the loader reads, with its rule. Fields
# the reference does not read (final_logit_softcapping is a class constant there) are
# not read here either.
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)
_REQUIRED = ("num_experts", "top_k_experts", "moe_intermediate_size")
_ACTIVATIONS = ("gelu_pytorch_tanh",)
_NOT_READ = ("final_logit_softcapping",)


def _parse_model_config(raw: dict[str, Any], source: str) -> ModelConfig:
    """Validate config.json against the schema, then build the ModelConfig.

    The schema is the ModelConfig dataclass plus the checks below (dataclasses with
    validators: pydantic would be a new dependency of the core for ~40 rules, and its
    messages are multi-line).
    """
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not DiffusionGemma; "
            "expected one of "
            f"{', '.join(MODEL_TYPES)}"
        )
    text = raw.get("text_config", raw) if model_type == "diffusion_gemma" else raw
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: text_config must be an object, got {text!r}")
    names = {f.name for f in dataclasses.fields(ModelConfig)} - set(_NOT_READ)
    kw = {k: v for k, v in text.items() if k in names and k != "per_layer_config"}
    kw["model_type"] = model_type
    if model_type == "diffusion_gemma":
        kw["canvas_length"] = raw.get("canvas_length", 256)
        _check_tied(raw.get("tie_word_embeddings", True), source)
    kw["quantization"] = raw.get("quantization", raw.get("quantization_config"))
    cfg = ModelConfig(**kw)
    _check_fields(cfg, source)
    if cfg.top_k_experts > cfg.num_experts:
        raise ConfigError(
            f"{source}: top_k_experts must be <= num_experts ({cfg.num_experts}), "
            f"got {cfg.top_k_experts}"
        )
    if cfg.use_bidirectional_attention == "all":
        raise ConfigError(
            f"{source}: use_bidirectional_attention='all' (bidirectional "
            "encoder) is not "
            "supported; expected None or 'vision'"
        )
    _resolve_layers(cfg, text, source)
    return cfg


def _check_tied(value: Any, source: str) -> None:
    # Every backend ties the output head to the embedding, as the release does.
    if value is not True:
        raise ConfigError(
            f"{source}: tie_word_embeddings must be true (untied output heads are "
            f"not supported), got {value!r}"
        )


def _check_fields(cfg: ModelConfig, source: str) -> None:
    """Type and range of each field (one line naming file, key, value, expectation)."""

    def fail(key: str, want: str) -> ConfigError:
        value = getattr(cfg, key)
        return ConfigError(f"{source}: {key} must be {want}, got {value!r}")

    for key in ("canvas_length", *_POSITIVE_INTS):
        V.integer(getattr(cfg, key), key, lo=1, source=source, error=ConfigError)
    cfg.rms_norm_eps = V.number(
        cfg.rms_norm_eps, "rms_norm_eps", lo=0, source=source, error=ConfigError
    )
    if cfg.head_dim % 2:
        raise fail("head_dim", "even (RoPE rotates pairs)")
    if not isinstance(cfg.attention_bias, bool):
        raise fail("attention_bias", "true or false")
    _check_tied(cfg.tie_word_embeddings, source)
    if cfg.hidden_activation not in _ACTIVATIONS:
        raise fail("hidden_activation", f"one of {list(_ACTIVATIONS)}")
    if cfg.use_bidirectional_attention not in (None, "vision", "all"):
        raise fail("use_bidirectional_attention", "null or 'vision'")
    if cfg.layer_types is not None and not isinstance(cfg.layer_types, list):
        raise fail("layer_types", "a list of layer types")
    if cfg.rope_parameters is not None and not isinstance(cfg.rope_parameters, dict):
        raise fail("rope_parameters", "an object keyed by layer type")
    for key in ("pad_token_id", "bos_token_id"):
        if getattr(cfg, key) is not None:
            V.token_id(
                getattr(cfg, key), key, cfg.vocab_size, source=source, error=ConfigError
            )
    V.token_ids(
        cfg.eos_token_id,
        "eos_token_id",
        cfg.vocab_size,
        source=source,
        error=ConfigError,
    )


def _resolve_layers(cfg: ModelConfig, text: dict[str, Any], source: str) -> None:
    n = cfg.num_hidden_layers
    if cfg.layer_types is None:
        cfg.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    cfg.layer_types = list(cfg.layer_types)
    if len(cfg.layer_types) != n or not all(
        t in (SLIDING, FULL) for t in cfg.layer_types
    ):
        raise ConfigError(
            f"{source}: layer_types must list {n} entries of {SLIDING!r}/{FULL!r}, "
            f"got {cfg.layer_types!r}"
        )
    cfg.layer_types[-1] = FULL  # the reference forces the last layer to full attention
    rope = dict(DEFAULT_ROPE if cfg.rope_parameters is None else cfg.rope_parameters)
    for kind in set(cfg.layer_types):
        if not isinstance(rope.get(kind), dict) or "rope_theta" not in rope[kind]:
            raise ConfigError(f"{source}: rope_parameters[{kind!r}] needs a rope_theta")
        _check_rope(rope[kind], f"rope_parameters[{kind!r}]", source)
    cfg.rope_parameters = rope
    cfg.per_layer_config = _per_layer_overrides(cfg, text, source)
    for i in range(n):
        kv = cfg.layer_kv_heads(i)
        if cfg.num_attention_heads % kv:
            raise ConfigError(
                f"{source}: num_attention_heads ({cfg.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads of layer {i} ({kv})"
            )
        if cfg.layer_head_dim(i) % 2:
            raise ConfigError(
                f"{source}: head_dim of layer {i} must be even (RoPE rotates pairs), "
                f"got {cfg.layer_head_dim(i)}"
            )
        try:
            cfg.rope_inv_freq(i)  # validates the rope type early
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


_ROPE_TYPES = ("default", "proportional")


def _check_rope(params: dict[str, Any], name: str, source: str) -> None:
    """rope_theta > 0, partial_rotary_factor in (0, 1], factor > 0, a known type."""
    kind = params.get("rope_type", "default")
    if kind not in _ROPE_TYPES:
        raise ConfigError(
            f"{source}: {name}: unsupported rope_type {kind!r}; expected one of "
            f"{list(_ROPE_TYPES)}"
        )
    for key, hi in (("rope_theta", None), ("partial_rotary_factor", 1.0)):
        if key in params:
            V.number(
                params[key],
                f"{name}.{key}",
                lo=0,
                lo_open=True,
                hi=hi,
                source=source,
                error=ConfigError,
            )
    if "factor" in params:
        V.number(
            params["factor"],
            f"{name}.factor",
            lo=0,
            lo_open=True,
            source=source,
            error=ConfigError,
        )


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
                f"{source}: per_layer_config must map layer indices to objects, "
                f"got {explicit!r}"
            ) from None
    else:
        head_dim = text.get("global_head_dim", 512)
        override = {"head_dim": _pos_int(head_dim, "global_head_dim", source)}
        kv = text.get("num_global_key_value_heads")
        # Trap (spec §1.1): attention_k_eq_v=false drops the KV-head override.
        if kv is not None and text.get("attention_k_eq_v", True):
            kv = _pos_int(kv, "num_global_key_value_heads", source)
            override["num_key_value_heads"] = kv
        out = {i: dict(override) for i, t in enumerate(cfg.layer_types) if t == FULL}
    for i, o in out.items():
        if not 0 <= i < cfg.num_hidden_layers:
            raise ConfigError(f"{source}: per_layer_config has unknown layer {i}")
        for key in o:
            if key not in ("head_dim", "num_key_value_heads"):
                raise ConfigError(
                    f"{source}: per_layer_config[{i}] has unknown key {key!r}; "
                    "expected head_dim or num_key_value_heads"
                )
            _pos_int(o[key], f"per_layer_config[{i}].{key}", source)
        if o.get("head_dim") == cfg.head_dim:
            o.pop("head_dim")
        if o.get("num_key_value_heads") == cfg.num_key_value_heads:
            o.pop("num_key_value_heads")
    return {i: o for i, o in out.items() if o}


def _pos_int(value: Any, key: str, source: str) -> int:
    return V.integer(value, key, lo=1, source=source, error=ConfigError)


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


# Documented upper bounds of the call options (the reference has none): past them a
# typo would run for hours or allocate a [stability_threshold, B, C] history.
MAX_NEW_TOKENS = 1 << 20
MAX_DENOISING_STEPS = 10_000
# t_max - t_min below this underflows the float32 schedule (T -> 0, logits -> inf).
MIN_TEMPERATURE_GAP = 1e-6


# The denoising loop's settings (not lengths or token ids): what a CLI flag, an API
# request or a benchmark record names when it talks about "the sampler".
SAMPLER_KEYS = (
    "t_min",
    "t_max",
    "entropy_bound",
    "max_denoising_steps",
    "stability_threshold",
    "confidence_threshold",
)


@dataclass
class GenerationConfig:
    """`DiffusionGemmaGenerationConfig` with `generate`'s global defaults applied.

    One schema for generation_config.json and the options of a call: `update`
    validates every key (unknown and autoregressive-only keys raise, as in the
    reference). Deviations from the reference, all towards accepting what a user
    means or refusing what cannot work: numpy scalars are accepted, an int is
    accepted for a float option (the reference refuses `entropy_bound: 1`), NaN and
    infinities are refused, `t_max - t_min >= 1e-6`, `max_new_tokens` and
    `max_length` <= MAX_NEW_TOKENS (2**20), `max_denoising_steps` <=
    MAX_DENOISING_STEPS (10,000), `stability_threshold` <= `max_denoising_steps`,
    and token ids must lie inside the vocabulary (`check_vocab`).
    """

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
        """A validated copy with `overrides` (generate kwargs, config file keys).

        A None value keeps the current setting, except for the nullable keys
        (max_length, pad_token_id, bos_token_id, eos_token_id) where it clears it.
        """
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
            elif key not in kw:
                raise ValueError(f"{source}: unknown generation option {key!r}")
            elif value is not None or key in _NULLABLE:
                kw[key] = value
        return GenerationConfig(**_checked(kw, source))

    def validate(self, source: str = "generation_config") -> None:
        """Raise a one-line ValueError naming the first invalid field."""
        _checked(dataclasses.asdict(self), source)

    def check_vocab(self, vocab_size: int, source: str = "generate") -> None:
        """The eos/pad/bos ids must be token ids of a model with `vocab_size`."""
        for key in ("pad_token_id", "bos_token_id"):
            value = getattr(self, key)
            if value is not None:
                V.token_id(value, key, vocab_size, source=source)
        V.token_ids(self.eos_token_id, "eos_token_id", vocab_size, source=source)

    def num_canvases(self, canvas_length: int, cur_len: int) -> int:
        """Canvases to generate: whole canvases covering the requested new tokens."""
        if self.max_length is not None and self.max_new_tokens == 256:
            max_new = self.max_length - cur_len
        else:
            max_new = self.max_new_tokens
        return max(0, math.ceil(max_new / canvas_length))


def _checked(kw: dict[str, Any], source: str) -> dict[str, Any]:
    """The fields of a GenerationConfig, type- and range-checked and normalized."""
    out = dict(kw)
    for key in ("max_new_tokens", "max_length"):
        if out[key] is not None or key == "max_new_tokens":
            out[key] = V.integer(out[key], key, lo=1, hi=MAX_NEW_TOKENS, source=source)
    out["max_denoising_steps"] = V.integer(
        out["max_denoising_steps"],
        "max_denoising_steps",
        lo=1,
        hi=MAX_DENOISING_STEPS,
        source=source,
    )
    for key in ("entropy_bound", "confidence_threshold"):
        out[key] = V.number(out[key], key, lo=0, lo_open=True, source=source)
    for key in ("t_min", "t_max"):
        out[key] = V.number(out[key], key, lo=0, source=source)
    if not out["t_max"] - out["t_min"] >= MIN_TEMPERATURE_GAP:
        raise ValueError(
            f"{source}: t_max must be > t_min (by at least {MIN_TEMPERATURE_GAP}), "
            f"got t_max={out['t_max']} <= t_min={out['t_min']}"
        )
    steps = out["max_denoising_steps"]
    out["stability_threshold"] = V.integer(
        out["stability_threshold"], "stability_threshold", lo=0, source=source
    )
    if out["stability_threshold"] > steps:
        raise ValueError(
            f"{source}: stability_threshold must be <= max_denoising_steps ({steps}), "
            f"got {out['stability_threshold']}"
        )
    for key in ("pad_token_id", "bos_token_id"):
        if out[key] is not None:
            out[key] = V.token_id(out[key], key, None, source=source)
    out["eos_token_id"] = V.token_ids(
        out["eos_token_id"], "eos_token_id", None, source=source
    )
    return out


_NULLABLE = ("max_length", "pad_token_id", "bos_token_id", "eos_token_id")
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

"""Hostile-but-realistic inputs for the validation fuzzers (tests/test_fuzz.py).

Each case carries its own expectation, computed by a small oracle written from the
documented rules (not from the code under test): a valid case must be accepted, an
invalid one must raise a one-line ValueError that names the option, key or file.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The tiny test checkpoint's limits (core/tiny.py): vocab 128, generation defaults.
VOCAB = 128
DEFAULTS = {"max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8, "stability": 1}
MAX_NEW_TOKENS = 1 << 20
MAX_STEPS = 10_000
NAN, INF = float("nan"), float("inf")

# option -> [(value, valid?)]; cross-field rules are applied by `_cross`.
# fmt: off
OPTION_POOL: dict[str, list[tuple[Any, bool]]] = {
    "max_new_tokens": [
        (8, True), (1, True), (np.int64(16), True), (None, True), (0, False),
        (-3, False), (2.5, False), (True, False), ("8", False), (10**9, False),
    ],
    "max_denoising_steps": [
        (4, True), (2, True), (np.int32(3), True), (0, False), (-1, False),
        (10**9, False), (3.0, False), (False, False), (NAN, False),
    ],
    "t_min": [
        (0.0, True), (0.2, True), (np.float32(0.3), True), (0, True), (-0.1, False),
        (NAN, False), (INF, False), (True, False), ("0.4", False),
    ],
    "t_max": [
        (0.9, True), (1, True), (np.float64(0.95), True), (INF, False),
        (1e300, False), (NAN, False), (-1, False), (None, True),
    ],
    "entropy_bound": [
        (0.1, True), (1, True), (np.float32(0.2), True), (0, False), (-0.5, False),
        (NAN, False), (INF, False), (True, False), ("0.1", False),
    ],
    "confidence_threshold": [
        (0.005, True), (1, True), (np.float16(0.01), True), (0, False),
        (NAN, False), (INF, False), (-1, False), ([0.1], False),
    ],
    "stability_threshold": [
        (0, True), (1, True), (2, True), (np.int64(2), True), (-1, False),
        (10**9, False), (1.5, False), (True, False),
    ],
    "pad_token_id": [
        (0, True), (None, True), (5, True), (np.int64(3), True), (-5, False),
        (999999, False), (VOCAB, False), (1.0, False), (True, False),
    ],
    "eos_token_id": [
        (1, True), ([1, 5], True), ([], True), (np.int64(1), True), (-1, False),
        ([1, VOCAB], False), ("x", False), ([1.5], False), ([True], False),
    ],
    "max_length": [(None, True), (64, True), (0, False), (-1, False), (2.0, False)],
    "seed": [
        (0, True), (7, True), (-1, True), (2**64, True), (2**70 + 3, True),
        (np.uint64(2**64 - 1), True), (np.int64(-3), True), (None, True),
        (True, False), (1.5, False), ("3", False), (np.float32(2), False),
    ],
    "foo": [(1, False)],
    "top_p": [(0.9, False)],
    "temperature": [(0.7, False)],
}
# fmt: on


@dataclass
class OptionCase:
    opts: dict[str, Any]
    bad: list[str] = field(default_factory=list)  # options that make the case invalid

    @property
    def valid(self) -> bool:
        return not self.bad


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, (bool, np.bool_, str, list)):
        return None
    return float(v)


def _cross(opts: dict[str, Any]) -> list[str]:
    """Cross-field rules over the values that are valid on their own."""
    bad = []
    steps = _num(opts.get("max_denoising_steps")) or DEFAULTS["max_denoising_steps"]
    t_min = _num(opts.get("t_min"))
    t_max = _num(opts.get("t_max"))
    t_min = DEFAULTS["t_min"] if t_min is None else t_min
    t_max = DEFAULTS["t_max"] if t_max is None else t_max
    if not t_max - t_min >= 1e-6:
        bad.append("t_max")
    s = _num(opts.get("stability_threshold"))
    if s is not None and s > steps:
        bad.append("stability_threshold")
    return bad


def option_cases(n: int = 320, seed: int = 0) -> list[OptionCase]:
    """`n` option sets of 1-3 options each, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    keys = sorted(OPTION_POOL)
    cases = []
    for _ in range(n):
        chosen = rng.choice(keys, size=int(rng.integers(1, 4)), replace=False)
        opts, bad = {}, []
        for k in chosen:
            value, ok = OPTION_POOL[k][int(rng.integers(len(OPTION_POOL[k])))]
            opts[str(k)] = value
            if not ok:
                bad.append(str(k))
        if not bad:
            bad = _cross(opts)
        cases.append(OptionCase(opts, bad))
    return cases


# --------------------------------------------------------------------------------------
# Ids, masks, prompts
# --------------------------------------------------------------------------------------

# (prompt_ids, attention_mask, valid?, name the error must contain)
ID_CASES: list[tuple[Any, Any, bool, str]] = [
    ([2, 10, 11], None, True, ""),
    (np.array([[2, 10, 11]], np.int64), None, True, ""),
    ([[2, 10, 11], [2, 12, 13]], [[1, 1, 1], [0, 1, 1]], True, ""),
    ([[2, 10, 11], [2, 12]], None, False, "input_ids"),  # ragged
    ([2.7, 10.2], None, False, "input_ids"),
    (None, None, False, "input_ids"),
    ([], None, False, "input_ids"),
    ([[[2, 3]]], None, False, "input_ids"),
    ([2, VOCAB], None, False, "input_ids"),  # an id equal to vocab_size
    ([2, -1], None, False, "input_ids"),
    ([2, 2**70], None, False, "input_ids"),
    ([True, False], None, False, "input_ids"),
    (["a", "b"], None, False, "input_ids"),
    ([2, 10, 11], [1, 2, 1], False, "attention_mask"),
    ([2, 10, 11], [1, -1, 1], False, "attention_mask"),
    ([2, 10, 11], [1, 1], False, "attention_mask"),
    ([2, 10, 11], [0, 0, 0], False, "attention_mask"),
    ([2, 10, 11], [0.5, 1, 1], False, "attention_mask"),
    ([2, 10, 11], [[1, 1], [1]], False, "attention_mask"),
    ([2, 10, 11], [True, True, True], True, ""),
]


# --------------------------------------------------------------------------------------
# Corrupted checkpoints
# --------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One corruption of the tiny checkpoint: `where` is text | top | gen | tensor."""

    name: str
    where: str
    key: str
    value: Any
    valid: bool  # loads (and generates as the reference would) rather than raising


def _v(where: str, key: str, value: Any, valid: bool = False) -> Variant:
    return Variant(f"{where}:{key}={value!r}", where, key, value, valid)


CHECKPOINT_VARIANTS: list[Variant] = [
    *[_v("text", "hidden_size", v) for v in ("big", 128.0, None, 0, -32, True)],
    *[_v("text", "num_attention_heads", v) for v in ("4", 0, 3, -4)],
    *[_v("text", "num_key_value_heads", v) for v in (0, -2, 3, "2")],
    *[_v("text", "head_dim", v) for v in (-8, 0, 8.5)],
    *[_v("text", "vocab_size", v) for v in (-128, 0, "128", 2)],
    *[_v("text", "num_hidden_layers", v) for v in (0, -1, "4")],
    _v("text", "num_hidden_layers+no_layer_types", 0),
    *[_v("text", "intermediate_size", v) for v in (0, -48)],
    *[_v("text", "moe_intermediate_size", v) for v in (0, "16")],
    *[_v("text", "num_experts", v) for v in (0, 1.5)],
    *[_v("text", "top_k_experts", v) for v in (0, 5)],
    *[_v("text", "rms_norm_eps", v) for v in ("tiny", -1e-6, NAN)],
    *[_v("text", "sliding_window", v) for v in (0, -1, 8.5)],
    *[_v("text", "layer_types", v) for v in (["full_attention"], "sliding")],
    *[_v("text", "eos_token_id", v) for v in ("x", 999, [1, -1])],
    *[_v("text", "pad_token_id", v) for v in (-1, 128)],
    _v("text", "bos_token_id", 4096),
    _v("text", "attention_bias", "yes"),
    _v("text", "hidden_activation", "relu"),
    _v("text", "tie_word_embeddings", False),
    _v("text", "use_bidirectional_attention", "weird"),
    *[_v("text", "global_head_dim", v) for v in (0, "16")],
    _v("text", "num_global_key_value_heads", 0),
    _v("text", "rope_theta", "abc"),
    _v("text", "rope_theta", -1.0),
    _v("text", "partial_rotary_factor", 2.0),
    _v("text", "rope_type", "yarn"),
    _v("text", "per_layer_config", {"1": {"head_dim": -16}}),
    _v("text", "per_layer_config", {"1": "x"}),
    _v("text", "max_position_embeddings", 0),
    _v("text", "final_logit_softcapping", 0, valid=True),  # not read by the reference
    _v("text", "some_future_key", 1, valid=True),
    *[_v("top", "canvas_length", v) for v in (0, -64, "8", 2.0, None)],
    _v("top", "canvas_length", 16, valid=True),
    _v("top", "text_config", "x"),
    _v("top", "tie_word_embeddings", False),
    _v("gen", "foo", 1),
    _v("gen", "top_p", 0.9),
    _v("gen", "t_max", "0.8"),
    _v("gen", "t_max", 0.1),
    _v("gen", "entropy_bound", NAN),
    _v("gen", "pad_token_id", 999999),
    _v("gen", "pad_token_id", -5),
    _v("gen", "eos_token_id", [1, -5]),
    _v("gen", "max_new_tokens", 0),
    _v("gen", "stability_threshold", 10**9),
    _v("gen", "max_denoising_steps", 10**9),
    _v("gen", "sampler_config", {"_cls_name": "X"}),
    _v("gen", "confidence_threshold", INF),
    _v("gen", "transformers_version", "5.8.0", valid=True),
    _v("gen", "entropy_bound", 1, valid=True),
    *[_v("tensor", "norm.weight", d) for d in ("int32", "bool", "int8", "float64")],
    _v("tensor", "layers.0.input_layernorm.weight", "nan"),
    _v("tensor", "embed_tokens.weight", "inf"),
    _v("tensor", "norm.weight", "float16", valid=True),
]

_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "rope_type")


def write_variant(src: Path, dst: Path, v: Variant) -> Path:
    """A copy of checkpoint `src` at `dst` with corruption `v` applied."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    text = cfg["text_config"]
    if v.where == "text" and v.key in _ROPE_KEYS:
        text["rope_parameters"]["full_attention"][v.key] = v.value
    elif v.where == "text" and v.key == "num_hidden_layers+no_layer_types":
        text.pop("layer_types")
        text["num_hidden_layers"] = v.value
    elif v.where == "text":
        text[v.key] = v.value
    elif v.where == "top":
        cfg[v.key] = v.value
    elif v.where == "gen":
        gen = json.loads((dst / "generation_config.json").read_text())
        if v.key == "entropy_bound":
            gen["sampler_config"]["entropy_bound"] = v.value
        else:
            gen[v.key] = v.value
        (dst / "generation_config.json").write_text(json.dumps(gen))
    else:
        _corrupt_tensor(dst / "model.safetensors", "model.decoder." + v.key, v.value)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _corrupt_tensor(path: Path, name: str, how: str) -> None:
    from safetensors.numpy import load_file, save_file

    w = load_file(str(path))
    t = w[name]
    if how in ("nan", "inf"):
        t = t.copy()
        t.flat[3] = math.nan if how == "nan" else math.inf
    else:
        t = (t > 0) if how == "bool" else t.astype(how)
    w[name] = t
    save_file(w, str(path))


def names_key(message: str, *keys: str) -> bool:
    """A one-line message that names one of `keys`."""
    return "\n" not in message.strip() and any(k in message for k in keys)


# --------------------------------------------------------------------------------------
# Right-padded masks (issue 21): only left padding is supported, by name
# --------------------------------------------------------------------------------------

ID_CASES += [
    ([[2, 10, 11], [2, 12, 13]], [[1, 1, 1], [1, 1, 0]], False, "left padding"),
    ([[2, 10, 11], [2, 12, 13]], [[1, 0, 1], [1, 1, 1]], False, "left padding"),
    ([[2, 10, 11], [2, 12, 13]], [[0, 1, 0], [1, 1, 1]], False, "attention_mask"),
    ([[2, 10, 11], [2, 12, 13]], [[0, 0, 1], [0, 1, 1]], True, ""),
]


# --------------------------------------------------------------------------------------
# Drafter folders, `self:` strings and speculative options (issue 21)
# --------------------------------------------------------------------------------------


@dataclass
class DrafterVariant:
    """One change to a valid drafter folder: `where` is config | adapter | target
    (drafter_config.json, its "adapter" or "target" entry) or weights (the file:
    `value` names the damage). `key`: what the error must name ("" when valid)."""

    where: str
    field: str
    value: Any
    key: str = ""

    @property
    def valid(self) -> bool:
        return not self.key

    @property
    def name(self) -> str:
        return f"{self.where}:{self.field}={self.value!r}"


def _d(where: str, field: str, value: Any, key: str | None = None) -> DrafterVariant:
    return DrafterVariant(where, field, value, field if key is None else key)


_WEIGHTS = "drafter.safetensors"
_OTHER = "drafter made for a different model"
DRAFTER_VARIANTS: list[DrafterVariant] = [
    _d("adapter", "rope_theta", "abc", "adapter.rope_theta"),
    _d("adapter", "rope_theta", -1.0, "adapter.rope_theta"),
    _d("adapter", "rope_theta", NAN, "adapter.rope_theta"),
    _d("adapter", "rms_norm_eps", "tiny", "adapter.rms_norm_eps"),
    _d("adapter", "rms_norm_eps", -1.0, "adapter.rms_norm_eps"),
    _d("adapter", "intermediate_size", "24", "adapter.intermediate_size"),
    _d("adapter", "intermediate_size", 10**12, _WEIGHTS),  # shapes: no allocation
    _d("adapter", "num_layers", 10**9, _WEIGHTS),
    _d("adapter", "head_dim", 0, "adapter.head_dim"),
    _d("adapter", "head_dim", 3, "adapter.head_dim"),
    _d("adapter", "num_heads", 0, "adapter.num_heads"),
    _d("adapter", "num_heads", 2.0, "adapter.num_heads"),
    _d("adapter", "depth", 2, "depth"),
    _d("adapter", "rope_theta", 10000, ""),  # an int where a float is meant
    _d("config", "top_k", "1"),
    _d("config", "top_k", 0),
    _d("config", "head_vocab", 64.5),
    _d("config", "head_vocab", 10**6, "head_vocab"),
    _d("config", "target_layers", [0.5, 1.7]),
    _d("config", "target_layers", []),
    _d("config", "target_layers", [0, 0]),
    _d("config", "target_layers", [0, 9]),
    _d("config", "target_layers", "0,1"),
    _d("config", "kind", "other"),
    _d("config", "adapters", {}),
    _d("config", "head_vocab", None, ""),
    _d("target", "vocab_size", 256, _OTHER),
    _d("target", "num_hidden_layers", 6, _OTHER),
    _d("target", "weights", "sha256:" + "0" * 64, _OTHER),
    _d("config", "target", "tiny", "target"),
    *[_d("weights", "file", v, _WEIGHTS) for v in ("half", "truncated", "empty")],
    _d("weights", "file", "garbage", _WEIGHTS),
    _d("weights", "dtype", "int32", "layers.0.q_proj.weight"),
    _d("weights", "dtype", "float64", "layers.0.q_proj.weight"),
    _d("weights", "dtype", "float16", ""),
    _d("weights", "value", "nan", "layers.1.o_proj.weight"),
    _d("weights", "value", "inf", "layers.1.o_proj.weight"),
    _d("weights", "value", "-inf", "layers.1.o_proj.weight"),
]


def write_drafter_variant(src: Path, dst: Path, v: DrafterVariant) -> Path:
    """A copy of the drafter folder `src` at `dst` with change `v` applied."""
    shutil.copytree(src, dst)
    if v.where == "weights":
        _damage_weights(dst / _WEIGHTS, v.field, v.value)
        return dst
    path = dst / "drafter_config.json"
    cfg = json.loads(path.read_text())
    entry = {"config": cfg, "adapter": cfg["adapter"], "target": cfg.get("target")}
    entry[v.where][v.field] = v.value
    path.write_text(json.dumps(cfg))
    return dst


def _damage_weights(path: Path, how: str, value: str) -> None:
    from safetensors.numpy import load_file, save_file

    data = path.read_bytes()
    if how == "file":
        cut = {"half": len(data) // 2, "truncated": len(data) - 3, "empty": 0}
        damaged = data[: cut[value]] if value in cut else bytes(range(256)) * 4
        path.write_bytes(damaged)
        return
    w = load_file(str(path))
    if how == "dtype":
        name = "layers.0.q_proj.weight"
        w[name] = (w[name] * 100).astype(value)
    else:
        name = "layers.1.o_proj.weight"
        w[name] = w[name].copy()
        w[name].flat[5] = float(value)
    save_file(w, str(path))


# (`self:` settings, the word its error must name; "" for a valid one), on the tiny
# model: 4 layers, 4 experts, vocabulary 128.
SELF_PLAN_CASES: list[tuple[str, str]] = [
    ("self:top_k=1", ""),
    ("self:layers=0,3 sc_top_k=16 head_vocab=64", ""),
    ("self:top_k=1 top_k=2", "top_k"),
    ("self:layers=0 layers=1", "layers"),
    ('self:top_k="1"', "top_k"),
    ("self:top_k=1.0", "top_k"),
    ("self:head_vocab=64.5", "head_vocab"),
    ("self:layers=0.5,1.7", "layers"),
    ("self:top_k=\u0663", "top_k"),  # ARABIC-INDIC DIGIT THREE: int() reads 3
    ("self:top_k=1_0", "top_k"),
    ("self:sc_top_k=" + "9" * 5000, "sc_top_k"),
    ("self:layers=", "layers"),
    ("self:layers=-1", "layers"),
]

# (speculative= options, the option its error must name; "" for a valid set)
SPEC_CASES: list[tuple[dict[str, Any], str]] = [
    ({"draft_steps": np.int64(8)}, ""),
    ({"draft_confidence": np.float32(0.05)}, ""),
    ({"refine_steps": np.int32(3), "max_rounds": np.uint8(2)}, ""),
    ({"draft_entropy_bound": np.float16(0.5), "draft_confidence": 1}, ""),
    ({"draft_steps": MAX_STEPS, "refine_steps": 1, "max_rounds": MAX_STEPS}, ""),
    ({"draft_steps": 10**9}, "draft_steps"),
    ({"draft_steps": MAX_STEPS + 1}, "draft_steps"),
    ({"refine_steps": 10**9}, "refine_steps"),
    ({"max_rounds": 10**9}, "max_rounds"),
    ({"max_rounds": np.int64(0)}, "max_rounds"),
    ({"draft_steps": 8.0}, "draft_steps"),
    ({"draft_steps": np.float64(8)}, "draft_steps"),
    ({"draft_steps": "8"}, "draft_steps"),
    ({"draft_steps": True}, "draft_steps"),
    ({"draft_confidence": NAN}, "draft_confidence"),
    ({"draft_confidence": np.float32(INF)}, "draft_confidence"),
    ({"draft_confidence": 0.0}, "draft_confidence"),
    ({"draft_confidence": "0.05"}, "draft_confidence"),
    ({"draft_entropy_bound": 1e300}, "draft_entropy_bound"),
    ({"draft_entropy_bound": np.bool_(True)}, "draft_entropy_bound"),
    ({"verify": "plain", "verify_on": "both"}, "verify_on"),
    ({"verify": "plain", "verify_on": ["argmax"]}, "verify_on"),
    ({"verify": "plain", "verify_on": np.array(["argmax", "canvas"])}, "verify_on"),
    ({"verify_on": "canvas"}, "verify_on"),  # the hidden verify does not read it
]


# --------------------------------------------------------------------------------------
# Hole markers (issue 21): a malformed one is refused by name, not kept as text
# --------------------------------------------------------------------------------------

# (text, what its error must name; "" when it parses)
HOLE_CASES: list[tuple[str, str]] = [
    ("a <|hole|> b", ""),
    ("a <|hole:3|> b <|hole|>", ""),
    ("a <|hole:007|> b", ""),
    (f"a <|hole:{MAX_NEW_TOKENS}|>", ""),
    ("a <|hole:-1|> b", "<|hole:-1|>"),
    ("a <|hole:1e3|> b", "<|hole:1e3|>"),
    ("a <|hole: 5|> b", "<|hole: 5|>"),
    ("a <|hole:5 |> b", "<|hole:5 |>"),
    ("a <|hole:+5|> b", "<|hole:+5|>"),
    ("a <|hole:|> b", "<|hole:|>"),
    ("a <|hole", "<|hole"),
    ("a <|hole:4", "<|hole"),
    ("a <|hole|> b <|hole:2", "<|hole"),
    ("a <|hole:<|hole|>|> b", "<|hole:<|hole|>"),
    ("a <|hole:\u0663|> b", "<|hole:\u0663|>"),  # a non-ASCII digit
    ("a <|hole:\uff13|> b", "<|hole:\uff13|>"),  # FULLWIDTH DIGIT THREE
    ("a <|hole:0|> b", "<|hole:0|>"),
    (f"a <|hole:{MAX_NEW_TOKENS + 1}|>", f"<|hole:{MAX_NEW_TOKENS + 1}|>"),
    ("a <|hole:99999999|>", "<|hole:99999999|>"),
    ("a <|hole:" + "9" * 5000 + "|>", "<|hole:999"),
    ("a <|hole:2|>" * 3 + f"<|hole:{MAX_NEW_TOKENS - 3}|>", "add up to"),
    ("a \ud800 <|hole|>", "text_with_holes"),
    ("no marker", "no hole marker"),
]

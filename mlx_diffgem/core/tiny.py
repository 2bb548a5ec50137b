"""Seeded random DiffusionGemma checkpoints in the Hugging Face layout (numpy only).

Tests and benchmarks build these instead of downloading weights. The default config
switches every feature on (spec §6.2): sliding and full layers, k == v full layers with
their own head dim and KV heads, proportional RoPE, MoE top-k < E, self-conditioning,
and a sliding window shorter than a typical test prompt. All-ones scales are perturbed
so that norm weights, router scales and layer scalars are actually exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .config import FULL, RELEASE_GENERATION, ModelConfig

TINY_TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    layer_types=[
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    global_head_dim=16,
    num_global_key_value_heads=1,
    num_experts=4,
    top_k_experts=2,
    sliding_window=8,
    max_position_embeddings=4096,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
        },
    },
    use_bidirectional_attention="vision",
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# A minimal gemma4_vision tower so that transformers can build the class.
TINY_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=4,
    pooling_kernel_size=2,
    position_embedding_size=16,
)

TINY_GENERATION = {
    **RELEASE_GENERATION,
    "max_new_tokens": 16,
    "eos_token_id": [1],
    "pad_token_id": 0,
}


def tiny_config_dict(canvas_length: int = 8, **text_overrides: Any) -> dict[str, Any]:
    """A release-layout config.json dict for a tiny model."""
    text = {**TINY_TEXT, **text_overrides, "model_type": "diffusion_gemma_text"}
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": canvas_length,
        "text_config": text,
        "vision_config": dict(TINY_VISION),
        "image_token_id": text["vocab_size"] - 3,
        "boi_token_id": text["vocab_size"] - 4,
        "eoi_token_id": text["vocab_size"] - 2,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


class _Draws:
    """Seeded float32 draws, in call order (the order fixes the weights)."""

    def __init__(self, seed: int, std: float):
        self.rng, self.std = np.random.default_rng(seed), std

    def normal(self, *shape: int, scale: float | None = None) -> np.ndarray:
        s = self.std if scale is None else scale
        return (self.rng.standard_normal(shape) * s).astype(np.float32)

    def ones_ish(self, *shape: int) -> np.ndarray:
        return (1.0 + 0.3 * self.rng.standard_normal(shape)).astype(np.float32)


_LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "post_feedforward_layernorm_1",
    "pre_feedforward_layernorm_2",
    "post_feedforward_layernorm_2",
)


def random_weights(
    cfg: ModelConfig, seed: int = 0, std: float = 0.02
) -> dict[str, np.ndarray]:
    """Checkpoint tensors (HF names, float32) for `cfg`, seeded."""
    d = _Draws(seed, std)
    H, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    p = "model.decoder."
    w = {
        p + "embed_tokens.weight": d.normal(V, H, scale=0.3),
        p + "norm.weight": d.ones_ish(H),
        p + "self_conditioning.pre_norm.weight": d.ones_ish(H),
        p + "self_conditioning.gate_proj.weight": d.normal(I, H, scale=0.05),
        p + "self_conditioning.up_proj.weight": d.normal(I, H, scale=0.05),
        p + "self_conditioning.down_proj.weight": d.normal(H, I, scale=0.05),
    }
    for i in range(cfg.num_hidden_layers):
        _layer_weights(w, cfg, i, d)
    return w


def _layer_weights(
    w: dict[str, np.ndarray], cfg: ModelConfig, i: int, d: _Draws
) -> None:
    """Layer `i`'s tensors, added to `w` in the order they are drawn."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    E, Ie = cfg.num_experts, cfg.moe_intermediate_size
    D, kv, nh = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_attention_heads
    # Weights at the init std keep the random stack smooth: with larger ones it is
    # chaotic, and float32 rounding differences between frameworks grow ~50x per
    # self-conditioned step, which makes token-identical replays impossible.
    lin = d.std
    q = f"model.decoder.layers.{i}."
    for norm in _LAYER_NORMS:
        w[f"{q}{norm}.weight"] = d.ones_ish(H)
    w[q + "layer_scalar"] = np.array([0.5 + 0.1 * i], np.float32)
    w[q + "self_attn.q_proj.weight"] = d.normal(nh * D, H, scale=lin)
    w[q + "self_attn.k_proj.weight"] = d.normal(kv * D, H, scale=lin)
    if cfg.layer_types[i] != FULL:
        w[q + "self_attn.v_proj.weight"] = d.normal(kv * D, H, scale=lin)
    w[q + "self_attn.o_proj.weight"] = d.normal(H, nh * D, scale=lin)
    # Attention scale is 1.0 on normed q/k: unit-size norms make random scores
    # so sharp that the stack becomes chaotic (see `lin` above).
    w[q + "self_attn.q_norm.weight"] = 0.3 * d.ones_ish(D)
    w[q + "self_attn.k_norm.weight"] = 0.3 * d.ones_ish(D)
    w[q + "mlp.gate_proj.weight"] = d.normal(I, H, scale=lin)
    w[q + "mlp.up_proj.weight"] = d.normal(I, H, scale=lin)
    w[q + "mlp.down_proj.weight"] = d.normal(H, I, scale=lin)
    w[q + "router.proj.weight"] = d.normal(E, H, scale=1.0)
    w[q + "router.scale"] = d.ones_ish(H)
    w[q + "router.per_expert_scale"] = d.ones_ish(E)
    w[q + "experts.gate_up_proj"] = d.normal(E, 2 * Ie, H, scale=lin)
    w[q + "experts.down_proj"] = d.normal(E, H, Ie, scale=lin)
    enc = f"model.encoder.language_model.layers.{i}.layer_scalar"
    w[enc] = np.array([0.8 - 0.1 * i], np.float32)


def build_tiny_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    canvas_length: int = 8,
    generation: dict[str, Any] | None = None,
    **text_overrides: Any,
) -> Path:
    """Write config.json, generation_config.json and model.safetensors to `path`."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = tiny_config_dict(canvas_length, **text_overrides)
    cfg = ModelConfig.from_dict(raw)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    gen = dict(TINY_GENERATION if generation is None else generation)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    save_file(
        random_weights(cfg, seed), str(path / "model.safetensors"), {"format": "pt"}
    )
    return path


SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def build_char_tokenizer(path: str | Path, vocab_size: int = 128) -> Path:
    """A character-level tokenizer.json (ids 0-4: pad/eos/bos/unk/mask, as released)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    names = SPECIALS + chars
    unused = [f"<unused{i}>" for i in range(vocab_size - len(names))]
    names += unused
    tok = Tokenizer(
        models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS + unused)  # decoding skips them
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}
    (path / "tokenizer_config.json").write_text(
        json.dumps(special | {"unk_token": "<unk>"})
    )
    return path


def build_tiny_with_tokenizer(path: str | Path) -> Path:
    """Tiny random weights + a character tokenizer: a text model for tests.

    Built once (atomically) and reused; its output is random text.
    """
    import os
    import tempfile

    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
    gen = dict(TINY_GENERATION, max_new_tokens=32, max_denoising_steps=16)
    build_tiny_checkpoint(tmp, seed=0, canvas_length=16, generation=gen)
    build_char_tokenizer(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path

"""Cost model of DiffusionGemma: FLOPs and bytes per pass, and the roofline limit.

Counts follow spec §5.2 (B = batch rows, C = canvas, N = cached context tokens):

1. Decoder step (one denoising pass over B x C canvas tokens): every layer's matmuls
   (attention projections, dense MLP, router, top-k experts), the self-conditioning
   MLP, the LM head 2CVH and the soft embedding softmax(s) @ E 2CVH; attention costs
   4 nh D C FLOPs per visible key (sliding layers see min(N, W-1) + C keys, full layers
   N + C). Bytes: the weights of every touched expert (expected distinct experts of
   B C tokens x top-k uniform picks: E (1 - (1 - k/E)^(BC))), the dense weights, the
   embedding a second time (LM head + soft embedding), the KV cache read and the
   sampler's fp32 [C, V] passes.
2. Encoder pass over S tokens (prefill or canvas commit): the layer matmuls and causal
   attention, no LM head, no self-conditioning; it reads the cache and writes K/V.
3. Canvas: S_steps decoder steps + 1 encoder pass over the C committed tokens.

The roofline floor of a pass is max(FLOPs / matmul rate, bytes / bandwidth).
Activations, norms' compute and kernel launch overheads are ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.tiny import tiny_config_dict

from .hardware import DEVICES, Device, get_device, measure_this_machine

BF16 = 2  # bytes of an unquantized weight, norm scale or KV entry
FP32 = 4  # bytes of one sampler element

# -- presets -------------------------------------------------------------------------

RELEASED_TEXT = dict(  # spec §1.3
    model_type="diffusion_gemma_text",
    vocab_size=262_144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    sliding_window=1024,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    max_position_embeddings=262_144,
)

PRESETS = {
    "diffusiongemma-26b-a4b": lambda: {
        "model_type": "diffusion_gemma",
        "canvas_length": 256,
        "text_config": dict(RELEASED_TEXT),
    },
    "tiny": tiny_config_dict,
}


def load_preset(name: str) -> ModelConfig:
    """The ModelConfig of a named preset."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}"
        )
    return ModelConfig.from_dict(PRESETS[name](), f"preset {name}")


# -- weights inventory ---------------------------------------------------------------


@dataclass(frozen=True)
class Matrix:
    """`count` weight matrices [rows, cols]; quantization groups run along cols."""

    part: str  # embed | attn | mlp | router | experts | sc
    rows: int
    cols: int
    count: int = 1

    @property
    def numel(self) -> int:
        return self.count * self.rows * self.cols


@dataclass(frozen=True)
class LayerWeights:
    matrices: tuple[Matrix, ...]
    vectors: int  # norm scales, router scales, both layer scalars: never quantized

    def numel(self, part: str | None = None) -> int:
        return sum(m.numel for m in self.matrices if part in (None, m.part))


def layer_weights(cfg: ModelConfig, i: int) -> LayerWeights:
    """Tensors of layer i (spec §2.1); full layers have no v_proj (k == v)."""
    H, nh, D, kv = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.layer_head_dim(i),
        cfg.layer_kv_heads(i),
    )
    I, E, Ie = cfg.intermediate_size, cfg.num_experts, cfg.moe_intermediate_size
    attn = [Matrix("attn", nh * D, H), Matrix("attn", kv * D, H)]
    if not cfg.is_full(i):
        attn.append(Matrix("attn", kv * D, H))
    attn.append(Matrix("attn", H, nh * D))
    mats = attn + [
        Matrix("mlp", I, H, 2),
        Matrix("mlp", H, I),
        Matrix("router", E, H),
        Matrix("experts", 2 * Ie, H, E),
        Matrix("experts", H, Ie, E),
    ]
    # 7 norms + q/k norms + router.scale + per_expert_scale + decoder/encoder scalars
    vectors = 7 * H + 2 * D + H + E + 2
    return LayerWeights(tuple(mats), vectors)


def _embedding(cfg: ModelConfig, rows: int | None = None) -> Matrix:
    return Matrix("embed", cfg.vocab_size if rows is None else rows, cfg.hidden_size)


def _sc_mlp(cfg: ModelConfig) -> tuple[Matrix, ...]:
    H, I = cfg.hidden_size, cfg.intermediate_size
    return (Matrix("sc", I, H, 2), Matrix("sc", H, I))


@dataclass
class ParamCounts:
    """Text-model parameters (spec §2.5), tied embedding counted once."""

    embedding: int
    self_conditioning: int
    final_norm: int
    layers: int
    attention: int
    dense_mlp: int
    router: int
    experts: int
    layer_vectors: int
    total: int
    active_per_token: int  # one layer-stack pass: attention + MLP + router + k experts
    active_with_head: int

    def to_dict(self) -> dict:
        return asdict(self)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts by part (decoder + the encoder's separate layer scalars)."""
    layers = [layer_weights(cfg, i) for i in range(cfg.num_hidden_layers)]
    by = {p: sum(lw.numel(p) for lw in layers) for p in ("attn", "mlp", "router")}
    experts = sum(lw.numel("experts") for lw in layers)
    # router.scale [H] and per_expert_scale [E] count as router parameters (spec §2.5)
    router = by["router"] + len(layers) * (cfg.hidden_size + cfg.num_experts)
    vectors = sum(lw.vectors for lw in layers)
    stack = sum(lw.numel() for lw in layers) + vectors
    embed = _embedding(cfg).numel
    sc = sum(m.numel for m in _sc_mlp(cfg)) + cfg.hidden_size
    active = by["attn"] + by["mlp"] + by["router"]
    active += experts * cfg.top_k_experts // cfg.num_experts
    return ParamCounts(
        embedding=embed,
        self_conditioning=sc,
        final_norm=cfg.hidden_size,
        layers=stack,
        attention=by["attn"],
        dense_mlp=by["mlp"],
        router=router,
        experts=experts,
        layer_vectors=vectors - len(layers) * (cfg.hidden_size + cfg.num_experts),
        total=stack + embed + sc + cfg.hidden_size,
        active_per_token=active,
        active_with_head=active + embed,
    )


# -- quantization --------------------------------------------------------------------


@dataclass(frozen=True)
class Quant:
    """Weight bits per part; affine groups of `group_size` with a bf16 scale + bias."""

    name: str
    bits: dict[str, int] = field(default_factory=dict)  # part -> bits; absent: bf16
    group_size: int = 64
    group_overhead: int = 2 * BF16  # bytes of scale + bias per group (MLX affine)

    def matrix_bytes(self, m: Matrix) -> float:
        bits = self.bits.get(m.part)
        if bits is None:
            return m.numel * BF16
        groups = math.ceil(m.cols / self.group_size)
        return m.count * m.rows * (m.cols * bits / 8 + groups * self.group_overhead)


_PARTS = ("embed", "attn", "mlp", "router", "experts", "sc")
QUANTS = {
    "bf16": Quant("bf16"),
    "8bit": Quant("8bit", dict.fromkeys(_PARTS, 8)),
    "4bit": Quant("4bit", dict.fromkeys(_PARTS, 4)),
    # embeddings, attention, router and the dense MLPs at 8 bits; experts at 4
    "mixed": Quant("mixed", {**dict.fromkeys(_PARTS, 8), "experts": 4}),
}


def get_quant(name: str) -> Quant:
    if name not in QUANTS:
        raise ValueError(f"unknown quantization {name!r}; known: {', '.join(QUANTS)}")
    return QUANTS[name]


# -- passes --------------------------------------------------------------------------


def expected_experts_hit(tokens: float, top_k: int, num_experts: int) -> float:
    """Expected distinct experts picked by `tokens` tokens of top-k uniform routing.

    Each token picks a given expert with probability k/E, independently across tokens
    (real routers are skewed, so this is an upper bound on the experts read).
    """
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _layer_bytes(lw: LayerWeights, quant: Quant, hit_fraction: float) -> float:
    dense = sum(quant.matrix_bytes(m) for m in lw.matrices if m.part != "experts")
    experts = sum(quant.matrix_bytes(m) for m in lw.matrices if m.part == "experts")
    return dense + experts * hit_fraction + lw.vectors * BF16


def _layer_flops(
    cfg: ModelConfig, lw: LayerWeights, tokens: int, top_k: int | None = None
) -> float:
    dense = lw.numel() - lw.numel("experts")
    k = cfg.top_k_experts if top_k is None else top_k
    routed = lw.numel("experts") * k / cfg.num_experts
    return 2.0 * tokens * (dense + routed)


def _cached_keys(cfg: ModelConfig, i: int, context: int) -> int:
    # the sliding cache keeps the last W-1 tokens (spec §3.5)
    return context if cfg.is_full(i) else min(context, cfg.sliding_window - 1)


def kv_bytes_per_token(cfg: ModelConfig, i: int, kv_shared: bool = False) -> int:
    """Cached bytes per token of layer i: K and V in bf16, as HF stores them.

    `kv_shared`: full layers (k == v) store the raw k_proj output once instead.
    """
    per = cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * BF16
    return per if kv_shared and cfg.is_full(i) else 2 * per


def _stack(
    cfg: ModelConfig,
    quant: Quant,
    tokens: int,
    layers: Sequence[int] | None = None,
    top_k: int | None = None,
) -> tuple[float, float, float]:
    """(layer matmul FLOPs, layer weight bytes, experts hit per layer) for `tokens`
    through `layers` (default: all), each routed to `top_k` experts (default: the
    config's)."""
    k = cfg.top_k_experts if top_k is None else top_k
    hit = expected_experts_hit(tokens, k, cfg.num_experts)
    flops = weights = 0.0
    for i in _layers(cfg, layers):
        lw = layer_weights(cfg, i)
        flops += _layer_flops(cfg, lw, tokens, k)
        weights += _layer_bytes(lw, quant, hit / cfg.num_experts)
    return flops, weights, hit


def _layers(cfg: ModelConfig, layers: Sequence[int] | None) -> Sequence[int]:
    return range(cfg.num_hidden_layers) if layers is None else sorted(layers)


def _kv_read(
    cfg: ModelConfig, context: int, kv_shared: bool, layers: Sequence[int] | None = None
) -> float:
    return sum(
        _cached_keys(cfg, i, context) * kv_bytes_per_token(cfg, i, kv_shared)
        for i in _layers(cfg, layers)
    )


@dataclass
class PassCost:
    """FLOPs and bytes of one forward pass, by component."""

    mode: str  # decoder | encoder
    batch: int
    tokens: int  # per row: canvas length or encoded tokens
    context: int  # cached tokens before the pass
    experts_hit_per_layer: float
    flops: dict[str, float]
    bytes: dict[str, float]

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_flops=self.total_flops, total_bytes=self.total_bytes)
        return d


def decoder_cost(
    cfg: ModelConfig,
    context: int,
    *,
    canvas: int | None = None,
    batch: int = 1,
    quant: str = "bf16",
    sampler_passes: float = 5,
    kv_shared: bool = False,
    plan: Any = None,
) -> PassCost:
    """One denoising step over a [batch, canvas] canvas with `context` cached tokens.

    `sampler_passes`: fp32 [B, C, V] tensors the sampler writes per step. The default 5
    is the naive count of spec §5.2 (softcapped logits, processed logits, probabilities,
    the entropy's log-softmax, the self-conditioning softmax); a fused sampler is ~1.

    `plan`: a `drafter.plan.SelfDraftPlan` (or anything with its four fields): the
    cost of one self-drafter pass instead. Only the kept layers run (their matmuls,
    attention and KV reads), each token reaches `top_k` experts, the soft embedding
    is a `sc_top_k`-row weighted sum (2 C k H FLOPs, the gathered rows read) instead
    of softmax(s) @ E, and the LM head has `head_vocab` rows, the width of the
    drafter's logits and so of its sampler's tensors. A plan with no cuts costs
    exactly a target step.
    """
    q, B, C = get_quant(quant), batch, canvas or cfg.canvas_length
    H, V, T = cfg.hidden_size, cfg.vocab_size, batch * C
    kept = None if plan is None else plan.layers
    top_k = None if plan is None else plan.top_k
    head = V if plan is None or plan.head_vocab is None else plan.head_vocab
    soft_k = None if plan is None else plan.sc_top_k
    layer_flops, layer_bytes, hit = _stack(cfg, q, T, kept, top_k)
    sc = _sc_mlp(cfg)
    attn = sum(
        4.0 * cfg.num_attention_heads * cfg.layer_head_dim(i) * T
        * (_cached_keys(cfg, i, context) + C)
        for i in _layers(cfg, kept)
    )  # fmt: skip
    flops = {
        "layers": layer_flops,
        "sc_mlp": 2.0 * T * sum(m.numel for m in sc),
        "lm_head": 2.0 * T * head * H,
        "soft_embedding": 2.0 * T * (V if soft_k is None else soft_k) * H,
        "attention": attn,
    }
    embed = q.matrix_bytes(_embedding(cfg))
    head_bytes = embed if head == V else q.matrix_bytes(_embedding(cfg, head))
    soft_bytes = (
        embed if soft_k is None else q.matrix_bytes(_embedding(cfg, min(T * soft_k, V)))
    )
    nbytes = {
        # every parameter once: stack, SC MLP + pre_norm, final norm, embedding (a
        # drafter's head reads its `head_vocab` rows)
        "weights": layer_bytes
        + sum(q.matrix_bytes(m) for m in sc)
        + 2 * H * BF16
        + head_bytes,
        # the soft embedding reads the table again (a top-k one: the gathered rows);
        # the canvas rows are gathered
        "embedding_reread": soft_bytes + q.matrix_bytes(_embedding(cfg, min(T, V))),
        "kv_read": B * _kv_read(cfg, context, kv_shared, kept),
        "sampler": sampler_passes * T * head * FP32,
    }
    return PassCost("decoder", B, C, context, hit, flops, nbytes)


def _causal_keys(cfg: ModelConfig, i: int, tokens: int, context: int) -> int:
    """Keys summed over the `tokens` causal queries of layer i (spec §3.5 masks)."""
    n = context * tokens + tokens * (tokens + 1) // 2  # query q sees context + q + 1
    if cfg.is_full(i):
        return n
    W = cfg.sliding_window  # ... capped at W (itself and the W-1 previous tokens)
    # the last k queries exceed W, by context + tokens - W, ..., down to 1
    k = min(max(0, context + tokens - W), tokens)
    return n - (k * (context + tokens - W) - k * (k - 1) // 2)


def encoder_cost(
    cfg: ModelConfig,
    tokens: int,
    context: int = 0,
    *,
    batch: int = 1,
    quant: str = "bf16",
    kv_shared: bool = False,
) -> PassCost:
    """One causal encoder pass over `tokens` new tokens per row after `context`."""
    q, B, T, H = get_quant(quant), batch, batch * tokens, cfg.hidden_size
    layer_flops, layer_bytes, hit = _stack(cfg, q, T)
    layers = range(cfg.num_hidden_layers)
    attn = sum(
        4.0 * cfg.num_attention_heads * cfg.layer_head_dim(i) * B
        * _causal_keys(cfg, i, tokens, context)
        for i in layers
    )  # fmt: skip
    written = sum(
        (tokens if cfg.is_full(i) else min(tokens, cfg.sliding_window - 1))
        * kv_bytes_per_token(cfg, i, kv_shared)
        for i in layers
    )
    rows = q.matrix_bytes(_embedding(cfg, min(T, cfg.vocab_size)))
    nbytes = {
        "weights": layer_bytes + H * BF16 + rows,  # + final norm + gathered rows
        "kv_read": B * _kv_read(cfg, context, kv_shared),
        "kv_write": B * written,
    }
    flops = {"layers": layer_flops, "attention": attn}
    return PassCost("encoder", B, tokens, context, hit, flops, nbytes)


# -- roofline ------------------------------------------------------------------------


@dataclass
class Floor:
    compute_s: float
    memory_s: float

    @property
    def floor_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s > self.memory_s else "memory"

    def to_dict(self) -> dict:
        return {**asdict(self), "floor_s": self.floor_s, "bound": self.bound}


def floor(cost: PassCost, device: Device, basis: str = "peak") -> Floor:
    """Roofline floor of one pass: max(FLOPs / matmul rate, bytes / bandwidth)."""
    flops_per_s, bytes_per_s = device.rates(basis)
    return Floor(cost.total_flops / flops_per_s, cost.total_bytes / bytes_per_s)


@dataclass(frozen=True)
class Schedule:
    """Passes per canvas: native steps, or target verifies plus drafter passes."""

    steps_per_canvas: float = 15
    target_passes: float = 2
    drafter_passes: float = 8
    drafter_cost: float = 0.1  # one drafter pass as a fraction of a target step


@dataclass
class Estimate:
    """Floors and throughput of one device at one basis (peak or measured)."""

    device: str
    basis: str
    matmul_tflops: float
    bandwidth_gbs: float
    step: Floor
    encoder: Floor
    native_canvas_s: float
    native_tokens_per_s: float
    speculative_canvas_s: float
    speculative_tokens_per_s: float
    weights_fit_in_memory: bool
    drafter_step: Floor | None = None  # one drafter pass, when given as a PassCost
    drafter_cost: float | None = None  # drafter pass / target step used (floor ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(step=self.step.to_dict(), encoder=self.encoder.to_dict())
        if self.drafter_step is not None:
            d["drafter_step"] = self.drafter_step.to_dict()
        return d


def estimate(
    decoder: PassCost,
    encoder: PassCost,
    device: Device,
    schedule: Schedule = Schedule(),
    basis: str = "peak",
    drafter: PassCost | None = None,
) -> Estimate:
    """Canvas time and tokens/s: S steps (or verifies + drafts) + one canvas commit.

    `drafter`: the cost of one drafter pass (`decoder_cost(..., plan=...)`); its floor
    on `device` replaces `schedule.drafter_cost` (a fraction of a target step)."""
    step, enc = floor(decoder, device, basis), floor(encoder, device, basis)
    native = schedule.steps_per_canvas * step.floor_s + enc.floor_s
    draft = None if drafter is None else floor(drafter, device, basis)
    ratio = schedule.drafter_cost if draft is None else draft.floor_s / step.floor_s
    drafts = schedule.drafter_passes * ratio
    spec = (schedule.target_passes + drafts) * step.floor_s + enc.floor_s
    tokens = decoder.batch * decoder.tokens
    flops_per_s, bytes_per_s = device.rates(basis)
    return Estimate(
        device=device.name,
        basis=basis,
        matmul_tflops=flops_per_s / 1e12,
        bandwidth_gbs=bytes_per_s / 1e9,
        step=step,
        encoder=enc,
        native_canvas_s=native,
        native_tokens_per_s=tokens / native,
        speculative_canvas_s=spec,
        speculative_tokens_per_s=tokens / spec,
        weights_fit_in_memory=decoder.bytes["weights"] <= device.memory_gb.value * 1e9,
        drafter_step=draft,
        drafter_cost=ratio,
    )


# -- self-drafter --------------------------------------------------------------------


def self_draft_plan(cfg: ModelConfig, spec: str = "auto") -> Any:
    """A SelfDraftPlan for `cfg` from a drafter argument: "auto" / "self" (the
    default cuts), "full" / "target" (no cuts), or "self:layers=0,5 top_k=1 ..."."""
    from drafter.plan import SelfDraftPlan

    kind, _, settings = spec.partition(":")
    if kind == "target" and not settings:
        return SelfDraftPlan().checked(cfg)
    return SelfDraftPlan.parse(settings if kind == "self" else spec, cfg)


def self_draft_cost(
    cfg: ModelConfig,
    plan: Any = None,
    context: int = 512,
    *,
    canvas: int | None = None,
    batch: int = 1,
    quant: str = "bf16",
    sampler_passes: float = 5,
    kv_shared: bool = False,
    devices: Sequence[Device] = (),
) -> dict:
    """One self-drafter pass (`plan`; default SelfDraftPlan.auto) next to one target
    step: FLOPs and bytes by part, their ratios, and the roofline floor ratio on each
    of `devices` (peak basis)."""
    plan = self_draft_plan(cfg) if plan is None else plan
    kw = dict(
        canvas=canvas,
        batch=batch,
        quant=quant,
        sampler_passes=sampler_passes,
        kv_shared=kv_shared,
    )
    target = decoder_cost(cfg, context, **kw)
    draft = decoder_cost(cfg, context, plan=plan, **kw)
    return {
        "plan": plan.to_dict(),
        "context": context,
        "canvas_length": target.tokens,
        "batch": batch,
        "quant": quant,
        "target": _pass_summary(target),
        "drafter": _pass_summary(draft),
        "flops_ratio": draft.total_flops / target.total_flops,
        "bytes_ratio": draft.total_bytes / target.total_bytes,
        "floor_ratio": {
            d.name: floor(draft, d).floor_s / floor(target, d).floor_s for d in devices
        },
    }


def pass_speedup(
    native_passes: float, spec_passes: float, drafter_passes: float, drafter_cost: float
) -> float:
    """Native / speculative time per canvas if every pass cost its share of a
    target pass (a drafter pass: `drafter_cost`, e.g. `self_draft_cost`'s
    flops_ratio) and nothing else took time: what the measured pass counts allow
    at that cost ratio, the ceiling a measured wall-clock ratio is read against."""
    return native_passes / (spec_passes + drafter_cost * drafter_passes)


def _pass_summary(cost: PassCost) -> dict:
    return {
        "flops": cost.total_flops,
        "bytes": cost.total_bytes,
        "flops_by_part": dict(cost.flops),
        "bytes_by_part": dict(cost.bytes),
        "experts_hit_per_layer": cost.experts_hit_per_layer,
    }


# -- published figures and the speculative projection --------------------------------

ANCHORS = "reference/anchors.md"  # /work/shared/reference/anchors.md, as of 2026-11


@dataclass(frozen=True)
class Published:
    """A published single-stream figure of the released 26B-A4B on one device."""

    device: str
    engine: str
    quant: str
    tokens_per_s: float  # DiffusionGemma (native decoding)
    steps_per_canvas: str | None  # as reported
    autoregressive_tokens_per_s: float | None  # Gemma 4 26B-A4B, same machine
    source: str = ANCHORS + ": DiffusionGemma on Apple silicon"


PUBLISHED = [
    Published("M3 Ultra", "mlx-vlm", "8-bit", 42.8, None, 60.9),
    Published("M1 Ultra", "mlxcel", "4-bit", 15.0, "26-28", 71.3),
    Published("M5 Pro", "mlx-vlm stock", "4-bit", 22.5, None, None),  # 19-26
    Published("M5 Max", "vmlx-swift", "MXFP4", 36.8, "32.7", 81.0),  # AR ~81
    Published("M5 Max", "vmlx-swift", "MXFP8", 42.3, "22.7", 81.0),
    Published("M4 Pro", "MLX", "4-bit", 5.4, None, 38.0),
]
PROJECTION_DEVICES = ("M1 Ultra", "M4 Max", "M5 Max")  # M4 Max: nothing published


def published(device: str) -> list[dict]:
    return [asdict(p) for p in PUBLISHED if p.device == device]


def project_speculative(
    native_passes: float,
    spec_passes: float,
    drafter_passes: float,
    *,
    drafter_cost: float | None = None,
    plan: Any = None,
    preset: str = "diffusiongemma-26b-a4b",
    cfg: ModelConfig | None = None,
    context: int = 512,
    quant: str = "4bit",
    sampler_passes: float = 5,
    devices: Sequence[str] = PROJECTION_DEVICES,
) -> dict:
    """Tokens/s of the released model (`preset`, or `cfg`) from measured pass
    counts per canvas: native = S target steps + 1 commit; speculative = S' target
    passes + D drafter passes + 1 commit, on the roofline floor of each device of the
    table (peak, and measured where known). A drafter pass costs `drafter_cost` target
    steps, or (None) the floor of `plan` (default SelfDraftPlan.auto of the config)
    on that device. Next to each: the published native and autoregressive figures and
    the published native figure scaled by the projected speedup."""
    model = preset if cfg is None else "config"
    cfg = load_preset(preset) if cfg is None else cfg
    plan = self_draft_plan(cfg) if plan is None and drafter_cost is None else plan
    kw = dict(quant=quant)
    dec = decoder_cost(cfg, context, sampler_passes=sampler_passes, **kw)
    enc = encoder_cost(cfg, cfg.canvas_length, context, **kw)
    draft = None
    if drafter_cost is None:
        draft = decoder_cost(
            cfg, context, sampler_passes=sampler_passes, plan=plan, **kw
        )
    sched = Schedule(
        native_passes, spec_passes, drafter_passes, 0.0 if draft else drafter_cost
    )
    out = {}
    for name in devices:
        dev = get_device(name)
        bases = {}
        for basis in _bases(dev):
            e = estimate(dec, enc, dev, sched, basis, draft)
            bases[basis] = {
                "step_ms": e.step.floor_s * 1e3,
                "drafter_pass_ms": e.drafter_cost * e.step.floor_s * 1e3,
                "drafter_cost": e.drafter_cost,
                "native_tokens_per_s": e.native_tokens_per_s,
                "speculative_tokens_per_s": e.speculative_tokens_per_s,
                "speedup": e.native_canvas_s / e.speculative_canvas_s,
            }
        pubs = published(name)
        speedup = bases["peak"]["speedup"]
        for p in pubs:
            p["scaled_by_speedup"] = p["tokens_per_s"] * speedup
        out[name] = {"floor": bases, "published": pubs}
    return {
        "model": model,
        "context": context,
        "canvas_length": cfg.canvas_length,
        "quant": quant,
        "passes_per_canvas": {
            "native_target": native_passes,
            "speculative_target": spec_passes,
            "speculative_drafter": drafter_passes,
        },
        "drafter_plan": None if plan is None else plan.to_dict(),
        "drafter_cost_given": drafter_cost,
        "devices": out,
        "method": "roofline floor per pass (bench.cost.estimate): canvas = passes x "
        "floor + one encoder commit; `scaled_by_speedup` = the published native "
        "tok/s x the projected native/speculative canvas-time ratio (peak basis)",
    }


# -- report --------------------------------------------------------------------------

ASSUMPTIONS = [
    "weights: every parameter of the touched experts and all dense weights read once "
    "per pass; the decoder reads the embedding twice (LM head + soft embedding)",
    "experts touched: E (1 - (1 - k/E)^(B C)), independent uniform top-k routing",
    "quantization: MLX affine, group size 64, bf16 scale + bias per group; norms and "
    "scalars stay bf16",
    "KV cache bf16; sliding layers hold min(N, W-1) tokens, full layers N; K and V "
    "both stored unless kv_shared",
    "sampler: `sampler_passes` fp32 [B, C, V] tensors written per step",
    "every decoder step runs the self-conditioning path (the first step has none)",
    "canvas: S decoder steps + 1 encoder commit over C tokens at the same context; "
    "prefill and activations are not counted",
    "speculative: target passes + drafter passes x drafter cost (fraction of a target "
    "step) + 1 commit",
]


def report(
    cfg: ModelConfig,
    *,
    context: int = 512,
    canvas: int | None = None,
    batch: int = 1,
    quant: str = "bf16",
    schedule: Schedule = Schedule(),
    sampler_passes: float = 5,
    kv_shared: bool = False,
    devices: list[Device] | None = None,
    drafter: str | None = None,
) -> dict:
    """Everything `python -m bench.cost --json` prints, as a dict.

    `drafter`: a self-drafter plan ("auto", "full", "layers=0,5 top_k=1 ..."): its
    pass cost next to the target step's, and the speculative estimates charge each
    drafter pass its own floor instead of `schedule.drafter_cost`."""
    C = canvas or cfg.canvas_length
    kw = dict(batch=batch, kv_shared=kv_shared)
    dec = decoder_cost(
        cfg, context, canvas=C, quant=quant, sampler_passes=sampler_passes, **kw
    )
    enc = encoder_cost(cfg, C, context, quant=quant, **kw)
    weights_by_quant = {
        name: decoder_cost(cfg, context, canvas=C, quant=name, **kw).bytes["weights"]
        for name in QUANTS
    }
    devs = list(DEVICES.values()) if devices is None else devices
    plan = None if drafter is None else self_draft_plan(cfg, drafter)
    draft = None
    if plan is not None:
        draft = decoder_cost(
            cfg, context, canvas=C, quant=quant, sampler_passes=sampler_passes,
            plan=plan, **kw,
        )  # fmt: skip
    per_device = {
        d.name: {
            b: estimate(dec, enc, d, schedule, b, draft).to_dict() for b in _bases(d)
        }
        for d in devs
    }
    S = schedule.steps_per_canvas
    return {
        "config": _config_summary(cfg),
        "context": context,
        "canvas_length": C,
        "batch": batch,
        "quant": quant,
        "params": param_counts(cfg).to_dict(),
        "flops_per_step": dec.total_flops,
        "bytes_per_step": dec.total_bytes,
        "weight_bytes_per_step": dec.bytes["weights"],
        "weight_bytes_by_quant": weights_by_quant,
        "kv_read_bytes_per_step": dec.bytes["kv_read"],
        "sampler_bytes_per_step": dec.bytes["sampler"],
        "sampler_passes": sampler_passes,
        "experts_hit_per_layer": dec.experts_hit_per_layer,
        "decoder": dec.to_dict(),
        "encoder": enc.to_dict(),
        "canvas": {
            "flops": S * dec.total_flops + enc.total_flops,
            "bytes": S * dec.total_bytes + enc.total_bytes,
        },
        "schedule": asdict(schedule),
        "drafter": None
        if plan is None
        else self_draft_cost(
            cfg,
            plan,
            context,
            canvas=C,
            batch=batch,
            quant=quant,
            sampler_passes=sampler_passes,
            kv_shared=kv_shared,
            devices=devs,
        ),  # fmt: skip
        "devices": per_device,
        "assumptions": ASSUMPTIONS,
    }


MULTI_DEVICES = ("M1 Ultra", "M4 Max", "M5 Pro", "M5 Max", "RTX 4090", "H100 SXM")
# One M5 Pro study measured ~80 GB/s for single-stream 4-bit MoE decoding, even with
# Apple's tuned kernel (issue 12): dequantising gathered experts, not DRAM, limits it.
MOE_4BIT_EFFECTIVE_GBS = 80.0


def multi_canvas(
    cfg: ModelConfig,
    device: Device,
    *,
    context: int = 512,
    quant: str = "bf16",
    canvases: Sequence[int] = (1, 2, 4),
    basis: str = "peak",
    bandwidth_gbs: float | None = None,
) -> list[dict]:
    """One target pass over k canvases at once (batch k: two drafted canvases, or
    two candidate drafts of one) against k separate passes, on the roofline.

    Weights are streamed once per pass whatever k is, FLOPs grow with k: in the
    memory-bound regime a k-canvas pass costs about one pass, so each canvas's
    verification gets ~k times cheaper; compute-bound, nothing is gained.
    `bandwidth_gbs` replaces the device's bandwidth (an effective kernel figure).
    """
    flops_s, bytes_s = device.rates(basis)
    if bandwidth_gbs is not None:
        bytes_s = bandwidth_gbs * 1e9
    rows, one = [], None
    for k in sorted(set(canvases) | {1}):
        cost = decoder_cost(cfg, context, batch=k, quant=quant)
        compute, memory = cost.total_flops / flops_s, cost.total_bytes / bytes_s
        t = max(compute, memory)
        one = t if k == 1 else one
        rows.append(
            {
                "canvases": k,
                "pass_s": t,
                "bound": "compute" if compute > memory else "memory",
                "per_canvas_vs_single": t / (k * one),
            }
        )
    return rows


def multi_canvas_regimes(cfg: ModelConfig, context: int = 512, k: int = 2) -> list:
    """Per device x precision: the per-canvas cost of a k-canvas verify pass
    relative to a single-canvas one (1.0: no gain; 1/k: the whole gain)."""
    out = []
    for name in MULTI_DEVICES:
        dev = DEVICES[name]
        for quant in ("bf16", "8bit", "4bit"):
            cases = [("peak", None)]
            if quant == "4bit" and name.startswith("M"):
                cases.append(("effective 4-bit MoE", MOE_4BIT_EFFECTIVE_GBS))
            for label, gbs in cases:
                rows = multi_canvas(
                    cfg, dev, context=context, quant=quant, canvases=(k,),
                    bandwidth_gbs=gbs,
                )  # fmt: skip
                out.append(
                    {
                        "device": name,
                        "quant": quant,
                        "bandwidth": label,
                        "single_bound": rows[0]["bound"],
                        "per_canvas_vs_single": rows[-1]["per_canvas_vs_single"],
                    }
                )
    return out


def _multi_text(rows: list[dict], k: int) -> str:
    lines = [
        f"Verifying {k} canvases in one target pass: per-canvas cost vs one canvas "
        "per pass (1.00 = no gain)",
        f"{'device':<10} {'weights':<6} {'bandwidth':<20} {'1-canvas pass':<14} ratio",
    ]
    for r in rows:
        lines.append(
            f"{r['device']:<10} {r['quant']:<6} {r['bandwidth']:<20} "
            f"{r['single_bound'] + '-bound':<14} {r['per_canvas_vs_single']:.2f}"
        )
    return "\n".join(lines)


def _bases(device: Device) -> list[str]:
    measured = device.measured_bandwidth_gbs or device.measured_matmul_tflops
    return ["peak", "measured"] if measured else ["peak"]


def _config_summary(cfg: ModelConfig) -> dict:
    keys = (
        "vocab_size hidden_size intermediate_size num_hidden_layers "
        "num_attention_heads num_key_value_heads head_dim sliding_window num_experts "
        "top_k_experts moe_intermediate_size canvas_length"
    ).split()
    d = {k: getattr(cfg, k) for k in keys}
    d["full_layers"] = [i for i in range(cfg.num_hidden_layers) if cfg.is_full(i)]
    d["per_layer_config"] = {str(i): v for i, v in cfg.per_layer_config.items()}
    return d


def _si(x: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.0f}"


def _text(rep: dict) -> str:
    d, e = rep["decoder"], rep["encoder"]
    lines = [
        f"decoder step: {_si(d['total_flops'])}FLOP, {_si(d['total_bytes'])}B "
        f"({rep['quant']}, context {rep['context']}, batch {rep['batch']})",
        "  flops: " + ", ".join(f"{k} {_si(v)}" for k, v in d["flops"].items()),
        "  bytes: " + ", ".join(f"{k} {_si(v)}" for k, v in d["bytes"].items()),
        f"encoder commit: {_si(e['total_flops'])}FLOP, {_si(e['total_bytes'])}B",
        *_drafter_text(rep.get("drafter")),
        f"{'device':<14}{'basis':<10}{'step ms':>9}{'bound':>9}"
        f"{'native tok/s':>14}{'spec tok/s':>12}{'fits':>6}",
    ]
    for name, by_basis in rep["devices"].items():
        for basis, e in by_basis.items():
            lines.append(
                f"{name:<14}{basis:<10}{e['step']['floor_s'] * 1e3:>9.4g}"
                f"{e['step']['bound']:>9}{e['native_tokens_per_s']:>14.0f}"
                f"{e['speculative_tokens_per_s']:>12.0f}"
                f"{'yes' if e['weights_fit_in_memory'] else 'no':>6}"
            )
    return "\n".join(lines)


def _drafter_text(d: dict | None) -> list[str]:
    if d is None:
        return []
    plan = ", ".join(f"{k}={v}" for k, v in d["plan"].items() if v is not None)
    t, x = d["drafter"], d["target"]
    return [
        f"self-drafter pass ({plan or 'no cuts'}): {_si(t['flops'])}FLOP, "
        f"{_si(t['bytes'])}B = {d['flops_ratio']:.3f} of the step's FLOPs, "
        f"{d['bytes_ratio']:.3f} of its bytes",
        "  flops: " + ", ".join(f"{k} {_si(v)}" for k, v in t["flops_by_part"].items()),
        f"  (target step: {_si(x['flops'])}FLOP, {_si(x['bytes'])}B)",
    ]


def _projection_text(proj: dict) -> str:
    n = proj["passes_per_canvas"]
    lines = [
        f"projection ({proj['model']}, {proj['quant']}, context {proj['context']}): "
        f"native {n['native_target']:g} target passes/canvas; speculative "
        f"{n['speculative_target']:g} target + {n['speculative_drafter']:g} drafter",
        f"{'device':<10}{'basis':<10}{'draft cost':>11}{'native tok/s':>14}"
        f"{'spec tok/s':>12}{'speedup':>9}  published native / AR tok/s",
    ]
    for name, d in proj["devices"].items():
        pubs = "; ".join(
            f"{p['tokens_per_s']:g} ({p['engine']} {p['quant']}) -> "
            f"{p['scaled_by_speedup']:.1f} / AR {p['autoregressive_tokens_per_s']}"
            for p in d["published"]
        )
        for basis, e in d["floor"].items():
            note = (pubs or "none published") if basis == "peak" else ""
            lines.append(
                f"{name:<10}{basis:<10}{e['drafter_cost']:>11.3f}"
                f"{e['native_tokens_per_s']:>14.1f}"
                f"{e['speculative_tokens_per_s']:>12.1f}{e['speedup']:>9.3f}  {note}"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.cost", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--preset", default="diffusiongemma-26b-a4b", help=", ".join(PRESETS)
    )
    p.add_argument("--config", help="a config.json instead of a preset")
    p.add_argument("--context", type=int, default=512, help="cached tokens N_ctx")
    p.add_argument("--canvas", type=int, help="canvas length C (default: config)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--quant", default="bf16", choices=list(QUANTS))
    p.add_argument("--device", help="one device of the table (default: all)")
    p.add_argument("--steps-per-canvas", type=float, default=15)
    p.add_argument("--target-passes", type=float, default=2)
    p.add_argument("--drafter-passes", type=float, default=8)
    p.add_argument("--drafter-cost", type=float, default=0.1)
    p.add_argument("--sampler-passes", type=float, default=5)
    p.add_argument("--kv-shared", action="store_true", help="k==v layers store once")
    p.add_argument(
        "--drafter",
        nargs="?",
        const="auto",
        default=None,
        metavar="PLAN",
        help="a self-drafter pass's cost (auto, full, or 'layers=0,5 top_k=1 "
        "sc_top_k=32 head_vocab=1024'); speculative estimates charge its floor",
    )
    p.add_argument(
        "--project",
        type=_three_floats,
        default=None,
        metavar="NATIVE,SPEC,DRAFTER",
        help="project tokens/s on M1 Ultra, M4 Max, M5 Max from measured target "
        "passes per canvas (native, speculative) and drafter passes per canvas",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="measure this machine (device this-machine)",
    )
    p.add_argument(
        "--multi-canvas",
        type=int,
        default=None,
        metavar="K",
        help="per device and precision: does one target pass over K canvases "
        "beat K passes (memory- vs compute-bound)?",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(
            f"expected NATIVE,SPEC,DRAFTER passes per canvas, got {text!r}"
        )
    return values  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.context < 0 or args.batch < 1 or (args.canvas or 1) < 1:
        p.error("--context must be >= 0, --batch and --canvas >= 1")
    extra, measured = {}, None
    if args.measure:
        here = measure_this_machine()
        extra, measured = {here.name: here}, here.to_dict()
    try:
        cfg = (
            ModelConfig.from_file(args.config)
            if args.config
            else load_preset(args.preset)
        )
        devices = None
        if args.device:
            devices = [get_device(args.device, extra)]
        elif extra:
            devices = [*DEVICES.values(), *extra.values()]
        plan = self_draft_plan(cfg, args.drafter or "auto")
    except ValueError as e:
        p.error(str(e))
    schedule = Schedule(
        args.steps_per_canvas,
        args.target_passes,
        args.drafter_passes,
        args.drafter_cost,
    )
    rep = report(
        cfg,
        context=args.context,
        canvas=args.canvas,
        batch=args.batch,
        quant=args.quant,
        schedule=schedule,
        sampler_passes=args.sampler_passes,
        kv_shared=args.kv_shared,
        devices=devices,
        drafter=args.drafter,
    )
    rep["preset"] = None if args.config else args.preset
    if args.project:
        rep["projection"] = project_speculative(
            *args.project,
            plan=plan,
            preset=args.preset,
            cfg=cfg if args.config else None,
            context=args.context,
            quant=args.quant,
            sampler_passes=args.sampler_passes,
        )
    if measured:
        rep["measured"] = measured
    if args.multi_canvas is not None:
        if args.multi_canvas < 2:
            p.error(
                f"--multi-canvas: expected an integer >= 2, got {args.multi_canvas}"
            )
        rep["multi_canvas"] = multi_canvas_regimes(cfg, args.context, args.multi_canvas)
    if args.json:
        print(json.dumps(rep))
        return 0
    if measured:
        bw, mm = measured["bandwidth_gbs"]["value"], measured["matmul_tflops"]["value"]
        print(f"this machine: {mm:.3f} TFLOP/s fp32 matmul, {bw:.1f} GB/s copy")
    print(_text(rep))
    if args.project:
        print(_projection_text(rep["projection"]))
    if args.multi_canvas is not None:
        print(_multi_text(rep["multi_canvas"], args.multi_canvas))
    return 0


if __name__ == "__main__":
    sys.exit(main())

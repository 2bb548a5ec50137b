"""FLOPs and bytes of one DiffusionGemma pass: presets, weights, quantization, passes.

Counts follow spec §5.2 (B = batch rows, C = canvas, N = cached context tokens):

1. Decoder step (one denoising pass over B x C canvas tokens): every layer's matmuls
   (attention projections, dense MLP, router, top-k experts), the self-conditioning
   MLP, the LM head 2CVH and the soft embedding softmax(s) @ E 2CVH; attention costs
   4 nh D C FLOPs per visible key (sliding layers see min(N, W-1) + C keys, full layers
   N + C). Bytes: the weights of every touched expert (expected distinct experts of
   B C tokens x top-k uniform picks: E (1 - (1 - k/E)^(BC))), the dense weights, the
   embedding a second time (LM head + soft embedding), the KV cache read and the
   sampler's fp32 [C, V] passes. A self-drafter plan cuts some of these (see
   `decoder_cost`).
2. Encoder pass over S tokens (prefill or canvas commit): the layer matmuls and causal
   attention, no LM head, no self-conditioning; it reads the cache and writes K/V.

Activations, norms' compute and kernel launch overheads are ignored. The time of a
pass on a device is bench/roofline.py's; the command line is `python -m bench.cost`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.tiny import tiny_config_dict

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


@dataclass(frozen=True)
class PassOptions:
    """How a decoder pass runs, apart from its context: `decoder_cost`'s options."""

    canvas: int | None = None  # canvas length (None: the config's)
    batch: int = 1
    quant: str = "bf16"
    sampler_passes: float = 5
    kv_shared: bool = False


@dataclass(frozen=True)
class _Cuts:
    """What a self-drafter plan keeps of a decoder pass (no plan: everything)."""

    layers: Sequence[int] | None  # the kept layers (None: all)
    top_k: int | None  # experts per token (None: the config's)
    head: int  # LM head rows: the vocabulary, or the plan's head_vocab
    soft_k: int | None  # soft-embedding rows per token (None: the whole table)
    # a trained drafter's own layers (drafter.trained.AdapterConfig)
    adapter: Any = None


def _cuts(cfg: ModelConfig, plan: Any) -> _Cuts:
    if plan is None:
        return _Cuts(None, None, cfg.vocab_size, None)
    head = cfg.vocab_size if plan.head_vocab is None else plan.head_vocab
    # a plan holds the adapter module (its .config) or, for a shape it was never
    # built for (bench.drafter_cost.released_plan), the config itself
    adapter = getattr(plan, "adapter", None)
    adapter = getattr(adapter, "config", adapter)
    return _Cuts(plan.layers, plan.top_k, head, plan.sc_top_k, adapter)


def _adapter_matrices(a: Any) -> tuple[Matrix, ...]:
    """One adapter layer's weights: q, k, v, o and a gated MLP (drafter/adapter_*)."""
    H, inner, I = a.hidden_size, a.num_heads * a.head_dim, a.intermediate_size
    return (
        Matrix("attn", inner, H, 3),
        Matrix("attn", H, inner),
        Matrix("mlp", I, H, 2),
        Matrix("mlp", H, I),
    )


def _adapter_cost(a: Any, q: Quant, T: int, C: int) -> tuple[float, float]:
    """(FLOPs, weight bytes) of a trained drafter's own layers over T canvas tokens:
    their matmuls and bidirectional attention over the C canvas tokens."""
    if a is None:
        return 0.0, 0.0
    mats = _adapter_matrices(a)
    per_layer = (
        2.0 * T * sum(m.numel for m in mats) + 4.0 * a.num_heads * a.head_dim * T * C
    )
    nbytes = sum(q.matrix_bytes(m) for m in mats) + 2 * a.hidden_size * BF16
    return a.num_layers * per_layer, a.num_layers * nbytes


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

    `plan`: a `core.plan.PassPlan` (or anything with its four fields): the cost of
    one drafter pass instead. Only the kept layers run (their matmuls, attention and
    KV reads), each token reaches `top_k` experts, the soft embedding is a
    `sc_top_k`-row weighted sum (2 C k H FLOPs, the gathered rows read) instead of
    softmax(s) @ E, and the LM head has `head_vocab` rows, the width of the drafter's
    logits and so of its sampler's tensors. A trained drafter's own layers (the
    plan's `adapter`) add their matmuls, canvas attention and weights ("adapter").
    A plan with no cuts costs exactly a target step.
    """
    q, B, C = get_quant(quant), batch, canvas or cfg.canvas_length
    T, cut = batch * C, _cuts(cfg, plan)
    layer_flops, layer_bytes, hit = _stack(cfg, q, T, cut.layers, cut.top_k)
    flops = _decoder_flops(cfg, context, C, T, cut, layer_flops)
    nbytes = _decoder_weight_bytes(cfg, q, T, cut, layer_bytes) | {
        "kv_read": B * _kv_read(cfg, context, kv_shared, cut.layers),
        "sampler": sampler_passes * T * cut.head * FP32,
    }
    if cut.adapter is not None:
        flops["adapter"], nbytes["adapter"] = _adapter_cost(cut.adapter, q, T, C)
    return PassCost("decoder", B, C, context, hit, flops, nbytes)


def _decoder_flops(
    cfg: ModelConfig, context: int, C: int, T: int, cut: _Cuts, layer_flops: float
) -> dict[str, float]:
    """A decoder pass's FLOPs by part; T = batch x C canvas tokens."""
    H, V = cfg.hidden_size, cfg.vocab_size
    attn = sum(
        4.0 * cfg.num_attention_heads * cfg.layer_head_dim(i) * T
        * (_cached_keys(cfg, i, context) + C)
        for i in _layers(cfg, cut.layers)
    )  # fmt: skip
    return {
        "layers": layer_flops,
        "sc_mlp": 2.0 * T * sum(m.numel for m in _sc_mlp(cfg)),
        "lm_head": 2.0 * T * cut.head * H,
        "soft_embedding": 2.0 * T * (V if cut.soft_k is None else cut.soft_k) * H,
        "attention": attn,
    }


def _decoder_weight_bytes(
    cfg: ModelConfig, q: Quant, T: int, cut: _Cuts, layer_bytes: float
) -> dict[str, float]:
    """The weight bytes a decoder pass reads: once each, and the embedding again."""
    H, V = cfg.hidden_size, cfg.vocab_size
    embed = q.matrix_bytes(_embedding(cfg))
    head_bytes = embed if cut.head == V else q.matrix_bytes(_embedding(cfg, cut.head))
    soft_bytes = (
        embed
        if cut.soft_k is None
        else q.matrix_bytes(_embedding(cfg, min(T * cut.soft_k, V)))
    )
    return {
        # every parameter once: stack, SC MLP + pre_norm, final norm, embedding (a
        # drafter's head reads its `head_vocab` rows)
        "weights": layer_bytes
        + sum(q.matrix_bytes(m) for m in _sc_mlp(cfg))
        + 2 * H * BF16
        + head_bytes,
        # the soft embedding reads the table again (a top-k one: the gathered rows);
        # the canvas rows are gathered
        "embedding_reread": soft_bytes + q.matrix_bytes(_embedding(cfg, min(T, V))),
    }


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

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
from dataclasses import asdict, dataclass, field

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


def _layer_flops(cfg: ModelConfig, lw: LayerWeights, tokens: int) -> float:
    dense = lw.numel() - lw.numel("experts")
    routed = lw.numel("experts") * cfg.top_k_experts / cfg.num_experts
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


def _stack(cfg: ModelConfig, quant: Quant, tokens: int) -> tuple[float, float, float]:
    """(layer matmul FLOPs, layer weight bytes, experts hit per layer) for `tokens`."""
    hit = expected_experts_hit(tokens, cfg.top_k_experts, cfg.num_experts)
    flops = weights = 0.0
    for i in range(cfg.num_hidden_layers):
        lw = layer_weights(cfg, i)
        flops += _layer_flops(cfg, lw, tokens)
        weights += _layer_bytes(lw, quant, hit / cfg.num_experts)
    return flops, weights, hit


def _kv_read(cfg: ModelConfig, context: int, kv_shared: bool) -> float:
    return sum(
        _cached_keys(cfg, i, context) * kv_bytes_per_token(cfg, i, kv_shared)
        for i in range(cfg.num_hidden_layers)
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
) -> PassCost:
    """One denoising step over a [batch, canvas] canvas with `context` cached tokens.

    `sampler_passes`: fp32 [B, C, V] tensors the sampler writes per step. The default 5
    is the naive count of spec §5.2 (softcapped logits, processed logits, probabilities,
    the entropy's log-softmax, the self-conditioning softmax); a fused sampler is ~1.
    """
    q, B, C = get_quant(quant), batch, canvas or cfg.canvas_length
    H, V, T = cfg.hidden_size, cfg.vocab_size, batch * C
    layer_flops, layer_bytes, hit = _stack(cfg, q, T)
    sc = _sc_mlp(cfg)
    attn = sum(
        4.0 * cfg.num_attention_heads * cfg.layer_head_dim(i) * T
        * (_cached_keys(cfg, i, context) + C)
        for i in range(cfg.num_hidden_layers)
    )  # fmt: skip
    flops = {
        "layers": layer_flops,
        "sc_mlp": 2.0 * T * sum(m.numel for m in sc),
        "lm_head": 2.0 * T * V * H,
        "soft_embedding": 2.0 * T * V * H,
        "attention": attn,
    }
    embed = q.matrix_bytes(_embedding(cfg))
    nbytes = {
        # every parameter once: stack, SC MLP + pre_norm, final norm, embedding
        "weights": layer_bytes
        + sum(q.matrix_bytes(m) for m in sc)
        + 2 * H * BF16
        + embed,
        # the soft embedding reads the table again; the canvas rows are gathered
        "embedding_reread": embed + q.matrix_bytes(_embedding(cfg, min(T, V))),
        "kv_read": B * _kv_read(cfg, context, kv_shared),
        "sampler": sampler_passes * T * V * FP32,
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(step=self.step.to_dict(), encoder=self.encoder.to_dict())
        return d


def estimate(
    decoder: PassCost,
    encoder: PassCost,
    device: Device,
    schedule: Schedule = Schedule(),
    basis: str = "peak",
) -> Estimate:
    """Canvas time and tokens/s: S steps (or verifies + drafts) + one canvas commit."""
    step, enc = floor(decoder, device, basis), floor(encoder, device, basis)
    native = schedule.steps_per_canvas * step.floor_s + enc.floor_s
    drafts = schedule.drafter_passes * schedule.drafter_cost
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
    )


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
) -> dict:
    """Everything `python -m bench.cost --json` prints, as a dict."""
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
    per_device = {
        d.name: {b: estimate(dec, enc, d, schedule, b).to_dict() for b in _bases(d)}
        for d in (list(DEVICES.values()) if devices is None else devices)
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
        "devices": per_device,
        "assumptions": ASSUMPTIONS,
    }


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
        "--measure",
        action="store_true",
        help="measure this machine (device this-machine)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


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
    )
    rep["preset"] = None if args.config else args.preset
    if measured:
        rep["measured"] = measured
    if args.json:
        print(json.dumps(rep))
        return 0
    if measured:
        bw, mm = measured["bandwidth_gbs"]["value"], measured["matmul_tflops"]["value"]
        print(f"this machine: {mm:.3f} TFLOP/s fp32 matmul, {bw:.1f} GB/s copy")
    print(_text(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DiffusionGemma's text model in plain PyTorch (spec §3): one weight set, two modes.

`encode` is a causal pass that appends K/V to the cache (encoder layer scalars);
`decode` is a bidirectional pass over [cache ; canvas] with self-conditioning that
returns softcapped float32 logits and never changes the cache (decoder scalars).

Attribute names are the checkpoint's names without `model.decoder.` (see
`core.checkpoint.hf_to_internal`), so a state dict loads one to one; the experts stay
fused as `gate_up_proj [E, 2*Ie, H]` and `down_proj [E, H, Ie]`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.layout import HiddenLayout
from mlx_diffgem.core.plan import PassPlan
from mlx_diffgem.core.validate import check_pass_sc

from .cache import Cache, LayerCache, Masks
from .expert_gemm import FLOATS, choose, grouped_linear, training, triton_grouped


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back to the input dtype; the weight as is (no 1 + w)."""
    y = x.float()
    y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """Gated GELU MLP (the dense branch and the self-conditioning block)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.gate_proj(x)) * self.up_proj(x))


class SelfConditioning(MLP):
    """pre_norm -> gated MLP; `post_norm` has no weight and is applied by the model."""

    def __init__(self, hidden: int, inner: int, eps: float):
        super().__init__(hidden, inner)
        self.pre_norm = RMSNorm(hidden, eps)

    def forward(self, soft: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pre_norm(soft))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [B, S, h, D], cos/sin [S, D] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        self.head_dim, self.kv_heads = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        self.sliding = not cfg.is_full(i)
        self.eps = cfg.rms_norm_eps
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(H, nh * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=bias)
        # Full layers have no v_proj: V is the raw k_proj output (k == v, spec §3.2).
        if self.sliding:
            self.v_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(nh * self.head_dim, H, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, self.eps)
        self.k_norm = RMSNorm(self.head_dim, self.eps)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim)
        q = rope(self.q_norm(q), cos, sin).transpose(1, 2)  # [B, nh, S, D]
        k0 = self.k_proj(x).view(B, S, -1, self.head_dim)
        v0 = self.v_proj(x).view(B, S, -1, self.head_dim) if self.sliding else k0
        k = rope(self.k_norm(k0), cos, sin).transpose(1, 2)  # [B, kv, S, D]
        v = rms_norm(v0, None, self.eps).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rot: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        layer_cache: LayerCache,
        encoder: bool,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self._qkv(x, *rot)
        group = q.shape[1] // self.kv_heads
        if encoder:
            k, v = layer_cache.append(k, v)
            # Once per canvas: repeat K/V so the [B, 1, S, keys] mask broadcasts.
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            # A left pad early in a row attends to nothing: torch's math kernel gives
            # 0 there (as the reference gets), other kernels may give NaN.
            o = o.nan_to_num(0.0)
        else:
            k, v = layer_cache.with_canvas(k, v)
            o = decoder_attention(q, k, v, mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


# Fold query groups in the decoder: None = on every device but the CPU.
FOLD_GQA: bool | None = None


def decoder_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Bidirectional attention of q [B, nh, S, D] over k, v [B, kv, keys, D].

    On GPUs each KV head's query group is folded into the query axis: any SDPA kernel
    takes it, and no step copies the cached K/V. On the CPU the reference's own GQA
    call keeps the GEMM shapes, so float32 logits match transformers bit for bit.
    """
    B, nh, S, D = q.shape
    kv = k.shape[1]
    fold = FOLD_GQA if FOLD_GQA is not None else q.device.type != "cpu"
    if fold:
        if mask is not None and mask.shape[2] > 1:  # a layout: one row per query
            mask = mask.repeat(1, 1, nh // kv, 1)  # folded queries: group-major
        o = F.scaled_dot_product_attention(
            q.reshape(B, kv, nh // kv * S, D), k, v, attn_mask=mask, scale=1.0
        )
        return o.reshape(B, nh, S, D)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True
    )


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, E = cfg.hidden_size, cfg.num_experts
        self.top_k, self.eps = cfg.top_k_experts, cfg.rms_norm_eps
        self.proj = nn.Linear(H, E, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(E))

    def forward(self, r: torch.Tensor, top_k: int | None = None) -> tuple:
        """Top-k expert weights (float32) and ids from the raw residual r [N, H];
        `top_k` overrides the config's k (a self-drafter uses fewer experts)."""
        z = rms_norm(r, None, self.eps) * self.scale * r.shape[-1] ** -0.5
        probs = torch.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        # softmax over all E, then top-k
        w, idx = torch.topk(probs, top_k or self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """The routed experts as two grouped GEMMs over tokens sorted by expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, Ie = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Ie, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, Ie))
        # The expert-GEMM path (expert_gemm.choose), fixed once the weights sit on
        # their device and dtype (`use_expert_path`); None: chosen at every call.
        self.path: str | None = None

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        """x [N, H], w [N, K] float32, idx [N, K] -> [N, H] in x's dtype."""
        N, K = idx.shape
        E = self.gate_up_proj.shape[0]
        flat = idx.reshape(-1)
        # Unstable sort, as the reference: the row order inside a group changes GEMM
        # rounding on some BLAS builds.
        ids, order = torch.sort(flat)
        # End row of each expert's group, without a host sync (graph friendly).
        experts = torch.arange(E, device=ids.device, dtype=ids.dtype)
        offs = torch.searchsorted(ids, experts, right=True).to(torch.int32)
        y = self.project(
            "down_proj", self.activated(x[order // K], offs, ids), offs, ids
        )
        # The reference multiplies in float32 and sums the K picks in float32 once.
        y = y.float() * w.reshape(-1)[order, None]
        out = torch.empty_like(y)
        out[order] = y
        return out.view(N, K, -1).sum(dim=1).to(x.dtype)

    def activated(
        self, x: torch.Tensor, offs: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """gelu(x gate^T) * (x up^T) for rows sorted by expert; one kernel on Triton."""
        fused = self.path == "triton" and not training(self.gate_up_proj)
        if fused and type(self).project is Experts.project:
            return triton_grouped(x, self.gate_up_proj, offs, True)
        gate, up = self.project("gate_up_proj", x, offs, ids).chunk(2, dim=-1)
        return gelu(gate) * up

    def project(
        self, name: str, x: torch.Tensor, offs: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """Rows x (sorted by expert, `ids` = their experts) times weight `name`."""
        return grouped_linear(x, getattr(self, name), offs, self.path)


def use_expert_path(model: nn.Module) -> str:
    """Fix every expert layer's GEMM path for its weights as they are now; the path."""
    paths = set()
    for m in model.modules():
        if isinstance(m, Experts):
            w = m.gate_up_proj  # int8 / fp8 experts multiply in the model's dtype
            quantized = w.dtype not in FLOATS
            m.path = choose(w[:0].to(model.dtype) if quantized else w, quantized)
            paths.add(m.path)
    if len(paths) > 1:
        raise RuntimeError(
            f"expert layers disagree on their GEMM path: {sorted(paths)}"
        )
    return paths.pop() if paths else "none"


_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "post_feedforward_layernorm_1",
    "pre_feedforward_layernorm_2",
    "post_feedforward_layernorm_2",
)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        for name in _NORMS:
            setattr(self, name, RMSNorm(H, eps))
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(H, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        # Only these differ between the modes (buffers, separate in the checkpoint).
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(
        self,
        h: torch.Tensor,
        rot: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        layer_cache: LayerCache,
        encoder: bool,
        top_k: int | None = None,
    ) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), rot, mask, layer_cache, encoder)
        r = h + self.post_attention_layernorm(a)
        h1 = self.post_feedforward_layernorm_1(
            self.mlp(self.pre_feedforward_layernorm(r))
        )
        flat = r.reshape(-1, r.shape[-1])
        w, idx = self.router(flat, top_k)  # the router reads the raw residual
        h2 = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx)
        h2 = self.post_feedforward_layernorm_2(h2.view(r.shape))
        h = r + self.post_feedforward_layernorm(h1 + h2)
        return h * (self.encoder_layer_scalar if encoder else self.layer_scalar)


class Model(nn.Module):
    """The DiffusionGemma text stack shared by the encoder and the decoder."""

    # Set by `compile.compile_model`. Eager passes run under inference_mode (~13%
    # less dispatch than no_grad on small shapes); torch.compile cannot trace views
    # under inference_mode (pytorch#180823), so compiled passes use no_grad.
    compiled = False
    # A compiled decoder-mode layer (`compile.compile_model`, layer scope) or None.
    decoder_layer = None
    # The canvas loop's sampler: one Triton kernel (sampling.fused_step) or torch ops.
    fused_sampler = False
    # Plain decoder passes replayed as CUDA graphs per context bucket
    # (`graphs.GraphedDecode`, set by `compile.compile_model`), or None.
    graphs = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(H, eps)
        self.self_conditioning = SelfConditioning(H, cfg.intermediate_size, eps)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)build the float32 RoPE frequencies on the embedding's device and the
        embedding scale for its dtype: call it after loading weights onto the
        meta-built module (and do not cast the frequencies)."""
        # sqrt(H) rounded to the weight dtype first: 53.0 in bf16 for H = 2816.
        scale = torch.tensor(math.sqrt(self.config.hidden_size), device="cpu")
        self._embed_scale = float(scale.to(self.dtype))
        device = self.embed_tokens.weight.device
        # One layer of each kind gives its frequencies (unused if there is none).
        layer_of = {not self.config.is_full(i): i for i in range(len(self.layers))}
        for sliding, name in ((False, "inv_freq_full"), (True, "inv_freq_sliding")):
            inv = self.config.rope_inv_freq(layer_of.get(sliding, 0))
            self.register_buffer(name, torch.as_tensor(inv, device=device), False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed_scale(self) -> float:
        """sqrt(H) as the weight dtype holds it (the reference's rounding)."""
        return self._embed_scale

    def _rotations(self, positions: torch.Tensor) -> dict[bool, tuple]:
        out = {}
        for sliding in (False, True):
            inv = getattr(self, f"inv_freq_{'sliding' if sliding else 'full'}").float()
            f = positions.float()[:, None] * inv[None]
            emb = torch.cat((f, f), dim=-1)
            out[sliding] = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
        return out

    def _layers(
        self,
        h,
        positions,
        masks: Masks,
        cache: Cache,
        encoder: bool,
        plan: PassPlan | None = None,
    ):
        rot = self._rotations(positions)
        top_k = None if plan is None else plan.top_k
        for i, (layer, layer_cache) in enumerate(
            zip(self.layers, cache.layers, strict=True)
        ):
            if plan is not None and not plan.keeps(i):
                h = h * layer.layer_scalar  # a skipped layer still scales the stream
                continue
            s = layer.self_attn.sliding
            if encoder or self.decoder_layer is None:
                h = layer(h, rot[s], masks[s], layer_cache, encoder, top_k)
            else:
                h = self.decoder_layer(layer, h, rot[s], masks[s], layer_cache, top_k)
        return h

    def grad_off(self):
        """The no-autograd context of this model's passes (see `compiled`)."""
        return torch.no_grad() if self.compiled else torch.inference_mode()

    def encode(self, ids: torch.Tensor, cache: Cache, attention_mask=None) -> None:
        """Causal pass over ids [B, S] (long) that appends their K/V to `cache`.

        attention_mask: [B, S] numpy for the new ids only, 1 = token, 0 = padding.
        """
        with self.grad_off():
            positions, masks = cache.begin_encode(ids.shape[1], attention_mask)
            h = self.embed_tokens(ids) * self.embed_scale()
            self._layers(h, positions, masks, cache, encoder=True)
            cache.end_encode(ids.shape[1])

    def _decoder_input(
        self,
        canvas: torch.Tensor,
        sc: torch.Tensor | None,
        plan: PassPlan | None = None,
        layout: HiddenLayout | None = None,
    ) -> torch.Tensor:
        if layout is not None:
            layout.check_pass(canvas.shape, sc is not None)
        scale = self.embed_scale()
        e = self.embed_tokens(canvas) * scale
        if sc is not None:
            check_pass_sc(sc.shape, canvas.shape, self.config.vocab_size, plan)
            # Expected embedding under the previous step's distribution (spec §3.6).
            e = e + self.self_conditioning(self._soft_embed(sc, plan) * scale)
        # Without sc the block sees zeros and adds exactly zero; skip it.
        return rms_norm(e, None, self.config.rms_norm_eps)

    def _soft_embed(
        self, sc: torch.Tensor, plan: PassPlan | None = None
    ) -> torch.Tensor:
        """softmax(sc) @ E; a plan with sc_top_k takes it over each row's top k."""
        k = None if plan is None else plan.sc_top_k
        if k is None:  # sc narrower than V: a drafter's sub-vocabulary
            p = torch.softmax(sc, dim=-1, dtype=torch.float32).to(self.dtype)
            return p @ self.embed_tokens.weight[: sc.shape[-1]]
        vals, idx = torch.topk(sc.float(), k, dim=-1)
        p = torch.softmax(vals, dim=-1).to(self.dtype)
        rows = self.embed_tokens(idx)  # [B, C, k, H]
        return (p.unsqueeze(-2) @ rows).squeeze(-2)

    def decode(
        self,
        canvas: torch.Tensor,
        cache: Cache,
        self_conditioning: torch.Tensor | None = None,
        plan: PassPlan | None = None,
        layout: HiddenLayout | None = None,
    ) -> torch.Tensor:
        """Bidirectional pass: canvas [B, C] long -> logits [B, C, V] float32
        ([B, C, head_vocab] under a plan with a sub-vocabulary head, which also
        takes self-conditioning of that width).

        plan: a `PassPlan` (core/plan.py): run this pass as a drafter made of these
        weights (fewer layers and experts, top-k soft embedding, sub-vocabulary head,
        a trained drafter's own layers).
        layout: a `HiddenLayout` (core/layout.py): canvas is [B, 2C], query slots
        then reference slots at the same positions, under the layout's order mask;
        the logits are the query slots' [B, C, V].
        """
        if self.graphs is not None and plan is None and layout is None:
            return self.graphs(canvas, cache, self_conditioning)
        with self.grad_off():
            order = None if layout is None else layout.mask()
            positions, masks = cache.decoder_masks(canvas.shape[1], order)
            h = self._decoder_input(canvas, self_conditioning, plan, layout)
            h = self._layers(h, positions, masks, cache, False, plan)
            if layout is not None:
                h = h[:, : canvas.shape[1] // 2]  # a layout's logits: the queries'

            if plan is not None and plan.adapter is not None:
                h = plan.adapter(h)  # a trained drafter's own layers
            return self._head(self.norm(h), plan)

    def _head(self, h: torch.Tensor, plan: PassPlan | None = None) -> torch.Tensor:
        """Softcapped fp32 logits over the vocabulary, or over a plan's first
        `head_vocab` ids only (the drafter's sampler then works on that width)."""
        rows = None if plan is None else plan.head_vocab
        weight = self.embed_tokens.weight
        logits = F.linear(h, weight if rows is None else weight[:rows]).float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap

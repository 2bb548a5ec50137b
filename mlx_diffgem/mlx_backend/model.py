"""DiffusionGemma's text model in MLX, exact to transformers 5.23.0 (spec §3).

One set of weights runs in two modes. `Model.encode` is a causal pass that appends K/V
to the cache (encoder layer scalars, no head). `Model.decode` is the bidirectional
denoiser over [cached K/V ; canvas]: it reads the cache, never writes it, applies
self-conditioning and the decoder layer scalars, and returns softcapped fp32 logits.
Module attributes carry the checkpoint's names, so `sanitize` is a short mapping.
"""

from __future__ import annotations

import math
import re

import numpy as np

from mlx_diffgem.core.config import ModelConfig
from mlx_diffgem.core.layout import HiddenLayout
from mlx_diffgem.core.plan import PassPlan
from mlx_diffgem.core.validate import check_pass_sc

from ._blas import import_mlx
from .cache import Cache, make_cache

mx = import_mlx()
import mlx.nn as nn  # noqa: E402
from mlx_lm.models.switch_layers import SwitchGLU  # noqa: E402

_DROP = ("model.encoder.vision_tower.", "model.encoder.embed_vision.", "lm_head.")
_ENCODER_SCALAR = re.compile(
    r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar"
)


def _rms(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """RMSNorm computed in fp32 and cast back once (spec §3.1: y = x̂ · w, no 1 + w)."""
    w = None if weight is None else weight.astype(mx.float32)
    return mx.fast.rms_norm(x.astype(mx.float32), w, eps).astype(x.dtype)


def _gelu(x: mx.array) -> mx.array:
    # torch's tanh GELU rounds once from fp32; so do we.
    return nn.gelu_approx(x.astype(mx.float32)).astype(x.dtype)


def _gelu_glu(x_up: mx.array, x_gate: mx.array) -> mx.array:
    return _gelu(x_gate) * x_up


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return _rms(x, self.weight, self.eps)


class MLP(nn.Module):
    """Gated GELU MLP (the dense branch of every layer)."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(_gelu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Self-attention of layer i (spec §3.2): scale 1.0, q/k norms, k == v if full."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        H, nh, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        self.head_dim = D = cfg.layer_head_dim(i)
        kv = cfg.layer_kv_heads(i)
        self.eps = cfg.rms_norm_eps
        self.q_proj = nn.Linear(H, nh * D, bias=bias)
        self.k_proj = nn.Linear(H, kv * D, bias=bias)
        if not cfg.is_full(i):
            self.v_proj = nn.Linear(H, kv * D, bias=bias)
        self.o_proj = nn.Linear(nh * D, H, bias=bias)
        self.q_norm = RMSNorm(D, self.eps)
        self.k_norm = RMSNorm(D, self.eps)
        # mx.fast.rope takes periods (1 / inv_freq). Unrotated pairs of the proportional
        # RoPE (inv_freq 0) get the largest finite period: angle ~1e-33, cos 1, x exact.
        inv = cfg.rope_inv_freq(i)
        big = np.finfo(np.float32).max
        with np.errstate(divide="ignore"):
            self._periods = mx.array(
                np.where(inv > 0, 1.0 / inv, big).astype(np.float32)
            )

    def _rope(self, x: mx.array, offset: int, copies: int = 1) -> mx.array:
        """RoPE at positions offset, offset+1, ...; with `copies`, the sequence is
        that many copies of a canvas, each at the canvas's positions."""
        if copies > 1:
            B, h, S, D = x.shape
            y = self._rope(x.reshape(B, h, copies, S // copies, D), offset)
            return y.reshape(B, h, S, D)
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )

    def project(self, x: mx.array, offset: int, copies: int = 1) -> tuple:
        """q, k, v [B, heads, S, D] of x [B, S, H] at positions offset, offset+1, ...
        (`copies`: x is that many copies of a canvas, each at the same positions)."""
        B, S, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).reshape(B, S, -1, D)
        k0 = self.k_proj(x).reshape(B, S, -1, D)
        # Full layers have no v_proj: V is the raw k_proj output, normed without scale.
        v0 = self.v_proj(x).reshape(B, S, -1, D) if "v_proj" in self else k0
        q = self._rope(self.q_norm(q).transpose(0, 2, 1, 3), offset, copies)
        k = self._rope(self.k_norm(k0).transpose(0, 2, 1, 3), offset, copies)
        v = _rms(v0, None, self.eps).transpose(0, 2, 1, 3)
        return q, k, v

    def __call__(self, x, store, offset: int, mask, write: bool, copies=1) -> mx.array:
        B, S, _ = x.shape
        q, k, v = self.project(x, offset, copies)
        if write:
            k, v = store.append(k, v)
        elif store.length:
            # The decoder reads [cache ; canvas]; its slots stay as they were.
            k, v = store.with_scratch(k, v)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, S, -1))


class Router(nn.Module):
    """Top-k routing (spec §3.3): softmax over all experts, top-k, renorm, scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, E = cfg.hidden_size, cfg.num_experts
        self.proj = nn.Linear(H, E, bias=False)
        self.scale = mx.ones((H,))
        self.per_expert_scale = mx.ones((E,))
        self.top_k = cfg.top_k_experts
        self.eps = cfg.rms_norm_eps
        self.root = H**-0.5

    def __call__(self, r: mx.array, top_k: int | None = None) -> tuple:
        """(weights [.., k] float32, expert ids [.., k]); `top_k` overrides the
        config's k (a self-drafter routes each token to fewer experts)."""
        z = _rms(r, None, self.eps) * self.scale * self.root
        p = mx.softmax(self.proj(z).astype(mx.float32), axis=-1)
        k = top_k or self.top_k
        idx = mx.argpartition(-p, kth=k - 1, axis=-1)[..., :k]
        w = mx.take_along_axis(p, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        return w * self.per_expert_scale[idx].astype(mx.float32), idx


class DecoderLayer(nn.Module):
    """One layer (spec §3.3), shared by both modes except for its output scalar."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(H, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = SwitchGLU(
            H, cfg.moe_intermediate_size, cfg.num_experts, activation=_gelu_glu
        )
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(H, eps))
        self.layer_scalar = mx.ones((1,))
        self.encoder_layer_scalar = mx.ones((1,))

    def __call__(
        self, h, store, offset: int, mask, encoder: bool, top_k=None, copies=1
    ) -> mx.array:
        """One layer over h [B, S, H]; `top_k` overrides the experts per token (a
        drafter's plan), `copies` lays the canvas out that many times (a layout)."""
        x = self.input_layernorm(h)
        a = self.self_attn(x, store, offset, mask, write=encoder, copies=copies)
        r = h + self.post_attention_layernorm(a)
        h1 = self.post_feedforward_layernorm_1(
            self.mlp(self.pre_feedforward_layernorm(r))
        )
        h2 = self.post_feedforward_layernorm_2(self._experts(r, top_k))
        h = r + self.post_feedforward_layernorm(h1 + h2)
        scalar = self.encoder_layer_scalar if encoder else self.layer_scalar
        return h * scalar.astype(h.dtype)

    def _experts(self, r: mx.array, top_k: int | None = None) -> mx.array:
        # The router reads the raw residual; the experts read a separately normed copy.
        w, idx = self.router(r, top_k)
        y = self.experts(self.pre_feedforward_layernorm_2(r), idx)  # [B, S, K, H]
        return (y.astype(mx.float32) * w[..., None]).sum(axis=-2).astype(r.dtype)


class SelfConditioning(nn.Module):
    """Mixes the previous step's soft embedding into the decoder input (spec §3.6)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.pre_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)
        self.eps = cfg.rms_norm_eps

    def __call__(self, e: mx.array, soft: mx.array | None) -> mx.array:
        # No signal (first step) makes the MLP output exactly 0: skip it. The input is
        # still normalised without scale (post_norm), unlike the encoder's.
        if soft is not None:
            g = self.pre_norm(soft)
            e = e + self.down_proj(_gelu(self.gate_proj(g)) * self.up_proj(g))
        return _rms(e, None, self.eps)


class Model(nn.Module):
    """The DiffusionGemma text stack, shared by the encoder and the denoiser."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]

    @property
    def embed_scale(self) -> mx.array:
        """sqrt(H) in the embedding dtype (bf16: 53.0, not 53.066; spec §8.9)."""
        return mx.array(math.sqrt(self.config.hidden_size), self.dtype)

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (that of the embedding, or its scales if quantized)."""
        emb = self.embed_tokens
        return (
            emb.scales.dtype
            if isinstance(emb, nn.QuantizedEmbedding)
            else emb.weight.dtype
        )

    def make_cache(self, batch_size: int = 1) -> Cache:
        return make_cache(self.config, batch_size)

    def encode(
        self, ids: mx.array, cache: Cache, attention_mask: mx.array | None = None
    ) -> None:
        """Causal pass over ids [B, S] that appends their K/V to `cache` (spec §3.5).

        Args:
            ids: token ids at positions cache.offset, ..., cache.offset + S - 1.
            cache: the cache to extend; its padding mask covers the earlier slots.
            attention_mask: [B, S], 1 = real token, 0 = pad (for these ids only).
        """
        ids = mx.array(ids)
        S = _check_ids(ids, cache, "ids")
        if attention_mask is not None:
            attention_mask = mx.array(attention_mask)
        if attention_mask is not None and attention_mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(ids.shape)} (one entry per new "
                f"id), got {tuple(attention_mask.shape)}"
            )
        if attention_mask is not None and mx.all(attention_mask).item():
            attention_mask = None  # no padding: no masks to build
        pad = attention_mask
        masks = self._masks(cache, lambda n, w: _causal_mask(cache, n, S, w, pad))
        h = self.embed_tokens(ids) * self.embed_scale
        for layer, store, mask in zip(self.layers, cache.layers, masks, strict=True):
            h = layer(h, store, cache.offset, mask, encoder=True)
        cache.advance(S, attention_mask)
        # The last hidden state is unused: only the K/V are evaluated (lazily skipping
        # the last layer's feed-forward), which also keeps the cache's graph short.
        mx.async_eval(cache.state)

    def decode(
        self,
        canvas: mx.array,
        cache: Cache,
        self_conditioning: mx.array | None = None,
        plan: PassPlan | None = None,
        layout: HiddenLayout | None = None,
    ) -> mx.array:
        """One denoiser pass over canvas [B, C]: fp32 softcapped logits [B, C, V]
        ([B, C, head_vocab] under a plan with a sub-vocabulary head).

        Args:
            canvas: ids at positions cache.offset, ..., cache.offset + C - 1.
            cache: read only; the canvas attends to all of it (sliding layers: to the
                W-1 slots they keep) and bidirectionally to itself.
            self_conditioning: the previous step's processed logits [B, C, V] or None
                (under a plan with head_vocab, [B, C, head_vocab] also: a drafter's).
            plan: a `PassPlan` (core/plan.py): run this pass as a drafter made of these
                weights (fewer layers and experts, top-k soft embedding,
                sub-vocabulary head, a trained drafter's own layers).
            layout: a `HiddenLayout` (core/layout.py): canvas is [B, 2C], query slots
                then reference slots at the same positions, attending under the
                layout's order mask; the logits are the query slots' [B, C, V].
        """
        canvas = mx.array(canvas)
        S = _check_ids(canvas, cache, "canvas")
        copies = 1 if layout is None else 2
        h = self._decoder_input(canvas, self_conditioning, plan, layout)
        if layout is None:
            masks = self._masks(cache, lambda n, w: _canvas_mask(cache, n, S))
        else:
            order = mx.array(layout.mask())
            masks = self._masks(cache, lambda n, w: _layout_mask(cache, n, order))
        top_k = None if plan is None else plan.top_k
        for i, (layer, store, mask) in enumerate(
            zip(self.layers, cache.layers, masks, strict=True)
        ):
            if plan is None or plan.keeps(i):
                h = layer(h, store, cache.offset, mask, False, top_k, copies)
            else:  # a skipped layer still scales the residual stream
                h = h * layer.layer_scalar.astype(h.dtype)
        h = h[:, : S // copies]  # a layout's logits: the query slots'
        if plan is not None and plan.adapter is not None:
            h = plan.adapter(h)  # a trained drafter's own layers
        return self._head(self.norm(h), plan)

    def _decoder_input(self, canvas, sc, plan, layout) -> mx.array:
        """The embedded canvas, with the previous step's self-conditioning mixed in."""
        if layout is not None:
            layout.check_pass(canvas.shape, sc is not None)
        if sc is not None:
            check_pass_sc(sc.shape, canvas.shape, self.config.vocab_size, plan)
        e = self.embed_tokens(canvas) * self.embed_scale
        soft = None if sc is None else self._soft_embed(sc, plan)
        return self.self_conditioning(e, soft)

    def _head(self, h: mx.array, plan: PassPlan | None = None) -> mx.array:
        """Softcapped fp32 logits over the vocabulary, or over a plan's first
        `head_vocab` ids only (the drafter's sampler then works on that width)."""
        cap = self.config.final_logit_softcapping
        rows = None if plan is None else plan.head_vocab
        if rows is None:
            logits = self.embed_tokens.as_linear(h).astype(mx.float32)
            return mx.tanh(logits / cap) * cap
        emb = self.embed_tokens
        if isinstance(emb, nn.QuantizedEmbedding):
            kw = dict(transpose=True, group_size=emb.group_size, bits=emb.bits)
            w = (emb.weight[:rows], emb.scales[:rows], emb.biases[:rows])
            logits = mx.quantized_matmul(h, *w, **kw)
        else:
            logits = h @ emb.weight[:rows].T
        return mx.tanh(logits.astype(mx.float32) / cap) * cap

    def _soft_embed(self, logits: mx.array, plan: PassPlan | None = None) -> mx.array:
        """softmax(logits) @ E * embed_scale: the expected embedding (spec §3.6);
        a plan with sc_top_k takes the expectation over each position's top k."""
        k = None if plan is None else plan.sc_top_k
        if k is not None:
            s = logits.astype(mx.float32)
            idx = mx.argpartition(-s, kth=k - 1, axis=-1)[..., :k]
            p = mx.softmax(mx.take_along_axis(s, idx, axis=-1), axis=-1)
            rows = self.embed_tokens(idx)  # [B, C, k, H], dequantized if needed
            soft = (p.astype(self.dtype)[..., None, :] @ rows).squeeze(-2)
            return soft * self.embed_scale
        p = mx.softmax(logits.astype(mx.float32), axis=-1).astype(self.dtype)
        emb = self.embed_tokens
        n = logits.shape[-1]  # < V: a drafter's sub-vocabulary
        if isinstance(emb, nn.QuantizedEmbedding):
            kw = dict(transpose=False, group_size=emb.group_size, bits=emb.bits)
            w = (emb.weight[:n], emb.scales[:n], emb.biases[:n])
            soft = mx.quantized_matmul(p, *w, **kw)
        else:
            soft = p @ emb.weight[:n]
        return soft * self.embed_scale

    def _masks(self, cache: Cache, build) -> list:
        """One mask per layer, built once per layer type from its cached length."""
        window = self.config.sliding_window
        built: dict[str, object] = {}
        out = []
        for kind, store in zip(self.config.layer_types, cache.layers, strict=True):
            if kind not in built:
                sliding = kind == "sliding_attention"
                built[kind] = build(store.length, window if sliding else None)
            out.append(built[kind])
        return out

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map transformers checkpoint names to this module's (idempotent)."""
        out = {}
        for name, w in weights.items():
            if name.startswith(_DROP):
                continue  # vision (text-only port); lm_head is tied to the embedding
            if m := _ENCODER_SCALAR.fullmatch(name):
                out[f"layers.{m[1]}.encoder_layer_scalar"] = w
                continue
            name = name.removeprefix("model.decoder.")
            if name.endswith("experts.gate_up_proj"):  # [E, 2 * Ie, H], gate rows first
                base, half = name.removesuffix("gate_up_proj"), w.shape[1] // 2
                out[base + "gate_proj.weight"] = w[:, :half]
                out[base + "up_proj.weight"] = w[:, half:]
            elif name.endswith("experts.down_proj"):
                out[name + ".weight"] = w
            else:
                out[name] = w
        return out


def _check_ids(ids: mx.array, cache: Cache, name: str) -> int:
    """The length of ids [B, S], checked against the cache's batch size."""
    if ids.ndim != 2 or ids.shape[0] != cache.batch_size or ids.shape[1] == 0:
        raise ValueError(
            f"{name}: expected shape (batch={cache.batch_size}, length >= 1), "
            f"got {tuple(ids.shape)}"
        )
    return ids.shape[1]


def _causal_mask(cache: Cache, n_cached: int, S: int, window: int | None, new_pad):
    """Encoder mask of S new queries over [n_cached kept slots ; S new] (spec §3.5).

    Query q sees key j iff j <= q (and q - W < j on sliding layers) and j is real.
    """
    start = cache.offset
    pad = cache.padding(n_cached, new_pad, S)
    if pad is None and (window is None or n_cached + S <= window):
        return "causal"  # lower-right aligned, as sdpa defines it
    q = mx.arange(start, start + S)[:, None]
    j = mx.arange(start - n_cached, start + S)[None]
    mask = j <= q
    if window is not None:
        mask = mask & (j > q - window)
    if pad is None:
        return mask
    # Padded queries also see themselves: finite rows that no real token reads.
    mask = (mask[None] & pad[:, None, :]) | (j == q)[None]
    return mask[:, None]  # [B, 1, S, K]


def _layout_mask(cache: Cache, n_cached: int, order: mx.array) -> mx.array:
    """A hidden layout's mask [B, 1, 2C, n_cached + 2C]: every slot sees the real
    cached slots; among the slots, the layout's order mask (core/layout.py)."""
    B, S, _ = order.shape
    pad = cache.padding(n_cached)
    seen = mx.ones((B, S, n_cached), mx.bool_)
    if pad is not None:
        seen = seen & pad[:, None, :]
    return mx.concatenate([seen, order], axis=2)[:, None]


def _canvas_mask(cache: Cache, n_cached: int, C: int):
    """Decoder mask: every canvas query sees all real cached slots and the canvas."""
    pad = cache.padding(n_cached, None, C)
    return None if pad is None else pad[:, None, None, :]  # [B, 1, 1, n_cached + C]

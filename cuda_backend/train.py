"""DiffusionGemma's block-diffusion training objective in PyTorch.

It trains the cuda_backend `Model` as is (checkpoint names are attribute names), so
the weights export to the release layout through `internal_to_hf`. One training
sequence is a clean prefix of P tokens followed by n canvases of C tokens:

1. Encoder: the shared stack runs causally over the clean sequence with the encoder
   layer scalars. Its per-layer K/V are kept, with gradients; an optional auxiliary
   next-token loss (`--ar-weight`, off by default: it costs ~10% per step) reads its
   final-norm states through the tied head.
2. Noise: every canvas gets a level t ~ U(0, 1) (stratified over the batch); each of
   its positions becomes a uniform id over the whole vocabulary with probability t
   (no mask token, as released).
3. Decoder pass 1 (no grad, no self-conditioning): all canvases in one forward,
   folded into the batch: canvas b sees the encoder K/V of the clean tokens before
   it (sliding layers: the last W-1 of them) and itself, bidirectionally; nothing of
   its own block's clean tokens or later ones.
4. Decoder pass 2: the first half of the rows (rows are i.i.d., so this is a random
   half) get pass 1's logits divided by a random temperature in [t_min, t_max] as
   self-conditioning, what the sampler feeds back; the other half get none.
5. Loss: cross-entropy on every canvas position, noised or not, equally weighted
   (the model cannot tell noise from clean tokens, and the sampler reads all of
   them), + ar_weight * the encoder's next-token loss + lb_weight * a Switch-style
   load-balancing loss on the routers + cf_weight * certainty forcing: the entropy
   of softmax(logits / cf_temp) on the positions the model already predicts right
   (dParallel, arXiv 2509.26488), which is what lets the sampler's stop rule (mean
   entropy < 0.005) fire; `cf_max_t` < 1 applies it only to canvases noised at most
   that much. `noise_power` > 1 draws more low-noise canvases
   (t = u ** power), where that stop decision is made. `plausible` > 0 gives that
   share of the noised positions the model's own sample instead of a uniform id
   (`plausible_noise`), so that a plain pass learns to flag plausible wrong tokens.

    python -m cuda_backend.corpus --out runs/corpus       # optional: train builds it
    python -m cuda_backend.train --out runs/default --steps 500 --batch 8
    python -m cuda_backend.train --out runs/default --resume
    python -m cuda_backend.train --out runs/default --export mlx_diffgem/assets/default
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlx_diffgem.core.checkpoint import internal_to_hf
from mlx_diffgem.core.config import RELEASE_GENERATION, ModelConfig
from mlx_diffgem.core.tiny import TINY_TEXT, tiny_config_dict

from . import corpus
from .model import Model, rms_norm

# The release's sampler settings (spec §1.4); eos is ours (no turn tokens here).
GENERATION = {
    **RELEASE_GENERATION,
    "eos_token_id": [corpus.EOS],
    "pad_token_id": corpus.PAD,
    "bos_token_id": corpus.BOS,
}

_SIZES = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "global_head_dim",
    "num_global_key_value_heads",
    "num_experts",
    "top_k_experts",
    "sliding_window",
)

# Text configs: the release's architecture at small scale (spec §1.3): 5 sliding
# layers : 1 full, k == v full layers with their own head dim and one KV head, MoE
# top-k < E next to the dense MLP, self-conditioning.
PRESETS = {
    "default": dict(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=64,
        num_global_key_value_heads=1,
        num_experts=8,
        top_k_experts=2,
        sliding_window=128,
    ),
    # The largest that fits the package's 50 MB in 16 bits (22.9M parameters, 45.8
    # MB): twice the width and depth of "default"; for a GPU run (train_device.sh).
    "large": dict(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=192,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        global_head_dim=128,
        num_global_key_value_heads=1,
        num_experts=8,
        top_k_experts=2,
        sliding_window=128,
    ),
    # core/tiny.py's parity-test model (its layer pattern is replaced below)
    "tiny": {k: TINY_TEXT[k] for k in _SIZES},
}


def model_config_dict(
    preset: str = "default",
    vocab_size: int = 4096,
    canvas_length: int = 64,
    **overrides,
) -> dict:
    """A release-layout config.json dict (text_config + a minimal vision_config)."""
    text = dict(PRESETS[preset], **overrides)
    n = text["num_hidden_layers"]
    text["layer_types"] = [
        "full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention"
        for i in range(n)
    ]
    raw = tiny_config_dict(
        canvas_length,
        vocab_size=vocab_size,
        max_position_embeddings=131072,
        **text,
    )
    # Reserved special tokens that text never produces (see corpus.IMAGE_TOKENS), so
    # transformers' vision-aware masks never fire on ordinary code.
    raw.update(boi_token_id=5, image_token_id=6, eoi_token_id=7)
    return raw


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def build_model(raw: dict, seed: int = 0, std: float = 0.02) -> Model:
    """A freshly initialised model with trainable layer scalars."""
    cfg = ModelConfig.from_dict(raw)
    torch.manual_seed(seed)
    model = Model(cfg)
    for layer in model.layers:
        # Buffers in the inference model; trained here (the release's differ per mode).
        for name in ("layer_scalar", "encoder_layer_scalar"):
            value = layer._buffers.pop(name)
            layer.register_parameter(name, nn.Parameter(value.clone()))
    with torch.no_grad():
        for p in model.parameters():
            nn.init.normal_(p, 0.0, std) if p.ndim >= 2 else nn.init.ones_(p)
        for layer in model.layers:
            # Attention has scale 1.0 on RMS-normed q/k: D^-1/4 on each norm starts
            # it at the usual 1/sqrt(D) temperature; training is free to sharpen it.
            att = layer.self_attn
            att.q_norm.weight.fill_(att.head_dim**-0.25)
            att.k_norm.weight.fill_(att.head_dim**-0.25)
    return model


class _Prefix:
    """Stands in for a cache layer in the encoder: keeps the layer's K/V."""

    def __init__(self) -> None:
        self.k = self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        return k, v

    def rows(self, n: int) -> _Prefix:
        out = _Prefix()
        out.k, out.v = self.k[:n], self.v[:n]
        return out


class _CanvasKeys:
    """Stands in for a cache layer in the decoder, with one canvas per batch row.

    Row (example, block b) gets the encoder K/V it may see: the last W-1 keys before
    s_b = P + b*C on sliding layers, all keys before s_b on full layers (others
    masked). Keys are rotated back by s_b, so every canvas can use the positions
    0..C-1: RoPE scores depend on position differences only, and this keeps the
    sliding layers at (W-1) + C keys per query instead of the whole sequence.
    """

    def __init__(self, prefix: _Prefix, P: int, C: int, n: int, window, inv):
        L, dev = prefix.k.shape[2], prefix.k.device
        starts = P + C * torch.arange(n, device=dev)  # s_b
        if window is None:
            span = torch.arange(P + (n - 1) * C, device=dev)[None].expand(n, -1)
            valid = span < starts[:, None]
        else:
            span = starts[:, None] - (window - 1) + torch.arange(window - 1, device=dev)
            valid = span >= 0
        idx = span.clamp(0, L - 1)  # [n, keys]
        inv = torch.as_tensor(inv, device=dev)
        f = -starts.float()[:, None] * inv[None]  # rotate by -s_b
        emb = torch.cat((f, f), dim=-1)[None, :, None, None]  # [1, n, 1, 1, D]
        self.k = _fold(_rotate(_gather(prefix.k, idx), emb.cos(), emb.sin()))
        self.v = _fold(_gather(prefix.v, idx))
        B = prefix.k.shape[0]
        canvas = valid.new_ones(n, C)
        mask = torch.cat([valid, canvas], dim=1)  # [n, keys + C]
        self.mask = mask[None].expand(B, -1, -1).reshape(B * n, 1, 1, -1)

    def with_canvas(self, k: torch.Tensor, v: torch.Tensor):
        return torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, kv, L, D], idx [n, keys] -> [B, n, kv, keys, D]."""
    return x[:, :, idx].permute(0, 2, 1, 3, 4)


def _fold(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rotations(model: Model, positions: torch.Tensor) -> dict[bool, tuple]:
    """{sliding?: (cos, sin) [S, D]} from the config's per-layer-type frequencies."""
    cfg = model.config
    out = {}
    for i in range(cfg.num_hidden_layers):
        sliding = not cfg.is_full(i)
        if sliding not in out:
            inv = torch.as_tensor(cfg.rope_inv_freq(i), device=positions.device)
            f = positions.float()[:, None] * inv[None]
            emb = torch.cat((f, f), dim=-1)
            out[sliding] = (emb.cos(), emb.sin())
    return out


def encoder_masks(L: int, window: int, device=None) -> dict[bool, torch.Tensor]:
    """Causal masks [1, 1, L, L]; sliding layers see themselves and W-1 before."""
    q = torch.arange(L, device=device)[:, None]
    k = torch.arange(L, device=device)[None]
    causal = k <= q
    return {False: causal[None, None], True: (causal & (k > q - window))[None, None]}


def _head(model: Model, h: torch.Tensor) -> torch.Tensor:
    logits = F.linear(model.norm(h), model.embed_tokens.weight).float()
    cap = model.config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def encoder_pass(model: Model, ids: torch.Tensor):
    """Causal pass over ids [B, L]: (final hidden [B, L, H], per-layer K/V)."""
    cfg = model.config
    L = ids.shape[1]
    rot = _rotations(model, torch.arange(L, device=ids.device))
    masks = encoder_masks(L, cfg.sliding_window, ids.device)
    prefixes = [_Prefix() for _ in model.layers]
    h = model.embed_tokens(ids) * model.embed_scale()
    for layer, prefix in zip(model.layers, prefixes, strict=True):
        s = layer.self_attn.sliding
        h = layer(h, rot[s], masks[s], prefix, True)
    return h, prefixes


def decoder_input(
    model: Model, canvas: torch.Tensor, sc: torch.Tensor | None
) -> torch.Tensor:
    """rms(E[c]*s + SC(softmax(sc) @ E * s)) (spec §3.6); rows of sc may be None."""
    scale = model.embed_scale()
    e = model.embed_tokens(canvas) * scale
    if sc is not None:
        # Self-conditioned rows first; the rest see a zero signal, which the block
        # maps to exactly zero (as the sampler's first step).
        p = torch.softmax(sc.float(), dim=-1)
        soft = p @ model.embed_tokens.weight * scale
        pad = soft.new_zeros(canvas.shape[0] - sc.shape[0], *soft.shape[1:])
        e = e + model.self_conditioning(torch.cat([soft, pad]))
    return rms_norm(e, None, model.config.rms_norm_eps)


def decoder_pass(model, canvas, prefixes, P, sc=None, plan=None) -> torch.Tensor:
    """Every canvas of canvas [B, n*C] denoised in one pass -> logits [B, n*C, V].

    Canvases are folded into the batch ([B*n, C]); each sees the clean encoder K/V
    before it and itself (`_CanvasKeys`), as the decoder does at inference.
    `plan` (a core.plan.PassPlan): run the drafter's layers, experts per
    token and adapter instead (its soft-embedding and head cuts are not applied:
    a drafter trains against the whole vocabulary).
    """
    cfg = model.config
    C = cfg.canvas_length
    B, n = canvas.shape[0], canvas.shape[1] // C
    rot = _rotations(model, torch.arange(C, device=canvas.device))
    keys = []
    for i, prefix in enumerate(prefixes):
        window = None if cfg.is_full(i) else cfg.sliding_window
        keys.append(_CanvasKeys(prefix, P, C, n, window, cfg.rope_inv_freq(i)))
    if sc is not None:
        sc = sc.reshape(-1, C, sc.shape[-1])
    h = decoder_input(model, canvas.reshape(B * n, C), sc)
    top_k = None if plan is None else plan.top_k
    for i, (layer, layer_keys) in enumerate(zip(model.layers, keys, strict=True)):
        if plan is not None and not plan.keeps(i):
            h = h * layer.layer_scalar  # as Model._layers: the scalar still applies
            continue
        s = layer.self_attn.sliding
        h = layer(h, rot[s], layer_keys.mask, layer_keys, False, top_k)
    if plan is not None and plan.adapter is not None:
        h = plan.adapter(h)
    return _head(model, h).view(B, n * C, -1)


# --------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------


@dataclass
class Objective:
    t_min: float = 0.4  # self-conditioning temperatures: the sampler's range
    t_max: float = 0.8
    ar_weight: float = 0.0
    lb_weight: float = 0.01
    cf_weight: float = 0.0  # certainty forcing (entropy on correct predictions)
    cf_temp: float = 0.6  # the sampler's temperatures are 0.4..0.8
    cf_max_t: float = 1.0  # certainty forcing only on canvases noised at most this much
    noise_power: float = 1.0  # t = u ** power: > 1 favours low noise
    plausible: float = 0.0  # share of noised positions given the model's own sample


def certainty(
    logits: torch.Tensor,
    target: torch.Tensor,
    temp: float,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean entropy of softmax(logits / temp) over the correctly predicted positions
    (and, if given, only where the boolean mask `where` [B, N] holds).

    Wrong positions are left to the cross-entropy: forcing certainty there would
    sharpen a mistake.
    """
    z = logits / temp
    h = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    right = logits.argmax(-1) == target
    if where is not None:
        right = right & where
    right = right.float()
    return (h * right).sum() / right.sum().clamp_min(1.0)


def noise_canvases(
    target: torch.Tensor,
    C: int,
    vocab: int,
    gen: torch.Generator,
    power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-noise corruption of each canvas of target [B, n*C] at its own level.

    Levels are stratified over the B*n canvases (one per 1/(B*n) interval, shuffled):
    the same U(0, 1) marginal with less variance per batch, raised to `power`.
    Returns (noisy, t [B, n]).
    """
    B, N = target.shape
    k = B * (N // C)
    t = (torch.randperm(k, generator=gen) + torch.rand(k, generator=gen)) / k
    t = t.pow(power).view(B, -1, 1)
    flip = torch.rand(B, N // C, C, generator=gen) < t
    noise = torch.randint(0, vocab, (B, N // C, C), generator=gen)
    # Drawn on the CPU generator (reproducible everywhere), then moved.
    flip, noise = flip.to(target.device), noise.to(target.device)
    return torch.where(flip, noise, target.view(B, -1, C)).view(B, N), t.view(B, -1)


def plausible_noise(model, noisy, target, prefixes, P, share, gen) -> torch.Tensor:
    """Plausible noise (issue 20, (c)): `share` of the noised positions take the
    model's own sample there, from a no-grad pass over the uniform-noise canvases,
    instead of a uniform id. Such tokens are plausible and often wrong: the model
    learns to correct what it sees rather than copy it, so that one plain pass over a
    drafted canvas can say no to a plausible wrong token."""
    with torch.no_grad():
        logits = decoder_pass(model, noisy, prefixes, P)
    probs = torch.softmax(logits.float(), dim=-1).flatten(0, 1).cpu()
    sample = torch.multinomial(probs, 1, generator=gen).view(noisy.shape)
    pick = torch.rand(noisy.shape, generator=gen) < share
    # Drawn on the CPU generator (reproducible everywhere), then moved.
    pick = pick.to(noisy.device) & (noisy != target)
    return torch.where(pick, sample.to(noisy.device), noisy)


class RouterBalance:
    """Switch-Transformer load balancing, read from the routers by forward hooks.

    The release has no balancing term in the forward pass; without one a small MoE
    trained from scratch tends to route everything to a few experts.
    """

    def __init__(self, model: Model):
        self.logits: list[torch.Tensor] = []
        self.choices: list[torch.Tensor] = []
        self.handles = []
        for layer in model.layers:
            router = layer.router
            self.handles.append(router.proj.register_forward_hook(self._on_logits))
            self.handles.append(router.register_forward_hook(self._on_choice))

    def _on_logits(self, module, args, out) -> None:
        if torch.is_grad_enabled():
            self.logits.append(out)

    def _on_choice(self, module, args, out) -> None:
        if torch.is_grad_enabled():
            self.choices.append(out[1])

    def loss(self) -> torch.Tensor:
        """E * sum_e(share of routed slots_e * mean prob_e): 1.0 when balanced."""
        terms = []
        for z, idx in zip(self.logits, self.choices, strict=True):
            E = z.shape[-1]
            prob = torch.softmax(z.float(), dim=-1).mean(0)
            share = torch.bincount(idx.flatten(), minlength=E).float() / idx.numel()
            terms.append(E * (share * prob).sum())
        self.logits.clear()
        self.choices.clear()
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def diffusion_loss(
    model: Model,
    ids: torch.Tensor,
    P: int,
    obj: Objective,
    gen: torch.Generator,
    balance: RouterBalance | None = None,
) -> dict[str, torch.Tensor]:
    """The training loss on ids [B, P + n*C] (steps 1-5 of the module docstring)."""
    C, V = model.config.canvas_length, model.config.vocab_size
    B = ids.shape[0]
    h, prefixes = encoder_pass(model, ids)
    ar = torch.zeros(())
    if obj.ar_weight:
        ar = F.cross_entropy(
            _head(model, h[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
        )
    target = ids[:, P:]
    noisy, t = noise_canvases(target, C, V, gen, obj.noise_power)
    if obj.plausible:
        noisy = plausible_noise(model, noisy, target, prefixes, P, obj.plausible, gen)
    half = B // 2
    sc = None
    if half:
        with torch.no_grad():
            first = decoder_pass(
                model, noisy[:half], [p.rows(half) for p in prefixes], P
            )
        span = obj.t_max - obj.t_min
        temp = obj.t_min + span * torch.rand(half, 1, 1, generator=gen)
        sc = first / temp.to(first.device)
    logits = decoder_pass(model, noisy, prefixes, P, sc)
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    ce = ce.view(B, -1)
    diff = ce.mean()
    lb = balance.loss() if balance is not None else torch.zeros(())
    cf = torch.zeros(())
    if obj.cf_weight:
        # At high noise the right predictions are mostly the easy tokens; sharpening
        # them there costs calibration where the canvas is still unknown.
        low = (t <= obj.cf_max_t).to(target.device).repeat_interleave(C, dim=1)
        cf = certainty(logits, target, obj.cf_temp, low)
    return {
        "loss": diff + obj.ar_weight * ar + obj.lb_weight * lb + obj.cf_weight * cf,
        "diff": diff,
        "diff_sc": ce[:half].mean() if half else diff,
        "diff_nosc": ce[half:].mean(),
        "ar": ar,
        "lb": lb,
        "cf": cf,
        "acc": (logits.argmax(-1) == target).float().mean(),
    }


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class Windows:
    """Random windows of a packed token stream; some start at a document's <bos>,
    as a prompt does."""

    def __init__(self, stream: np.ndarray, length: int, doc_start_frac: float = 0.25):
        if len(stream) <= length:
            raise ValueError(f"token stream of {len(stream)} is shorter than {length}")
        self.stream, self.length, self.doc_start_frac = stream, length, doc_start_frac
        starts = np.flatnonzero(stream == corpus.BOS)
        self.starts = starts[starts <= len(stream) - length]

    def sample(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        offs = rng.integers(0, len(self.stream) - self.length + 1, batch)
        if len(self.starts):
            docs = rng.choice(self.starts, batch)
            offs = np.where(rng.random(batch) < self.doc_start_frac, docs, offs)
        return np.stack([self.stream[o : o + self.length] for o in offs]).astype(
            np.int64
        )


def draw_batch(
    windows: Windows, rng: np.random.Generator, batch: int, C: int
) -> tuple[torch.Tensor, int]:
    """(ids [B, P + n*C], P) with a clean prefix P ~ U{1..C} and as many canvases as
    fit: every canvas trains with a different context length."""
    P = int(rng.integers(1, C + 1))
    n = (windows.length - P) // C
    ids = windows.sample(rng, batch)[:, : P + n * C]
    return torch.from_numpy(ids), P


# --------------------------------------------------------------------------------------
# Training loop, checkpoints, export
# --------------------------------------------------------------------------------------


@dataclass
class TrainArgs:
    out: str = "runs/default"
    data: str = "runs/corpus"
    preset: str = "default"
    canvas: int = 64
    steps: int = 700
    batch: int = 8
    seq_len: int = 512
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    ar_weight: float = 0.0
    lb_weight: float = 0.01
    cf_weight: float = 0.0
    cf_temp: float = 0.6
    cf_max_t: float = 1.0
    noise_power: float = 1.0
    plausible: float = 0.0  # share of noised positions given the model's own sample
    doc_start_frac: float = 0.25
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    ckpt_every_s: float = 300.0
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    init: str = ""  # a model folder (release layout) to continue from
    minutes: float = 0.0  # > 0: train this long; the cosine follows the time


def progress(step: int, elapsed: float, a: TrainArgs) -> float:
    """How far the run is, 0..1: by steps, or by training time when that is further."""
    frac = (step - a.warmup) / max(1, a.steps - a.warmup)
    if a.minutes > 0:
        frac = max(frac, elapsed / (60.0 * a.minutes))
    return min(1.0, max(0.0, frac))


def lr_at(step: int, a: TrainArgs, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine down to min_lr_frac * lr at the end of the run."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = progress(step, elapsed, a)
    return a.lr * (
        a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def make_optimizer(model: Model, a: TrainArgs) -> torch.optim.AdamW:
    # No decay on norms, scales and layer scalars (1-D): they are gains, not weights.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": a.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8)


def load_stream(data: str | Path, split: str) -> np.ndarray:
    path = Path(data) / f"{split}.npy"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; build it with python -m cuda_backend.corpus --out {data}"
        )
    return np.load(path, mmap_mode="r")


@torch.no_grad()
def evaluate(model: Model, windows: Windows, a: TrainArgs, obj: Objective) -> dict:
    """Mean losses on fixed held-out batches (fixed windows, prefixes and noise).

    Noise levels stay uniform whatever the training draws, so `diff` (and best.pt)
    compare across runs.
    """
    obj = dataclasses.replace(obj, noise_power=1.0, plausible=0.0)
    rng = np.random.default_rng(1234)
    gen = torch.Generator().manual_seed(1234)
    totals: dict[str, float] = {}
    for _ in range(a.eval_batches):
        ids, P = draw_batch(windows, rng, a.batch, model.config.canvas_length)
        ids = ids.to(model.embed_tokens.weight.device)
        for k, v in diffusion_loss(model, ids, P, obj, gen).items():
            totals[k] = totals.get(k, 0.0) + float(v) / a.eval_batches
    return totals


@dataclass
class RunState:
    step: int = 0
    elapsed: float = 0.0  # training seconds over all sessions
    tokens: int = 0
    best: float = math.inf  # lowest held-out diffusion loss, kept as best.pt
    history: list = dataclasses.field(default_factory=list)


def save_checkpoint(path: Path, model, opt, a: TrainArgs, raw: dict, st, rngs) -> None:
    """Model, optimizer, step and every RNG, written atomically (a crash mid-write
    keeps the previous checkpoint)."""
    np_rng, gen = rngs
    blob = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "args": dataclasses.asdict(a),
        "config": raw,
        "state": dataclasses.asdict(st),
        "np_rng": np_rng.bit_generator.state,
        "torch_gen": gen.get_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _log(st: RunState, a: TrainArgs, rec: dict, path: Path) -> None:
    st.history.append(rec)
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    if rec["kind"] == "eval":
        print(
            f"  held-out @ {rec['step']}: diff {rec['diff']:.4f} "
            f"(sc {rec['diff_sc']:.4f} / no-sc {rec['diff_nosc']:.4f}) "
            f"acc {rec['acc']:.3f}",
            flush=True,
        )
        return
    h, m = divmod(int(st.elapsed) // 60, 60)
    print(
        f"step {rec['step']}/{a.steps} loss {rec['loss']:.4f} diff {rec['diff']:.4f} "
        f"(sc {rec['diff_sc']:.3f} / no-sc {rec['diff_nosc']:.3f}) lb {rec['lb']:.3f} "
        f"acc {rec['acc']:.3f} lr {rec['lr']:.2e} {rec['tok_s']:.0f} tok/s "
        f"{h}:{m:02d} elapsed",
        flush=True,
    )


class _Meter:
    """Running means of the logged losses between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = self.tokens = 0
        self.seconds = 0.0

    def add(self, losses: dict, tokens: int, seconds: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        self.tokens += tokens
        self.seconds += seconds

    def record(self, step: int, lr: float) -> dict:
        rec = {k: v / self.count for k, v in self.sums.items()}
        rec.update(kind="train", step=step, lr=lr, tok_s=self.tokens / self.seconds)
        self.__init__()
        return rec


def _start(a: TrainArgs, blob: dict | None):
    """(raw config, model, optimizer, RunState, (numpy rng, torch generator))."""
    if blob is not None:
        raw = blob["config"]
    elif a.init:
        raw = json.loads((Path(a.init) / "config.json").read_text())
    else:
        vocab = json.loads((Path(a.data) / "meta.json").read_text())["vocab_size"]
        raw = model_config_dict(a.preset, vocab_size=vocab, canvas_length=a.canvas)
    model = build_model(raw, seed=a.seed)
    if blob is None and a.init:
        model.load_state_dict(load_weights(a.init))
    model = model.to(a.device)
    opt = make_optimizer(model, a)
    rngs = (np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed))
    st = RunState()
    if blob is not None:
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        rngs[0].bit_generator.state = blob["np_rng"]
        rngs[1].set_state(blob["torch_gen"])
        st = RunState(**blob["state"])
    return raw, model, opt, st, rngs


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """A release-layout folder's weights as fp32 training state (internal names)."""
    from mlx_diffgem.core.checkpoint import weight_files

    from .backend import load_tensors

    return load_tensors(weight_files(folder), torch.device("cpu"), torch.float32)


def check_tokenizer(data: str | Path, init: str | Path) -> None:
    """The corpus must be encoded with the tokenizer of the model it continues."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(Path(data) / "tokenizer.json")).get_vocab()
    theirs = Tokenizer.from_file(str(Path(init) / "tokenizer.json")).get_vocab()
    if ours != theirs:
        raise ValueError(
            f"{data}/tokenizer.json differs from {init}/tokenizer.json: rebuild the "
            f"corpus with python -m cuda_backend.corpus --out {data} "
            f"--tokenizer {init}/tokenizer.json"
        )


def _step(model, opt, batch, obj, gen, balance, a: TrainArgs, lr: float) -> dict:
    ids, P = batch[0].to(model.embed_tokens.weight.device), batch[1]
    for group in opt.param_groups:
        group["lr"] = lr
    losses = diffusion_loss(model, ids, P, obj, gen, balance)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
    opt.step()
    return {k: v.detach() for k, v in losses.items()}


def train(a: TrainArgs, blob: dict | None = None) -> RunState:
    """Train (or resume from `blob`, a loaded checkpoint) until `a.steps`."""
    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda"):
        # TF32 tensor cores for the float32 matmuls: ~8x the rate, 10 mantissa bits,
        # well inside what the optimizer's noise tolerates.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    raw, model, opt, st, rngs = _start(a, blob)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # export needs them
        (out / name).write_bytes((Path(a.data) / name).read_bytes())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters; from step {st.step} to {a.steps}", flush=True)
    train_w = Windows(load_stream(a.data, "train"), a.seq_len, a.doc_start_frac)
    held_w = Windows(load_stream(a.data, "heldout"), a.seq_len, a.doc_start_frac)
    obj = Objective(
        ar_weight=a.ar_weight,
        lb_weight=a.lb_weight,
        cf_weight=a.cf_weight,
        cf_temp=a.cf_temp,
        cf_max_t=a.cf_max_t,
        noise_power=a.noise_power,
        plausible=a.plausible,
    )
    balance, meter, C = RouterBalance(model), _Meter(), model.config.canvas_length
    last_save, ckpt = time.time(), out / "last.pt"
    try:
        done = st.step >= a.steps
        while not done:
            t0, lr = time.time(), lr_at(st.step, a, st.elapsed)
            batch = draw_batch(train_w, rngs[0], a.batch, C)
            losses = _step(model, opt, batch, obj, rngs[1], balance, a, lr)
            st.step += 1
            dt = time.time() - t0
            st.elapsed, st.tokens = st.elapsed + dt, st.tokens + batch[0].numel()
            meter.add(losses, batch[0].numel(), dt)
            done = st.step >= a.steps or progress(st.step, st.elapsed, a) >= 1.0
            if st.step % a.log_every == 0 or done:
                _log(st, a, meter.record(st.step, lr), out / "metrics.jsonl")
            if st.step % a.eval_every == 0 or done:
                rec = evaluate(model, held_w, a, obj)
                _log(st, a, dict(rec, kind="eval", step=st.step), out / "metrics.jsonl")
                if rec["diff"] < st.best:
                    st.best = rec["diff"]
                    save_checkpoint(out / "best.pt", model, opt, a, raw, st, rngs)
            if time.time() - last_save >= a.ckpt_every_s or done:
                save_checkpoint(ckpt, model, opt, a, raw, st, rngs)
                last_save = time.time()
    except KeyboardInterrupt:  # also SIGTERM (see main): keep the progress
        save_checkpoint(ckpt, model, opt, a, raw, st, rngs)
        print(f"interrupted at step {st.step}; saved {ckpt}", flush=True)
    finally:
        balance.close()
    return st


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export(
    run: str | Path, dest: str | Path, dtype: str = "float32", which: str = "last"
) -> Path:
    """Write the run's `which` checkpoint (last or best) as a Hugging Face folder,
    with the sampler settings of the model it continued (`--init`), if it has them,
    else the release's."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from mlx_diffgem.core.checkpoint import check_checkpoint

    run, dest = Path(run), Path(dest)
    blob = torch.load(run / f"{which}.pt", map_location="cpu", weights_only=False)
    raw = dict(blob["config"], dtype=dtype)
    model = build_model(raw)
    model.load_state_dict(blob["model"])
    tensors = {
        internal_to_hf(k): v.detach().to(_DTYPES[dtype]).contiguous()
        for k, v in model.state_dict().items()
    }
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (dest / "generation_config.json").write_text(_sampler(blob["args"]))
    corpus.save_tokenizer(Tokenizer.from_file(str(run / "tokenizer.json")), dest)
    check_checkpoint(dest, ModelConfig.from_dict(raw))
    return dest


def _sampler(args: dict) -> str:
    """generation_config.json of an export: a continued model keeps the settings
    chosen for it (the release's make a small model run every canvas to the cap)."""
    init = args.get("init")
    path = Path(init) / "generation_config.json" if init else None
    if path is not None and path.is_file():
        return path.read_text()
    return json.dumps(GENERATION, indent=2) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train DiffusionGemma's block-diffusion objective (CPU or GPU)."
    )
    for f in dataclasses.fields(TrainArgs):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default))
    ap.add_argument("--resume", action="store_true", help="continue OUT/last.pt")
    ap.add_argument("--export", metavar="DIR", help="write OUT/last.pt as a model")
    ap.add_argument("--export-dtype", default="float32", choices=sorted(_DTYPES))
    ap.add_argument(
        "--export-which",
        default="last",
        choices=["last", "best"],
        help="the latest checkpoint or the one with the lowest held-out loss",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import signal

    ns = _parse(argv)
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    given = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    out = Path(given.get("out", TrainArgs.out))
    if ns.export:
        path = export(out, ns.export, ns.export_dtype, ns.export_which)
        print(f"exported {path}")
        return
    blob = None
    if ns.resume:
        blob = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        a = TrainArgs(**{**blob["args"], **given})
    else:
        if (out / "last.pt").exists():
            sys.exit(f"{out / 'last.pt'} exists: pass --resume, or another --out")
        a = TrainArgs(**given)
    if not (Path(a.data) / "meta.json").is_file():
        tok = Path(a.init) / "tokenizer.json" if a.init else None
        corpus.build(a.data, tokenizer=tok)
    if a.init:
        check_tokenizer(a.data, a.init)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    train(a, blob)


if __name__ == "__main__":
    main()

"""The native DiffusionGemma sampler pieces, on the torch device (spec §4.3).

Each function is one piece of the reference's trio (accept / renoise / stop) plus the
entropy they share; `canvas.py` runs them in the reference's order. The MLX twin is
`mlx_diffgem/mlx_backend/sampling.py`.
"""

from __future__ import annotations

import os

import torch


def entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(z) over the vocab, [..., V] -> [...] (float32)."""
    # -sum p * log p with log p = z - logsumexp(z), as the reference: the shortcut
    # logsumexp(z) - <p, z> cancels catastrophically when one token dominates. The
    # product goes in place into p (two [.., V] temporaries), and a pairwise `sum`
    # keeps the 262k-term reduction accurate (a matmul dot product does not).
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    return -logp.exp().mul_(logp).sum(dim=-1)


def score(z: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Divide the logits by the step's temperature in place; (argmax, entropy) [B, C].

    One pass over [B, C, V] when `compile.compile_model` fuses it.
    """
    z = z.div_(temperature)
    return torch.argmax(z, dim=-1), entropy(z)


FUSED_ENV = "DIFFGEM_FUSED_SAMPLER"


def use_fused(device: torch.device) -> bool:
    """Whether the canvas loop takes `fused_step`: on CUDA with Triton importable;
    DIFFGEM_FUSED_SAMPLER=0 turns it off, =1 asks for it (on a CPU: only under
    TRITON_INTERPRET=1, for tests)."""
    from .expert_gemm import has_triton, interpreting

    want = os.environ.get(FUSED_ENV)
    if want not in (None, "", "0", "1"):
        raise ValueError(f"{FUSED_ENV}: expected 0 or 1, got {want!r}")
    runs = has_triton() and (device.type == "cuda" or interpreting())
    if want == "1" and not runs:
        raise ValueError(f"{FUSED_ENV}=1: needs Triton on CUDA (or TRITON_INTERPRET=1)")
    return runs and want != "0" and (device.type == "cuda" or want == "1")


FUSED_BLOCK = 1024  # lanes per row: 256 passes over a 262,144-id vocabulary


def fused_step(
    z: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """`score` and a categorical draw in one read of the [B, C, V] float32 logits
    (Triton, sampler_kernels.py): z becomes z / T in place; (argmax, entropy, draw),
    each [B, C]. The draw is Gumbel-max on Triton's Philox stream keyed by `seed`
    (an int64 device scalar), so it follows another random stream than
    `sample_tokens`: the same distribution, other tokens."""
    from .sampler_kernels import fused_step as kernel  # imports Triton

    B, C, V = z.shape
    if z.dtype != torch.float32 or not z.is_contiguous():
        raise ValueError("fused_step: expected contiguous float32 logits")
    arg = torch.empty((B, C), dtype=torch.int64, device=z.device)
    ent = torch.empty((B, C), dtype=torch.float32, device=z.device)
    draw = torch.empty((B, C), dtype=torch.int64, device=z.device)
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=z.device)
    block = min(FUSED_BLOCK, max(16, 1 << (V - 1).bit_length()))
    kernel[(B * C,)](z, temperature, seed, arg, ent, draw, V, BLOCK=block)
    return arg, ent, draw


def accept_mask(h: torch.Tensor, bound: float) -> torch.Tensor:
    """Entropy-bound acceptance: keep the k lowest-entropy positions with
    sum(H_1..H_k) - max(H_1..H_k) <= bound (at least one per row). [B, C] -> bool."""
    h_sorted, order = torch.sort(h, dim=-1)
    keep_sorted = (torch.cumsum(h_sorted, dim=-1) - h_sorted) <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def renoise(
    keep: torch.Tensor, draft: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Next canvas: accepted positions take the sampled draft, all others noise."""
    return torch.where(keep, draft, noise)


def sample_tokens(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per position from softmax(z): [B, C, V] -> [B, C] int64."""
    B, C, V = z.shape
    probs = torch.softmax(z, dim=-1, dtype=torch.float32).view(B * C, V)
    return torch.multinomial(probs, 1, generator=generator).view(B, C)


def stop_update(
    history: torch.Tensor | None,
    new_arg: torch.Tensor,
    mean_entropy: torch.Tensor,
    stability_threshold: int,
    confidence_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stable-and-confident test: (stop [B] bool, updated argmax history [S, B, C]).

    Stable = the argmax equals each of the previous `stability_threshold` argmaxes (the
    history starts at -1, so a canvas needs at least threshold + 1 steps).
    """
    confident = mean_entropy < confidence_threshold
    if stability_threshold == 0:
        return confident, history
    if history is None:
        history = torch.full(
            (stability_threshold, *new_arg.shape),
            -1,
            dtype=new_arg.dtype,
            device=new_arg.device,
        )
    stable = (history == new_arg[None]).all(dim=2).all(dim=0)
    history = torch.cat([history[1:], new_arg[None]], dim=0)
    return stable & confident, history

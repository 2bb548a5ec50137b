"""The native DiffusionGemma sampler pieces, on the torch device (spec §4.3).

Each function is one piece of the reference's trio (accept / renoise / stop) plus the
entropy they share; `canvas.py` runs them in the reference's order. The MLX twin is
`mlx_diffgem/mlx_backend/sampling.py`.
"""

from __future__ import annotations

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

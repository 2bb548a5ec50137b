"""Record transformers' random draws during `generate`, for token-identical replays.

The reference draws, in order: per canvas one `torch.randint` (initial canvas), per step
one `torch.multinomial` ([B*C, 1]) and one `torch.randint` (renoise) (spec §4.4). We
wrap both torch functions for the duration of one `generate` call.
"""

from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def recording(batch: int, canvas: int):
    import torch

    draws: list[np.ndarray] = []
    randint, multinomial = torch.randint, torch.multinomial

    def rec_randint(*args, **kwargs):
        out = randint(*args, **kwargs)
        draws.append(out.cpu().numpy().astype(np.int32))
        return out

    def rec_multinomial(probs, num_samples, *args, **kwargs):
        out = multinomial(probs, num_samples, *args, **kwargs)
        draws.append(out.cpu().numpy().reshape(batch, canvas).astype(np.int32))
        return out

    torch.randint, torch.multinomial = rec_randint, rec_multinomial
    try:
        yield draws
    finally:
        torch.randint, torch.multinomial = randint, multinomial


def hf_generate(
    hf_model, ids: np.ndarray, attention_mask=None, seed: int = 0, **kwargs
):
    """transformers' generate on numpy ids -> (sequences, tokens_per_forward, draws)."""
    import torch

    torch.manual_seed(seed)
    B, C = ids.shape[0], hf_model.config.canvas_length
    args = (
        {"attention_mask": torch.tensor(attention_mask)}
        if attention_mask is not None
        else {}
    )
    with recording(B, C) as draws, torch.no_grad():
        out = hf_model.generate(torch.tensor(ids, dtype=torch.long), **args, **kwargs)
    return out.sequences.numpy(), out.tokens_per_forward.numpy(), draws

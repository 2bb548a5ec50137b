"""Which drafted tokens a hidden-token pass accepts (DESIGN §4, step 3).

The model scored every drafted token without seeing it (core/layout.py): at each
position its logits are conditioned on the prompt and on the draft's earlier-ranked
tokens only. A token is *agreed* when the model would write it there (greedy: its
argmax; or, with a threshold, when the model gives it at least that probability).
Acceptance runs along the draft's commit order: whole groups (equal ranks) while
every token of the group is agreed; in the first group with a disagreement, its
agreed tokens are still accepted (each was judged on accepted tokens only) and the
rest is not, nor is anything ranked after it (it was judged on a token that is
now gone).
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def agreement(logits: np.ndarray, draft: np.ndarray, threshold: float | None = None):
    """[B, C] bool: the model agrees with each drafted token (module docstring);
    logits [B, C, V] (numpy), draft [B, C] ids."""
    if threshold is None:
        return logits.argmax(axis=-1) == draft
    p = np.take_along_axis(softmax(logits), draft[..., None], axis=-1)[..., 0]
    return p >= threshold


def accept_along(rank: np.ndarray, agree: np.ndarray) -> np.ndarray:
    """[B, C] bool: the tokens accepted along the commit order (module docstring)."""
    accepted = np.zeros_like(agree, dtype=bool)
    for b in range(rank.shape[0]):
        for r in np.unique(rank[b]):
            group = rank[b] == r
            accepted[b] |= group & agree[b]
            if not agree[b][group].all():
                break
    return accepted

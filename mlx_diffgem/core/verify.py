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

Speculative sampling ("ratio"): the drafter proposes its argmax, a point mass, so the
ratio p_model(x) / p_draft(x) of speculative sampling is p_model(x): a drafted token
is accepted with probability p_model(x), at the temperature of the verify's place in
the schedule, and at the first rejection the model's token is drawn from p_model with
x left out. Each committed token is then distributed as the model's own sample there
(given the accepted tokens before it), whatever the drafter proposed.
"""

from __future__ import annotations

import numpy as np

RATIO = "ratio"  # accept by the speculative-sampling ratio (module docstring)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def prob_of(p: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[B, C] the probability p [B, C, V] gives each id [B, C]."""
    return np.take_along_axis(p, ids[..., None].astype(np.int64), axis=-1)[..., 0]


def agreement(logits: np.ndarray, draft: np.ndarray, threshold: float | None = None):
    """[B, C] bool: the model agrees with each drafted token (module docstring);
    logits [B, C, V] (numpy), draft [B, C] ids."""
    if threshold is None:
        return logits.argmax(axis=-1) == draft
    return prob_of(softmax(logits), draft) >= threshold


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


def draft_rank(confidence: np.ndarray, pinned: np.ndarray, groups: int) -> np.ndarray:
    """[B, C] commit order of a draft: pinned positions -1 (seen by every query),
    the others in `groups` equal groups by the drafter's confidence, surest first."""
    rank = np.full(confidence.shape, -1, np.int64)
    for b in range(confidence.shape[0]):
        free = np.flatnonzero(~pinned[b])
        order = free[np.argsort(-confidence[b, free], kind="stable")]
        rank[b, order] = np.arange(order.size) * groups // max(order.size, 1)
    return rank


def judge(
    logits: np.ndarray,
    draft: np.ndarray,
    rank: np.ndarray,
    threshold=None,
    sure=0.0,
    *,
    rng: np.random.Generator | None = None,
    temperature: float = 1.0,
) -> np.ndarray:
    """[B, C] ids one hidden-token verify commits, -1 elsewhere: the drafted tokens
    accepted along the order (pinned ones, rank -1, always), and at the first
    rejection (lowest rank, then position) the model's own token, which was judged
    on accepted tokens only: its argmax, or with `threshold` "ratio" a draw from its
    distribution at `temperature` without the rejected token (drawn from `rng`, as
    are the acceptances). With `sure` > 0 a token is committed only where the model
    gives it at least that probability (at temperature 1): a token that is merely
    likely given little context is left open, as a native pass would leave it."""
    p = softmax(logits)
    sampled = threshold == RATIO
    if sampled:  # kept with probability p_model(x) at the verify's temperature
        pt = softmax(logits / np.float32(temperature))
        agree = rng.random(draft.shape) < prob_of(pt, draft)
    else:
        agree = agreement(logits, draft, threshold)
    agree |= rank < 0
    sure_of = prob_of(p, draft)
    accepted = accept_along(rank, agree & ((sure_of >= sure) | (rank < 0)))
    ids = np.where(accepted, draft, -1)
    for b in range(draft.shape[0]):
        left = np.flatnonzero(~accepted[b])
        if left.size:
            i = left[np.lexsort((left, rank[b, left]))[0]]
            if not sampled:
                own = p[b, i].argmax()
            elif agree[b, i]:  # sampled, but not sure enough: left open
                continue
            else:
                own = _residual(pt[b, i], draft[b, i], rng)
            if p[b, i, own] >= sure:
                ids[b, i] = own
    return ids


def judge_each(
    logits: np.ndarray, draft: np.ndarray, rank: np.ndarray, threshold=None, sure=0.0
) -> np.ndarray:
    """[B, C] ids a leave-one-out verify commits (`HiddenLayout(others=True)`: each
    token scored on the whole rest of the draft), -1 elsewhere: every drafted token
    the model agrees with and is sure of, and where it disagrees, its own token if it
    is sure of that; pinned ones (rank -1) always. No order: each position is
    decided on its own, as a native pass decides every position at once."""
    p = softmax(logits)
    agree = agreement(logits, draft, threshold) & (prob_of(p, draft) >= sure)
    own = p.argmax(axis=-1)
    own_sure = prob_of(p, own) >= sure
    ids = np.where(agree, draft, np.where(own_sure & (own != draft), own, -1))
    return np.where(rank < 0, draft, ids)


def _residual(p: np.ndarray, drafted: int, rng: np.random.Generator) -> int:
    """A draw from p [V] with the drafted token left out (the residual of
    speculative sampling against a point-mass proposal); p itself when that token
    held all the mass."""
    q = p.astype(np.float64).copy()
    q[drafted] = 0.0
    if q.sum() <= 0:
        q = p.astype(np.float64)
    cdf = np.cumsum(q / q.sum())
    return int(min(np.searchsorted(cdf, rng.random(), side="right"), q.size - 1))

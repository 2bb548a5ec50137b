"""The probes behind `spec-torch-*-jacobi-*.json` and `*-finish-sc-*.json`
(exploratory, patches of the speculative loop as it was at c154a17, the records'
commit; not features).

JAC=model: after a leave-one-out verify, the positions it left open take the model's
own argmax there (given the rest of the draft, from the verify's logits) as the next
draft, instead of the drafter redrafting them from noise: a Jacobi iteration of the
verify. JAC=drafter runs the shipped loop; JAC_LOG appends "round open committed"
per verify.
JAC=sc-draft, JAC=sc-verify: the shipped loop, but the model's native finish starts
with self-conditioning: the last draft's logits, or the verify's own logits at the
finish's first temperature (torch only), instead of none. JAC=step: the finish's
temperature schedule goes on from the drafter's passes instead of starting over;
JAC=sc-draft-step both.
Run from the repository root, e.g.

    JAC=model JAC_LOG=rounds.txt PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python \\
        bench/results/exploratory/loop_probes.py spec --backend torch \\
        --drafter default --prompts 20 --repeats 1 --threads 1 \\
        --spec-min-commit 0 --spec-max-rounds 6 --out runs/jac
"""

import dataclasses
import os
import sys
import types

import numpy as np

from mlx_diffgem.core import speculative as S
from mlx_diffgem.core import verify

MODE = os.environ.get("JAC", "model")
LAST = {}
HIDDEN_VERIFY = S._Canvas._hidden_verify
DRAFT = S._Canvas._draft


def judge_each(logits, draft, rank, threshold=None, sure=0.0):
    LAST["logits"] = logits
    LAST["own"] = logits.argmax(axis=-1)  # the model's token, given the rest
    return verify.judge_each(logits, draft, rank, threshold, sure)


def finish(self, state, pins):
    """_Canvas._finish with the self-conditioning JAC names."""
    sc = LAST["draft_sc"]
    if MODE == "sc-verify":
        import torch

        T = self.policy.temperature(self.policy.max_steps)
        sc = torch.as_tensor(LAST["logits"] / np.float32(T)).to(sc.dtype)
    if MODE.endswith("-step") or MODE == "step":  # the schedule goes on
        state = dataclasses.replace(state, step=state.step + self.drafter_steps)
        sc = None if MODE == "step" else sc
    start = dataclasses.replace(self._redraft(state, pins), self_conditioning=sc)
    budget = max(self.policy.max_steps - self.target_steps, 1)
    policy = dataclasses.replace(self.policy, budget=budget)
    res = yield from S._run(
        self.target, start, self.cache, policy, self.noise, self.views
    )
    self.target_steps += res.steps
    self.stats.append(res.step_stats)
    return res


def hidden_verify(self, state, draft, pins):
    LAST["draft_sc"] = draft.state.self_conditioning
    ids = HIDDEN_VERIFY(self, state, draft, pins)
    LAST["verified"] = self  # this canvas's next draft is a redraft
    with open(os.environ.get("JAC_LOG", os.devnull), "a") as f:
        committed = int(((ids >= 0) & (pins < 0)).sum())
        f.write(f"{self.rounds} {int((pins < 0).sum())} {committed}\n")
    return ids


def draft(self, state, budget):
    """_Canvas._draft; with JAC=model, after a verify, the model's own tokens."""
    if MODE == "model" and LAST.pop("verified", None) is self:
        tokens = np.where(state.fixed >= 0, state.fixed, LAST["own"]).astype(np.int32)
        return types.SimpleNamespace(tokens=tokens, state=LAST["draft"].state)
    LAST["draft"] = yield from DRAFT(self, state, budget)
    return LAST["draft"]


if __name__ == "__main__":
    S.judge_each = judge_each
    S._Canvas._hidden_verify = hidden_verify
    if MODE.startswith("sc-") or MODE == "step":
        S._Canvas._finish = finish
    else:
        S._Canvas._draft = draft
    from bench.run import main

    sys.exit(main(sys.argv[1:]))

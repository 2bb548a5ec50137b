"""bench verify: how well one verify pass tells planted errors from correct tokens.

On held-out function prompts the model writes one canvas natively; its commit order
(the pass from which each position kept its final token) is recorded. Then a share
of the canvas's positions is replaced by plausible wrong tokens: the model's own
second choice there (from a plain pass over the clean canvas). Each verify variant
judges every position of the planted canvas:

- `plain`: one model pass over the planted canvas, as the speculative loop's verify
  does today (the canvas in plain sight; no self-conditioning);
- `hidden`: the hidden-token pass (core/layout.py): query slots of uniform noise,
  reference slots of the planted canvas, ranked by the native commit order;
- `others`: the hidden-token pass with each query seeing every other position's
  planted token (leave-one-out, `HiddenLayout(others=True)`);
- `grouped4`: four plain passes, each with a random quarter of the positions
  renoised; a position is judged by the pass that hid it.

A position is rejected when the model disagrees with its token: `argmax` (the
model's argmax differs) or `p>=T` (the model gives it less than T). Recall: the
share of planted errors rejected; false rejection: the share of correct tokens
rejected (goal, issue 20: recall >= 0.7 at false rejection <= 0.1). For `hidden`
the record also gives what one verify accepts along the commit order
(core/verify.py): the share of the canvas, and the planted errors among it.

    python -m bench.verify --backend torch --prompts 120 --out bench/results
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

CRITERIA = {
    "argmax": None,
    **{f"p>={t}": t for t in (0.01, 0.02, 0.05, 0.1, 0.2)},
}
GROUPS = 4  # passes of the grouped variant


@dataclass
class Canvas:
    """One prompt's native canvas, its commit order and its planted copy."""

    cache: object
    tokens: np.ndarray  # [1, C] the native argmax
    rank: np.ndarray  # [1, C] the pass from which each position kept its token
    planted: np.ndarray  # [1, C] tokens with the errors in
    errors: np.ndarray  # [1, C] bool, where the planted errors are
    live: np.ndarray  # [1, C] bool, positions before the first EOS (judged)


def commit_order(argmaxes: list[np.ndarray]) -> np.ndarray:
    """[1, C] the first pass from which each position's argmax stayed final."""
    steps = np.stack(argmaxes)  # [S, 1, C]
    same = steps == steps[-1]
    # trailing run of True per position, counted from the last pass
    trailing = np.cumprod(same[::-1], axis=0).sum(axis=0)
    return (len(steps) - trailing).astype(np.int64)


def native(target, ids: np.ndarray, seed: int):
    """The prompt's cache, native canvas and commit order."""
    from mlx_diffgem.core.backend import CanvasState, DenoisePolicy
    from mlx_diffgem.core.generate import prefill
    from mlx_diffgem.core.noise import SeededNoise

    cache = target.new_cache(1)
    prefill(target, ids, cache)
    policy = DenoisePolicy.from_generation(target.generation_config)
    steps = target.denoise_steps(CanvasState(), cache, policy, SeededNoise(seed))
    argmaxes = []
    while True:
        try:
            argmaxes.append(next(steps).argmax)
        except StopIteration as stop:
            return cache, stop.value.tokens, commit_order(argmaxes)


def plant(target, cache, tokens, eos, share: float, rng) -> tuple:
    """(planted, errors, live): `share` of the live positions set to the model's
    second choice there (plain pass over the clean canvas)."""
    import mlx_diffgem as dg

    logits = dg.to_numpy(target.decode(tokens, cache))[0]
    top2 = np.argsort(-logits, axis=-1)[:, :2]
    second = np.where(top2[:, 0] == tokens[0], top2[:, 1], top2[:, 0])
    live = np.cumsum(np.isin(tokens[0], eos)) == 0
    idx = np.flatnonzero(live)
    n = max(1, int(round(share * idx.size)))
    errors = np.zeros_like(live)
    errors[rng.choice(idx, size=min(n, idx.size), replace=False)] = True
    planted = np.where(errors, second, tokens[0]).astype(np.int32)
    return planted[None], errors[None], live[None]


def verdicts(target, c: Canvas, rng) -> dict[str, np.ndarray]:
    """Each variant's logits [1, C, V] (numpy) over the planted canvas."""
    import mlx_diffgem as dg
    from mlx_diffgem.core.layout import HiddenLayout

    V = target.config.vocab_size
    queries = rng.integers(0, V, c.planted.shape).astype(np.int32)
    hidden_ids = np.concatenate([queries, c.planted], axis=1)
    layout = HiddenLayout(c.rank)
    others = HiddenLayout(c.rank, others=True)
    return {
        "plain": dg.to_numpy(target.decode(c.planted, c.cache)),
        "hidden": dg.to_numpy(target.decode(hidden_ids, c.cache, layout=layout)),
        "others": dg.to_numpy(target.decode(hidden_ids, c.cache, layout=others)),
        f"grouped{GROUPS}": grouped(target, c, rng),
    }


def grouped(target, c: Canvas, rng) -> np.ndarray:
    """Issue 20's variant (b): GROUPS plain passes, each with a random 1/GROUPS of the
    positions renoised (uniform ids); each position judged in the pass that hid it."""
    import mlx_diffgem as dg

    C, V = c.planted.shape[1], target.config.vocab_size
    group = rng.permutation(C) % GROUPS
    out = None
    for g in range(GROUPS):
        hide = group == g
        noisy = np.where(hide, rng.integers(0, V, C), c.planted[0]).astype(np.int32)
        z = dg.to_numpy(target.decode(noisy[None], c.cache))
        out = z if out is None else np.where(hide[None, :, None], z, out)
    return out


def tally(rows: dict, c: Canvas, logits: dict[str, np.ndarray]) -> None:
    """Add one canvas's counts to rows[(variant, criterion)]."""
    from mlx_diffgem.core.verify import accept_along, agreement

    err, ok = c.errors & c.live, ~c.errors & c.live
    for variant, z in logits.items():
        for name, threshold in CRITERIA.items():
            agree = agreement(z, c.planted, threshold)
            row = rows.setdefault((variant, name), _zero())
            row["planted"] += int(err.sum())
            row["correct"] += int(ok.sum())
            row["errors_rejected"] += int((err & ~agree).sum())
            row["correct_rejected"] += int((ok & ~agree).sum())
            if variant == "hidden":
                acc = accept_along(c.rank, agree | ~c.live) & c.live
                row["accepted"] += int(acc.sum())
                row["errors_accepted"] += int((acc & c.errors).sum())
                row["live"] += int(c.live.sum())


def _zero() -> dict:
    keys = ("planted", "correct", "errors_rejected", "correct_rejected")
    return dict.fromkeys((*keys, "accepted", "errors_accepted", "live"), 0)


def summary(rows: dict) -> list[dict]:
    out = []
    for (variant, criterion), r in sorted(rows.items()):
        row = {
            "variant": variant,
            "criterion": criterion,
            "recall": round(r["errors_rejected"] / max(r["planted"], 1), 4),
            "false_rejection": round(r["correct_rejected"] / max(r["correct"], 1), 4),
            **{k: v for k, v in r.items() if v or k in ("planted", "correct")},
        }
        if r["live"]:
            row["accepted_share"] = round(r["accepted"] / r["live"], 4)
        out.append(row)
    return out


def run(a: argparse.Namespace) -> dict:
    import mlx_diffgem as dg
    from mlx_diffgem.core.tokenizer import format_prompt

    from . import record
    from .spec_suites import spec_prompts

    opts = {"device": "cpu"} if a.backend == "torch" else {}
    target, tok = dg.load(a.model, backend=a.backend, dtype="float32", **opts)
    eos = np.atleast_1d(target.generation_config.eos_token_id or [])
    rng, rows, t0 = np.random.default_rng(a.seed), {}, time.perf_counter()
    prompts = spec_prompts(a.prompts, a.seed)
    for i, (context, _) in enumerate(prompts):
        ids = np.asarray([format_prompt(tok, context)], np.int32)
        cache, tokens, rank = native(target, ids, a.seed + i)
        planted = plant(target, cache, tokens, eos, a.share, rng)
        c = Canvas(cache, tokens, rank, *planted)
        tally(rows, c, verdicts(target, c, rng))
    rec = record.envelope("verify", record.cpu_name())
    rec.update(
        backend=a.backend,
        model={"preset": "default" if a.model is None else "path", "path": a.model},
        config={"prompts": len(prompts), "share": a.share, "seed": a.seed},
        rows=summary(rows),
        wall_s=round(time.perf_counter() - t0, 1),
    )
    return rec


def table(rec: dict) -> str:
    lines = [f"{'variant':8} {'criterion':9} {'recall':>7} {'false rej':>9} {'acc':>6}"]
    for r in rec["rows"]:
        acc = r.get("accepted_share")
        lines.append(
            f"{r['variant']:8} {r['criterion']:9} {r['recall']:7.3f} "
            f"{r['false_rejection']:9.3f} {'' if acc is None else f'{acc:6.3f}'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    p.add_argument("--model", default=None, help="model folder (default: embedded)")
    p.add_argument("--prompts", type=int, default=40, help="held-out prompts")
    p.add_argument("--share", type=float, default=0.15, help="share of errors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the JSON record")
    a = p.parse_args(argv)
    if not 0 < a.share < 1 or a.prompts < 1:
        p.error("--share: expected 0 < share < 1; --prompts: at least 1")
    from . import record

    record.pin_git()
    rec = run(a)
    print(table(rec))
    if a.out:
        print(f"wrote {record.write(rec, a.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

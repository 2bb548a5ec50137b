"""Train a drafter for a target model (PyTorch; CPU or CUDA).

The target is frozen. Each step draws windows of the training corpus, encodes them
with the target (its K/V are what the drafter's kept layers read at inference), and
takes as the goal of every canvas position what the target commits there: the
target's argmax on the clean canvas (`--labels target`; `data` uses the corpus tokens).
The drafter sees the canvas corrupted at a uniform noise level, with the
self-conditioning signal of its own previous pass on half of the batch, as
`cuda_backend/train.py` trains the target, and learns to jump to the committed canvas
from any noise level: few drafter passes where the target needs many.

Certainty forcing (`--certainty W`, dParallel, arXiv 2509.26488) adds W times the
entropy of the drafter's distribution at the positions it already gets right: a
drafter that is right and sure commits many positions per pass under the entropy
bound, so it reaches its draft in a few passes.

The run is resumable: every evaluation writes `state.pt` (adapter, optimizer, step,
random streams) beside the drafter, and `--resume` goes on from it. `--patience K`
stops once the held-out loss has not improved for K evaluations (a plateau).

    python -m drafter.distill --target mlx_diffgem/assets/default \\
        --out mlx_diffgem/assets/default/drafter --layers 0,1,5 --minutes 30
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cuda_backend import train as T

from .adapter_torch import Adapter
from .trained import CONFIG, AdapterConfig, DrafterSpec, load_adapter, save


@dataclass
class DistillArgs:
    target: str = ""  # a model folder (default: the embedded model)
    out: str = "runs/drafter"
    data: str = "runs/corpus"
    layers: str = "0,1,5"  # the target's decoder layers the drafter runs
    adapter_layers: int = 1
    top_k: int = 0  # experts per token (0: the target's)
    sc_top_k: int = 32  # soft-embedding rows at inference (0: whole vocabulary)
    head_vocab: int = 0  # LM head rows at inference (0: whole vocabulary)
    labels: str = "target"
    certainty: float = 0.0  # weight of the entropy on correct positions
    cf_temp: float = 0.6  # the temperature that entropy is taken at
    steps: int = 400
    minutes: float = 0.0  # > 0: stop after this much training time
    batch: int = 8
    seq_len: int = 512
    lr: float = 2e-3
    warmup: int = 30
    eval_every: int = 50
    eval_batches: int = 4
    threads: int = 1
    seed: int = 0
    resume: bool = False  # go on from the out folder's state.pt
    init: str = ""  # a trained drafter folder to start from (same design), not --resume
    patience: int = 0  # > 0: stop after this many evaluations without improvement


def build_spec(a: DistillArgs, cfg) -> DrafterSpec:
    try:
        layers = tuple(int(i) for i in a.layers.split(",") if i.strip())
    except ValueError:
        raise ValueError(
            f"--layers {a.layers!r}: expected integers like 0,1,5"
        ) from None
    return DrafterSpec(
        target_layers=layers,
        adapter=AdapterConfig.at_width_of(cfg, a.adapter_layers),
        top_k=a.top_k or None,
        sc_top_k=a.sc_top_k or None,
        head_vocab=a.head_vocab or None,
    )


def batch_loss(target, plan, ids, P, labels: str, gen, cf=0.0, temp=0.6) -> dict:
    """Cross-entropy of the drafter on one batch, toward the target's commitment,
    plus `cf` times its certainty-forcing term (entropy where it is right, at
    temperature `temp`)."""
    C, V = target.config.canvas_length, target.config.vocab_size
    clean = ids[:, P:]
    with torch.no_grad():
        _, prefixes = T.encoder_pass(target, ids)
        goal = clean
        if labels == "target":
            goal = T.decoder_pass(target, clean, prefixes, P).argmax(-1)
    noisy, _ = T.noise_canvases(clean, C, V, gen)
    half = ids.shape[0] // 2
    sc = None
    if half:
        with torch.no_grad():
            rows = [p.rows(half) for p in prefixes]
            sc = T.decoder_pass(target, noisy[:half], rows, P, plan=plan) / 0.6
    logits = T.decoder_pass(target, noisy, prefixes, P, sc, plan)
    ce = F.cross_entropy(logits.flatten(0, 1), goal.flatten())
    acc = (logits.argmax(-1) == goal).float().mean()
    sure = T.certainty(logits, goal, temp)
    return {"loss": ce + cf * sure, "ce": ce, "acc": acc, "entropy": sure}


@torch.no_grad()
def evaluate(target, plan, windows, a: DistillArgs) -> dict:
    """Mean drafter objective ("loss"), cross-entropy, accuracy and entropy on
    fixed held-out windows and noise."""
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    C, batches = target.config.canvas_length, a.eval_batches
    sums = {"loss": 0.0, "ce": 0.0, "acc": 0.0, "entropy": 0.0}
    for _ in range(batches):
        ids, P = T.draw_batch(windows, rng, a.batch, C)
        out = batch_loss(target, plan, ids, P, a.labels, gen, a.certainty, a.cf_temp)
        for k in sums:
            sums[k] += float(out[k]) / batches
    return sums


@dataclass
class _Run:
    """What a resumed run continues: the counters and the random streams."""

    step: int = 0
    elapsed: float = 0.0
    best: float = math.inf
    stale: int = 0  # evaluations since the best held-out loss
    objective: tuple = ()  # (certainty, cf_temp) that `best` was measured with
    log: list = dataclasses.field(default_factory=list)
    start: dict = dataclasses.field(default_factory=dict)


def lr_at(a: DistillArgs, run: _Run) -> float:
    """Warmup, then a cosine from lr to lr/10 over the steps or the minutes,
    whichever is further along."""
    frac = run.step / max(1, a.steps)
    if a.minutes:
        frac = max(frac, run.elapsed / (60 * a.minutes))
    warm = min(1.0, (run.step + 1) / a.warmup)
    return a.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


def _save_state(out: Path, adapter, opt, run: _Run, rng, gen) -> None:
    blob = {
        "adapter": adapter.state_dict(),
        "opt": opt.state_dict(),
        "run": dataclasses.asdict(run),
        "rng": rng.bit_generator.state,
        "gen": gen.get_state(),
    }
    torch.save(blob, out / "state.tmp")
    (out / "state.tmp").replace(out / "state.pt")  # never a half-written state


def _resume(out: Path, adapter, opt, rng, gen) -> _Run:
    path = out / "state.pt"
    if not path.exists():
        raise ValueError(f"--resume: {path} does not exist")
    blob = torch.load(path, weights_only=False)
    adapter.load_state_dict(blob["adapter"])
    opt.load_state_dict(blob["opt"])
    rng.bit_generator.state = blob["rng"]
    gen.set_state(blob["gen"])
    return _Run(**blob["run"])


def _start(a: DistillArgs, spec: DrafterSpec) -> Adapter:
    """The adapter of the drafter folder `a.init`, trainable: a warm start (new
    optimizer and schedule), refused where its design differs from the flags'."""
    if a.resume:
        raise ValueError("--init and --resume: give one (--resume reads state.pt)")
    folder = Path(a.init)
    have = DrafterSpec.from_file(folder / CONFIG)
    want = dataclasses.replace(spec, target=have.target, speculative=have.speculative)
    if have != want:
        raise ValueError(
            f"--init {folder}: its design ({_design(have)}) differs from the "
            f"flags' ({_design(spec)})"
        )
    if have.target and _shape(have.target) != _shape(spec.target):
        raise ValueError(f"--init {folder}: it was made for a model of another shape")
    if have.target and have.target.get("weights") != (spec.target or {}).get("weights"):
        # same shape, other weights (a continued model): a start, re-distilled here
        print(f"--init {folder}: made for other weights of this shape; distilling anew")
    adapter = load_adapter(folder, have, "torch", torch.float32)
    return adapter.train().requires_grad_(True)


def _shape(target: dict | None) -> dict:
    """A target fingerprint without its weights hash: the model's shape."""
    return {k: v for k, v in (target or {}).items() if k != "weights"}


def _design(s: DrafterSpec) -> str:
    layers = ",".join(map(str, s.target_layers))
    return (
        f"layers {layers}, {s.adapter.num_layers} adapter layers, top_k {s.top_k}, "
        f"sc_top_k {s.sc_top_k}, head_vocab {s.head_vocab}"
    )


def _record(out: Path, a: DistillArgs, folder: Path, run: _Run) -> None:
    meta = {"args": dataclasses.asdict(a), "target": str(folder), "start": run.start}
    meta |= {"steps": run.step, "elapsed_s": run.elapsed, "log": run.log}
    (out / "distill.json").write_text(json.dumps(meta, indent=1) + "\n")


def distill(a: DistillArgs) -> Path:
    from cuda_backend.backend import load
    from mlx_diffgem.core.checkpoint import default_model_path

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.labels not in ("target", "data"):
        raise ValueError(f"--labels {a.labels!r}: expected 'target' or 'data'")
    folder = Path(a.target) if a.target else default_model_path()
    loaded = load(folder, device="cpu", dtype="float32")
    target = loaded.model.requires_grad_(False)
    # with the target's fingerprint: the drafter refuses to load for another model
    spec = build_spec(a, target.config).for_target(loaded.path, target.config)
    adapter = _start(a, spec) if a.init else Adapter(spec.adapter)
    plan = spec.plan(target.config, adapter)
    train_w = T.Windows(T.load_stream(a.data, "train"), a.seq_len)
    held_w = T.Windows(T.load_stream(a.data, "heldout"), a.seq_len)
    opt = torch.optim.AdamW(adapter.parameters(), lr=a.lr, betas=(0.9, 0.95))
    rng, gen = np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.resume:
        run = _resume(out, adapter, opt, rng, gen)
        print(f"resumed at step {run.step} ({run.elapsed:.0f} s)", flush=True)
        if tuple(run.objective) != (a.certainty, a.cf_temp):
            # another objective: its losses do not compare with the best so far
            run.best, run.stale = math.inf, 0
    else:
        start = evaluate(target, plan, held_w, a)
        run = _Run(best=start["loss"], start=start)
        print(f"step 0: held-out {run.start}", flush=True)
    run.objective = (a.certainty, a.cf_temp)
    while _going(a, run):
        _train_step(target, plan, opt, (train_w, rng, gen), a, run)
        if run.step % a.eval_every == 0 or run.step == a.steps:
            held = evaluate(target, plan, held_w, a)
            run.log.append({"step": run.step, "elapsed_s": run.elapsed, **held})
            print(f"step {run.step}: held-out {held}", flush=True)
            improved = held["loss"] < run.best - 1e-4
            run.best, run.stale = (
                min(run.best, held["loss"]),
                0 if improved else run.stale + 1,
            )
            if improved:
                save(out, spec, adapter.to_numpy())
            _save_state(out, adapter, opt, run, rng, gen)
            _record(out, a, folder, run)
    if not (out / "drafter.safetensors").exists():
        save(out, spec, adapter.to_numpy())
    _record(out, a, folder, run)
    return out


def _going(a: DistillArgs, run: _Run) -> bool:
    if run.step >= a.steps or (a.minutes and run.elapsed > 60 * a.minutes):
        return False
    return not (a.patience and run.stale >= a.patience)  # a plateau


def _train_step(target, plan, opt, draws, a: DistillArgs, run: _Run) -> None:
    windows, rng, gen = draws
    t0 = time.time()
    for g in opt.param_groups:
        g["lr"] = lr_at(a, run)
    ids, P = T.draw_batch(windows, rng, a.batch, target.config.canvas_length)
    losses = batch_loss(target, plan, ids, P, a.labels, gen, a.certainty, a.cf_temp)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
    opt.step()
    run.step, run.elapsed = run.step + 1, run.elapsed + time.time() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m drafter.distill", description=__doc__)
    for f in dataclasses.fields(DistillArgs):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=type(f.default), default=f.default)
    a = DistillArgs(**vars(ap.parse_args(argv)))
    try:
        distill(a)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()

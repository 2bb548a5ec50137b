"""Train a drafter for a target model (PyTorch; CPU or CUDA).

The target is frozen. Each step draws windows of the training corpus, encodes them
with the target (its K/V are what the drafter's kept layers read at inference), and
takes as the goal of every canvas position what the target commits there: the
target's argmax on the clean canvas (`--labels target`; `data` uses the corpus tokens).
The drafter sees the canvas corrupted at a uniform noise level, with the
self-conditioning signal of its own previous pass on half of the batch, as
`cuda_backend/train.py` trains the target, and learns to jump to the committed canvas
from any noise level: few drafter passes where the target needs many.

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
from .trained import AdapterConfig, DrafterSpec, save


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


def build_spec(a: DistillArgs, cfg) -> DrafterSpec:
    try:
        layers = tuple(int(i) for i in a.layers.split(",") if i.strip())
    except ValueError:
        raise ValueError(
            f"--layers {a.layers!r}: expected integers like 0,1,5"
        ) from None
    adapter = AdapterConfig(
        hidden_size=cfg.hidden_size,
        num_layers=a.adapter_layers,
        num_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps,
    )
    return DrafterSpec(
        target_layers=layers,
        adapter=adapter,
        top_k=a.top_k or None,
        sc_top_k=a.sc_top_k or None,
        head_vocab=a.head_vocab or None,
    )


def batch_loss(target, plan, ids, P, labels: str, gen) -> dict:
    """Cross-entropy of the drafter on one batch, toward the target's commitment."""
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
    return {"loss": ce, "acc": acc}


@torch.no_grad()
def evaluate(target, plan, windows, a: DistillArgs) -> dict:
    """Mean drafter CE/accuracy on fixed held-out windows and noise."""
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    C, sums = target.config.canvas_length, {"loss": 0.0, "acc": 0.0}
    batches, labels = a.eval_batches, a.labels
    for _ in range(batches):
        ids, P = T.draw_batch(windows, rng, a.batch, C)
        out = batch_loss(target, plan, ids, P, labels, gen)
        for k in sums:
            sums[k] += float(out[k]) / batches
    return sums


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
    adapter = Adapter(spec.adapter)
    plan = spec.plan(target.config, adapter)
    train_w = T.Windows(T.load_stream(a.data, "train"), a.seq_len)
    held_w = T.Windows(T.load_stream(a.data, "heldout"), a.seq_len)
    opt = torch.optim.AdamW(adapter.parameters(), lr=a.lr, betas=(0.9, 0.95))
    rng, gen = np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed)
    C, out, best, log = target.config.canvas_length, Path(a.out), math.inf, []
    start = evaluate(target, plan, held_w, a)
    print(f"step 0: held-out {start}", flush=True)
    elapsed, step = 0.0, 0
    while step < a.steps and not (a.minutes and elapsed > 60 * a.minutes):
        t0 = time.time()
        frac = min(1.0, step / max(1, a.steps))
        lr = (
            a.lr
            * min(1.0, (step + 1) / a.warmup)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        ids, P = T.draw_batch(train_w, rng, a.batch, C)
        losses = batch_loss(target, plan, ids, P, a.labels, gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        step, elapsed = step + 1, elapsed + time.time() - t0
        if step % a.eval_every == 0 or step == a.steps:
            held = evaluate(target, plan, held_w, a)
            log.append({"step": step, "elapsed_s": elapsed, **held})
            train_loss = float(losses["loss"].detach())
            print(f"step {step}: train {train_loss:.3f} held-out {held}", flush=True)
            if held["loss"] < best:
                best = held["loss"]
                save(out, spec, adapter.to_numpy())
    if not (out / "drafter.safetensors").exists():
        save(out, spec, adapter.to_numpy())
    meta = {
        "args": dataclasses.asdict(a),
        "target": str(folder),
        "start": start,
        "log": log,
    }
    (out / "distill.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m drafter.distill", description=__doc__)
    for f in dataclasses.fields(DistillArgs):
        ap.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default
        )
    a = DistillArgs(**vars(ap.parse_args(argv)))
    try:
        distill(a)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()

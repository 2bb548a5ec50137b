"""Quality of a trained model on held-out standard-library files (model card figures).

1. Denoising cross-entropy on held-out canvases corrupted at fixed noise levels (one
   decoder pass without self-conditioning, and the two-pass self-conditioned variant),
   next to the unigram entropy of the held-out tokens (what a model that ignores its
   input can reach).
2. The model's mean entropy on clean held-out canvases (logits / 0.7): how sure it is
   where it is right, the quantity the sampler's stop rule reads.
3. Native decoding of held-out function headers with the model's own shipped sampler
   settings: target passes per canvas (mean, p10/p50/p90, share of canvases stopped
   before the cap), tokens per forward, and the fraction of completions that parse with
   `ast` once cut at the function's end (a completion that does not reach the end of
   its function within the token budget is judged up to its last complete line).
4. Five completions, verbatim.
5. With `--newline`: the same prompts ending after the header's newline, as people
   type them, through the API with token healing (the default) and without it.
6. With `--unseen PKG ...`: the parse rate on function headers from installed
   packages the model never trained on (refused when the model's
   `training_sources.json` or the corpus's `meta.json` lists one of them, or when it
   is reserved for evaluation or vendored by a reserved package:
   `cuda_backend.wheels.is_reserved`).

`--baseline DIR` evaluates a second model (e.g. the previously shipped one) on the same
prompts, seeds and windows, side by side in the record and the card.

    python -m bench.quality --model mlx_diffgem/assets/default --json-out q.json \
        --card mlx_diffgem/assets/default/README.md --baseline old/default

`--card` rewrites the model card's figures between its `<!-- quality:start -->` and
`<!-- quality:end -->` markers from the record, so the card never drifts from it.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import textwrap
import time
from pathlib import Path

import numpy as np

HEADER = re.compile(r"^(\s*)def \w+\(.*\)(\s*->\s*[^:]+)?:\s*$")
SCHEMA = "mlx-diffgem-quality/1"
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
CARD_START, CARD_END = "<!-- quality:start -->", "<!-- quality:end -->"


def unigram_entropy(stream: np.ndarray, vocab: int) -> float:
    """Entropy in nats of the held-out token frequencies."""
    p = np.bincount(stream, minlength=vocab) / len(stream)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def denoising_ce(model, stream: np.ndarray, levels, batches: int = 4, batch: int = 8):
    """Mean CE per noise level on fixed held-out windows: {level: {no_sc, sc}}."""
    import torch
    import torch.nn.functional as F

    from cuda_backend import train

    C, V = model.config.canvas_length, model.config.vocab_size
    windows = train.Windows(stream, 4 * C + C // 2)
    out = {}
    for t in levels:
        rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
        sums = {"no_sc": 0.0, "sc": 0.0}
        for _ in range(batches):
            ids, P = train.draw_batch(windows, rng, batch, C)
            target = ids[:, P:]
            flip = torch.rand(target.shape, generator=gen) < t
            noise = torch.randint(0, V, target.shape, generator=gen)
            noisy = torch.where(flip, noise, target)
            with torch.no_grad():
                _, prefixes = train.encoder_pass(model, ids)
                first = train.decoder_pass(model, noisy, prefixes, P)
                second = train.decoder_pass(model, noisy, prefixes, P, first / 0.6)
            for key, logits in (("no_sc", first), ("sc", second)):
                ce = F.cross_entropy(logits.flatten(0, 1), target.flatten())
                sums[key] += float(ce) / batches
        out[f"{t:.2f}"] = sums
    return out


def clean_entropy(model, stream: np.ndarray, batches: int = 4, batch: int = 8) -> dict:
    """Mean entropy (nats, logits / 0.7) of one decoder pass on clean held-out canvases,
    and the share of positions below 0.01 nats."""
    import torch

    from cuda_backend import train

    C = model.config.canvas_length
    windows = train.Windows(stream, 4 * C + C // 2)
    rng, hs = np.random.default_rng(1), []
    for _ in range(batches):
        ids, P = train.draw_batch(windows, rng, batch, C)
        with torch.no_grad():
            _, prefixes = train.encoder_pass(model, ids)
            z = train.decoder_pass(model, ids[:, P:], prefixes, P) / 0.7
        hs.append(-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1).flatten())
    h = torch.cat(hs)
    return {
        "mean": float(h.mean()),
        "share_below_0.01": float((h < 0.01).float().mean()),
    }


def function_prompts(texts: list[str], n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context ending in a one-line `def ...:` header, header indent) pairs.

    The context stops at the header's colon, not after its newline: the tokenizer
    merges a newline with the next line's indent into one token, so a prompt ending in
    a bare newline asks for a token boundary that never occurs inside a function.
    """
    found = []
    for text in texts:
        lines = text.split("\n")
        for i, line in enumerate(lines):
            m = HEADER.match(line)
            if m and i + 1 < len(lines) and lines[i + 1].strip():
                context = "\n".join(lines[max(0, i - 30) : i + 1])
                found.append((context, m.group(1)))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(found), size=min(n, len(found)), replace=False)
    return [found[i] for i in sorted(pick)]


def function_source(prompt: str, completion: str, indent: str) -> str:
    """The prompt's last line (the header) plus the completion that continues it, cut
    where the function ends, dedented.

    A completion that never leaves the function was cut by the token budget, not by
    the model: its last, unfinished line is dropped.
    """
    header = prompt.rstrip("\n").split("\n")[-1]
    first, *rest = (header + completion).split("\n")
    body, ended = [], False
    for line in rest:
        ind = len(line) - len(line.lstrip())
        if body and line.strip() and ind <= len(indent):
            ended = True
            break
        body.append(line)
    if not ended and len(body) > 1:
        body[-1] = ""
    return textwrap.dedent("\n".join([first, *body]))


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def completions(
    model, tokenizer, prompts, max_tokens: int, seed: int, **overrides
) -> dict:
    """Generate for each prompt; parse rate, passes per canvas, tokens per forward.
    `overrides`: sampler settings instead of the model's generation_config.json."""
    import mlx_diffgem as dg

    cap = overrides.get(
        "max_denoising_steps", model.generation_config.max_denoising_steps
    )
    ok, steps, generated, passes, samples = 0, [], 0, 0, []
    t0 = time.perf_counter()
    for i, (context, indent) in enumerate(prompts):
        ids = [tokenizer.bos_token_id, *tokenizer.encode(context)]
        seq, stats = dg.generate_ids(
            model, [ids], seed=seed + i, max_new_tokens=max_tokens, **overrides
        )
        text = tokenizer.decode(seq[0, len(ids) :].tolist())
        parsed = parses(function_source(context, text, indent))
        ok += parsed
        steps += list(stats.steps_per_canvas)
        generated += stats.generated_tokens
        passes += stats.row_passes
        tail = context.split("\n")[-1]
        samples.append({"prompt_tail": tail, "completion": text, "parses": parsed})
    return {
        "prompts": len(prompts),
        "parse_rate": ok / len(prompts),
        "steps_per_canvas": float(np.mean(steps)),
        "passes_per_canvas": {
            "mean": float(np.mean(steps)),
            **{f"p{q}": float(np.percentile(steps, q)) for q in (10, 50, 90)},
            "stopped_before_cap": float(np.mean(np.asarray(steps) < cap)),
            "canvases": len(steps),
            "cap": cap,
        },
        "tokens_per_forward": generated / passes,
        "seconds": time.perf_counter() - t0,
        "samples": samples[:5],
    }


def api_completions(model, tokenizer, prompts, max_tokens: int, seed: int, heal):
    """`completions` for prompts that end after the header's newline, through the
    public API (`dg.generate`), with token healing on (`heal=None`) or off."""
    import mlx_diffgem as dg

    ok, samples, t0 = 0, [], time.perf_counter()
    for i, (context, indent) in enumerate(prompts):
        text = dg.generate(
            model,
            tokenizer,
            context + "\n",
            max_tokens=max_tokens,
            seed=seed + i,
            heal=heal,
        )
        parsed = parses(function_source(context, "\n" + text, indent))
        ok += parsed
        samples.append({"completion": text, "parses": parsed})
    return {
        "prompts": len(prompts),
        "parse_rate": ok / len(prompts),
        "heal": heal is not False,
        "seconds": time.perf_counter() - t0,
        "samples": samples[:3],
    }


def trained_packages(folders: list[Path], data: Path) -> set[str]:
    """Normalized names of every package the models or the corpus trained on."""
    from cuda_backend.wheels import normalize

    names = set()
    for folder in folders:
        sources = folder / "training_sources.json"
        if sources.is_file():
            names |= set(json.loads(sources.read_text())["packages"])
    meta = data / "meta.json"
    if meta.is_file():
        meta = json.loads(meta.read_text())
        names |= set(meta.get("extra", {})) | set(meta.get("wheels", {}))
    return {normalize(n.lstrip("_")) for n in names}


def unseen_prompts(names: list[str], trained: set[str], n: int, seed: int) -> tuple:
    """(prompts, {package: version}) from installed packages the model never saw."""
    import importlib.metadata

    from cuda_backend import corpus
    from cuda_backend.wheels import is_reserved, normalize

    for name in names:
        if is_reserved(name):
            raise ValueError(f"--unseen {name}: reserved for evaluation (issue 23)")
        if normalize(name) in trained:
            raise ValueError(f"--unseen {name}: the model was trained on it")
    texts = corpus.extra_texts(names, [])
    dists = importlib.metadata.packages_distributions()  # import name -> dist
    versions = {k: importlib.metadata.version(dists.get(k, [k])[0]) for k in names}
    pool = [t for name in names for t in texts[name]]
    return function_prompts(pool, n, seed), versions


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    p.add_argument("--model", default=None, help="model folder (default: embedded)")
    p.add_argument("--data", default="runs/corpus", help="corpus folder (heldout.npy)")
    p.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    p.add_argument("--card", default=None, help="model card to update (markers)")
    p.add_argument(
        "--baseline", default=None, help="a second model folder, side by side"
    )
    p.add_argument(
        "--newline", action="store_true", help="also prompts ending in a newline"
    )
    p.add_argument(
        "--unseen", nargs="*", default=[], metavar="PKG", help="unseen packages"
    )
    a = p.parse_args(argv)
    from . import record as rec

    rec.pin_git()
    record = run(a)
    if a.card:
        update_card(a.card, record)
    return record


def extra_sets(a: argparse.Namespace, model, tokenizer, prompts) -> dict:
    """The --newline and --unseen measurements of one model."""
    out = {}
    if a.newline:
        for key, heal in (("native_newline", None), ("native_newline_unhealed", False)):
            out[key] = api_completions(
                model, tokenizer, prompts, a.max_tokens, a.seed, heal
            )
    if a.unseen:
        folders = [Path(a.model) if a.model else dg_default()]
        folders += [Path(a.baseline)] if a.baseline else []
        trained = trained_packages(folders, Path(a.data))
        unseen, versions = unseen_prompts(a.unseen, trained, a.prompts, a.seed)
        out["native_unseen"] = {
            "packages": versions,
            **completions(model, tokenizer, unseen, a.max_tokens, a.seed),
        }
    return out


def dg_default() -> Path:
    from mlx_diffgem.core.checkpoint import default_model_path

    return Path(default_model_path())


def run(a: argparse.Namespace) -> dict:
    import mlx_diffgem as dg
    from cuda_backend import corpus
    from cuda_backend.backend import load as torch_load
    from mlx_diffgem.core.config import SAMPLER_KEYS

    path = Path(a.model) if a.model else dg.default_model_path()
    stream = np.load(Path(a.data) / "heldout.npy").astype(np.int64)
    root = corpus.stdlib_root()
    _, held = corpus.split_files(corpus.source_files(root))
    prompts = function_prompts(corpus.read_texts(root, held), a.prompts, a.seed)
    from . import record as rec

    def evaluate(folder: Path) -> dict:
        model, tokenizer = dg.load(folder, backend=a.backend)
        reference = torch_load(folder, device="cpu", dtype="float32").model
        gen = model.generation_config
        return {
            "model": str(folder),
            "sampler": {k: getattr(gen, k) for k in SAMPLER_KEYS},
            "unigram_entropy": unigram_entropy(stream, model.config.vocab_size),
            "denoising_ce": denoising_ce(reference, stream, LEVELS),
            "clean_entropy": clean_entropy(reference, stream),
            "native": completions(model, tokenizer, prompts, a.max_tokens, a.seed),
            **extra_sets(a, model, tokenizer, prompts),
        }

    record = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "machine": rec.machine("cpu"),
        "versions": rec.versions(),
        "git": rec.git(),
        "settings": {
            "prompts": a.prompts,
            "max_tokens": a.max_tokens,
            "seed": a.seed,
            "levels": list(LEVELS),
        },
        "backend": a.backend,
        "heldout_tokens": int(len(stream)),
        **evaluate(path),
    }
    if a.baseline:
        record["baseline"] = evaluate(Path(a.baseline))
    text = json.dumps(record, indent=1)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")
    print(text)
    return record


def _figures(model: dict) -> dict[str, str]:
    """The card's per-model figures, formatted."""
    nat, ce = model["native"], model["denoising_ce"]
    dist = nat.get("passes_per_canvas")
    rows = {
        f"CE at noise {t}, no SC / with SC": f"{v['no_sc']:.3f} / {v['sc']:.3f}"
        for t, v in ce.items()
    }
    if "clean_entropy" in model:
        h = model["clean_entropy"]
        rows["mean entropy on clean canvases (nats, logits / 0.7)"] = (
            f"{h['mean']:.3f} ({h['share_below_0.01']:.0%} of positions < 0.01)"
        )
    rows["target passes per canvas, mean"] = f"{nat['steps_per_canvas']:.1f}"
    if dist:
        rows["passes per canvas, p10 / p50 / p90"] = (
            f"{dist['p10']:.0f} / {dist['p50']:.0f} / {dist['p90']:.0f}"
        )
        rows[f"canvases stopped before the {dist['cap']}-pass cap"] = (
            f"{dist['stopped_before_cap']:.0%} of {dist['canvases']}"
        )
    rows["tokens per forward"] = f"{nat['tokens_per_forward']:.2f}"
    rows["completions that parse with `ast`"] = (
        f"{nat['parse_rate']:.0%} ({round(nat['parse_rate'] * nat['prompts'])} "
        f"of {nat['prompts']})"
    )
    if "sampler" in model:
        rows["sampler settings (generation_config.json)"] = ", ".join(
            f"{k} {v}" for k, v in model["sampler"].items()
        )
    return rows


def card_section(record: dict) -> str:
    """The model card's figures (markdown) from a quality record."""
    nat = record["native"]
    ours = _figures(record)
    base = _figures(record["baseline"]) if record.get("baseline") else None
    head = ["| | this model |", "| --- | --- |"]
    if base:
        head = ["| | this model | previous model |", "| --- | --- | --- |"]
    table = [
        f"| {k} | {v} |" + (f" {base.get(k, '')} |" if base else "")
        for k, v in ours.items()
    ]
    lines = [
        f"Held-out figures (`{record['backend']}` backend, {nat['prompts']} held-out "
        "function headers with up to 30 lines of context, "
        f"{record.get('settings', {}).get('max_tokens', 128)} new tokens each, "
        "each model with its own shipped sampler settings). Denoising cross-entropy "
        "in nats/token by noise level, one decoder pass without self-conditioning and "
        "the two-pass self-conditioned one; the unigram entropy of the held-out tokens "
        f"is **{record['unigram_entropy']:.3f}** nats. A completion is cut where its "
        "function ends (or at its last complete line when the token budget ends "
        "first) before `ast.parse`.",
        "",
        *head,
        *table,
        "",
        "### Five completions, verbatim",
    ]
    for sample in nat["samples"]:
        tail = sample["prompt_tail"].rstrip("\n")
        # A fence longer than any backtick run inside keeps the sample verbatim.
        runs = re.findall(r"`+", sample["completion"])
        fence = "`" * max(3, 1 + max(map(len, runs), default=0))
        lines += [
            "",
            f"Prompt ends with `{tail}` (parses: {sample['parses']}):",
            "",
            fence,
            sample["completion"],
            fence,
        ]
    return "\n".join(lines) + "\n"


def update_card(path: str | Path, record: dict) -> None:
    """Replace the text between the card's quality markers with `card_section`."""
    path = Path(path)
    text = path.read_text()
    if text.count(CARD_START) != 1 or text.count(CARD_END) != 1:
        raise ValueError(f"{path}: expected one {CARD_START} and one {CARD_END}")
    head, rest = text.split(CARD_START)
    _, tail = rest.split(CARD_END)
    body = card_section(record)
    path.write_text(f"{head}{CARD_START}\n{body}{CARD_END}{tail}")


if __name__ == "__main__":
    main()

"""The training corpus of the embedded model: the Python standard library's own source.

The `.py` files under `sysconfig.get_paths()["stdlib"]` (PSF licence) are split by
file into train and held-out (a hash of the relative path, about 5% held out), so a
held-out file is never seen in training. A byte-level BPE tokenizer (ids 0-4 =
<pad>/<eos>/<bos>/<unk>/<mask>, as released) is trained on the train split only,
and each split is packed as `<bos> file text <eos> ...` into a uint16 token stream.

Left out: site-packages (not the stdlib), test folders (test/, tests/, idle_test/:
20 MB of fixtures, generated data and deliberately odd code), encodings/ (generated
codec tables), pydoc_data/ (one huge docs string), config-*/ and the machine-specific
`_sysconfigdata*` files, and any file that is not UTF-8.

More training data (`--extra numpy jinja2 ...`): the `.py` sources and shipped `.pyi`
stubs (`--no-stubs`: the sources alone) of installed packages among the project's
declared dependencies, with the same exclusions, go into the train split only; a file
whose text equals a held-out stdlib file's (a vendored copy) is dropped.
`--stdlib-weight 2` packs the stdlib train split twice, so the evaluation domain keeps
its share next to the extra sources. The held-out split stays the stdlib's alone.

Sources from the package index (`--wheels runs/wheels`): permissively licensed
wheels, read and checked by `cuda_backend/wheels.py` (licence recorded in meta.json,
reserved evaluation packages refused), train split only.

    python -m cuda_backend.corpus --out runs/corpus
    python -m cuda_backend.corpus --out runs/corpus2 \
        --tokenizer runs/corpus/tokenizer.json --extra numpy jinja2 --stdlib-weight 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cuda_backend import wheels  # stdlib only: wheel reading and the reserved list

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
# Reserved for the vision ids that config.json must name: never produced from text.
IMAGE_TOKENS = ["<|image>", "<|image|>", "<image|>"]
PAD, EOS, BOS = 0, 1, 2
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "test",
        "tests",
        "idle_test",
        "encodings",
        "pydoc_data",
        "__pycache__",
    }
)
HELD_OUT_PERCENT = 5


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    parts = rel.parts[:-1]
    if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts):
        return True
    return rel.name.startswith("_sysconfigdata")


def source_files(root: Path | None = None, suffixes=(".py",)) -> list[Path]:
    """Relative paths of the corpus files under `root` (default: the stdlib), sorted."""
    root = stdlib_root() if root is None else Path(root)
    rels = (
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix in suffixes and p.is_file()
    )
    return sorted(r for r in rels if not _excluded(r))


def package_root(name: str) -> Path:
    """The folder of an installed (regular) package."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--extra {name}: not an installed package")
    return Path(list(spec.submodule_search_locations)[0])


def extra_texts(
    names: Iterable[str],
    held_texts: list[str],
    suffixes: tuple[str, ...] = wheels.SOURCES,
) -> dict[str, list[str]]:
    """{package: texts} of the `.py`/`.pyi` files of each package (test folders and
    copies of held-out stdlib files left out); `suffixes` (".py",) drops the stubs."""
    held = {hashlib.sha256(t.encode()).digest() for t in held_texts}
    out = {}
    for name in names:
        if wheels.is_reserved(name):
            raise ValueError(f"--extra {name}: reserved for evaluation (issue 23)")
        root = package_root(name)
        texts = read_texts(root, source_files(root, suffixes))
        out[name] = [
            t for t in texts if hashlib.sha256(t.encode()).digest() not in held
        ]
    return out


def is_held_out(rel: Path | str, percent: int = HELD_OUT_PERCENT) -> bool:
    """Deterministic by-file split: the same path is always on the same side."""
    digest = hashlib.sha256(Path(rel).as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < percent


def split_files(
    files: Iterable[Path], percent: int = HELD_OUT_PERCENT
) -> tuple[list[Path], list[Path]]:
    """(train, held-out) relative paths."""
    files = list(files)
    held = [f for f in files if is_held_out(f, percent)]
    return [f for f in files if not is_held_out(f, percent)], held


def read_texts(root: Path, files: Iterable[Path]) -> list[str]:
    """File contents; files that are not UTF-8 are skipped."""
    out = []
    for rel in files:
        try:
            out.append((root / rel).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE `tokenizers.Tokenizer`; ids 0-7 are the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # No normalizer and a byte-level decoder: decode(encode(text)) == text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS + IMAGE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, folder: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens named as released)."""
    from tokenizers.processors import TemplateProcessing

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Like Gemma's: encoding with special tokens prepends <bos>.
    tok.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "padding_side": "left",
        "model_max_length": 1_000_000,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def pack(tok, texts: list[str]) -> np.ndarray:
    """`<bos> text <eos>` for every text, concatenated as uint16."""
    assert tok.get_vocab_size() <= 65536
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([BOS, *enc.ids, EOS], np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


@dataclass(frozen=True)
class Sources:
    """What goes into the train split next to the stdlib's own: installed packages
    (`extra`), a folder of wheels, how many stdlib copies, and whether `.pyi` stubs
    come with the packages."""

    extra: tuple[str, ...] = ()
    wheels: str | Path | None = None
    stdlib_weight: int = 1
    stubs: bool = True

    @property
    def suffixes(self) -> tuple[str, ...]:
        return wheels.SOURCES if self.stubs else (".py",)


def build(
    out: str | Path,
    root: Path | None = None,
    vocab_size: int = 4096,
    percent: int = HELD_OUT_PERCENT,
    tokenizer: str | Path | None = None,
    sources: Sources = Sources(),
) -> dict:
    """Write tokenizer files, train.npy, heldout.npy and meta.json to `out`.

    `tokenizer` (a tokenizer.json) is used as is instead of training one: a run that
    continues a shipped model must encode the corpus with that model's tokenizer.
    """
    root = stdlib_root() if root is None else Path(root)
    out = Path(out)
    train, held = split_files(source_files(root), percent)
    train_texts, held_texts = read_texts(root, train), read_texts(root, held)
    if tokenizer is None:
        tok = train_tokenizer(train_texts, vocab_size)
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
    save_tokenizer(tok, out)
    extras = extra_texts(sources.extra, held_texts, sources.suffixes)
    more = [t for texts in extras.values() for t in texts]
    index = _index_sources(sources.wheels, held_texts + more, sources.suffixes)
    more += [t for src in index.values() for t in src.texts]
    stdlib = train_texts * sources.stdlib_weight
    streams = {"train": pack(tok, stdlib + more), "heldout": pack(tok, held_texts)}
    for name, ids in streams.items():
        np.save(out / f"{name}.npy", ids)
    meta = {
        "root": str(root),
        "vocab_size": tok.get_vocab_size(),
        "train_files": [f.as_posix() for f in train],
        "heldout_files": [f.as_posix() for f in held],
        "train_tokens": int(streams["train"].size),
        "heldout_tokens": int(streams["heldout"].size),
        "train_bytes": sum(len(t.encode()) for t in stdlib + more),
        "stdlib_weight": sources.stdlib_weight,
        "stubs": sources.stubs,
        **_sources_meta(extras, index),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _sources_meta(extras: dict, index: dict) -> dict:
    """meta.json's record of every package in the train split, licences included."""

    def size(texts):
        return sum(len(t.encode()) for t in texts)

    return {
        "extra": {
            name: {"version": _version(name), "files": len(texts), "bytes": size(texts)}
            for name, texts in extras.items()
        },
        "wheels": {
            name: {
                "version": src.version,
                "licence": src.licence,
                "files": len(src.texts),
                "bytes": size(src.texts),
            }
            for name, src in index.items()
        },
    }


def _index_sources(folder, earlier: list[str], suffixes) -> dict:
    """Wheels from the package index (cuda_backend/wheels.py), texts seen earlier
    (held-out and installed-package ones) dropped, at most 1.5 MB per package."""
    if folder is None:
        return {}
    seen = {hashlib.sha256(t.encode()).digest() for t in earlier}
    return wheels.wheel_sources(folder, seen, 1_500_000, suffixes)


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name.lstrip("_").replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/corpus")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--held-out-percent", type=int, default=HELD_OUT_PERCENT)
    ap.add_argument("--tokenizer", help="a tokenizer.json to use instead of training")
    ap.add_argument(
        "--extra", nargs="*", default=[], help="installed packages to add (train only)"
    )
    ap.add_argument("--stdlib-weight", type=int, default=1, help="stdlib train copies")
    ap.add_argument(
        "--wheels",
        help="a folder of downloaded wheels to add (cuda_backend/wheels.txt)",
    )
    ap.add_argument(
        "--no-stubs",
        action="store_true",
        help="leave out the packages' .pyi stubs (bodies of `...`: a model trained on "
        "them ends annotated headers with ` ...` instead of a body)",
    )
    args = ap.parse_args(argv)
    if args.stdlib_weight < 1:
        ap.error(f"--stdlib-weight: expected an integer >= 1, got {args.stdlib_weight}")
    meta = build(
        args.out,
        vocab_size=args.vocab_size,
        percent=args.held_out_percent,
        tokenizer=args.tokenizer,
        sources=Sources(
            tuple(args.extra), args.wheels, args.stdlib_weight, not args.no_stubs
        ),
    )
    print(
        f"{len(meta['train_files'])} train files ({meta['train_tokens']:,} tokens, "
        f"{meta['train_bytes'] / meta['train_tokens']:.2f} bytes/token), "
        f"{len(meta['heldout_files'])} held-out files "
        f"({meta['heldout_tokens']:,} tokens) -> {args.out}"
    )


if __name__ == "__main__":
    main()

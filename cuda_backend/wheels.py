"""Training sources from the package index: the Python files of downloaded wheels.

A wheel is a zip with its licence in `*.dist-info/METADATA`; only permissively
licensed ones (MIT, BSD, Apache, PSF, ISC and alike; not MPL, LGPL or GPL) are read.
The packages reserved for evaluation (pip, setuptools, wheel, packaging, attrs,
click) and every package they vendor are refused by name, and so are vendored
folders inside any wheel (`_vendor/`, `vendor/`, `extern/`), so no reserved code
slips in as someone else's copy. Test folders are left out as in the stdlib corpus.

    pip download --no-deps --only-binary :all: --dest runs/wheels \\
        -r cuda_backend/wheels.txt
    python -m cuda_backend.corpus --out runs/corpus3 --wheels runs/wheels ...
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

# Kept for evaluation (issue 23): never in a training corpus, nor anything they vendor
# (pip's vendor.txt and setuptools' _vendor as of pip 26 / setuptools 80).
RESERVED = frozenset({"pip", "setuptools", "wheel", "packaging", "attrs", "click"})
VENDORED = frozenset(
    "cachecontrol colorama distlib distro msgpack platformdirs pyparsing "
    "pyproject-hooks requests certifi chardet idna urllib3 rich pygments "
    "typing-extensions resolvelib six tenacity tomli webencodings truststore "
    "autocommand backports-tarfile importlib-metadata jaraco-text jaraco-context "
    "jaraco-functools jaraco-collections more-itertools zipp inflect typeguard "
    "ordered-set pkg-resources".split()
)
VENDOR_DIRS = frozenset({"_vendor", "vendor", "extern", "_vendored"})
TEST_DIRS = frozenset({"test", "tests", "testing", "__pycache__"})
PERMISSIVE = re.compile(
    r"\b(MIT|BSD|Apache|PSF|Python Software Foundation|ISC|Unlicense|Zlib|"
    r"Public Domain|0BSD|HPND)\b",
    re.I,
)
COPYLEFT = re.compile(r"\b(GPL|LGPL|AGPL|MPL|Mozilla|EUPL|CDDL|EPL)\b", re.I)


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_reserved(name: str) -> bool:
    return normalize(name) in RESERVED | VENDORED


@dataclass(frozen=True)
class WheelSource:
    name: str
    version: str
    licence: str
    texts: tuple[str, ...]


def licence_of(meta) -> str:
    """The licence a METADATA header states: expression, field or classifiers."""
    expr = meta.get("License-Expression")
    if expr:
        return expr.strip()
    classifiers = [
        c.split("::")[-1].strip()
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    field = (meta.get("License") or "").strip().splitlines()
    short = field[0][:80] if field else ""
    return "; ".join(dict.fromkeys([*classifiers, short] if short else classifiers))


def is_permissive(licence: str) -> bool:
    return bool(PERMISSIVE.search(licence)) and not COPYLEFT.search(licence)


SOURCES = (".py", ".pyi")


def _kept(member: str, suffixes: tuple[str, ...] = SOURCES) -> bool:
    parts = member.split("/")
    if not member.endswith(suffixes) or ".dist-info" in parts[0]:
        return False
    return not any(p in VENDOR_DIRS or p in TEST_DIRS for p in parts[:-1])


def read_wheel(path: str | Path, suffixes: tuple[str, ...] = SOURCES) -> WheelSource:
    """The wheel's name, version, licence and Python texts (UTF-8 only, sorted);
    `suffixes` (".py",) leaves out `.pyi` stubs."""
    with zipfile.ZipFile(path) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = HeaderParser().parsestr(z.read(info).decode("utf-8", "replace"))
        texts = []
        members = [m for m in z.namelist() if _kept(m, suffixes)]
        for member in sorted(members):
            try:
                texts.append(z.read(member).decode("utf-8"))
            except UnicodeDecodeError:
                continue
    return WheelSource(meta["Name"], meta["Version"], licence_of(meta), tuple(texts))


def wheel_sources(
    folder: str | Path,
    seen: set[bytes],
    max_bytes: int,
    suffixes: tuple[str, ...] = SOURCES,
) -> dict[str, WheelSource]:
    """{name: source} for every wheel in `folder`; refuses reserved or copyleft ones.

    `seen` holds the sha256 of texts already in the corpus (held-out ones included);
    a text seen before is dropped, and a package keeps its files up to `max_bytes`.
    """
    out = {}
    for path in sorted(Path(folder).glob("*.whl")):
        src = read_wheel(path, suffixes)
        if is_reserved(src.name):
            raise ValueError(f"{path}: {src.name} is reserved for evaluation")
        if not is_permissive(src.licence):
            raise ValueError(f"{path}: licence {src.licence!r} is not permissive")
        kept, size = [], 0
        for text in src.texts:
            digest = hashlib.sha256(text.encode()).digest()
            if digest in seen or size + len(text.encode()) > max_bytes:
                continue
            seen.add(digest)
            kept.append(text)
            size += len(text.encode())
        out[normalize(src.name)] = WheelSource(
            src.name, src.version, src.licence, tuple(kept)
        )
    return out

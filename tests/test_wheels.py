"""Training sources from the package index: licences, reserved packages, dedup."""

import json
import zipfile

import pytest

from cuda_backend import corpus, wheels


def make_wheel(folder, name, licence="MIT", files=None, field="License-Expression"):
    files = files or {f"{name}/__init__.py": "def f():\n    return 1\n"}
    path = folder / f"{name}-1.0-py3-none-any.whl"
    meta = f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n"
    meta += f"{field}: {licence}\n" if licence else ""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
        for member, text in files.items():
            z.writestr(member, text)
    return path


def test_read_wheel_keeps_sources_not_tests_or_vendored_copies(tmp_path):
    files = {
        "pkg/__init__.py": "x = 1\n",
        "pkg/core.pyi": "def f() -> int: ...\n",
        "pkg/tests/test_core.py": "assert True\n",
        "pkg/_vendor/idna/core.py": "y = 2\n",
        "pkg/data.json": "{}",
        "pkg/bin.py": b"\xff\xfe".decode("latin-1"),
    }
    src = wheels.read_wheel(make_wheel(tmp_path, "pkg", files=files))
    assert (src.name, src.version, src.licence) == ("pkg", "1.0", "MIT")
    assert len(src.texts) == 3 and "x = 1\n" in src.texts
    assert not any("assert True" in t or "y = 2" in t for t in src.texts)


def test_licence_from_classifiers_and_field():
    from email.parser import HeaderParser

    meta = HeaderParser().parsestr(
        "Name: a\nClassifier: License :: OSI Approved :: BSD License\n"
        "License: BSD-3-Clause\n"
    )
    assert wheels.licence_of(meta) == "BSD License; BSD-3-Clause"
    assert wheels.is_permissive("Apache Software License; Apache-2.0")
    assert wheels.is_permissive("MIT OR Apache-2.0")
    for bad in ("", "GPL-3.0", "MPL-2.0 AND MIT", "LGPL", "Proprietary"):
        assert not wheels.is_permissive(bad), bad


@pytest.mark.parametrize("name", ["pip", "Click", "attrs", "idna", "more_itertools"])
def test_reserved_and_vendored_packages_are_refused(tmp_path, name):
    make_wheel(tmp_path, name)
    with pytest.raises(ValueError, match="reserved for evaluation"):
        wheels.wheel_sources(tmp_path, set(), 10**6)
    with pytest.raises(ValueError, match="reserved"):
        corpus.extra_texts([name], [])


def test_copyleft_or_unlabelled_wheels_are_refused(tmp_path):
    make_wheel(tmp_path, "gpl", licence="GPL-3.0-or-later")
    with pytest.raises(ValueError, match="gpl-1.0-py3-none-any.whl: licence"):
        wheels.wheel_sources(tmp_path, set(), 10**6)
    (tmp_path / "gpl-1.0-py3-none-any.whl").unlink()
    make_wheel(tmp_path, "nolicence", licence=None)
    with pytest.raises(ValueError, match="not permissive"):
        wheels.wheel_sources(tmp_path, set(), 10**6)


def test_duplicates_and_the_byte_cap(tmp_path):
    same = "def shared():\n    pass\n"
    make_wheel(tmp_path, "a", files={"a/x.py": same, "a/y.py": "z = 1\n" * 100})
    make_wheel(tmp_path, "b", files={"b/x.py": same, "b/w.py": "w = 2\n"})
    out = wheels.wheel_sources(tmp_path, set(), max_bytes=100)
    assert out["a"].texts == (same,)  # y.py is over the cap
    assert out["b"].texts == ("w = 2\n",)  # a copy of a's file is dropped


def test_corpus_records_wheels_and_their_licences(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(30):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "tiny_pkg", licence="BSD-3-Clause")
    sources = corpus.Sources(wheels=folder)
    meta = corpus.build(tmp_path / "c", root=root, vocab_size=300, sources=sources)
    assert meta["wheels"] == {
        "tiny-pkg": {
            "version": "1.0",
            "licence": "BSD-3-Clause",
            "files": 1,
            "bytes": 22,
        }
    }
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["wheels"]


def test_stubs_can_be_left_out(tmp_path):
    # .pyi bodies are `...`: a model trained on many of them ends annotated headers
    # with ` ...` instead of a body (issue 23), so a corpus can leave them out
    stub = "def f(x: int) -> int: ...\n"
    files = {"pkg/__init__.py": "x = 1\n", "pkg/core.pyi": stub}
    path = make_wheel(tmp_path, "pkg", files=files)
    assert stub in wheels.read_wheel(path).texts
    assert wheels.read_wheel(path, (".py",)).texts == ("x = 1\n",)
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(30):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    for stubs, files in ((True, 2), (False, 1)):
        out = tmp_path / f"c{stubs}"
        sources = corpus.Sources(wheels=tmp_path, stubs=stubs)
        meta = corpus.build(out, root=root, vocab_size=300, sources=sources)
        assert meta["stubs"] is stubs and meta["wheels"]["pkg"]["files"] == files


def test_the_listed_wheels_are_allowed():
    from pathlib import Path

    lines = Path(wheels.__file__).with_suffix(".txt").read_text().splitlines()
    names = [ln.split("==")[0] for ln in lines if ln and not ln.startswith("#")]
    assert len(names) > 100
    assert not [n for n in names if wheels.is_reserved(n)]


def test_unseen_refuses_what_the_model_trained_on(tmp_path):
    from bench import quality
    from mlx_diffgem.core.checkpoint import default_model_path

    trained = quality.trained_packages([default_model_path()], tmp_path)
    assert {"tqdm", "numpy", "mlx-lm", "pytest"} <= trained
    with pytest.raises(ValueError, match="--unseen tqdm: the model was trained"):
        quality.unseen_prompts(["tqdm"], trained, 4, 0)
    with pytest.raises(ValueError, match="--unseen idna: reserved"):
        quality.unseen_prompts(["idna"], trained, 4, 0)


def test_unseen_packages_by_import_name():
    # PyYAML is imported as `yaml` (installed with transformers): the record names
    # the distribution's version, found through the import name
    from importlib.metadata import version

    from bench import quality

    prompts, versions = quality.unseen_prompts(["yaml"], set(), 3, 0)
    assert len(prompts) == 3 and versions == {"yaml": version("PyYAML")}

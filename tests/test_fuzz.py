"""Fuzzers over the public boundary (issue 11): options, ids/masks, bad checkpoints.

Every case is either accepted or refused with a one-line ValueError naming the option,
key or file; the expectation comes from tests/fuzz_cases.py's oracle. Option and id
cases only validate (no generation), so hundreds run in well under a second.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH
from fuzz_cases import (
    CHECKPOINT_VARIANTS,
    ID_CASES,
    names_key,
    option_cases,
    write_variant,
)

from mlx_diffgem.core.generate import make_call
from mlx_diffgem.core.validate import check_call

BACKENDS = [
    pytest.param(
        "mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx not installed")
    ),
    pytest.param(
        "torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
    ),
]
IDS = np.array([[2, 10, 11, 12]], np.int32)


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_path):
    import mlx_diffgem as dg

    return dg.load(tiny_path, backend=request.param, dtype="float32")[0]


def _outcome(fn, valid: bool, keys: list[str]) -> str | None:
    """None when the case behaved as the oracle says, else what went wrong."""
    try:
        fn()
    except ValueError as e:
        if valid:
            return f"refused a valid case: {e}"
        return None if names_key(str(e), *keys) else f"unnamed error: {e}"
    except Exception as e:  # anything else is a raw error
        return f"raw {type(e).__name__}: {e}"
    return None if valid else "accepted an invalid case"


def test_option_fuzzer(model):
    cases = option_cases(n=320, seed=0)
    assert sum(c.valid for c in cases) > 40 and sum(not c.valid for c in cases) > 150
    failures = []
    for c in cases:
        opts = dict(c.opts)
        seed = opts.pop("seed", None)
        keys = c.bad + (["t_min"] if "t_max" in c.bad else [])

        def call(opts=opts, seed=seed):
            make_call(model, IDS, seed=seed, overrides=opts)

        problem = _outcome(call, c.valid, keys)
        if problem:
            failures.append((c.opts, problem))
    assert not failures, f"{len(failures)} of {len(cases)}: {failures[:5]}"


def test_valid_fuzzed_options_generate(model):
    """A sample of the accepted option sets runs end to end (no crash, no NaN)."""
    from mlx_diffgem.core.generate import generate_ids

    valid = [c for c in option_cases(n=320, seed=0) if c.valid][:6]
    for c in valid:
        opts = {"max_new_tokens": 8, **c.opts, "max_denoising_steps": 3}
        opts["stability_threshold"] = min(opts.get("stability_threshold") or 0, 3)
        opts.pop("max_length", None)
        seed = opts.pop("seed", None)
        seqs, stats = generate_ids(model, IDS, seed=seed, **opts)
        assert seqs.shape[1] > IDS.shape[1] and stats.target_passes >= 1
        assert 0 <= seqs.min() and seqs.max() < model.config.vocab_size


@pytest.mark.parametrize("case", range(len(ID_CASES)))
def test_id_and_mask_cases(model, case):
    ids, mask, valid, key = ID_CASES[case]
    problem = _outcome(
        lambda: check_call(model, ids, attention_mask=mask), valid, [key]
    )
    assert problem is None, (ids, mask, problem)


# --------------------------------------------------------------------------------------
# Corrupted checkpoints
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("variants")
    return [
        write_variant(tiny_path, root / str(i), v)
        for i, v in enumerate(CHECKPOINT_VARIANTS)
    ]


def _generate(target) -> np.ndarray:
    from mlx_diffgem.core.generate import generate_ids

    return generate_ids(target, IDS, seed=0, max_new_tokens=8, max_denoising_steps=4)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_checkpoint_table(backend, tiny_path, variants):
    """Every variant: one named error at load, or it loads and (where the change
    must not matter, as in the reference) generates what the clean checkpoint does."""
    import mlx_diffgem as dg

    base = _generate(dg.load(tiny_path, backend=backend, dtype="float32")[0])
    failures = []
    for v, path in zip(CHECKPOINT_VARIANTS, variants, strict=True):
        key = v.key.split("+")[0]
        try:
            target = dg.load(path, backend=backend, dtype="float32")[0]
        except ValueError as e:
            if v.valid or not names_key(str(e), key):
                failures.append((v.name, str(e)))
            continue
        except Exception as e:
            failures.append((v.name, f"raw {type(e).__name__}: {e}"))
            continue
        if not v.valid:
            failures.append((v.name, "loaded"))
        elif v.key in _NEUTRAL and not np.array_equal(_generate(target), base):
            failures.append((v.name, "output differs from the clean checkpoint"))
        else:
            _generate(target)
    assert not failures, f"{len(failures)} of {len(variants)}: {failures[:5]}"


# Fields the reference does not read, or that do not change generation here.
_NEUTRAL = ("final_logit_softcapping", "some_future_key", "transformers_version")


def test_variant_errors_name_the_file(tiny_path, variants):
    """Config errors name config.json or generation_config.json; tensor errors the
    weights file."""
    from mlx_diffgem.core.checkpoint import check_checkpoint, load_config
    from mlx_diffgem.core.checkpoint import load_generation_config as load_gen

    files = {"text": "config.json", "top": "config.json"}
    files |= {"gen": "generation_config.json", "tensor": "model.safetensors"}
    for v, path in zip(CHECKPOINT_VARIANTS, variants, strict=True):
        if v.valid or v.key in ("nan", "inf") or v.value in ("nan", "inf"):
            continue  # NaN weights are found by the backends while loading
        with pytest.raises(ValueError) as e:
            cfg = load_config(path)
            load_gen(path, cfg)
            check_checkpoint(path, cfg)
        assert files[v.where] in str(e.value), (v.name, str(e.value))


def test_generation_config_file_keys_are_named(tmp_path, tiny_path):
    import shutil

    from mlx_diffgem.core.checkpoint import load_generation_config

    path = tmp_path / "g"
    shutil.copytree(tiny_path, path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(gen | {"top_q": 1}))
    with pytest.raises(ValueError, match=r"generation_config\.json: unknown .*'top_q'"):
        load_generation_config(path)

"""Fuzzers over the public boundary (issues 11, 21): options, ids/masks, bad
checkpoints, drafter folders, `self:` strings and speculative options.

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
    DRAFTER_VARIANTS,
    ID_CASES,
    SELF_PLAN_CASES,
    SPEC_CASES,
    names_key,
    option_cases,
    write_drafter_variant,
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


# --------------------------------------------------------------------------------------
# Drafter folders, `self:` strings, speculative options (issue 21)
# --------------------------------------------------------------------------------------


def drafter_weights(adapter, seed: int = 0) -> dict:
    """Random float32 weights for every tensor of an adapter (names and shapes from
    its config, so no backend is needed)."""
    rng = np.random.default_rng(seed)
    return {
        k: (
            (1.0 if k.endswith("norm.weight") else 0.0) + 0.1 * rng.standard_normal(s)
        ).astype(np.float32)
        for k, s in sorted(adapter.shapes().items())
    }


@pytest.fixture(scope="module")
def drafter_root(tmp_path_factory, tiny_path):
    """A valid trained-drafter folder for the tiny model (with its fingerprint),
    then every DRAFTER_VARIANTS copy of it."""
    from drafter.trained import AdapterConfig, DrafterSpec, save
    from mlx_diffgem.core.checkpoint import load_config

    cfg = load_config(tiny_path)
    adapter = AdapterConfig(cfg.hidden_size, 2, 2, 8, 24)
    spec = DrafterSpec((0, 1), adapter, top_k=1, sc_top_k=16, head_vocab=64)
    root = tmp_path_factory.mktemp("drafters")
    base = save(
        root / "base", spec.for_target(tiny_path, cfg), drafter_weights(adapter)
    )
    return base, [
        write_drafter_variant(base, root / str(i), v)
        for i, v in enumerate(DRAFTER_VARIANTS)
    ]


def test_drafter_variants(model, drafter_root):
    """Every changed drafter folder: one named error at load (ValueError, naming
    the key, file or tensor), or it loads and drafts."""
    import warnings

    from drafter import load_drafter
    from mlx_diffgem.core.generate import generate_ids
    from mlx_diffgem.core.speculative import SpecPolicy, SpeculativeModel

    base, variants = drafter_root
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fingerprinted folder loads unwarned
        load_drafter(model, str(base))
    failures = []
    for v, path in zip(DRAFTER_VARIANTS, variants, strict=True):

        def run(path=path):
            spec = SpeculativeModel(
                model, load_drafter(model, str(path)), SpecPolicy(2)
            )
            ids = generate_ids(
                spec, IDS, seed=0, max_new_tokens=8, max_denoising_steps=3
            )
            assert 0 <= ids[0].min() and ids[0].max() < model.config.vocab_size

        problem = _outcome(run, v.valid, [v.key])
        if problem:
            failures.append((v.name, problem))
    assert not failures, f"{len(failures)} of {len(variants)}: {failures[:5]}"


def test_drafter_errors_name_the_file(model, drafter_root):
    """A config error names drafter_config.json, a weights error the weights file,
    a foreign drafter its folder."""
    from drafter import load_drafter

    for v, path in zip(DRAFTER_VARIANTS, drafter_root[1], strict=True):
        if v.valid:
            continue
        with pytest.raises(ValueError) as e:
            load_drafter(model, str(path))
        where = "drafter_config.json"
        if v.where == "weights" or v.key == "drafter.safetensors":
            where = "drafter.safetensors"  # a config that does not fit its tensors
        elif "different model" in v.key:
            where = str(path)
        assert where in str(e.value), (v.name, str(e.value))


@pytest.mark.parametrize("case", range(len(SELF_PLAN_CASES)))
def test_self_plan_cases(model, case):
    from drafter import load_drafter

    text, key = SELF_PLAN_CASES[case]
    problem = _outcome(lambda: load_drafter(model, text), not key, [key])
    assert problem is None, (text, problem)


def test_speculative_option_cases():
    from mlx_diffgem.core.speculative import SpecPolicy

    failures = []
    for opts, key in SPEC_CASES:
        problem = _outcome(lambda opts=opts: SpecPolicy(**opts), not key, [key])
        if problem:
            failures.append((opts, problem))
    assert not failures, failures
    p = SpecPolicy(draft_steps=np.int64(8), draft_confidence=np.float32(0.05))
    assert type(p.draft_steps) is int and type(p.draft_confidence) is float


def test_numpy_speculative_options_reach_generation(tiny_path):
    """numpy numbers through dg.load(speculative=...), as the rest of the API
    takes them, and generation runs with them."""
    import mlx_diffgem as dg

    backend = "torch" if HAS_TORCH else "mlx"
    spec = {"draft_steps": np.int64(3), "draft_confidence": np.float32(0.05)}
    model = dg.load(tiny_path, backend=backend, drafter="self", speculative=spec)[0]
    assert model.spec.draft_steps == 3
    _generate(model)
    with pytest.raises(ValueError, match=r"draft_steps must be .*\[1, 10000\]"):
        dg.load(
            tiny_path,
            backend=backend,
            drafter="self",
            speculative={"draft_steps": 10**9},
        )


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"top_k": "1"}, "top_k"),
        ({"top_k": 1.0}, "top_k"),
        ({"head_vocab": 64.5}, "head_vocab"),
        ({"sc_top_k": True}, "sc_top_k"),
        ({"layers": (0.5, 1.7)}, "layers"),
        ({"layers": "01"}, "layers"),
        ({"layers": (0, np.int64(3)), "top_k": np.int64(2)}, ""),
    ],
)
def test_plan_objects_are_checked(model, fields, key):
    """A PassPlan built in Python (bench, a caller of Target.planned) is checked as
    a parsed one: a value of the wrong type is refused, not compared or cut."""
    from drafter.plan import SelfDraftPlan

    check = SelfDraftPlan(**fields).checked
    assert _outcome(lambda: check(model.config), not key, [key]) is None

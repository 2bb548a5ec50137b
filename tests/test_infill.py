"""Infill and edit-in-place: pinned canvas positions (both backends), the window
driver (core/infill.py) over a scripted target, and the embedded model's infill."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HAS_MLX, HAS_TORCH, needs_torch
from fuzz_cases import HOLE_CASES, names_key

import mlx_diffgem as dg
from mlx_diffgem.core.backend import CanvasResult, CanvasState, DenoisePolicy
from mlx_diffgem.core.config import GenerationConfig, ModelConfig
from mlx_diffgem.core.infill import Hole, fill, parse_holes
from mlx_diffgem.core.noise import ReplayNoise
from mlx_diffgem.core.tiny import tiny_config_dict

BACKENDS = [
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="no mlx")),
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
]
EOS, PAD, BOS = 1, 0, 2


def _load(path, backend):
    opts = {"device": "cpu"} if backend == "torch" else {}
    return dg.load(path, backend=backend, dtype="float32", **opts)


# --------------------------------------------------------------------------------------
# The canvas loops: pinned positions
# --------------------------------------------------------------------------------------


def _pinned(C: int) -> np.ndarray:
    """Row 0 pins its even positions, row 1 its first half (-1: hole)."""
    fixed = np.full((2, C), -1, np.int32)
    fixed[0, ::2] = 40 + np.arange(0, C, 2)
    fixed[1, : C // 2] = 70 + np.arange(C // 2)
    return fixed


def _replay(C: int, V: int, steps: int, seed: int = 0) -> ReplayNoise:
    rng = np.random.default_rng(seed)
    return ReplayNoise(rng.integers(0, V, (1 + 2 * steps, 2, C)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pinned_positions_never_change(tiny_path, backend):
    model, _ = _load(tiny_path, backend)
    C, V = model.config.canvas_length, model.config.vocab_size
    cache = model.new_cache(2)
    model.encode(np.array([[BOS, 9, 10], [BOS, 11, 12]], np.int32), cache)
    fixed, views = _pinned(C), []
    policy = DenoisePolicy(max_steps=6)
    res = model.denoise(
        CanvasState(fixed=fixed), cache, policy, _replay(C, V, 6), views.append
    )
    pin = fixed >= 0
    assert views and all((v.argmax[pin] == fixed[pin]).all() for v in views)
    assert (res.tokens[pin] == fixed[pin]).all()
    assert (dg.to_numpy(res.state.canvas)[pin] == fixed[pin]).all()
    assert res.state.fixed is fixed  # carried on, so another model continues it


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_rule_mean_entropy_counts_holes_only(tiny_path, backend):
    model, _ = _load(tiny_path, backend)
    C, V = model.config.canvas_length, model.config.vocab_size
    ids = np.array([[BOS, 9, 10], [BOS, 11, 12]], np.int32)
    fixed, draws = _pinned(C), np.random.default_rng(1).integers(0, V, (3, 2, C))
    noise, first = ReplayNoise(draws), np.where(fixed >= 0, fixed, draws[0])
    cache = model.new_cache(2)
    model.encode(ids, cache)
    policy = DenoisePolicy(max_steps=4, budget=1)
    res = model.denoise(CanvasState(fixed=fixed), cache, policy, noise)
    z = dg.to_numpy(model.decode(first.astype(np.int32), cache)).astype(np.float64)
    z /= policy.temperature(4)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    h = -(np.exp(logp) * logp).sum(-1)
    want = [h[b][fixed[b] < 0].mean() for b in range(2)]
    np.testing.assert_allclose(res.step_stats["mean_entropy"][0], want, rtol=1e-4)
    # pinned positions are kept and use none of the entropy bound
    assert (res.step_stats["accepted"][0] > (fixed >= 0).sum(-1)).all()


@needs_torch
@pytest.mark.skipif(not HAS_MLX, reason="no mlx")
def test_pinned_canvas_same_tokens_on_both_backends(tiny_path):
    out = []
    for backend in ("mlx", "torch"):
        model, _ = _load(tiny_path, backend)
        C, V = model.config.canvas_length, model.config.vocab_size
        cache = model.new_cache(2)
        model.encode(np.array([[BOS, 9, 10], [BOS, 11, 12]], np.int32), cache)
        policy = DenoisePolicy(max_steps=8)
        noise = _replay(C, V, 8, seed=3)
        res = model.denoise(CanvasState(fixed=_pinned(C)), cache, policy, noise)
        out.append((res.tokens, res.steps))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]


# --------------------------------------------------------------------------------------
# The window driver over a scripted target
# --------------------------------------------------------------------------------------


class CharTokenizer:
    """Ids 10 + ord(c) - 32 for printable ASCII and '\\n'; specials are skipped."""

    bos_token_id = BOS

    def encode(self, text: str) -> list[int]:
        return [10 + (ord(c) - 32 if c != "\n" else 95) for c in text]

    def decode(self, ids) -> str:
        return "".join(
            "\n" if i == 105 else chr(i - 10 + 32) for i in ids if 10 <= i <= 105
        )


class ScriptedTarget:
    """Writes `script(call)` into the holes of each window; records every call."""

    backend = "fake"

    def __init__(self, C: int = 8, script=None):
        self.config = ModelConfig.from_dict(tiny_config_dict(canvas_length=C))
        self.generation_config = GenerationConfig(eos_token_id=[EOS], pad_token_id=PAD)
        self.script = script or (lambda k: np.full(C, 43 + k))  # "A", "B", ...
        self.windows, self.encoded = [], []

    def new_cache(self, batch_size):
        return type("Cache", (), {"batch_size": batch_size, "offset": 0})()

    def encode(self, ids, cache, attention_mask=None):
        assert ids.shape[1] > 0
        self.encoded.append(ids[0].tolist())
        cache.offset += ids.shape[1]

    def denoise(self, state, cache, policy, noise, on_step=None):
        fixed = state.fixed[0]
        self.windows.append((cache.offset, fixed.copy()))
        tokens = np.where(fixed >= 0, fixed, self.script(len(self.windows) - 1))
        one = np.ones(1, np.int64)
        return CanvasResult(tokens[None].astype(np.int32), 2, 2 * one, state)

    def peak_memory(self):
        return 0


TOK = CharTokenizer()


def test_window_starts_at_the_hole_and_pins_the_suffix():
    target = ScriptedTarget(C=8)
    r = fill(target, TOK, ["def f", Hole(3), "(x): return x\n"])
    assert r.text == "def fAAA(x): return x\n" and r.holes == ["AAA"]
    offset, fixed = target.windows[0]
    assert offset == 1 + 5  # <bos> "def f" encoded; the hole opens the canvas
    assert TOK.decode(fixed[3:].tolist()) == "(x): " and (fixed[:3] == -1).all()
    assert target.encoded == [[BOS, *TOK.encode("def f")]]


def test_a_long_prefix_is_encoded_in_chunks():
    target = ScriptedTarget(C=8)
    r = fill(target, TOK, ["x" * 600, Hole(2), "y\n"])
    assert r.holes == ["AA"] and [len(e) for e in target.encoded] == [512, 85]


def test_several_holes_each_filled_and_fixed_text_kept():
    target = ScriptedTarget(C=8)
    text = "a = " + dg.hole(2) + "\nb = 1\nc = " + dg.hole(3) + "\nprint(a, b, c)\n"
    r = fill(target, TOK, text)
    assert r.holes == ["AA", "BBB"]
    assert r.text == "a = AA\nb = 1\nc = BBB\nprint(a, b, c)\n"
    assert r.filled.sum() == 5 and r.stats.generated_tokens == 5
    assert r.stats.canvases == 2 and r.stats.target_passes == 4


def test_hole_longer_than_one_canvas_ends_in_a_window_that_sees_the_suffix():
    target = ScriptedTarget(C=8)
    r = fill(target, TOK, ["x = (", Hole(20), ")\ny = x\n"])
    assert r.text == "x = (" + "A" * 8 + "B" * 8 + "C" * 4 + ")\ny = x\n"
    assert [w[0] for w in target.windows] == [6, 14, 22]
    # the hole's last window holds its end and, pinned, the start of the suffix
    fixed = target.windows[-1][1]
    assert (fixed[:4] == -1).all() and TOK.decode(fixed[4:].tolist()) == ")\ny "
    assert sum(len(e) for e in target.encoded) == 22


def test_chosen_length_hole_ends_at_eos_and_the_text_moves_up():
    def script(k):
        return np.array([43, 44, EOS, 45, 45, 45, 45, 45]) if k == 0 else np.full(8, 50)

    target = ScriptedTarget(C=8, script=script)
    r = fill(target, TOK, "s = " + dg.HOLE + "\nt = " + dg.hole(2) + "\n")
    assert r.holes == ["AB", "HH"]
    assert r.text == "s = AB\nt = HH\n"
    assert len(r.ids) == 1 + len(r.text)
    # the second window sees the text after the cut, at its new positions
    offset, fixed = target.windows[1]
    assert offset == 7 and TOK.decode(r.ids[1:offset].tolist()) == "s = AB"
    assert TOK.decode(fixed[fixed >= 0].tolist()) == "\nt = \n"


def test_chosen_hole_without_eos_takes_max_hole_tokens():
    target = ScriptedTarget(C=8)
    r = fill(target, TOK, ["def g():\n    return ", Hole(), "\n"], max_hole_tokens=5)
    assert r.holes == ["AAAAA"]


def test_text_shorter_than_a_canvas_ends_with_eos_then_pad():
    target = ScriptedTarget(C=8)
    r = fill(target, TOK, ["x", Hole(2)])
    assert r.text == "xAA"
    offset, fixed = target.windows[0]
    assert (
        offset == 1 and fixed.tolist() == [TOK.encode("x")[0], -1, -1, EOS] + [PAD] * 4
    )


def test_infill_and_edit_return_the_middle_and_the_text():
    target = ScriptedTarget(C=8)
    assert dg.infill(target, TOK, "ab", "cd", length=2) == "AA"
    assert dg.edit(ScriptedTarget(C=8), TOK, "ab<|hole:1|>cd") == "abAcd"
    # the prefix and suffix of infill are literal: a marker there is text
    middle = dg.infill(ScriptedTarget(C=8), TOK, dg.HOLE, "x", length=1)
    assert middle == "A"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: fill(t, TOK, "no holes here"), "text_with_holes: no hole marker"),
        (lambda t: fill(t, TOK, "a<|hole:0|>b"), "'<|hole:0|>': expected a length"),
        (lambda t: fill(t, TOK, ["a", 3, Hole()]), "expected str or Hole parts"),
        (lambda t: fill(t, TOK, ["a", Hole(-2)]), "Hole.tokens must be an integer"),
        (lambda t: fill(t, TOK, ["a", Hole(2**20 + 1)]), r"Hole.tokens .*1048576"),
        (lambda t: fill(t, TOK, ["a", Hole(1.5)]), "Hole.tokens"),
        (lambda t: fill(t, TOK, ["a\ud800", Hole()]), r"text_with_holes\[0\]: a lone"),
        (lambda t: fill(t, TOK, "a" + dg.HOLE, max_hole_tokens=2**21), "max_hole_t"),
        (lambda t: dg.infill(t, TOK, "a\ud800", "b"), "prefix: a lone surrogate"),
        (lambda t: dg.infill(t, TOK, "a", "b\udfff"), "suffix: a lone surrogate"),
        (lambda t: dg.infill(t, TOK, "a", "b", length=2**21), "length"),
        (lambda t: dg.infill(t, TOK, "a", "b", max_tokens=2**21), "max_tokens must"),
        (lambda t: dg.hole(2**21), "hole must be an integer"),
        (lambda t: fill(t, None, "a" + dg.HOLE), "tokenizer: infill needs"),
        (lambda t: fill(t, TOK, "a" + dg.HOLE, max_hole_tokens=0), "max_hole_tokens"),
        (lambda t: dg.infill(t, TOK, "a", "b", length=2, max_tokens=3), "length:"),
        (lambda t: dg.infill(t, TOK, "a", 5), "suffix: expected a string"),
        (lambda t: fill(t, TOK, "a" + dg.HOLE, top_p=0.9), "top_p"),
    ],
)
def test_bad_arguments_get_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match.replace("|", r"\|")) as e:
        call(NoWork())
    assert "\n" not in str(e.value)


def test_markers_parse():
    assert parse_holes("a" + dg.HOLE + "b" + dg.hole(7)) == [
        "a",
        Hole(),
        "b",
        Hole(7),
        "",
    ]


class NoWork(ScriptedTarget):
    """A target that fails the test as soon as any work starts: a refused call
    must be refused before it (a reverted check fails here, not by hanging)."""

    def new_cache(self, batch_size):
        raise AssertionError("the call was accepted: a cache was made")


@pytest.mark.parametrize("case", range(len(HOLE_CASES)))
def test_hole_marker_cases(case):
    """Every "<|hole" is a well-formed marker, or the text is refused by a
    one-line error naming the marker (never kept as literal text)."""
    text, key = HOLE_CASES[case]
    if not key:  # parsing only: some of these holes are 2**20 tokens long
        assert any(isinstance(p, Hole) for p in parse_holes(text))
        return
    with pytest.raises(ValueError) as e:
        fill(NoWork(), TOK, text)
    assert names_key(str(e.value), key), str(e.value)


def test_malformed_marker_is_text_in_the_list_form():
    target = ScriptedTarget(C=8)
    r = fill(target, TOK, ["a <|hole:-1|> ", Hole(2), " <|hole"])
    assert r.text == "a <|hole:-1|> AA <|hole" and r.holes == ["AA"]


def test_fixed_text_is_the_given_text_even_where_decoding_is_not_exact():
    """The text around the holes comes back as given, not as the tokenizer's
    round trip (CharTokenizer drops what is not ASCII)."""
    target = ScriptedTarget(C=8)
    r = fill(target, TOK, "caf\u00e9 = " + dg.hole(2) + " # \u2581\U0001f600\n")
    assert r.text == "caf\u00e9 = AA # \u2581\U0001f600\n" and r.holes == ["AA"]


# --------------------------------------------------------------------------------------
# The embedded model
# --------------------------------------------------------------------------------------

CODE_PREFIX = "import os\n\n\ndef read_lines(path):\n    "
CODE_MIDDLE = (
    "\n    return [line.rstrip() for line in lines]\n\n\ndef count(path):\n    "
)
CODE_SUFFIX = "\n    return len(read_lines(path))\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_text_comes_back_byte_for_byte(backend):
    model, tok = dg.load(
        backend=backend, **({"device": "cpu"} if backend == "torch" else {})
    )
    parts = [CODE_PREFIX, Hole(12), CODE_MIDDLE, Hole(80), CODE_SUFFIX]
    r = fill(model, tok, parts, seed=0, max_denoising_steps=8)
    assert r.text.startswith(CODE_PREFIX) and r.text.endswith(CODE_SUFFIX)
    assert CODE_MIDDLE in r.text
    want = [tok.bos_token_id, *tok.encode(CODE_PREFIX)]
    want += tok.encode(CODE_MIDDLE) + tok.encode(CODE_SUFFIX)
    assert r.ids[~r.filled].tolist() == want
    assert (
        r.filled.sum() == 92 and r.stats.canvases >= 2
    )  # 80 tokens: more than a canvas


SPECIAL_TEXT = "x = '<eos>' + <|hole:4|> + '<pad><bos>' # <mask><unk>\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_token_strings_in_fixed_text_stay_text(backend):
    """'<eos>', '<pad><bos>' in the user's text are text: encoded as plain text
    (not as the special tokens, which decoding would drop) and returned exactly."""
    model, tok = _load_default(backend)
    r = fill(model, tok, SPECIAL_TEXT, seed=0, max_denoising_steps=2)
    before, after = SPECIAL_TEXT.split("<|hole:4|>")
    assert r.text == before + r.holes[0] + after
    fixed = r.ids[~r.filled].tolist()
    assert fixed == [
        tok.bos_token_id,
        *tok.encode_plain(before),
        *tok.encode_plain(after),
    ]
    specials = {tok.token_to_id(t) for t in ("<eos>", "<pad>", "<bos>", "<mask>")}
    assert not specials & set(fixed[1:])
    assert tok.decode(fixed[1:]) == before + after  # the ids decode back, too


def _load_default(backend):
    return dg.load(backend=backend, **({"device": "cpu"} if backend == "torch" else {}))


@needs_torch
def test_infill_with_a_self_drafter_keeps_the_fixed_text():
    model, tok = dg.load(backend="torch", device="cpu", drafter="self")
    r = fill(model, tok, [CODE_PREFIX, Hole(10), CODE_SUFFIX], seed=0)
    assert r.text.startswith(CODE_PREFIX) and r.text.endswith(CODE_SUFFIX)
    assert r.stats.drafter_passes > 0


@needs_torch
def test_cli_infill_reads_stdin_and_prints_the_text(tmp_path, capsys, monkeypatch):
    import io

    from mlx_diffgem.cli import main

    (tmp_path / "suffix.py").write_text(CODE_SUFFIX)
    monkeypatch.setattr("sys.stdin", io.StringIO(CODE_PREFIX))
    argv = [
        "infill",
        "--prefix-file",
        "-",
        "--suffix-file",
        str(tmp_path / "suffix.py"),
    ]
    opts = ["--length", "6", "--backend", "torch", "--device", "cpu", "--whole"]
    assert main(argv + opts) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith(CODE_PREFIX) and out.endswith(CODE_SUFFIX)
    assert len(out) > len(CODE_PREFIX + CODE_SUFFIX)
    # the stats as a block, one fact per line, as `diffgem generate` prints them
    block = captured.err.split("=" * 10 + "\n", 1)[1].splitlines()
    assert block[0].startswith("prompt: ") and block[1].startswith("generation: 6 ")
    assert any(line.startswith("tokens/forward: ") for line in block)


def _held_out_lines(tok, n: int) -> list[tuple[str, str, str]]:
    """(30 lines before, the removed line, 24 lines after) from held-out stdlib
    files: the first code line of 6-16 tokens past each file's middle."""
    from cuda_backend import corpus

    root = corpus.stdlib_root()
    _, held = corpus.split_files(corpus.source_files(root))
    out = []
    for text in corpus.read_texts(root, held):
        lines = text.splitlines(keepends=True)
        for i in range(len(lines) // 2, len(lines) - 30):
            line = lines[i].rstrip("\n")
            code = line.strip()
            if not (20 <= len(code) <= 60) or code.startswith(("#", '"', "'")):
                continue
            if 6 <= len(tok.encode(line)) <= 16:
                after = "\n" + "".join(lines[i + 1 : i + 25])
                out.append(("".join(lines[max(0, i - 30) : i]), line, after))
                break
        if len(out) == n:
            break
    return out


def _cross_entropy(model, tok, prefix: str, x: list[int], suffix: str) -> float:
    """The model's CE (nats/token) of tokens `x` between prefix and suffix: x's
    positions are uniform noise (as on a first denoising step), the suffix follows in
    the canvas; mean over 4 noise draws."""
    C, V = model.config.canvas_length, model.config.vocab_size
    cache = model.new_cache(1)
    model.encode(np.array([[tok.bos_token_id, *tok.encode(prefix)]], np.int32), cache)
    rng, suf, ce = np.random.default_rng(0), tok.encode(suffix)[: C - len(x)], []
    for _ in range(4):
        canvas = np.array([[*rng.integers(0, V, len(x)), *suf]], np.int32)
        z = dg.to_numpy(model.decode(canvas, cache))[0, : len(x)].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        ce.append(-logp[np.arange(len(x)), x].mean())
    return float(np.mean(ce))


@needs_torch
def test_infill_of_a_removed_line_beats_unconditioned_generation():
    model, tok = dg.load(backend="torch", device="cpu")  # faster than MLX on a CPU
    cases = _held_out_lines(tok, 4)
    assert len(cases) == 4
    figures = []
    for prefix, line, suffix in cases:
        n = len(tok.encode(line))
        filled = fill(model, tok, [prefix, Hole(n), suffix], seed=0)
        free = fill(model, tok, [Hole(n)], seed=0)  # same length, no context
        xs = (tok.encode(line), filled.ids[filled.filled], free.ids[free.filled])
        figures.append(
            [_cross_entropy(model, tok, prefix, list(x), suffix) for x in xs]
        )
    original, infilled, unconditioned = np.mean(figures, axis=0)
    print(
        f"CE nats/token: original {original:.2f} infill {infilled:.2f} "
        f"unconditioned {unconditioned:.2f}"
    )
    assert infilled < unconditioned
    assert sum(f[1] < f[2] for f in figures) >= 3

"""The `diffgem` command line: help, version, backend choice, stats, progress, BLAS."""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlx_diffgem import __version__, cli
from mlx_diffgem.cli import bench, generate, terminal
from mlx_diffgem.core import auto
from mlx_diffgem.core.stats import Stats

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
HAS_TORCH = auto.installed("torch")


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_diffgem", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
        **kw,
    )


def test_version_and_description(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffgem {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "text-diffusion model" in out and "diffgem generate --prompt" in out


def test_every_generate_option_has_help():
    sub = argparse.ArgumentParser().add_subparsers()
    generate.add_parser(sub)
    actions = sub.choices["generate"]._actions
    missing = [a.option_strings for a in actions if not a.help]
    assert not missing
    flags = {s for a in actions for s in a.option_strings}
    assert {"--seed", "--t-min", "--no-chat", "--backend", "--dtype"} <= flags


def test_bench_help_names_the_diffgem_command(capsys):
    for tool in bench.BENCH_TOOLS:
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", tool, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: diffgem bench {tool}")


@pytest.mark.parametrize(
    "mlx, torch, apple, options, want",
    [
        (True, True, True, {}, "mlx"),  # Apple silicon
        (True, True, False, {}, "torch"),  # Linux: CUDA, or CPU where torch is faster
        (True, False, False, {}, "mlx"),  # only MLX installed
        (False, True, True, {}, "torch"),
        (True, True, True, {"device": "mps"}, "torch"),  # a torch-only option
    ],
)
def test_auto_backend(monkeypatch, mlx, torch, apple, options, want):
    monkeypatch.setattr(auto, "installed", {"mlx": mlx, "torch": torch}.get)
    monkeypatch.setattr(auto, "apple_silicon", lambda: apple)
    assert auto.resolve_backend("auto", options) == want
    assert auto.resolve_backend("mlx", options) == "mlx"  # explicit wins


@pytest.mark.parametrize(
    "quantization, want",
    [(None, False), ("int8", False), ({"bits": 8}, False), ("4bit", True)]
    + [({"bits": 4, "group_size": 64}, True), ("mixed", True)]
    + [({"bits": 8, "group_size": 32}, True)],  # MLX's grouped 8-bit
)
def test_mlx_only_quantization(quantization, want):
    assert auto.mlx_only(None, quantization) is want


def test_auto_picks_mlx_for_an_mlx_conversion(monkeypatch, tmp_path):
    monkeypatch.setattr(auto, "installed", lambda name: True)
    monkeypatch.setattr(auto, "apple_silicon", lambda: False)
    (tmp_path / "config.json").write_text('{"quantization": {"bits": 4}}')
    assert auto.choose_backend(path=tmp_path) == "mlx"
    (tmp_path / "config.json").write_text('{"model_type": "diffusion_gemma"}')
    assert auto.choose_backend(path=tmp_path) == "torch"
    assert auto.choose_backend(path="google/diffusiongemma-26B-A4B-it") == "torch"
    assert auto.choose_backend(quantization="mixed") == "mlx"


def test_auto_backend_without_any_backend_is_one_line(monkeypatch):
    monkeypatch.setattr(auto, "installed", lambda name: False)
    with pytest.raises(ImportError, match=r"neither mlx nor torch.*\[cpu\]"):
        auto.choose_backend()


def _stats(**kw) -> Stats:
    base = dict(
        prompt_tokens=10,
        prompt_time=0.1,
        generation_time=2.0,
        canvases=1,
        generated_tokens=64,
        row_passes=48,
        steps_per_canvas=[48],
        peak_memory=int(2e8),
    )
    return Stats(**{**base, **kw})


def test_stats_lines_say_what_the_numbers_mean():
    lines = terminal.stats_lines(
        _stats(), canvas=64, max_tokens=32, memory="process peak RSS"
    )
    text = "\n".join(lines)
    assert "64 tokens" in text and "--max-tokens 32 became 64" in text
    assert "1 canvas of 64 tokens" in text
    assert "steps/canvas: 48.0 (denoising passes" in text
    assert "tokens/forward: 1.33 (generated tokens per denoising pass)" in text
    assert "peak memory: 0.200 GB (process peak RSS)" in text
    assert "includes warm-up" in text and "compile" not in text
    compiled = terminal.stats_lines(_stats(), canvas=64, max_tokens=None, memory="x")
    assert "whole canvases" not in compiled[1]  # nothing was rounded
    timed = terminal.stats_lines(
        _stats(), canvas=64, max_tokens=64, memory="x", compile_s=31.5
    )
    assert timed[-1].startswith("compile: 31.5 s") and "warm-up" not in timed[0]


def test_memory_label_names_the_quantity():
    mlx = SimpleNamespace(backend="mlx")
    assert terminal.memory_label(mlx) == "MLX allocator peak"
    for kind, want in [("cpu", "process peak RSS"), ("cuda", "CUDA allocator peak")]:
        t = SimpleNamespace(backend="torch", device=SimpleNamespace(type=kind))
        assert terminal.memory_label(t) == want
        assert terminal.memory_label(SimpleNamespace(target=t, backend="torch")) == want


class _FakeTarget:
    backend, path = "fake", Path(".")
    config = generation_config = None

    def __init__(self):
        self.encoded: list[int] = []

    def encode(self, ids, cache, attention_mask=None):
        self.encoded.append(len(ids[0]))


def test_prefill_progress_counts_prompt_tokens_only(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    fake = _FakeTarget()
    model = terminal.PrefillProgress(fake, 1200, enabled=True)
    for n in (512, 512, 176, 64):  # three prompt chunks, then a committed canvas
        model.encode([[0] * n], None)
    assert fake.encoded == [512, 512, 176, 64]
    assert model.done == 1200 and model.bar.n == 1200
    assert "prompt:   0%|" in err.getvalue()  # the bar; leave=False erases it at 100%


def test_bars_are_quiet_without_a_terminal():
    assert terminal.bar(3, "canvases", "canvas").disable  # pytest captures stderr
    out = _cli("generate", "--prompt", "x " * 1100, "--max-tokens", "128")
    assert out.returncode == 0, out.stderr
    assert "it/s" not in out.stderr and "tok/s]" not in out.stderr


def test_progress_on_a_terminal():
    """stderr on a pseudo-terminal, stdout to a pipe: a prompt bar and a canvas bar."""
    master, slave = pty.openpty()
    # a fresh pty is 0 columns wide, which tqdm draws as nothing
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_diffgem", "generate", "--prompt", "x " * 2100]
        + ["--max-tokens", "128", "--backend", "mlx"],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=ENV,
        cwd=ROOT,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, err
    assert "prompt:" in err and "tok/" in err  # the prefill bar
    assert "canvases:" in err  # the canvas bar (stdout is not the terminal)
    assert "generation:" in err


def test_cli_default_backend_is_auto():
    out = _cli("generate", "--prompt", "def f(x):", "--max-tokens", "64")
    assert out.returncode == 0, out.stderr
    label = "process peak RSS" if HAS_TORCH else "MLX allocator peak"
    assert f"({label})" in out.stderr


def test_cli_drafter_options():
    args = ["generate", "--prompt", "def f(x):", "--max-tokens", "64"]
    out = _cli(*args, "--drafter", "self", "--draft-entropy-bound", "0.3")
    assert out.returncode == 0, out.stderr
    assert "drafter" in out.stderr  # the stats block counts the drafter's passes
    bad = _cli(*args, "--draft-entropy-bound", "0.3")
    assert bad.returncode != 0 and "only applies" in bad.stderr
    bad = _cli(*args, "--drafter", "self", "--draft-entropy-bound", "-1")
    assert bad.returncode != 0 and "draft_entropy_bound" in bad.stderr


BLAS_MISSING = """
import sys
from mlx_diffgem.mlx_backend import _blas
_blas._CANDIDATES = ("/nonexistent/libopenblas.so.0",)
from mlx_diffgem import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_warns_once_without_openblas():
    args = ["generate", "--prompt", "x", "--max-tokens", "64", "--backend", "mlx"]
    out = subprocess.run(
        [sys.executable, "-c", BLAS_MISSING, *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("warning: OpenBLAS not found") == 1
    assert "apt-get install libopenblas0-pthread" in out.stderr
    found = _cli(*args)  # with OpenBLAS installed: no warning
    if _openblas_installed():
        assert "OpenBLAS" not in found.stderr


def _openblas_installed() -> bool:
    import glob

    from mlx_diffgem.mlx_backend import _blas

    return any(glob.glob(p) for p in _blas._CANDIDATES)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="no torch")
def test_compile_says_compiling_and_times_apart():
    out = _cli("generate", "--prompt", "def f(x):", "--max-tokens", "64", "--compile")
    assert out.returncode == 0, out.stderr
    assert "compiling the denoising step" in out.stderr
    assert "compile:" in out.stderr and "not in the rates" in out.stderr


# -- arguments checked before the model loads (issue 22) -------------------------------

FAST_ERRORS = [
    (["generate", "--prompt", "x", "--max-tokens", "-5"], "max_new_tokens must be"),
    (["generate", "--prompt", "x", "--max-tokens", str(2**20 + 1)], "1048576"),
    (["generate", "--prompt", "x", "--t-min", "-1"], "t_min must be"),
    (["generate", "--prompt", "x", "--max-denoising-steps", "0"], "[1, 10000]"),
    (["generate", "--prompt", "x", "--t-min", "0.5", "--t-max", "0.5"], "t_max must"),
    (["generate", "--prompt", "x", "--stability-threshold", "-1"], "stability"),
    (["generate", "--prompt", "x", "--draft-steps", "8"], "only applies with"),
    (
        ["generate", "--prompt", "x", "--drafter", "self", "--draft-steps", "0"],
        "draft_",
    ),
    (["generate", "--prompt", "x", "--drafter", "self", "--max-rounds", "-1"], "max_r"),
    (["generate", "--prompt", "x", "--model", "."], "not a model folder (no config"),
    (["infill", "--prefix-file", "a", "--suffix-file", "b", "--length", "100000000"],)
    + ("--length must be an integer in [1, 1048576]",),
    (["infill", "--prefix-file", "a", "--suffix-file", "b", "--max-tokens", "0"],)
    + ("--max-tokens must be",),
    (["infill", "--prefix-file", "a", "--suffix-file", "b", "--t-max", "nan"],)
    + ("t_max must be",),
    (["infill", "--prefix-file", "a", "--suffix-file", "b", "--refine-steps", "2"],)
    + ("only applies",),
    (["infill", "--prefix-file", "-", "--suffix-file", "-"], "only one of them"),
    (["infill", "--prefix-file", "a", "--suffix-file", "b", "--model", "."],)
    + ("not a model folder",),
    (["serve", "--port", "70000"], "--port must be an integer in [1, 65535]"),
    (["serve", "--max-queue", "0"], "--max-queue must be"),
    (["serve", "--timeout", "-1"], "--timeout must be"),
    (["serve", "--max-tokens-limit", str(2**21)], "[1, 1048576]"),
    (["serve", "--max-prompt-tokens", "0"], "--max-prompt-tokens must be"),
    (["serve", "--max-request-bytes", "-1"], "--max-request-bytes must be"),
    (["serve", "--drafter", "self", "--draft-steps", "0"], "draft_steps must be"),
    (["serve", "--max-rounds", "3"], "--max-rounds: only applies with --drafter"),
    (["serve", "--drafter", "self", "--accept-threshold", "1.5"], "accept_threshold"),
    (["serve", "--drafter", "self", "--accept-threshold", "rate"], "or 'ratio', got"),
    (["serve", "--drafter", "self", "--verify", "others", "--verify-groups", "4"],)
    + ("verify_groups: only applies with verify='hidden'",),
    (["serve", "--model", "."], "not a model folder"),
]


@pytest.mark.parametrize("argv, message", FAST_ERRORS, ids=lambda a: " ".join(a))
def test_bad_arguments_are_refused_before_the_model_loads(
    monkeypatch, capsys, argv, message
):
    """The same one-line messages the API gives, with nothing loaded: a typo
    costs nothing (it used to cost a model load of 20-40 s)."""
    from mlx_diffgem import api
    from mlx_diffgem.serve import server

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(api, "load", no_load)
    monkeypatch.setattr(server, "start_engine", no_load)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_bad_arguments_come_back_at_once_from_the_command():
    """The console command itself, as a user runs it (no import of a backend)."""
    import time

    for argv in (
        ["generate", "--prompt", "x", "--max-tokens", "-5"],
        ["infill", "--prefix-file", "a", "--suffix-file", "b", "--length", "0"],
        ["serve", "--port", "0"],
    ):
        t0 = time.monotonic()
        out = _cli(*argv)
        assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr
        assert "Traceback" not in out.stderr
        assert time.monotonic() - t0 < 30  # a load took 20-40 s under load


def _parser(command: str) -> argparse.ArgumentParser:
    import importlib

    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(f"mlx_diffgem.cli.{command}").add_parser(sub)
    return sub.choices[command]


@pytest.mark.parametrize("command", ["generate", "infill", "serve"])
def test_every_option_has_help_and_the_command_a_description(command):
    p = _parser(command)
    assert p.description
    missing = [a.option_strings for a in p._actions if not a.help]
    assert not missing


def test_help_states_the_bounds_of_the_core():
    from mlx_diffgem.cli import options
    from mlx_diffgem.core.config import MAX_DENOISING_STEPS, MAX_NEW_TOKENS

    assert f"{MAX_NEW_TOKENS:,}" in options.TOKENS_RANGE and MAX_NEW_TOKENS == 2**20
    assert options.STEPS_RANGE == f"1..{MAX_DENOISING_STEPS:,}"
    text = _parser("generate").format_help()
    for flag in ("--max-tokens", "--max-denoising-steps", "--draft-steps"):
        assert flag in text
    assert text.count("1..10,000") >= 4 and "1..1,048,576" in text
    assert "modulo 2**64" in text and "-1 is 2**64-1" in text
    infill = _parser("infill").format_help()
    assert infill.count("1..1,048,576") == 2 and "modulo 2**64" in infill


def test_serve_help_shows_defaults_and_the_drafters():
    text = " ".join(_parser("serve").format_help().split())
    for default in ("8080", "127.0.0.1", "(default: 16)", "(default: 600)", "4096"):
        assert default in text
    assert "{auto,mlx,torch}" in text
    assert "'default' (the one shipped with the model, run with the settings" in text
    assert "P|ratio" in text and "speculative sampling" in text
    assert "413" in text and "4 MiB" in text


def test_serve_passes_auto_and_the_spec_policy(monkeypatch):
    from mlx_diffgem.serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda model, **kw: seen.update(kw) or 0)
    argv = ["serve", "--drafter", "self", "--draft-steps", "8", "--max-rounds", "2"]
    assert cli.main(argv) == 0
    assert seen["backend"] == "auto" and seen["drafter"] == "self"
    assert seen["speculative"] == {"draft_steps": 8, "max_rounds": 2}
    assert seen["limits"].body_bytes(131_072) == 4 << 20
    argv = ["serve", "--drafter", "default", "--accept-threshold", "ratio"]
    assert cli.main(argv) == 0
    assert seen["speculative"] == {"accept_threshold": "ratio"}

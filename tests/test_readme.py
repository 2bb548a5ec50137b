"""Every code block of README.md runs as written (issue 9).

Python blocks run as scripts; in shell blocks, the `diffgem ...` commands run (as
`python -m mlx_diffgem ...`, on the embedded model); installs, downloads and the test
suite itself (which runs this file) are left out.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",  # the README's examples must not need the network
}


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def commands(script: str) -> list[list[str]]:
    """The `diffgem` commands of a shell block, split at `&&` and `;`."""
    out = []
    for line in script.splitlines():
        for part in re.split(r"&&|;", line):
            words = shlex.split(part)
            if words and Path(words[0]).name == "diffgem":
                out.append(words[1:])
    return out


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout
    )


def test_readme_has_blocks_to_run():
    assert len(blocks("python")) >= 3
    assert len([c for b in blocks("bash") for c in commands(b)]) >= 4
    assert "../shared" not in README.read_text()  # the docs live in this repository


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index):
    out = _run([sys.executable, "-c", blocks("python")[index]])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()


def _cli_examples() -> list[list[str]]:
    seen: list[list[str]] = []
    for block in blocks("bash"):
        seen += [c for c in commands(block) if c not in seen]
    return seen


@pytest.mark.parametrize("argv", _cli_examples(), ids=" ".join)
def test_cli_example_runs(argv):
    out = _run([sys.executable, "-m", "mlx_diffgem", *argv])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() and "tokens/forward" in out.stderr


def test_readme_links_exist():
    links = re.findall(r"\]\(([^)#:]+)\)", README.read_text())
    assert links and all((ROOT / link).exists() for link in links), links


def test_linux_line_needs_sudo_only_when_not_root():
    line = next(b for b in blocks("bash") if "apt-get" in b)
    prefix = line.split(";", 1)[0]  # S=$(...): "sudo" unless root
    assert "apt-get update" in line
    out = _run(["bash", "-c", f'{prefix}; echo "[$S]"'])
    want = "[]" if os.getuid() == 0 else "[sudo]"
    assert out.stdout.strip() == want

"""bench/quality.py's pure parts: cutting and parsing completions, the card section."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import quality


def test_function_source_cuts_at_the_end_of_the_function():
    header = "    def f(self, x):"
    completion = "\n        y = x + 1\n        return y\n    def g(self):\n        pass"
    source = quality.function_source(header, completion, "    ")
    assert source == "def f(self, x):\n    y = x + 1\n    return y"
    assert quality.parses(source)
    assert not quality.parses(quality.function_source(header, "\n  return (\n", "    "))

    # The completion continues the header line (a comment, or junk that breaks it).
    body = "\n        pass\n"
    assert quality.parses(quality.function_source(header, "  # ok" + body, "    "))
    assert not quality.parses(quality.function_source(header, " x" + body, "    "))


def test_function_prompts_end_at_the_header_colon():
    """The tokenizer merges a newline with the next indent ('\\n   ' is one token), so
    a prompt must stop before the newline, as the training text would continue."""
    text = "import os\n\n\ndef f(a, b):\n    return a + b\n\n\ndef g():\n    pass\n"
    prompts = quality.function_prompts([text], 10)
    assert [p[0].split("\n")[-1] for p in prompts] == ["def f(a, b):", "def g():"]
    assert all(p[1] == "" for p in prompts)


def test_function_source_drops_the_line_the_token_budget_cut():
    header = "    def f(self, x):"
    # Never leaves the function: the last line is unfinished because tokens ran out.
    cut = "\n        y = x\n        return (y"
    source = quality.function_source(header, cut, "    ")
    assert source == "def f(self, x):\n    y = x\n"
    assert quality.parses(source)
    # A function that ends keeps every line of its body, broken or not.
    ended = "\n        return (y\n    def g(self):\n"
    assert not quality.parses(quality.function_source(header, ended, "    "))


def test_unigram_entropy():
    assert quality.unigram_entropy(np.arange(8), 8) == pytest.approx(math.log(8))
    assert quality.unigram_entropy(np.zeros(5, np.int64), 8) == 0.0


def _native(mean: float, parse: float) -> dict:
    flat = mean == 48.0
    return {
        "prompts": 4,
        "parse_rate": parse,
        "steps_per_canvas": mean,
        "passes_per_canvas": {
            "mean": mean,
            "p10": 48.0 if flat else 4.0,
            "p50": 48.0 if flat else 12.0,
            "p90": 48.0 if flat else 20.0,
            "stopped_before_cap": 0.0 if flat else 0.75,
            "canvases": 8,
            "cap": 48,
        },
        "tokens_per_forward": 1.3,
        "samples": [],
    }


def _record():
    return {
        "backend": "mlx",
        "unigram_entropy": 6.25,
        "settings": {"max_tokens": 64},
        "denoising_ce": {
            "0.10": {"no_sc": 0.5, "sc": 0.4},
            "1.00": {"no_sc": 6, "sc": 5},
        },
        "native": {
            "prompts": 4,
            "parse_rate": 0.25,
            "steps_per_canvas": 12.5,
            "tokens_per_forward": 5.125,
            "samples": [
                {
                    "prompt_tail": "def f():\n",
                    "completion": "x = ```\n",
                    "parses": False,
                }
            ],
        },
    }


def test_card_section_and_update(tmp_path):
    card = tmp_path / "README.md"
    card.write_text(f"# card\n{quality.CARD_START}\nold\n{quality.CARD_END}\nend\n")
    quality.update_card(card, _record())
    text = card.read_text()
    assert text.startswith("# card\n") and text.endswith(f"{quality.CARD_END}\nend\n")
    assert "old" not in text and "**6.250**" in text
    assert "| CE at noise 0.10, no SC / with SC | 0.500 / 0.400 |" in text
    assert "| CE at noise 1.00, no SC / with SC | 6.000 / 5.000 |" in text
    assert "| target passes per canvas, mean | 12.5 |" in text
    assert "| completions that parse with `ast` | 25% (1 of 4) |" in text
    assert "\n````\nx = ```\n\n````" in text  # the fence outgrows the sample's
    ours = {**_record(), "native": {**_record()["native"], **_native(12.5, 0.25)}}
    with_base = {**ours, "baseline": {**_record(), "native": _native(48.0, 0.0)}}
    quality.update_card(card, with_base)
    text = card.read_text()
    assert "| | this model | previous model |" in text
    assert "| target passes per canvas, mean | 12.5 | 48.0 |" in text
    assert "| passes per canvas, p10 / p50 / p90 | 4 / 12 / 20 | 48 / 48 / 48 |" in text
    card.write_text("# no markers\n")
    with pytest.raises(ValueError, match="expected one"):
        quality.update_card(card, _record())

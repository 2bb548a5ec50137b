"""The public Python API: load, generate, stream_generate (names follow mlx-lm)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .core.auto import resolve_backend
from .core.backend import StepView, Target, check_ids, get_backend
from .core.backend import to_numpy as to_numpy  # public: dg.to_numpy
from .core.checkpoint import default_model_path
from .core.generate import CanvasEvent, canvas_loop, make_call
from .core.healing import heal, strip_healed
from .core.speculative import SpecPolicy, SpeculativeModel
from .core.stats import Response, Stats
from .core.tokenizer import (
    StreamingDetokenizer,
    Tokenizer,
    format_prompt,
    load_tokenizer,
)
from .core.validate import Call


def load(
    path: str | Path | None = None,
    *,
    backend: str = "auto",
    drafter: str | None = None,
    speculative: SpecPolicy | dict | None = None,
    dtype: str | None = None,
    quantization: dict | str | None = None,
    **backend_options: Any,
) -> tuple[Target, Tokenizer | None]:
    """Load a model and its tokenizer (None when the folder has no tokenizer files).

    Args:
        path: a local folder or a Hugging Face repo id; None loads the default model.
        backend: "mlx", "torch" or "auto": MLX on Apple silicon, else torch when
            installed (CUDA, or CPU, where it is the faster one), else MLX.
        drafter: decode speculatively with a drafter: "self" (the target's own
            weights, cut: fewer layers and experts, cheaper vocabulary-wide parts),
            "self:layers=0,5 top_k=1 sc_top_k=32 head_vocab=1024" (explicit cuts),
            "target" (the target at full cost, a baseline), "default" (the drafter
            shipped with the model, if any), or a trained drafter's folder (refused
            when it was made for another model). None: native decoding.
        speculative: a SpecPolicy, or a dict of its fields that go over the
            settings a trained drafter recommends (its drafter_config.json's
            "speculative", e.g. draft_steps 8, verify "others", verify_sure 0.98
            for the shipped one; where the dict picks another verify, the
            drafter's settings for its own are dropped); only with a drafter.
            draft_steps, refine_steps, max_rounds: integers in [1, 10000] (default
            24, 2, 8); draft_confidence, draft_entropy_bound: finite numbers > 0 or
            None (the target's); verify and its settings (verify_on,
            verify_groups, accept_threshold, verify_sure, min_commit), each refused
            with a verify that does not read it. numpy numbers are accepted (see
            SpecPolicy).
        dtype: "float32", "bfloat16" or "float16" (default: bf16 on GPU, fp32 on CPU).
        quantization: quantize on load, e.g. {"bits": 4, "group_size": 64} or "mixed".
        **backend_options: e.g. device="cuda" for the torch backend.
    """
    _spec_policy(drafter, speculative)  # refused before anything loads
    path = default_model_path() if path is None else path
    opts = dict(path=path, quantization=quantization)
    module = get_backend(resolve_backend(backend, backend_options, **opts))
    model = module.load(path, dtype=dtype, quantization=quantization, **backend_options)
    if drafter is not None:
        from drafter import load_drafter, recommended

        draft = load_drafter(model, drafter)
        spec = _spec_policy(drafter, speculative, recommended(model, drafter))
        model = SpeculativeModel(model, draft, spec)
    return model, load_tokenizer(model.path)


def _spec_policy(
    drafter: str | None, spec: SpecPolicy | dict | None, defaults: dict | None = None
) -> SpecPolicy:
    """The SpecPolicy of `speculative=`: a SpecPolicy is taken as it is; a dict's
    fields (or none) go over the drafter's recommended `defaults`."""
    if spec is not None and drafter is None:
        raise ValueError("speculative: only applies with a drafter (drafter=...)")
    if isinstance(spec, SpecPolicy):
        return spec
    if spec is not None and not isinstance(spec, dict):
        raise ValueError("speculative: expected a SpecPolicy or a dict of its fields")
    return SpecPolicy.from_options(SpecPolicy.over(defaults or {}, spec or {}))


def _prompt_ids(
    tokenizer: Tokenizer | None, prompt: Any, chat: bool | None, vocab_size: int
) -> np.ndarray:
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
    ):
        if tokenizer is None:
            raise ValueError(
                "prompt: text needs a tokenizer; this model has none, pass ids"
            )
        return np.asarray([format_prompt(tokenizer, prompt, chat)], np.int32)
    if prompt is None:
        raise ValueError("prompt: expected text, chat messages or token ids, got None")
    ids = check_ids(prompt, vocab_size, "prompt")
    if ids.shape[0] != 1:
        raise ValueError(
            f"prompt: got {ids.shape[0]} rows of ids; generate and stream_generate "
            "take one prompt (use generate_ids for a batch)"
        )
    return ids


def _max_tokens(max_tokens: int | None, overrides: dict[str, Any]) -> None:
    if max_tokens is None:
        return
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or max_tokens <= 0
    ):
        raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
    overrides["max_new_tokens"] = max_tokens


def stream_generate(
    model: Target,
    tokenizer: Tokenizer | None,
    prompt: str | list[dict] | list[int],
    *,
    max_tokens: int | None = None,
    seed: int | None = None,
    draft: bool = False,
    chat: bool | None = None,
    **options: Any,
) -> Iterator[Response]:
    """Generate for one prompt, yielding the committed text of each canvas.

    Args:
        prompt: text, chat messages ([{"role", "content"}]) or token ids.
        max_tokens: new tokens wanted (rounded up to whole canvases).
        seed: the sampling noise's seed (see generate_ids: any integer, reduced
            modulo 2**64 the same way on both backends).
        draft: also yield a Response after every denoising step with the live canvas
            in `draft` (costs one host copy per step).
        chat: apply the chat template to a text prompt (default: only for messages).
        **options:
            heal: token healing (core/healing.py): the prompt's last token is taken
                back and the first generated token must extend its text, so that a
                prompt may end anywhere (after a newline, inside a word). Default
                (None): on for a plain text prompt; True also heals token ids;
                False: off. The text yielded continues the prompt as given.
            noise: a NoiseSource instead of `seed` (e.g. ReplayNoise).
            cache: a `model.new_cache(1)` kept across calls (multi-turn).
            GenerationConfig fields (generation overrides); autoregressive options
                raise.
    Yields:
        Response objects, each canvas as soon as it is committed; the last one has
        `finished=True` and the final stats.

    Raises:
        ValueError: naming the argument, at the call (before anything is encoded
            into `cache`), e.g. for several rows of ids (use generate_ids).
    """
    noise, cache = options.pop("noise", None), options.pop("cache", None)
    healing = _healing(options.pop("heal", None), prompt, chat, tokenizer)
    _max_tokens(max_tokens, options)
    ids = _prompt_ids(tokenizer, prompt, chat, model.config.vocab_size)
    removed, heal_ids = "", None
    if healing:
        kept, h = heal(tokenizer, ids[0].tolist())
        if h is not None:
            ids, removed, heal_ids = np.asarray([kept], np.int32), h.text, h.ids
    # Everything is checked before the first side effect (cache, noise, device).
    call = make_call(model, ids, noise=noise, seed=seed, cache=cache, overrides=options)
    call = dataclasses.replace(call, drafts=draft, heal_ids=heal_ids)
    return _stream(model, tokenizer, call, removed)


def _healing(heal: Any, prompt: Any, chat: bool | None, tokenizer: Any) -> bool:
    """Whether to heal: `heal` (None: a plain text prompt only), given a tokenizer
    and a prompt that is not chat (a template ends the prompt where it means to)."""
    if heal is not None and not isinstance(heal, bool):
        raise ValueError(f"heal: expected True, False or None, got {heal!r}")
    if heal is False or tokenizer is None or chat:
        return False
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return False  # chat messages
    return heal is True or isinstance(prompt, str)


def _stream(
    model: Target, tokenizer: Tokenizer | None, call: Call, removed: str = ""
) -> Iterator[Response]:
    """The Responses of `call`; `removed`: text token healing took back from the
    prompt, which the committed text starts with and the caller already has."""
    gen, stats = call.gen, Stats()
    detok = StreamingDetokenizer(tokenizer) if tokenizer is not None else None
    for ev in canvas_loop(model, call, stats):
        if isinstance(ev, StepView):
            text = (
                tokenizer.decode(ev.argmax[0].tolist())
                if tokenizer is not None
                else None
            )
            yield Response(
                "",
                ev.argmax[0],
                stats,
                stats.canvases,
                ev.step,
                text,
                source=ev.source,
            )
            continue
        r = _canvas_response(ev, detok, gen.pad_token_id, stats)
        if ev.last:  # yielded at once: streaming is never a canvas late
            r.text += detok.finalize() if detok is not None else ""
            r.finished, r.finish_reason = True, stats.finish_reason
        if removed:  # the healed text: the prompt as given already ends with it
            r.text, removed = strip_healed(r.text, removed)
        yield r


def _canvas_response(
    ev: CanvasEvent, detok: StreamingDetokenizer | None, pad: int | None, stats: Stats
) -> Response:
    row = ev.tokens[0]
    real = row[row != pad] if pad is not None else row
    text = ""
    if detok is not None:
        detok.add_tokens(real.tolist())
        text = detok.last_segment
    return Response(text, real, stats, ev.index)


def generate(
    model: Target,
    tokenizer: Tokenizer | None,
    prompt: str | list[dict] | list[int],
    *,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate and return the text (see stream_generate for the options)."""
    if kwargs.get("draft"):
        raise ValueError("draft: only stream_generate yields live drafts")
    text, stats = [], None
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(r.text)
        stats = r.stats
        if verbose:
            print(r.text, end="", flush=True)
    if verbose and stats is not None:
        print("\n" + stats.summary())
    return "".join(text)

"""Tokenizer, chat template and streaming detokenizer (tokenizers + jinja2 only).

The chat template is the checkpoint's own (`chat_template.jinja`, else the
`chat_template` of tokenizer_config.json), rendered in a sandboxed jinja2 environment
with the variables transformers passes. A checkpoint that ships none but whose
vocabulary has the Gemma-4 turn tokens gets `GEMMA4_TEMPLATE` (spec §1.5).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import validate as V
from .checkpoint import load_config, load_generation_config
from .config import GenerationConfig, read_json
from .errors import CheckpointError, ConfigError

# The built-in Gemma-4 chat template (spec §1.5). Thinking off pre-fills an empty
# thought channel; thinking on adds a system turn holding <|think|> and leaves the
# prompt open at `<|turn>model\n`. A leading system (or developer) message goes into
# that same system turn, after <|think|>: Gemma 4 has one system turn, not two.
# Assistant turns render their `content` only (no reasoning), roles other than
# system/user/assistant raise.
GEMMA4_TEMPLATE = r"""
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}
{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set has_system = messages and messages[0].role in ('system', 'developer') -%}
{%- if enable_thinking or has_system -%}
{{- '<|turn>system\n' -}}
{%- if enable_thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
{%- if has_system -%}{{- text(messages[0].content) | trim -}}{%- endif -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in (messages[1:] if has_system else messages) -%}
{%- set role = 'model' if message.role in ('assistant', 'model') else message.role -%}
{%- if role not in ('user', 'model') -%}
{{- raise_exception('unsupported role ' ~ message.role ~ '; expected system (first '
    ~ 'message only), user or assistant') -}}
{%- endif -%}
{{- '<|turn>' ~ role ~ '\n' ~ (text(message.content) | trim) ~ '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\n' -}}
{%- if not enable_thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""
GEMMA4_TOKENS = ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>")
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` with the checkpoint's special ids and chat template."""

    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # bos_token, eos_token, ... as strings, passed to chat templates
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    name: str = "tokenizer"  # the folder, for error messages

    def encode(
        self, text: str, add_special_tokens: bool = False, *, name: str = "text"
    ) -> list[int]:
        """Ids of `text`; special-token strings in it ("<eos>") become those tokens
        (chat templates rely on it). `name`: the argument an error names."""
        V.text(text, name)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str, *, name: str = "text") -> list[int]:
        """Ids of a user's `text` taken literally: a special-token string in it
        ("<eos>", "<pad><bos>") is encoded as the characters it is made of, so the
        ids decode back to `text` instead of losing it as a skipped special."""
        V.text(text, name)
        return self._plain.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _plain(self) -> tokenizers.Tokenizer:
        # A copy: the flag is the tokenizer's state, and `encode` needs it off.
        plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @functools.cached_property
    def vocab_size(self) -> int:
        """One past the largest id (the vocabulary may have gaps)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the `<0xXX>` byte-fallback tokens (none for byte-level BPE)."""
        if not getattr(self.backend.model, "byte_fallback", False):
            return frozenset()
        vocab = self.backend.get_vocab(with_added_tokens=False)
        return frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t))

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        added = self.backend.get_added_tokens_decoder()
        return frozenset(i for i, t in added.items() if t.special)

    @property
    def has_chat_template(self) -> bool:
        """A shipped template, or the Gemma-4 turn tokens for the built-in one."""
        if self.chat_template is not None:
            return True
        return all(self.token_to_id(t) is not None for t in GEMMA4_TOKENS)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tokenize: bool = True,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Render `messages` with the chat template; ids unless `tokenize=False`.

        The rendered text carries its own <bos>, so it is encoded without adding
        special tokens, as transformers does.
        """
        _check_messages(messages)
        if not self.has_chat_template:
            raise ValueError(
                f"{self.name}: no chat template (chat_template.jinja or "
                "tokenizer_config.json) and no Gemma-4 turn tokens; pass plain text"
            )
        template = self.chat_template or GEMMA4_TEMPLATE
        source = f"{self.name}: chat template" if self.chat_template else "built-in"
        variables = {
            **self.special_tokens,
            "tools": None,
            "documents": None,
            **template_kwargs,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "enable_thinking": enable_thinking,
        }
        text = _render(template, source, variables)
        return self.encode(text, name="messages") if tokenize else text


def _check_messages(messages: Any) -> None:
    ok = isinstance(messages, (list, tuple)) and all(
        isinstance(m, dict) and "role" in m for m in messages
    )
    if not ok:
        raise ValueError(
            "messages: expected a list of {'role': ..., 'content': ...} dicts, got "
            f"{type(messages).__name__}"
        )


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    # The variables and helpers transformers gives templates; sandboxed because chat
    # templates come from the Hub.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any
) -> str:
    # jinja's own tojson HTML-escapes, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _render(template: str, source: str, variables: dict[str, Any]) -> str:
    try:
        return _compile(template).render(**variables)
    except jinja2.TemplateError as e:
        detail = " ".join(str(e.message or type(e).__name__).split())
        raise ValueError(f"{source}: {detail}") from None


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has no tokenizer.json.

    Special ids come from tokenizer_config.json (else special_tokens_map.json); the
    eos ids add those of generation_config.json / config.json, and bos/pad fall back
    to them.

    Raises:
        CheckpointError: an unreadable tokenizer.json.
        ConfigError: an unreadable tokenizer_config.json or config file.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a tokenizer ({first})"
        ) from None
    tok_cfg = _optional_json(folder / "tokenizer_config.json")
    legacy = _optional_json(folder / "special_tokens_map.json")
    specials = _special_strings(tok_cfg, legacy)
    eos, bos, pad = _config_ids(folder)
    bos = _id_of(backend, specials.get("bos_token"), bos)
    pad = _id_of(backend, specials.get("pad_token"), pad)
    own_eos = _id_of(backend, specials.get("eos_token"), None)
    eos = list(dict.fromkeys(([] if own_eos is None else [own_eos]) + eos))
    for key, tid in (("bos_token", bos), ("pad_token", pad)):
        # templates read bos_token: name it when only config.json gave the id
        if key not in specials and tid is not None and backend.id_to_token(tid):
            specials[key] = backend.id_to_token(tid)
    return Tokenizer(
        backend,
        bos_token_id=bos,
        pad_token_id=pad,
        eos_token_ids=eos,
        special_tokens=specials,
        chat_template=_chat_template(folder, tok_cfg),
        name=str(folder),
    )


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _special_strings(tok_cfg: dict[str, Any], legacy: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key in _SPECIAL_KEYS:
        value = tok_cfg.get(key, legacy.get(key))
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _id_of(
    backend: tokenizers.Tokenizer, token: str | None, fallback: int | None
) -> int | None:
    tid = backend.token_to_id(token) if token is not None else None
    return tid if tid is not None else fallback


def _config_ids(folder: Path) -> tuple[list[int], int | None, int | None]:
    """(eos ids, bos, pad) from generation_config.json, falling back to config.json."""
    has_gen = (folder / "generation_config.json").is_file()
    if (folder / "config.json").is_file():
        cfg = load_config(folder)
        gen = load_generation_config(folder, cfg)
        eos = gen.eos_token_id or cfg.eos_ids
        bos = gen.bos_token_id if gen.bos_token_id is not None else cfg.bos_token_id
        pad = gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id
        return list(eos), bos, pad
    if has_gen:
        gen = GenerationConfig.from_file(folder / "generation_config.json")
        return list(gen.eos_token_id), gen.bos_token_id, gen.pad_token_id
    return [], None, None


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    value = tok_cfg.get("chat_template")
    if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ConfigError(
            f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a "
            "list with a 'default' entry"
        )
    return value


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------


def format_prompt(
    tokenizer: Tokenizer,
    prompt: str | Sequence[dict[str, Any]],
    chat: bool | None = None,
    *,
    enable_thinking: bool = False,
) -> list[int]:
    """Prompt ids for a plain string or a list of chat messages.

    `chat=None` applies the chat template to messages and encodes a string as plain
    text; `chat=True` wraps a string as one user message. Plain text gets <bos>
    prepended (the model was trained with it), once.
    """
    is_messages = not isinstance(prompt, str)
    if chat if chat is not None else is_messages:
        messages = prompt if is_messages else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=enable_thinking
        )
    if is_messages:
        raise ValueError("prompt: chat=False needs a string, got a list of messages")
    ids = tokenizer.encode(prompt, name="prompt")
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


class StreamingDetokenizer:
    """Text of a growing id sequence, released only once it can no longer change.

    Segments concatenate exactly to `tokenizer.decode(all_ids)`. Each call decodes a
    short window: the ids since a *context* token index known to sit on a character
    boundary. Held back until more ids arrive or `finalize()`: text ending in U+FFFD
    (a UTF-8 character split across byte-level tokens) and the text of a trailing run
    of byte-fallback tokens `<0xXX>`, which all turn into U+FFFD if the run ends up
    invalid UTF-8.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        run = tokenizer.byte_token_ids
        if run and skip_special_tokens:  # skipped tokens do not end a byte run
            run = run | tokenizer.special_token_ids
        self._run_ids = run
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.text = ""  # all released text
        self._unread = 0  # chars of `text` not yet returned by `last_segment`
        self._ctx = 0  # window start: a token index on a character boundary
        self._done = 0  # chars of decode(tokens[_ctx:]) already released
        self._boundary = 0  # latest token count whose text was fully released

    def add_tokens(self, ids: Iterable[int]) -> str:
        """Append ids; returns the newly released text."""
        self.tokens.extend(int(i) for i in ids)
        return self._release(final=False)

    def finalize(self) -> str:
        """Release everything, split characters included (as U+FFFD)."""
        return self._release(final=True)

    @property
    def last_segment(self) -> str:
        """Text released since the previous read of `last_segment`."""
        seg = self.text[len(self.text) - self._unread :] if self._unread else ""
        self._unread = 0
        return seg

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _release(self, final: bool) -> str:
        window = self._decode(self.tokens[self._ctx :])
        end = len(window) if final else self._stable_end(window)
        seg = window[self._done : end] if end > self._done else ""
        self._done = max(self._done, end)
        self.text += seg
        self._unread += len(seg)
        if end == len(window) == self._done:
            self._rebase(len(self.tokens))
        return seg

    def _stable_end(self, window: str) -> int:
        end = len(window.rstrip("\ufffd"))
        run = 0
        for t in reversed(self.tokens[self._ctx :]):
            if t not in self._run_ids:
                break
            run += 1
        if run:
            before = self._decode(self.tokens[self._ctx : len(self.tokens) - run])
            end = min(end, len(before))
        return end

    def _rebase(self, boundary: int) -> None:
        # The previous boundary stays as context, so that decoders which treat the first
        # token specially (strip a leading space) agree with a full decode. Context
        # that decodes to nothing (skipped special tokens) would not: grow it instead.
        if self._boundary > self._ctx:
            context = self._decode(self.tokens[self._boundary : boundary])
            if not context:
                return
            self._ctx, self._done = self._boundary, len(context)
        self._boundary = boundary

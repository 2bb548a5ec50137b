"""Request prompts -> token ids without stalling the server.

The tokenizers library holds Python's GIL while it encodes (5 MB of text: about
9 s on one core), so a long prompt encoded anywhere in the server's process would
stall every other request and /health, even from another thread. Prompts up to
SHORT characters (nearly every request: ~30 ms at most) are encoded on a thread;
longer ones by a child process that holds a copy of the tokenizer. The child sends
back the ids only of a prompt within the limit (of a longer one, just their count),
and after each long prompt both processes hand the freed memory back to the system.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import multiprocessing
import threading
from typing import Any

from ..core.tokenizer import Tokenizer, format_prompt

SHORT = 16_384  # characters: encoded in the server's process below this


class TooLong(Exception):
    """A prompt over the limit; `n` is its length in tokens."""

    def __init__(self, n: int):
        super().__init__(f"{n} tokens")
        self.n = n


class PromptEncoder:
    """`format_prompt` for the server: `await encode(...)` never blocks its loop."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._child: _Child | None = None
        self._lock = threading.Lock()  # one prompt at a time in the child

    async def encode(
        self, prompt: str | list[dict], limit: int, thinking: bool = False
    ) -> list[int]:
        """The ids of a text (plain) or of chat messages (through the template);
        raises TooLong past `limit` tokens, ValueError for a prompt the tokenizer
        or the template refuses."""
        args = (prompt, limit, thinking)
        if _chars(prompt) <= SHORT:
            out = await asyncio.to_thread(_encode, self.tokenizer, *args)
        else:
            out = await asyncio.to_thread(self._in_child, args)
        if isinstance(out, int):
            raise TooLong(out)
        return out

    def _in_child(self, args: tuple) -> list[int] | int:
        with self._lock:
            if self._child is None or not self._child.alive():
                self._child = _Child(self.tokenizer)
            out = self._child.call(args)
        release_memory()  # the request's text and its pickled copy
        return out

    def close(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.close()


def _chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(str(m.get("content") or "")) for m in prompt)


def _encode(
    tokenizer: Tokenizer, prompt: Any, limit: int, thinking: bool
) -> list[int] | int:
    """The ids, or only their count when there are more than `limit`."""
    if isinstance(prompt, str):
        ids = format_prompt(tokenizer, prompt)
    else:
        ids = format_prompt(tokenizer, prompt, enable_thinking=thinking)
    return ids if len(ids) <= limit else len(ids)


class _Child:
    """A process that encodes prompts (spawned: it imports only the core)."""

    def __init__(self, tokenizer: Tokenizer):
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(
            target=_child_main,
            args=(theirs, tokenizer),
            name="diffgem-tokenizer",
            daemon=True,
        )
        self.proc.start()
        theirs.close()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def call(self, args: tuple) -> list[int] | int:
        try:
            self.conn.send(args)
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError("the tokenizer process ended") from None
        if kind == "ValueError":
            raise ValueError(value)
        if kind != "ok":
            raise RuntimeError(f"tokenizer: {kind}: {value}")
        return value

    def close(self) -> None:
        self.conn.close()
        self.proc.terminate()
        self.proc.join(5)


def _child_main(conn: Any, tokenizer: Tokenizer) -> None:
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):  # the server has gone
            return
        try:
            reply = ("ok", _encode(tokenizer, *args))
        except ValueError as e:
            reply = ("ValueError", str(e))
        except Exception as e:  # e.g. the tokenizer's TypeError on a lone surrogate
            reply = (type(e).__name__, str(e))
        del args
        conn.send(reply)
        del reply
        release_memory()


def release_memory() -> None:
    """Hand freed heap memory back to the system: glibc keeps what a large request
    freed (hundreds of MB after a 5 MB prompt) until asked; a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None

"""The serving engine: one model, a bounded request queue, one worker thread.

No web imports: `server.py` puts HTTP in front of it. Requests run one at a time
(a denoising pass already fills the device); between committed canvases the worker
checks the request's cancel flag and deadline, so a disconnect or a timeout stops
the generation at the next canvas. `TextOutput` turns committed token ids into text
deltas: it caps them at `max_tokens`, cuts at `stop` strings and holds back a tail
that could still become a stop string.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api import stream_generate
from ..core.healing import heal, strip_healed
from ..core.tokenizer import StreamingDetokenizer, Tokenizer

log = logging.getLogger("mlx_diffgem.server")
# An absolute path (POSIX or Windows) of two or more parts, not inside a URL.
_PATH = re.compile(r"(?<![\w:/.])(?:[A-Za-z]:[\\/]|/)(?:[\w.@+~-]+[\\/])+[\w.@+~-]*")


@dataclass
class GenRequest:
    """What the worker needs: prompt ids and the already-validated options."""

    prompt: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    draft: bool = False
    timeout: float = 600.0
    overrides: dict[str, Any] = field(default_factory=dict)  # GenerationConfig
    # infill: the text between `prefix` and `suffix` (then `prompt` is unused)
    prefix: str | None = None
    suffix: str | None = None
    heal: bool = False  # token healing (a plain text prompt; core/healing.py)


@dataclass
class Event:
    """One message from the worker: "delta" (text), "draft" (live canvas),
    "done" (finish_reason, usage) or "error" (status, message)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    draft: dict[str, Any] | None = None
    status: int = 200


class QueueFull(Exception):
    pass


class Stopping(Exception):
    """The engine is shutting down: no new requests."""


# What ended a job, as /health counts it: each job is counted once, by whoever ends
# it first (the worker, or the server when the worker misses the deadline's grace).
OUTCOMES = ("completed", "cancelled", "timeouts", "errors")


class Job:
    """A submitted request; `emit` is called on the worker thread."""

    def __init__(
        self,
        request: GenRequest,
        emit: Callable[[Event], None],
        count: Callable[[Job, str], bool],
    ):
        self.request = request
        self.deadline = time.monotonic() + request.timeout
        self.cancelled = threading.Event()
        self.reason = "cancelled"  # why it was cancelled: "cancelled" or "shutdown"
        self.outcome: str | None = None  # one of OUTCOMES, once it has ended
        self._emit = emit
        self._count = count

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.cancelled.is_set():
            self.reason = reason
        self.cancelled.set()

    def expire(self) -> None:
        """The server answered 504 itself (the worker missed the grace period):
        counted as a timeout now, and the worker stops at its next check."""
        self._count(self, "timeouts")
        self.cancel()

    def end(self, outcome: str) -> bool:
        """Count the job's outcome; False if it was already counted."""
        return self._count(self, outcome)

    def emit(self, event: Event) -> None:
        try:
            self._emit(event)
        except RuntimeError:  # the caller's event loop has closed (shutdown)
            self.cancel()


class TextOutput:
    """Committed ids -> text deltas, capped at `max_tokens` and cut at `stop`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_tokens: int,
        stop: list[str],
        eos: list[int],
        healed: str = "",
    ):
        self.tokenizer, self.max_tokens, self.stop = tokenizer, max_tokens, stop
        self.eos = set(eos)
        self.detok = StreamingDetokenizer(tokenizer)
        self.ids: list[int] = []
        # Token healing took this text back from the prompt; the committed text
        # starts with it and the client already has it: never released.
        self.healed = healed
        self.text = ""
        self.sent = 0  # chars of `text` already released
        self.finish_reason: str | None = None

    def add(self, ids: Any) -> str:
        """Take a committed canvas's (non-pad) ids; returns the text now released."""
        if self.finish_reason is not None:
            return ""
        ids = [int(i) for i in ids][: self.max_tokens - len(self.ids)]
        at_eos = next((k for k, t in enumerate(ids) if t in self.eos), None)
        if at_eos is not None:
            ids = ids[: at_eos + 1]  # the EOS counts as generated, as in vLLM
        self.ids += ids
        self._add_text(self.detok.add_tokens(ids))
        if at_eos is not None or len(self.ids) >= self.max_tokens:
            return self.close("stop" if at_eos is not None else "length")
        if self._cut_at_stop():
            return self._release(everything=True)
        return self._release(everything=False)

    def _add_text(self, text: str) -> None:
        if self.healed:  # drop what the prompt already ends with
            text, self.healed = strip_healed(text, self.healed)
        self.text += text

    def close(self, reason: str = "length") -> str:
        """The generation ended: release everything (split characters included)."""
        if self.finish_reason is None:
            self._add_text(self.detok.finalize())
            if not self._cut_at_stop():
                self.finish_reason = reason
        return self._release(everything=True)

    def _cut_at_stop(self) -> bool:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s)) >= 0]
        if not hits:
            return False
        cut, s = min(hits)
        self.text = self.text[:cut]
        self.ids = self.ids[: self._covering(cut + len(s))]
        self.finish_reason = "stop"
        return True

    def _covering(self, n_chars: int) -> int:
        """Fewest leading ids whose text reaches `n_chars` (the stop string's end)."""
        lo, hi = 0, len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(self.ids[:mid])) >= n_chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _release(self, everything: bool) -> str:
        end = len(self.text) if everything else len(self.text) - self._held()
        seg = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return seg

    def _held(self) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = max((len(s) for s in self.stop), default=0)
        for k in range(min(longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


class Engine:
    """Loads the model on its worker thread (MLX streams are per thread) and runs
    queued requests there one at a time."""

    def __init__(self, loader: Callable[[], tuple[Any, Tokenizer]], max_queue: int):
        if max_queue < 1:
            raise ValueError(f"max_queue: expected >= 1, got {max_queue}")
        self._loader = loader
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._load_error: BaseException | None = None
        self._lock = threading.Lock()
        self._current: Job | None = None
        self.model: Any = None
        self.tokenizer: Tokenizer | None = None
        self.busy = False
        self.counts = dict.fromkeys(OUTCOMES, 0)

    def start(self) -> None:
        """Start the worker and wait until the model is loaded (its error re-raised)."""
        self._thread = threading.Thread(target=self._main, name="diffgem-worker")
        self._thread.daemon = True
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def shutdown(self) -> None:
        """Refuse new requests; the running one stops at its next canvas and the
        waiting ones at once, each answered 503. Returns at once (a signal handler
        calls it); `stop` waits for the worker."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.cancel("shutdown")
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.cancel("shutdown")
            self._stopped(job)

    def stop(self, timeout: float = 30.0) -> bool:
        """`shutdown`, then wait for the worker; True once it has ended."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self.shutdown()  # a request that slipped in while the worker ended
        return self._thread is None or not self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenRequest, emit: Callable[[Event], None]) -> Job:
        if self._stopping.is_set():
            raise Stopping
        job = Job(request, emit, self._count)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def _count(self, job: Job, outcome: str) -> bool:
        with self._lock:
            if job.outcome is not None:
                return False
            job.outcome = outcome
            self.counts[outcome] += 1
            return True

    def _main(self) -> None:
        try:
            self.model, self.tokenizer = self._loader()
        except BaseException as e:  # reported by start() on the caller's thread
            self._load_error = e
        self._ready.set()
        while self._load_error is None and not self._stopping.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.busy, self._current = True, job
            try:
                self._run(job)
            except ValueError as e:  # an option the up-front checks let through
                self._fail(job, 400, str(e))
            except Exception as e:  # the server keeps serving; the client learns why
                log.exception("generation failed")
                self._fail(job, 500, f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.busy, self._current = False, None

    def _fail(self, job: Job, status: int, message: str) -> None:
        if job.end("errors"):
            job.emit(Event("error", text=self.public(message), status=status))

    def public(self, text: str) -> str:
        """A library message fit for a response: it names no local path (the
        model's folder becomes "<model>", any other absolute path "<path>")."""
        folders = {
            getattr(self.model, "path", None),
            getattr(self.tokenizer, "name", None),
        }
        for folder in sorted({str(f) for f in folders if f}, key=len, reverse=True):
            for form in (folder, str(Path(folder).resolve())):
                text = text.replace(form, "<model>")
        return _PATH.sub("<path>", text)

    def _stopped(self, job: Job) -> bool:
        """Cancelled or past its deadline: count it (once), tell the client, stop."""
        if job.cancelled.is_set():
            if job.end("cancelled"):
                # 499: wakes a handler still waiting on the job (its client has
                # gone); 503: the server is shutting down
                down = job.reason == "shutdown"
                text = "server shutting down; retry later" if down else "cancelled"
                job.emit(Event("error", text=text, status=503 if down else 499))
            return True
        if time.monotonic() > job.deadline:
            if job.end("timeouts"):
                timeout = job.request.timeout
                text = f"timeout: over {timeout:g} s"
                job.emit(Event("error", text=text, status=504))
            return True
        return False

    def _run(self, job: Job) -> None:
        r = job.request
        if self._stopped(job):
            return
        if r.suffix is not None:
            return self._run_infill(job)
        eos = r.overrides.get("eos_token_id", self.model.generation_config.eos_token_id)
        h = heal(self.tokenizer, r.prompt)[1] if r.heal else None
        healed = "" if h is None else h.text
        out = TextOutput(self.tokenizer, r.max_tokens, r.stop, eos, healed)
        stream = stream_generate(
            self.model,
            self.tokenizer,
            r.prompt,
            max_tokens=r.max_tokens,
            seed=r.seed,
            draft=r.draft,
            heal=r.heal,
            **r.overrides,
        )
        try:
            for resp in stream:
                if self._stopped(job):
                    return
                if resp.is_draft:
                    job.emit(Event("draft", draft=_draft(resp)))
                    continue
                self._delta(job, out.add(resp.tokens))
                if out.finish_reason is not None:
                    break
        finally:
            stream.close()  # ends the generator (and frees its cache) right here
        self._delta(job, out.close())
        usage = _usage(len(r.prompt), len(out.ids))
        if job.end("completed"):
            job.emit(Event("done", finish_reason=out.finish_reason, usage=usage))

    def _run_infill(self, job: Job) -> None:
        """One whole middle (`fill` is not a stream: cancels act before it only)."""
        from ..core.infill import Hole, fill

        r = job.request
        res = fill(
            self.model,
            self.tokenizer,
            [r.prefix, Hole(None), r.suffix],
            max_hole_tokens=r.max_tokens,
            seed=r.seed,
            **r.overrides,
        )
        if self._stopped(job):
            return
        out = TextOutput(self.tokenizer, r.max_tokens, r.stop, [])
        text = out.add(self.tokenizer.encode(res.holes[0]))
        self._delta(job, text + out.close("stop"))  # ended before max_tokens: "stop"
        usage = _usage(res.stats.prompt_tokens, len(out.ids))
        if job.end("completed"):
            job.emit(Event("done", finish_reason=out.finish_reason, usage=usage))

    @staticmethod
    def _delta(job: Job, text: str) -> None:
        if text:
            job.emit(Event("delta", text=text))


def _draft(resp: Any) -> dict[str, Any]:
    return {
        "text": resp.draft,
        "canvas": resp.canvas_index,
        "step": resp.step,
        "source": resp.source,
    }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }

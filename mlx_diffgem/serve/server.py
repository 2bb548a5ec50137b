"""`diffgem serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

Endpoints: POST /v1/completions, POST /v1/chat/completions (server-sent events with
`stream`: one chunk per committed canvas, plus live-canvas chunks with the `draft`
extension), GET /v1/models, GET /health. The model is loaded once, on the engine's
worker thread; requests wait in a bounded queue (429 beyond it) and run one at a time.
Before a request reaches the queue: its body is bounded and must be JSON
(`guard.py`), its prompt is tokenized off the event loop (`prompts.py`). SIGTERM
shuts the server down cleanly (exit status 0). This module imports no web library
at import time, so that `diffgem` runs without the serve extra; the web stack loads
when a server is built. (No
`from __future__ import annotations`: FastAPI reads the routes' annotations, which
name classes local to create_app.)
"""

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .engine import Engine, Event, GenRequest, Job, QueueFull, Stopping
from .prompts import PromptEncoder, TooLong

EXTRA = (
    "install the serve extra (in a clone: .venv/bin/pip install -e '.[cpu,serve]', "
    "on macOS '.[mlx,serve]'; an installed package: pip install "
    "'mlx-diffgem[serve]')"
)
GRACE_S = 1.0  # the worker reports its own timeouts; this only backs it up
SHUTDOWN_GRACE_S = 10.0  # on a signal: how long in-flight requests may still run
# The default request-body limit: bytes per prompt token of the limit. A token's
# text is a few bytes; JSON's \uXXXX escapes of non-ASCII text and token-id lists
# ("262143, ") take up to ~8: 32 leaves room and still refuses a giant body unread.
BODY_BYTES_PER_TOKEN = 32
MIN_BODY_BYTES = 1 << 20
log = logging.getLogger("uvicorn.error")  # shown with uvicorn's own lines


@dataclass
class Limits:
    """Per-server limits (CLI flags)."""

    max_queue: int = 16  # requests waiting behind the running one
    timeout: float = 600.0  # seconds from arrival to the last token
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # default: the model's context
    max_body_bytes: int | None = None  # default: see body_bytes

    def body_bytes(self, context: int) -> int:
        """The request-body limit: BODY_BYTES_PER_TOKEN per prompt token, >= 1 MiB."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        tokens = self.max_prompt_tokens or context
        return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * tokens)


class ApiError(Exception):
    """An error answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, **kw):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kw.get("kind", "invalid_request_error")
        self.code = kw.get("code")

    def body(self) -> dict[str, Any]:
        from .openai_schema import error_body

        return error_body(self.message, self.kind, self.param, self.code)


def _require_web() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"diffgem serve needs {e.name}, which is not installed; {EXTRA}"
        ) from None


# --------------------------------------------------------------------------------------
# Requests -> engine jobs
# --------------------------------------------------------------------------------------


class Service:
    """The endpoints' logic over one Engine; the FastAPI routes only call it."""

    def __init__(self, engine: Engine, name: str, limits: Limits):
        self.engine, self.name, self.limits = engine, name, limits
        self.created = int(time.time())
        self.prompts = PromptEncoder(engine.tokenizer)

    @property
    def context(self) -> int:
        return self.engine.model.config.max_position_embeddings

    @property
    def prompt_limit(self) -> int:
        return self.limits.max_prompt_tokens or self.context

    def close(self) -> bool:
        """Stop the tokenizer process and the engine; True once the worker ended."""
        self.prompts.close()
        return self.engine.stop()

    def health(self) -> dict[str, Any]:
        e = self.engine
        state = {"status": "ok", "model": self.name, "backend": e.model.backend}
        state["busy"] = e.busy
        return state | {"queued": e.queued, **e.counts}

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "mlx-diffgem",
            "max_model_len": self.context,
        }

    async def prepare(self, body: Any, chat: bool) -> GenRequest:
        """Validate a request; raises ApiError (404 unknown model, 400 otherwise).
        Prompts are tokenized off the event loop (`PromptEncoder`)."""
        self._check_options(body)
        max_tokens = self._max_tokens(body, chat)
        prefix, suffix = self._infill(body, chat)
        try:
            stop = body.stops()
            overrides = body.overrides()
            self.engine.model.generation_config.update(source="request", **overrides)
        except ValueError as e:
            raise ApiError(400, self.engine.public(str(e))) from None
        if prefix is None:
            prompt = await self._prompt(body, chat, max_tokens)
        else:
            prompt = []  # the worker lays out prefix, hole and suffix itself
            await self._check_infill(prefix, suffix, max_tokens)
        return GenRequest(
            prompt,
            max_tokens,
            stop,
            seed=body.seed,
            draft=body.draft,
            timeout=self.limits.timeout,
            overrides=overrides,
            prefix=prefix,
            suffix=suffix,
            # a text completion may end anywhere (a chat template ends it on purpose)
            heal=not chat and isinstance(body.prompt, str),
        )

    def _check_options(self, body: Any) -> None:
        from . import openai_schema as oa

        if body.model != self.name:
            raise ApiError(
                404,
                f"model: {body.model!r} does not exist; this server serves "
                f"{self.name!r}",
                "model",
                code="model_not_found",
            )
        bad = oa.unsupported(body)
        if bad:
            raise ApiError(400, oa.unsupported_message(bad), bad[0])
        if body.draft and not body.stream:
            raise ApiError(400, "draft: live draft chunks need stream=true", "draft")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only with stream=true", "stream")

    @staticmethod
    def _infill(body: Any, chat: bool) -> tuple[str | None, str | None]:
        """(prefix, suffix) of a completion with a `suffix`: an infill request."""
        if chat or not body.suffix:
            return None, None
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "suffix: needs a text prompt (not token ids)", "suffix")
        if body.stream and body.draft:
            raise ApiError(400, "draft: not available with suffix (infill)", "draft")
        return prompt, body.suffix

    def _max_tokens(self, body: Any, chat: bool) -> int:
        n = body.max_tokens
        if n is None and chat:
            n = body.max_completion_tokens
        if n is None:
            n = self.engine.model.generation_config.max_new_tokens
        if n > self.limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens: {n} is over this server's limit of "
                f"{self.limits.max_tokens}",
                "max_tokens",
            )
        return n

    async def _prompt(self, body: Any, chat: bool, max_tokens: int) -> list[int]:
        param = "messages" if chat else "prompt"
        try:
            prompt, thinking = self._prompt_input(body, chat)
            if _is_ids(prompt):
                n = len(prompt)
            else:
                prompt = await self.prompts.encode(prompt, self.prompt_limit, thinking)
                n = len(prompt)
        except TooLong as e:
            n = e.n
        except ValueError as e:
            raise ApiError(400, self.engine.public(str(e)), param) from None
        self._check_length(param, n, max_tokens)
        if not chat and _is_ids(body.prompt):
            vocab = self.engine.model.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param)
        return prompt

    def _check_length(self, param: str, n: int, max_tokens: int) -> None:
        limit = self.prompt_limit
        if n > limit:
            message = f"{param}: {n} tokens, over the limit of {limit}"
        elif n + max_tokens > self.context:
            message = (
                f"{param}: {n} tokens + max_tokens {max_tokens} exceed the "
                f"model's context of {self.context}"
            )
        else:
            return
        raise ApiError(400, message, param, code="context_length_exceeded")

    async def _check_infill(self, prefix: str, suffix: str, max_tokens: int) -> None:
        """An infill's prefix and suffix within the limits (counted, not kept)."""
        n = 0
        for part in (prefix, suffix):
            try:
                n += len(await self.prompts.encode(part, self.prompt_limit))
            except TooLong as e:
                n += e.n
            except ValueError as e:
                raise ApiError(400, self.engine.public(str(e)), "prompt") from None
            if n > self.prompt_limit:
                break  # over already: the suffix need not be read
        self._check_length("prompt", n - 1, max_tokens)  # one <bos>, not two

    def _prompt_input(self, body: Any, chat: bool) -> tuple[Any, bool]:
        """(text, chat messages or token ids; enable_thinking), checked."""
        from . import openai_schema as oa

        if chat:
            if not self.engine.tokenizer.has_chat_template:
                raise ApiError(
                    400,
                    "messages: this model has no chat template; send plain text "
                    "to /v1/completions instead",
                    "messages",
                )
            kwargs = body.chat_template_kwargs or {}
            thinking = kwargs.get("enable_thinking", False)
            if set(kwargs) - {"enable_thinking"} or not isinstance(thinking, bool):
                raise ValueError(
                    "chat_template_kwargs: only {'enable_thinking': bool} is supported"
                )
            return oa.chat_messages(body), thinking
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("prompt: one prompt per request (batches: n/a)")
            prompt = prompt[0]
        if not prompt and not isinstance(prompt, str):
            raise ValueError("prompt: token ids must be a non-empty list")
        return prompt, False

    def submit(self, request: GenRequest) -> tuple[Job, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            job = self.engine.submit(
                request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
            )
        except QueueFull:
            raise ApiError(
                429,
                f"server busy: {self.limits.max_queue} requests already waiting; "
                "retry later",
                kind="rate_limit_exceeded",
                code="rate_limit_exceeded",
            ) from None
        except Stopping:
            raise ApiError(
                503, "server shutting down; retry later", kind="server_error"
            ) from None
        return job, events


def _is_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) for t in prompt[:1])


async def events_of(job: Job, events: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    """The job's events up to "done"; an "error" event or the deadline raises."""
    while True:
        remaining = job.deadline - time.monotonic() + GRACE_S
        try:
            ev = await asyncio.wait_for(events.get(), max(remaining, 0.0))
        except asyncio.TimeoutError:  # TimeoutError's alias from Python 3.11
            job.expire()  # counted as a timeout now; the worker stops at its check
            msg = f"timeout: over {job.request.timeout:g} s"
            raise ApiError(504, msg, kind="timeout") from None
        if ev.kind == "error":
            kind = "invalid_request_error" if ev.status < 500 else "server_error"
            raise ApiError(
                ev.status, ev.text, kind="timeout" if ev.status == 504 else kind
            )
        yield ev
        if ev.kind == "done":
            return


async def collect(job: Job, events: asyncio.Queue[Event], reply: Any, request: Any):
    """A whole (non-streamed) reply; a client that disconnects cancels the job."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    parts = []
    try:
        async for ev in events_of(job, events):
            if ev.kind == "delta":
                parts.append(ev.text)
            elif ev.kind == "done":
                return reply.full("".join(parts), ev.finish_reason, ev.usage)
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once the job is done


async def _cancel_on_disconnect(request: Any, job: Job) -> None:
    # The body has been read: the next ASGI message is the client going away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream(job: Job, events: asyncio.Queue[Event], reply: Any):
    """Server-sent events: one chunk per committed canvas (and per draft step)."""
    try:
        if reply.chat:
            yield _sse(reply.chunk())
        async for ev in events_of(job, events):
            if ev.kind == "delta":
                yield _sse(reply.chunk(text=ev.text))
            elif ev.kind == "draft":
                yield _sse(reply.chunk(draft=ev.draft))
            else:
                yield _sse(reply.chunk(finish=ev.finish_reason))
                if reply.include_usage:
                    yield _sse(reply.usage_chunk(ev.usage))
        yield "data: [DONE]\n\n"
    except ApiError as e:  # headers are sent: the error travels as an event
        yield _sse(e.body())
    finally:
        job.cancel()  # a disconnect closes this generator: stop the generation


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------


def create_app(engine: Engine, name: str, limits: Limits | None = None):
    """The FastAPI app over a started Engine (stopped when the app shuts down)."""
    _require_web()
    from fastapi import FastAPI, Request

    from . import openai_schema as oa
    from .guard import RequestGuard

    service = Service(engine, name, limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if await asyncio.to_thread(service.close):
            log.info("diffgem: engine stopped")
        else:
            log.warning("diffgem: the engine's worker is still busy; exiting anyway")

    app = FastAPI(title="mlx-diffgem", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(
        RequestGuard, max_bytes=service.limits.body_bytes(service.context)
    )
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model != name:
            raise ApiError(404, f"model: {model!r} does not exist", "model")
        return service.model_card()

    @app.post("/v1/completions")
    async def completions(body: oa.CompletionRequest, request: Request):
        return await _respond(service, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: oa.ChatRequest, request: Request):
        return await _respond(service, body, request, chat=True)

    return app


async def _respond(service: Service, body: Any, request: Any, chat: bool):
    from fastapi.responses import StreamingResponse

    from .openai_schema import Reply

    gen = await service.prepare(body, chat)
    usage = body.stream_options is not None and body.stream_options.include_usage
    reply = Reply(chat, service.name, include_usage=usage)
    job, events = service.submit(gen)
    if body.stream:
        return StreamingResponse(
            stream(job, events, reply), media_type="text/event-stream"
        )
    return await collect(job, events, reply, request)


def _add_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from .guard import TOO_LARGE
    from .openai_schema import error_body

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        message, param = _validation_message(e.errors())
        body = error_body(message, "invalid_request_error", param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = TOO_LARGE if e.status_code == 413 else None
        body = error_body(str(e.detail), "invalid_request_error", None, code)
        return JSONResponse(body, status_code=e.status_code)


def _validation_message(errors: Any) -> tuple[str, str | None]:
    """One line from pydantic's errors: the first one, named by its field path."""
    errors = list(errors)
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if err.get("type") == "json_invalid":
        detail = err.get("ctx", {}).get("error", err["msg"])
        return f"invalid JSON body: {detail}", None
    path = ""
    for p in err.get("loc", ())[1:]:  # loc[0] is "body"
        if isinstance(p, int):
            path += f"[{p}]"
        elif p.isidentifier() and p not in _TYPE_TAGS:
            path += f".{p}" if path else p
        else:  # a union member's tag (e.g. "list[int]"): the path ends here
            break
    # A union's members each add an error for the same field: one problem, not many.
    fields = {tuple(x.get("loc", ())[:2]) for x in errors}
    more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    param = path.split(".")[0].split("[")[0] or None
    return f"{path or 'body'}: {err['msg']}{more}", param


# Tags pydantic adds to the path of a union member's error.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------


def serve(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str | None = None,
    limits: Limits | None = None,
    log_level: str = "info",
    **load_options: Any,
) -> int:
    """Load `model` (None: the embedded default) and serve it until a signal.

    SIGTERM or Ctrl-C shut it down cleanly: no new requests, the running one stops
    at its next canvas (503), the engine and its worker stop; then this returns 0
    (after Ctrl-C, KeyboardInterrupt propagates, as it should).

    Args:
        name: the model name clients send (default: `model` as given, as vLLM does).
        limits: queue length, timeout, max_tokens, prompt and request-body limits.
        **load_options: passed to `mlx_diffgem.load` (backend, drafter, dtype, ...).
    """
    _require_web()
    import uvicorn

    limits = limits or Limits()
    with _sigterm_returns():
        engine = start_engine(model, limits.max_queue, **load_options)
        app = create_app(engine, name or model or "default", limits)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        try:
            _server(config, engine).run()
        finally:
            app.state.service.close()  # a no-op after a clean shutdown
    return 0


def _server(config: Any, engine: Engine) -> Any:
    """uvicorn's Server, whose signal handler also stops the engine at once, so
    that in-flight requests end (503) instead of running out the grace period."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.shutdown()
            super().handle_exit(sig, frame)

    return Server(config)


class _Terminated(Exception):
    """SIGTERM outside uvicorn's own handling (during the load, or re-raised)."""


def _on_sigterm(sig: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_returns():
    """SIGTERM ends the block quietly. uvicorn shuts down on SIGTERM and then
    re-raises it under the handler it found, which by default kills the process
    (exit by signal): this handler turns it into a normal return, and status 0, as
    systemd, Docker and Kubernetes expect of a clean stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except _Terminated:
        log.info("diffgem: stopped by SIGTERM")
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_engine(model: str | None, max_queue: int, **load_options: Any) -> Engine:
    """An Engine with `model` loaded (on its worker thread); text models only."""
    from .. import api

    engine = Engine(lambda: api.load(model, **load_options), max_queue)
    engine.start()
    if engine.tokenizer is None:
        engine.stop()
        raise ValueError(
            f"{engine.model.path}: no tokenizer.json; the server needs one"
        )
    return engine

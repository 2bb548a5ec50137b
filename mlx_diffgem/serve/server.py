"""`diffgem serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

Endpoints: POST /v1/completions, POST /v1/chat/completions (server-sent events with
`stream`: one chunk per committed canvas, plus live-canvas chunks with the `draft`
extension), GET /v1/models, GET /health. The model is loaded once, on the engine's
worker thread; requests wait in a bounded queue (429 beyond it) and run one at a time.
This module imports only the standard library at import time, so that `diffgem` runs
without the serve extra; the web stack loads when a server is built. (No
`from __future__ import annotations`: FastAPI reads the routes' annotations, which
name classes local to create_app.)
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .engine import Engine, Event, GenRequest, Job, QueueFull

EXTRA = "pip install 'mlx-diffgem[serve]'"
GRACE_S = 1.0  # the worker reports its own timeouts; this only backs it up


@dataclass
class Limits:
    """Per-server limits (CLI flags)."""

    max_queue: int = 16  # requests waiting behind the running one
    timeout: float = 600.0  # seconds from arrival to the last token
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # default: the model's context


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
            f"diffgem serve needs {e.name}, which is not installed: {EXTRA}"
        ) from None


# --------------------------------------------------------------------------------------
# Requests -> engine jobs
# --------------------------------------------------------------------------------------


class Service:
    """The endpoints' logic over one Engine; the FastAPI routes only call it."""

    def __init__(self, engine: Engine, name: str, limits: Limits):
        self.engine, self.name, self.limits = engine, name, limits
        self.created = int(time.time())

    @property
    def context(self) -> int:
        return self.engine.model.config.max_position_embeddings

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

    def prepare(self, body: Any, chat: bool) -> GenRequest:
        """Validate a request; raises ApiError (404 unknown model, 400 otherwise)."""
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
        max_tokens = self._max_tokens(body, chat)
        prompt = self._prompt(body, chat, max_tokens)
        prefix, suffix = self._infill(body, chat)
        try:
            stop = body.stops()
            overrides = body.overrides()
            self.engine.model.generation_config.update(source="request", **overrides)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
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
        )

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

    def _prompt(self, body: Any, chat: bool, max_tokens: int) -> list[int]:
        param = "messages" if chat else "prompt"
        try:
            ids = self._prompt_ids(body, chat)
        except ValueError as e:
            raise ApiError(400, str(e), param) from None
        limit = self.limits.max_prompt_tokens or self.context
        if len(ids) > limit:
            message = f"{param}: {len(ids)} tokens, over the limit of {limit}"
        elif len(ids) + max_tokens > self.context:
            message = (
                f"{param}: {len(ids)} tokens + max_tokens {max_tokens} exceed the "
                f"model's context of {self.context}"
            )
        else:
            return ids
        raise ApiError(400, message, param, code="context_length_exceeded")

    def _prompt_ids(self, body: Any, chat: bool) -> list[int]:
        from ..core.tokenizer import format_prompt
        from . import openai_schema as oa

        tok = self.engine.tokenizer
        if chat:
            kwargs = body.chat_template_kwargs or {}
            thinking = kwargs.get("enable_thinking", False)
            if set(kwargs) - {"enable_thinking"} or not isinstance(thinking, bool):
                raise ValueError(
                    "chat_template_kwargs: only {'enable_thinking': bool} is supported"
                )
            msgs = oa.chat_messages(body)
            return format_prompt(tok, msgs, enable_thinking=thinking)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("prompt: one prompt per request (batches: n/a)")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return format_prompt(tok, prompt)
        vocab = self.engine.model.config.vocab_size
        if not prompt or not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt: token ids must be in [0, {vocab}), non-empty")
        return list(prompt)

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
        return job, events


async def events_of(job: Job, events: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    """The job's events up to "done"; an "error" event or the deadline raises."""
    while True:
        remaining = job.deadline - time.monotonic() + GRACE_S
        try:
            ev = await asyncio.wait_for(events.get(), max(remaining, 0.0))
        except asyncio.TimeoutError:  # TimeoutError's alias from Python 3.11
            job.cancel()
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

    service = Service(engine, name, limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.stop()

    app = FastAPI(title="mlx-diffgem", lifespan=lifespan)
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

    gen = service.prepare(body, chat)
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
        body = error_body(str(e.detail), "invalid_request_error")
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
) -> None:
    """Load `model` (None: the embedded default) and serve it until interrupted.

    Args:
        name: the model name clients send (default: `model` as given, as vLLM does).
        limits: queue length, timeout, max_tokens and prompt limits.
        **load_options: passed to `mlx_diffgem.load` (backend, drafter, dtype, ...).
    """
    _require_web()
    import uvicorn

    engine = start_engine(model, (limits or Limits()).max_queue, **load_options)
    app = create_app(engine, name or model or "default", limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


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

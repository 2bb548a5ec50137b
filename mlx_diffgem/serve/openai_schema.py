"""OpenAI API shapes for `diffgem serve`: request models, option checks, replies.

Field names and response fields follow the OpenAI API as vLLM serves it, so a client
written for `vllm serve` works against this server by changing its base URL. Options
that only make sense for autoregressive decoding are rejected by name (unless given
their neutral value); extensions use vLLM's names where vLLM has one (`ignore_eos`,
`chat_template_kwargs`) and the generation config's names for the sampler.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..core.config import SAMPLER_KEYS

# Accepted only at these values (they change nothing); None is always accepted.
NEUTRAL: dict[str, list[Any]] = {
    "n": [1],
    "best_of": [1],
    "echo": [False],
    "logprobs": [False],
    "top_logprobs": [0],
    "presence_penalty": [0],
    "frequency_penalty": [0],
    "repetition_penalty": [1],
    "logit_bias": [{}],
    "top_p": [1],
    "tools": [[]],
    "tool_choice": ["none"],
    "response_format": [{"type": "text"}],
}
# Known options that never apply here (any non-None value is rejected).
REJECTED = ("temperature", "top_k", "min_p", "functions", "function_call")
# Known options that do not change the output.
IGNORED = ("metadata", "store", "service_tier", "parallel_tool_calls")
SAMPLER_HINT = (
    "diffusion decoding samples with its own schedule; set t_min, t_max, "
    "entropy_bound, confidence_threshold or max_denoising_steps instead"
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    # Extensions. draft: stream the live canvas after every denoising step.
    draft: bool = False
    ignore_eos: bool = False
    max_denoising_steps: int | None = Field(None, ge=1)
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    confidence_threshold: float | None = None
    stability_threshold: int | None = None

    def overrides(self) -> dict[str, Any]:
        """GenerationConfig overrides from the extension fields."""
        out = {
            k: getattr(self, k) for k in SAMPLER_KEYS if getattr(self, k) is not None
        }
        if self.ignore_eos:
            out["eos_token_id"] = []
        return out

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if "" in stops:
            raise ValueError("stop: empty strings cannot be stop sequences")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    suffix: str | None = None  # infill: the text after the completion


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None


def unsupported(body: BaseModel) -> list[str]:
    """Names of the request's options that this server does not apply."""
    bad = []
    for key, value in (body.model_extra or {}).items():
        if value is None or key in IGNORED:
            continue
        if key in NEUTRAL and any(value == v for v in NEUTRAL[key]):
            continue
        bad.append(key)
    return bad


def unsupported_message(names: list[str]) -> str:
    known = set(NEUTRAL) | set(REJECTED)
    unknown = [n for n in names if n not in known]
    parts = []
    if len(unknown) < len(names):
        rejected = ", ".join(n for n in names if n in known)
        parts.append(f"{rejected}: not supported by diffusion decoding")
    if unknown:
        parts.append(f"{', '.join(unknown)}: unknown parameter")
    sampler = {"temperature", "top_p", "top_k", "min_p"} & set(names)
    return "; ".join(parts) + (f" ({SAMPLER_HINT})" if sampler else "")


def chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    """The messages as template input; only text content parts are accepted."""
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise ValueError(
                    f"messages[{i}].content: only text parts are supported"
                )
            content = [{"type": "text", "text": p.text} for p in content]
        out.append({"role": m.role, "content": content or ""})
    return out


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Reply:
    """Builds the response bodies and stream chunks of one request."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = (
            ("chat.completion.chunk" if chunk else "chat.completion")
            if self.chat
            else "text_completion"
        )
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        head = {"id": prefix + self.id, "object": kind, "created": self.created}
        return head | {"model": self.model}

    def full(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._head(False) | {"choices": [choice], "usage": usage}

    def chunk(
        self,
        text: str | None = None,
        finish: str | None = None,
        draft: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A stream chunk; with `draft` it carries the live canvas (extension) and
        no text. The first chat chunk (text None, no finish) carries the role."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            first = text is None and finish is None and draft is None
            choice["delta"] = (
                {"role": "assistant", "content": ""}
                if first
                else ({"content": text} if text else {})
            )
        else:
            choice["text"] = text or ""
        if draft is not None:
            choice["draft"] = draft
        out = self._head(True) | {"choices": [choice]}
        return out | ({"usage": None} if self.include_usage else {})

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._head(True) | {"choices": [], "usage": usage}

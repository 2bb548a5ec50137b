"""The client of docs/serving.md: one script for `vllm serve` and `diffgem serve`.

Only the base URL differs between the two servers (the client reads it from the
OPENAI_BASE_URL environment variable); the requests and the fields read from the
responses are the same:

    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 python docs/openai_client.py
    OPENAI_BASE_URL=http://gpu-box:8000/v1 python docs/openai_client.py

It sends a completion with a stop sequence, then, if the model has a chat template
(the released model has one, the embedded default model has none), a chat
completion and a streamed one; without a template it says so in one line on stderr.
It prints one JSON object with the fields an app reads ("chat" and "streamed" are
null when chat was skipped).
"""

import argparse
import json
import os
import sys

import openai
from openai import OpenAI

USAGE = {"prompt_tokens", "completion_tokens", "total_tokens"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    # Local servers need no key; the client insists on one being set.
    client = OpenAI(api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = args.model or client.models.list().data[0].id
    completion = client.completions.create(
        model=model,
        prompt="def fibonacci(n):",
        max_tokens=args.max_tokens,
        stop=["\n\n"],
    )
    out = {
        "model": model,
        "completion": {
            "object": completion.object,
            "text": completion.choices[0].text,
            "finish_reason": completion.choices[0].finish_reason,
            "usage": completion.usage.model_dump(include=USAGE),
        },
        "chat": None,
        "streamed": None,
    }
    out.update(chat(client, model, args.max_tokens))
    print(json.dumps(out))


def chat(client: OpenAI, model: str, max_tokens: int) -> dict:
    """A chat completion and a streamed one; {} when the model has no chat
    template (both servers answer 400 and name the template)."""
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    try:
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens
        )
    except openai.BadRequestError as e:
        if "chat template" not in str(e):
            raise
        print(f"chat: skipped, {model} has no chat template", file=sys.stderr)
        return {}
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    message = reply.choices[0].message
    return {
        "chat": {
            "object": reply.object,
            "model": reply.model,
            "role": message.role,
            "content": message.content,
            "finish_reason": reply.choices[0].finish_reason,
            "usage": reply.usage.model_dump(include=USAGE),
        },
        "streamed": streamed,
    }


if __name__ == "__main__":
    main()

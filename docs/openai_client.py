"""The client of docs/serving.md: one script for `vllm serve` and `diffgem serve`.

Only the base URL differs between the two servers (the client reads it from the
OPENAI_BASE_URL environment variable); the requests and the fields read from the
responses are the same:

    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 python docs/openai_client.py
    OPENAI_BASE_URL=http://gpu-box:8000/v1 python docs/openai_client.py

It prints one JSON object with the fields an app reads.
"""

import argparse
import json
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    # Local servers need no key; the client insists on one being set.
    client = OpenAI(api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens
    )
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    completion = client.completions.create(
        model=model,
        prompt="def fibonacci(n):",
        max_tokens=args.max_tokens,
        stop=["\n\n"],
    )
    print(
        json.dumps(
            {
                "model": model,
                "chat": {
                    "object": chat.object,
                    "model": chat.model,
                    "role": chat.choices[0].message.role,
                    "content": chat.choices[0].message.content,
                    "finish_reason": chat.choices[0].finish_reason,
                    "usage": chat.usage.model_dump(include=USAGE),
                },
                "streamed": streamed,
                "completion": {
                    "object": completion.object,
                    "text": completion.choices[0].text,
                    "finish_reason": completion.choices[0].finish_reason,
                    "usage": completion.usage.model_dump(include=USAGE),
                },
            }
        )
    )


USAGE = {"prompt_tokens", "completion_tokens", "total_tokens"}

if __name__ == "__main__":
    main()

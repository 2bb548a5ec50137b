"""`diffgem serve` driven by the official `openai` client against real servers on
127.0.0.1 (uvicorn in a thread; one test starts the CLI in a subprocess)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import needs_mlx

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

pytestmark = needs_mlx
ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
)
LONG = {"max_tokens": 2048, "extra_body": {"ignore_eos": True}}  # ~13 s if not cut
# Surely over the 4 s timeout, even on a quiet machine with the faster backend: every
# canvas runs to a 48-pass cap (torch on a quiet 2-core CPU: ~20 s uncut; LONG: ~4 s).
SLOW = {
    "max_tokens": 4000,  # the tiny model's context is 4096
    "extra_body": {
        "ignore_eos": True,
        "max_denoising_steps": 48,
        "confidence_threshold": 1e-30,
    },
}


# -- servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """(plain, chat): the tiny text model without and with a chat template."""
    from mlx_diffgem.core.tiny import build_tiny_with_tokenizer

    home = tmp_path_factory.mktemp("serve")
    plain = build_tiny_with_tokenizer(home / "plain")
    chat = home / "chat"
    shutil.copytree(plain, chat)
    (chat / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return plain, chat


@contextmanager
def running(path, name, **limits):
    """A server in this process (uvicorn on a thread); yields its base URL."""
    import uvicorn

    from mlx_diffgem.serve.server import Limits, create_app, start_engine

    limits = Limits(**limits)
    app = create_app(start_engine(str(path), limits.max_queue), name, limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    _until(lambda: server.started, "server start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture(scope="module")
def srv(paths):
    with running(paths[1], "tiny", max_queue=8, timeout=60, max_prompt_tokens=200) as u:
        yield u


@pytest.fixture(scope="module")
def small(paths):
    """No chat template, one waiting request at most, 4 s per request."""
    with running(paths[0], "plain", max_queue=1, timeout=4) as url:
        yield url


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, **kw)


def _until(predicate, what, timeout=30.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200
        return json.load(r)


def post(url, body):
    """A raw POST (bytes or JSON-able): (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# -- endpoints -------------------------------------------------------------------------


def test_models_and_health(srv):
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    h = health(srv)
    assert h["status"] == "ok" and h["model"] == "tiny" and h["queued"] == 0


def test_completion_is_the_library_output(srv, paths):
    import mlx_diffgem as dg
    from mlx_diffgem.core.tokenizer import format_prompt

    r = client(srv).completions.create(
        model="tiny", prompt="def f(x):", max_tokens=32, seed=3
    )
    model, tok = dg.load(paths[1])
    want = dg.generate(model, tok, "def f(x):", max_tokens=32, seed=3)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == want
    u = r.usage
    assert u.prompt_tokens == len(format_prompt(tok, "def f(x):"))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert u.completion_tokens == 32
    else:  # EOS: it counts as generated
        assert r.choices[0].finish_reason == "stop" and u.completion_tokens < 32


def test_max_tokens_cuts_inside_a_canvas(srv):
    c = client(srv)
    full = c.completions.create(
        model="tiny", prompt="ab", seed=5, **LONG | {"max_tokens": 16}
    )
    part = c.completions.create(
        model="tiny", prompt="ab", seed=5, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert part.usage.completion_tokens == 5
    assert part.choices[0].finish_reason == "length"
    assert full.choices[0].text.startswith(part.choices[0].text)


def test_chat_stream_is_the_whole_reply_in_canvas_chunks(srv):
    c = client(srv)
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=48,  # three canvases of 16
        seed=1,
        extra_body={"ignore_eos": True},
    )
    whole = c.chat.completions.create(**kw)
    chunks = list(
        c.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        )
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [ch.choices[0].delta.content for ch in chunks[1:] if ch.choices]
    texts = [t for t in texts if t]
    assert "".join(texts) == whole.choices[0].message.content
    assert 1 <= len(texts) <= 3  # one chunk per committed canvas
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens == 48


def test_chat_without_a_template_is_400(small):
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client(small).chat.completions.create(
            model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )


def test_stop_sequences_cut_at_commit(srv):
    c = client(srv)
    kw = dict(model="tiny", prompt="x = ", seed=7, **LONG | {"max_tokens": 48})
    full_stream = list(c.completions.create(**kw, stream=True))
    first = full_stream[0].choices[0].text  # the first canvas's text
    full = "".join(ch.choices[0].text for ch in full_stream)
    n_full = c.completions.create(**kw).usage.completion_tokens
    stop = full[len(first) - 1 : len(first) + 1]  # straddles two canvases
    assert first and len(stop) == 2
    cut = full.find(stop)
    r = c.completions.create(**kw, stop=[stop, "never-in-output"])
    assert r.choices[0].text == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert cut + len(stop) <= r.usage.completion_tokens < n_full
    streamed = list(c.completions.create(**kw, stream=True, stop=stop))
    assert "".join(ch.choices[0].text for ch in streamed) == full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_draft_chunks_show_the_live_canvas(srv):
    c = client(srv)
    kw = dict(model="tiny", prompt="ab", max_tokens=32, seed=2)
    extra = {"max_denoising_steps": 3, "ignore_eos": True}
    plain = c.completions.create(**kw, extra_body=extra)
    chunks = list(
        c.completions.create(**kw, stream=True, extra_body=extra | {"draft": True})
    )
    drafts = [
        ch.choices[0].model_extra["draft"]
        for ch in chunks
        if ch.choices[0].model_extra.get("draft")
    ]
    assert [d["step"] for d in drafts] == [1, 2, 3, 1, 2, 3]
    assert [d["canvas"] for d in drafts] == [0, 0, 0, 1, 1, 1]
    assert all(isinstance(d["text"], str) for d in drafts)
    text = "".join(ch.choices[0].text for ch in chunks)
    assert text == plain.choices[0].text


def test_suffix_fills_the_middle(srv, paths):
    import mlx_diffgem as dg

    prefix, suffix = "def f(x):\n    y = ", "\n    return y\n"
    r = client(srv).completions.create(
        model="tiny", prompt=prefix, suffix=suffix, max_tokens=12, seed=4
    )
    model, tok = dg.load(paths[1])
    want = dg.infill(model, tok, prefix, suffix, max_tokens=12, seed=4)
    assert r.choices[0].text == want
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens >= len(tok.encode(prefix + suffix))
    ids = {"model": "tiny", "prompt": [5, 6], "suffix": "x", "max_tokens": 4}
    assert post(srv + "/v1/completions", ids)[0] == 400


# -- rejected requests -----------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        {"logprobs": 2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 1.0},
        {"logit_bias": {"7": 5}},
        {"best_of": 2},
        {"n": 2},
        {"temperature": 0.7},
        {"top_p": 0.9},
        {"echo": True},
    ],
)
def test_options_of_autoregressive_decoding_are_400(srv, option):
    (name,) = option
    with pytest.raises(openai.BadRequestError, match=name) as e:
        client(srv).completions.create(model="tiny", prompt="a", max_tokens=8, **option)
    assert e.value.body["param"] == name


def test_neutral_values_of_those_options_are_accepted(srv):
    r = client(srv).completions.create(
        model="tiny",
        prompt="a",
        max_tokens=8,
        n=1,
        top_p=1,
        presence_penalty=0,
        frequency_penalty=0,
        logprobs=None,
    )
    assert r.usage.completion_tokens > 0


def test_bad_requests_get_their_status_and_the_server_keeps_serving(srv):
    comp, chat = srv + "/v1/completions", srv + "/v1/chat/completions"
    ok = {"model": "tiny", "prompt": "a", "max_tokens": 8}
    cases = [
        (comp, b"{not json", 400, None),
        (comp, b"[1, 2]", 400, None),
        (comp, ok | {"prompt": 5}, 400, None),
        (comp, ok | {"max_tokens": "8"}, 400, None),
        (comp, ok | {"max_tokens": 0}, 400, None),
        (comp, ok | {"stream": "yes"}, 400, None),
        (comp, ok | {"prompt": [1, 10**6]}, 400, None),
        (comp, ok | {"prompt": ["a", "b"]}, 400, None),
        (comp, ok | {"max_tokens": 10**6}, 400, None),
        (comp, ok | {"t_min": 0.9}, 400, None),  # above t_max
        (comp, ok | {"stop": [""]}, 400, None),
        (comp, ok | {"draft": True}, 400, None),  # needs stream
        (comp, ok | {"prompt": "x" * 300}, 400, "context_length_exceeded"),
        (comp, ok | {"model": "gpt-4"}, 404, "model_not_found"),
        (chat, {"model": "tiny", "messages": "hi"}, 400, None),
        (chat, {"model": "tiny", "messages": []}, 400, None),
        (chat, {"model": "tiny", "messages": [{"content": "hi"}]}, 400, None),
        (
            chat,
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
            },
            400,
            None,
        ),
        (srv + "/v1/nothing", ok, 404, None),
    ]
    for url, body, status, code in cases:
        got, err = post(url, body)
        assert got == status, (body, err)
        assert isinstance(err["error"]["message"], str) and err["error"]["message"]
        assert err["error"]["code"] == code
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client(srv).completions.create(model="gpt-4", prompt="a", max_tokens=8)
    assert post(comp, ok)[0] == 200
    assert health(srv)["status"] == "ok"


# -- load ------------------------------------------------------------------------------


def test_eight_concurrent_clients_all_complete(srv):
    c = client(srv)

    def ask(i):
        r = c.completions.create(
            model="tiny",
            prompt=f"n{i}",
            max_tokens=32,
            seed=i,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text, r.usage.completion_tokens

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone  # none lost, none mixed up, each whole
    assert all(n == 32 for _, n in together)


def test_a_disconnect_cancels_the_generation(srv):
    before = health(srv)["cancelled"]
    hasty = client(srv, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        hasty.completions.create(model="tiny", prompt="a", **LONG)
    _until(lambda: health(srv)["cancelled"] == before + 1, "cancel", timeout=10)
    assert not health(srv)["busy"]


def test_queue_overflow_is_429_and_a_closed_stream_frees_the_worker(small):
    c = client(small)
    before = health(small)["cancelled"]
    running = c.completions.create(model="plain", prompt="a", stream=True, **LONG)
    next(iter(running))  # its first canvas is out: it is running
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            c.completions.create, model="plain", prompt="b", max_tokens=16
        )
        _until(lambda: health(small)["queued"] == 1, "the queue to fill")
        with pytest.raises(openai.RateLimitError, match="busy") as e:
            c.completions.create(model="plain", prompt="c", max_tokens=16)
        assert e.value.status_code == 429
        running.close()  # the client goes away: its generation stops
        assert waiting.result(timeout=30).usage.completion_tokens > 0
    assert health(small)["cancelled"] == before + 1


def test_a_request_over_its_timeout_is_504(small):
    before = health(small)["timeouts"]
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError, match="timeout") as e:
        client(small).completions.create(model="plain", prompt="a", **SLOW)
    assert e.value.status_code == 504 and time.monotonic() - t0 < 15
    assert health(small)["timeouts"] == before + 1
    r = client(small).completions.create(model="plain", prompt="a", max_tokens=8)
    assert r.usage.completion_tokens > 0


# -- the CLI and the vLLM client script ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_client_script_runs_unchanged_against_diffgem_serve(paths):
    """docs/openai_client.py, the script a user runs against `vllm serve`, against
    `diffgem serve` under the released model's name: only the base URL differs."""
    name, port = "google/diffusiongemma-26B-A4B-it", _free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mlx_diffgem", "serve", "--model", str(paths[1])]
    cmd += ["--port", str(port), "--served-model-name", name, "--log-level", "warning"]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: server.poll() is not None or _up(url), "diffgem serve", 120)
        assert server.poll() is None, server.stderr.read()
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "docs" / "openai_client.py"),
                "--max-tokens",
                "24",
            ],
            env=env | {"OPENAI_BASE_URL": url + "/v1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.terminate()
        server.wait(30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["model"] == name and got["chat"]["model"] == name
    assert got["chat"]["object"] == "chat.completion"
    assert got["chat"]["role"] == "assistant"
    assert got["completion"]["object"] == "text_completion"
    for reply in (got["chat"], got["completion"]):
        u = reply["usage"]
        assert reply["finish_reason"] in ("stop", "length")
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
    assert "\n\n" not in got["completion"]["text"]
    assert isinstance(got["streamed"], str)


def test_readme_serving_block_runs():
    """README's `sh` block of "## Serving" (tests/test_readme.py runs the `bash` and
    `python` blocks; this one starts a server, so it runs here, then stops it)."""
    readme = (ROOT / "README.md").read_text().split("## Serving", 1)[1]
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    assert "diffgem serve" in block and "/v1/completions" in block
    port = str(_free_port())
    script = block.replace("8080", port) + "\nkill $!\n"
    out = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # stdout interleaves uvicorn's access log with curl's reply
    found = re.search(r'\{"id".*?"usage":\{[^}]*\}\}', out.stdout)
    assert found, out.stdout[-3000:]
    reply = json.loads(found.group())
    assert reply["object"] == "text_completion" and reply["choices"][0]["text"]


def _up(url: str) -> bool:
    try:
        return health(url)["status"] == "ok"
    except OSError:
        return False


def test_serve_without_the_extra_is_one_line(monkeypatch, capsys):
    from mlx_diffgem import cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fastapi" in err and "mlx-diffgem[serve]" in err


# -- committed ids -> text -------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from mlx_diffgem.core.tiny import build_char_tokenizer
    from mlx_diffgem.core.tokenizer import load_tokenizer

    return load_tokenizer(build_char_tokenizer(tmp_path_factory.mktemp("tok")))


def _out(tok, stop=(), max_tokens=100):
    from mlx_diffgem.serve.engine import TextOutput

    return TextOutput(tok, max_tokens, list(stop), tok.eos_token_ids)


def test_text_output_holds_back_a_possible_stop_then_cuts(tok):
    out = _out(tok, ["world"])
    assert out.add(tok.encode("hello wo")) == "hello "  # "wo" may start "world"
    assert out.add(tok.encode("rld and more")) == ""
    assert out.finish_reason == "stop" and out.text == "hello "
    assert len(out.ids) == len("hello world")  # the stop string's tokens count


def test_text_output_releases_a_tail_that_did_not_become_a_stop(tok):
    out = _out(tok, ["world"])
    assert out.add(tok.encode("a wo")) == "a "
    assert out.add(tok.encode("ok")) == "wook"
    assert out.close() == "" and out.finish_reason == "length"


def test_text_output_caps_and_ends_at_eos(tok):
    capped = _out(tok, max_tokens=3)
    assert capped.add(tok.encode("abcdef")) == "abc"
    assert capped.finish_reason == "length" and len(capped.ids) == 3
    assert capped.add(tok.encode("gh")) == ""
    eos = tok.eos_token_ids[0]
    ended = _out(tok)
    assert ended.add([*tok.encode("ab"), eos, *tok.encode("cd")]) == "ab"
    assert ended.finish_reason == "stop" and len(ended.ids) == 3

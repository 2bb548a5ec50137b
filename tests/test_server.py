"""`diffgem serve` driven by the official `openai` client against real servers on
127.0.0.1 (uvicorn in a thread; one test starts the CLI in a subprocess)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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
from types import SimpleNamespace

import pytest
from conftest import needs_mlx

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

pytestmark = needs_mlx
ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
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


def test_chat_without_a_template_names_no_path(small, paths):
    _, err = post(
        small + "/v1/chat/completions",
        {"model": "plain", "messages": [{"role": "user", "content": "hi"}]},
    )
    message = err["error"]["message"]
    assert "no chat template" in message and "/v1/completions" in message
    assert str(paths[0]) not in message and err["error"]["param"] == "messages"


def test_library_messages_lose_local_paths(paths):
    from mlx_diffgem.serve.engine import Engine

    engine = Engine(lambda: None, 1)
    engine.model = SimpleNamespace(path=paths[0])
    engine.tokenizer = SimpleNamespace(name=str(paths[0]))
    said = f"{paths[0]}: chat template: bad; see /opt/x/y.json or https://a.io/b/c"
    assert engine.public(said) == (
        "<model>: chat template: bad; see <path> or https://a.io/b/c"
    )


def _raw(url: str, body: bytes, headers: dict, chunked: bool = False):
    """A POST by http.client (whole body first, then the reply, as most clients
    do): (status, JSON body)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        if chunked:
            parts = (body[i : i + 65536] for i in range(0, len(body), 65536))
            conn.request("POST", where.path, parts, headers, encode_chunked=True)
        else:
            conn.request("POST", where.path, body, headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded"]
)
def test_a_post_must_be_json(srv, content_type):
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 8}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    status, err = _raw(srv + "/v1/completions", body, headers)
    assert status == 400
    message = err["error"]["message"]
    assert message.startswith("Content-Type: expected application/json")
    assert "\n" not in message
    ok = {"Content-Type": "application/json; charset=utf-8"}
    assert _raw(srv + "/v1/completions", body, ok)[0] == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_a_body_over_the_limit_is_413(srv, chunked):
    """srv's limit is 1 MiB (its 200-token prompt limit x 32 bytes is less)."""
    prompt = "x" * (1 << 20)
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 8}).encode()
    headers = {"Content-Type": "application/json"}
    status, err = _raw(srv + "/v1/completions", body, headers, chunked)
    assert status == 413, err
    assert err["error"]["code"] == "request_too_large"
    assert "1,048,576 bytes" in err["error"]["message"]
    assert post(srv + "/v1/completions", {"model": "tiny", "prompt": "a"})[0] == 200


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
    # the worker counts the cancel, then returns and clears `busy`: it must be free
    # at once, long before the uncut request (~20 s) would have ended
    _until(lambda: not health(srv)["busy"], "the worker freed", timeout=2)


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


@pytest.fixture(scope="module")
def quick(paths):
    """Half a second per request: any real generation of SLOW runs over it."""
    with running(paths[0], "quick", max_queue=2, timeout=0.5) as url:
        yield url


def _timed_out(url):
    """One request that must end in 504; returns /health right after it."""
    with pytest.raises(openai.InternalServerError, match="timeout") as e:
        client(url).completions.create(model="quick", prompt="a", **SLOW)
    assert e.value.status_code == 504
    return health(url)  # counted before the 504 was sent, whoever sent it


def test_a_request_over_its_timeout_is_504(quick):
    before = health(quick)
    after = _timed_out(quick)
    assert after["timeouts"] == before["timeouts"] + 1
    _until(lambda: not health(quick)["busy"], "the worker to stop", timeout=60)
    assert health(quick)["cancelled"] == before["cancelled"]
    r = client(quick).completions.create(model="quick", prompt="a", max_tokens=8)
    assert r.usage.completion_tokens > 0


def _endless(pause_first: float):
    """A stand-in for stream_generate: a committed canvas every 50 ms, forever,
    after `pause_first` seconds (a worker stuck inside one canvas)."""

    def stream(*args, **kwargs):
        time.sleep(pause_first)
        while True:
            yield SimpleNamespace(is_draft=False, tokens=[40, 41])
            time.sleep(0.05)

    return stream


@pytest.mark.parametrize("pause_first", [0.0, 3.0], ids=["worker", "server"])
def test_a_timeout_is_counted_once_whoever_notices_it(quick, monkeypatch, pause_first):
    """The worker answers 504 at its next check past the deadline; when it misses
    the grace period (stuck in a canvas), the server answers and counts it, and
    the worker, waking later, counts nothing more (it used to count a cancel)."""
    from mlx_diffgem.serve import engine, server

    monkeypatch.setattr(engine, "stream_generate", _endless(pause_first))
    monkeypatch.setattr(server, "GRACE_S", 0.5)
    before = health(quick)
    after = _timed_out(quick)
    assert after["timeouts"] == before["timeouts"] + 1
    _until(lambda: not health(quick)["busy"], "the worker to stop", timeout=60)
    final = health(quick)
    assert final["timeouts"] == before["timeouts"] + 1
    assert final["cancelled"] == before["cancelled"]
    assert final["errors"] == before["errors"]


# -- the CLI and the client script ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cli_server(log_path, *args):
    """`diffgem serve ARGS` in a subprocess on a free port (its log in `log_path`);
    yields (url, process); SIGTERM at the end if the test has not stopped it."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlx_diffgem", "serve", *args, "--port", str(port)]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=log, text=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: server.poll() is not None or _up(url), "diffgem serve", 120)
        assert server.poll() is None, Path(log_path).read_text()[-3000:]
        yield url, server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _client_script(url: str) -> subprocess.CompletedProcess:
    script = str(ROOT / "docs" / "openai_client.py")
    return subprocess.run(
        [sys.executable, script, "--max-tokens", "24"],
        env=ENV | {"OPENAI_BASE_URL": url + "/v1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check_completion(got: dict) -> None:
    reply = got["completion"]
    assert reply["object"] == "text_completion"
    assert reply["finish_reason"] in ("stop", "length")
    assert "\n\n" not in reply["text"]
    u = reply["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0


def test_vllm_client_script_runs_unchanged_against_diffgem_serve(paths, tmp_path):
    """docs/openai_client.py, the script a user runs against `vllm serve`, against
    `diffgem serve` under the released model's name: only the base URL differs."""
    name = "google/diffusiongemma-26B-A4B-it"
    args = ["--model", str(paths[1]), "--served-model-name", name]
    with cli_server(tmp_path / "log", *args) as (url, _):
        out = _client_script(url)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["model"] == name and got["chat"]["model"] == name
    assert got["chat"]["object"] == "chat.completion"
    assert got["chat"]["role"] == "assistant"
    assert got["chat"]["finish_reason"] in ("stop", "length")
    u = got["chat"]["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
    _check_completion(got)
    assert isinstance(got["streamed"], str)


def test_client_script_runs_against_the_default_model(tmp_path):
    """The embedded model has no chat template: completions, then one line that
    says chat was skipped, and no traceback (issue 22)."""
    with cli_server(tmp_path / "log") as (url, _):
        out = _client_script(url)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["model"] == "default"
    _check_completion(got)
    assert got["chat"] is None and got["streamed"] is None
    assert out.stderr.strip() == "chat: skipped, default has no chat template"


def test_sigterm_shuts_down_cleanly(paths, tmp_path):
    """SIGTERM with a generation running: the stream ends (503 event), the engine
    stops, the process exits with status 0 (it used to die by the signal)."""
    log = tmp_path / "log"
    with cli_server(log, "--model", str(paths[0])) as (url, server):
        c = client(url)
        stream = iter(
            c.completions.create(model=str(paths[0]), prompt="a", stream=True, **LONG)
        )
        next(stream)  # the first canvas is out: the generation is running
        server.send_signal(signal.SIGTERM)
        rest = []
        with pytest.raises(openai.APIError, match="shutting down"):
            rest.extend(stream)  # ends with the 503 as an error event
        assert server.wait(60) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "engine stopped" in text and "Traceback" not in text
    assert len(rest) < LONG["max_tokens"] // 16  # cut short, not run to the end


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the tokenizer process)."""
    pids = [pid]  # a child started from another thread is listed under that thread
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for p in pids:
        status = Path(f"/proc/{p}/status").read_text()
        total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return total / 1024


def _refused_giant(url: str, text: str) -> tuple[int, dict, list[float]]:
    """POST a prompt over the limit while probing /health; (status, body, the
    probes' latencies)."""
    body = {"model": "default", "prompt": text, "max_tokens": 8}
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(post, url + "/v1/completions", body)
        times = []
        while not reply.done():
            t0 = time.perf_counter()
            health(url)
            times.append(time.perf_counter() - t0)
            time.sleep(0.02)
        status, err = reply.result()
    return status, err, sorted(times)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_giant_prompt_blocks_nothing_and_its_memory_returns(tmp_path):
    """A prompt of 600,000 characters (~250k tokens, a second or more to tokenize)
    over a 1,000-token limit: /health keeps answering at once while it is
    tokenized, the 400 names its length, and the server's memory (with its
    tokenizer process) comes back to where it was (issue 21)."""
    text = "def f(x):\n    return x + 1\n" * 22_000
    with cli_server(tmp_path / "log", "--max-prompt-tokens", "1000") as (url, proc):
        _refused_giant(url, text)  # starts the tokenizer process
        before = _rss_mb(proc.pid)
        status, err, times = _refused_giant(url, text)
        # the server trims its heap once the request's handling has returned,
        # which may be just after the client has its answer
        deadline = time.monotonic() + 5
        while (after := _rss_mb(proc.pid)) - before >= 40:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert health(url)["status"] == "ok"
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    assert "over the limit of 1000" in err["error"]["message"]
    assert len(times) >= 5, times  # /health answered all along
    assert times[len(times) // 2] < 0.1 and times[-1] < 1.0, times
    assert after - before < 40, (before, after)


def test_readme_serving_block_runs():
    """README's "## Serving": the install step, then the `sh` block that starts a
    server (tests/test_readme.py runs the `bash` and `python` blocks; this one
    starts a server, so it runs here, then stops it)."""
    install, block = _readme_serving_blocks()
    assert "pip install -e '.[cpu,serve]'" in install and ".[mlx,serve]" in install
    port = str(_free_port())
    script = block.replace("8080", port) + "\nkill $!\n"
    out = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=ENV,
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


def _readme_serving_blocks() -> tuple[str, str]:
    """(install, run): the `sh` blocks of README's "## Serving"."""
    section = (ROOT / "README.md").read_text().split("## Serving", 1)[1]
    blocks = re.findall(r"^```sh\n(.*?)^```", section.split("\n## ", 1)[0], re.S | re.M)
    install = next(b for b in blocks if "pip install" in b)
    run = next(b for b in blocks if "diffgem serve" in b)
    assert "/v1/completions" in run
    return install, run


@pytest.mark.parametrize(
    "stand_in, within",
    [("sleep 30", 10), ("false", 5)],
    ids=["never-answers", "exits-at-once"],
)
def test_readme_wait_loop_gives_up_with_a_message(stand_in, within):
    """The README's wait loop, with a server that never answers (cut to 3 s) or
    one that exits at once: it stops, says so, and sends nothing."""
    _, block = _readme_serving_blocks()
    server = ".venv/bin/diffgem serve --port 8080 &"
    assert server in block and "seq 60" in block
    script = block.replace(server, stand_in + " &").replace("seq 60", "seq 3")
    script = script.replace("8080", str(_free_port())) + "\nkill $! 2> /dev/null\n"
    t0 = time.monotonic()
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - t0 < within
    assert "diffgem serve is not answering" in out.stderr
    assert out.stdout == ""


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
    assert "\n" not in err and "fastapi" in err
    # the hint fits a clone and an installed package
    assert "pip install -e '.[cpu,serve]'" in err and "mlx-diffgem[serve]" in err


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

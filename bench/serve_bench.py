"""`diffgem serve` over many sequential requests: does latency or memory drift?

    OMP_NUM_THREADS=1 python -m bench.serve_bench --requests 100

Starts `diffgem serve` (the embedded default model, or --model) in a subprocess on
127.0.0.1, sends --requests completions one after another with the official `openai`
client, and after each reads the server's resident memory and CPU time. The work
repeats with a short period (prompt and seed cycle together, EOS off, so every request
commits the same canvases) so that the first and the last requests do identical work:
any change between them is the server's drift (mlx-vlm's server slows and grows after
~16 requests, its issue #1393). The server's CPU seconds per request measure that drift
even on a loaded machine, where wall-clock latency follows the load. Writes one JSON
record (bench/record.py) with the medians of the first and last --window requests
(after one warm-up request) and the memory at the start and the end; the last stdout
line is a JSON summary with the record's path.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence

import numpy as np

from . import backends, record

PROMPTS = (*backends.PROMPTS, "with open(path) as f:\n")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: embedded)")
    p.add_argument("--backend", default=None, choices=["mlx", "torch"])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--window", type=int, default=10, help="requests per median")
    p.add_argument("--out", default="bench/results", help="folder of the JSON record")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return json.load(r)
    except OSError:
        return None


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlx_diffgem", "serve", "--port", str(port)]
    cmd += ["--log-level", "warning", "--served-model-name", "bench"]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--backend", args.backend] if args.backend else []
    server = subprocess.Popen(cmd)
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while _health(url) is None:
        if server.poll() is not None or time.monotonic() > end:
            server.kill()
            raise SystemExit("error: diffgem serve did not start")
        time.sleep(0.2)
    return server


def rss_mb(pid: int) -> float:
    """Resident memory of a process (ps works on Linux and macOS)."""
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True)
    return int(out.stdout.decode().strip()) / 1024


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used: its work, whatever else loads the machine."""
    try:  # Linux: utime + stime in clock ticks (10 ms)
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:  # macOS: ps prints [[dd-]hh:]mm:ss.cc
        out = subprocess.run(["ps", "-o", "time=", "-p", str(pid)], capture_output=True)
        parts = out.stdout.decode().strip().replace("-", ":").split(":")
        return sum(float(p) * 60**i for i, p in enumerate(reversed(parts)))


def run_requests(client, pid: int, n: int, max_tokens: int) -> list[dict]:
    rows = []
    for i in range(n):
        k = i % len(PROMPTS)  # prompt and seed cycle together: same work per cycle
        t0, c0 = time.perf_counter(), cpu_s(pid)
        r = client.completions.create(
            model="bench",
            prompt=PROMPTS[k],
            max_tokens=max_tokens,
            seed=k,
            extra_body={"ignore_eos": True},
        )
        latency, cpu = time.perf_counter() - t0, cpu_s(pid) - c0
        rows.append(
            {
                "latency_s": round(latency, 5),
                "server_cpu_s": round(cpu, 3),
                "completion_tokens": r.usage.completion_tokens,
                "finish_reason": r.choices[0].finish_reason,
                "rss_mb": round(rss_mb(pid), 2),
            }
        )
    return rows


def summarize(rows: list[dict], window: int) -> dict:
    """First and last `window` requests after the warm-up one, and memory drift
    (the slope is fitted after the first window: allocators grow once, early)."""
    lat = [r["latency_s"] for r in rows]
    cpu = [r["server_cpu_s"] for r in rows]
    mem = [r["rss_mb"] for r in rows]
    first, last = lat[1 : 1 + window], lat[-window:]
    cpu_first, cpu_last = cpu[1 : 1 + window], cpu[-window:]
    slope = np.polyfit(np.arange(window, len(mem)), mem[window:], 1)[0]
    return {
        "requests": len(rows),
        "complete": sum(r["completion_tokens"] > 0 for r in rows),
        "latency_first_ms": record.spread(first),
        "latency_last_ms": record.spread(last),
        "latency_all_ms": record.spread(lat[1:]),
        "latency_last_over_first": round(float(np.median(last) / np.median(first)), 4),
        # The server's CPU time per request: its drift, free of the machine's load.
        "server_cpu_first_ms": record.spread(cpu_first),
        "server_cpu_last_ms": record.spread(cpu_last),
        "server_cpu_last_over_first": round(
            float(np.median(cpu_last) / np.median(cpu_first)), 4
        ),
        "latency_min_first_last_ms": [
            round(min(first) * 1e3, 2),
            round(min(last) * 1e3, 2),
        ],
        "rss_first_mb": mem[0],
        "rss_start_mb": mem[window],  # after the first window
        "rss_end_mb": mem[-1],
        "rss_max_mb": max(mem),
        "rss_slope_mb_per_100_requests": round(float(slope) * 100, 3),
    }


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench.serve_bench"):
    args = _parser(prog).parse_args(argv)
    if args.requests < 2 * args.window + 1:
        raise SystemExit("error: --requests: needs at least 2 * --window + 1")
    import openai

    port = _free_port()
    server = start_server(args, port)
    try:
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        rows = run_requests(client, server.pid, args.requests, args.max_tokens)
        backend = _health(url)["backend"]
    finally:
        server.terminate()
        server.wait(30)
    rec = record.envelope("serve", record.cpu_name(), [])
    rec |= {
        "backend": backend,
        "model": {"preset": "default" if args.model is None else "custom"},
        "config": {
            "model": args.model or "embedded default",
            "max_tokens": args.max_tokens,
            "prompts": len(PROMPTS),
            "ignore_eos": True,
            "window": args.window,
            "client": "openai " + openai.__version__,
            "threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "metrics": summarize(rows, args.window),
        "requests": rows,
    }
    path = record.write(rec, args.out)
    print(json.dumps({"record": str(path), **rec["metrics"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

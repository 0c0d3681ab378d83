"""Bounded load test of `python -m serve` on loopback: throughput, latency percentiles, errors, memory.

    python bench/serve.py --model ~/.cache/xbit/smollm2 [--concurrency 1 8 32] [--requests 32] [--max-tokens 32]

Starts the server (or uses --url), sends a fixed number of streaming completion requests per concurrency level,
repeats the whole sweep --repeat times and prints one table row per level and round, with the server's resident
memory after each level. Exits 1 on any error or if 8 clients reach less than 3x the tokens/s of 1 client.
"""

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are", "In 1969, the first humans", "Photosynthesis is the process"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(url: str, i: int, max_tokens: int, model: str | None) -> tuple[int, float, float, str | None]:
    """(completion tokens, latency s, time to first token s, error)."""
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, **({"model": model} if model else {})}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
            if r.status_code != 200:
                return 0, time.perf_counter() - t0, 0.0, f"HTTP {r.status_code}: {r.text[:200]}"
            for line in r.iter_lines(decode_unicode=True):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 0, time.perf_counter() - t0, 0.0, chunk["error"]["message"]
                if ttft is None and chunk.get("choices"):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except requests.RequestException as e:
        return 0, time.perf_counter() - t0, 0.0, str(e)
    return tokens, time.perf_counter() - t0, ttft or 0.0, None


def run_level(url: str, concurrency: int, n_requests: int, max_tokens: int, model: str | None) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(lambda i: one_request(url, i, max_tokens, model), range(n_requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[3] is None]
    lat = [r[1] for r in ok]
    return {"tokens": sum(r[0] for r in ok), "wall": wall, "errors": len(results) - len(ok),
            "p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
            "ttft50": percentile([r[2] for r in ok], 50), "first_error": next((r[3] for r in results if r[3]), None)}


def start_server(model: str, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serve", "--model", model, "--port", str(port), "--max-batch", str(max_batch),
           "--log-level", "warning"] + (["--threads", str(threads)] if threads else [])
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited: {log.read().decode()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready in 300 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder to serve (xbit or float HF)")
    p.add_argument("--url", help="use a running server instead of starting one")
    p.add_argument("--served-model", default=None, help="model name to send (default: none)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=2, help="sweeps (memory must stay flat across them)")
    args = p.parse_args(argv)
    if not (args.model or args.url):
        p.error("give --model or --url")
    proc, url = (None, args.url) if args.url else start_server(os.path.expanduser(args.model), args.max_batch,
                                                               args.threads)
    pid = proc.pid if proc else None
    rows, failed = [], False
    try:
        one_request(url, 0, 2, args.served_model)  # warm-up
        for rnd in range(1, args.repeat + 1):
            for c in args.concurrency:
                r = run_level(url, c, args.requests, args.max_tokens, args.served_model)
                r.update(round=rnd, clients=c, rss=rss_mb(pid))
                rows.append(r)
                if r["first_error"]:
                    print(f"error at {c} clients: {r['first_error']}", file=sys.stderr)
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)
    print(f"\nrequests/level={args.requests} max_tokens={args.max_tokens} max_batch={args.max_batch}")
    print("| round | clients | tokens | wall s | tokens/s | p50 s | p90 s | p99 s | TTFT p50 s | errors | server RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['clients']} | {r['tokens']} | {r['wall']:.1f} | {r['tokens'] / r['wall']:.1f} | "
              f"{r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} | {r['ttft50']:.2f} | {r['errors']} | "
              f"{r['rss']:.0f} |")
    errors = sum(r["errors"] for r in rows)
    tps = {(r["round"], r["clients"]): r["tokens"] / r["wall"] for r in rows}
    if (1, 1) in tps and (1, 8) in tps:
        speedup = min(tps[(k, 8)] / tps[(k, 1)] for k in range(1, args.repeat + 1))
        print(f"\n8 clients vs 1: {speedup:.2f}x tokens/s (need >= 3x)")
        failed |= speedup < 3
    if pid is not None and args.repeat > 1:
        first, last = rows[len(args.concurrency) - 1]["rss"], rows[-1]["rss"]
        print(f"server RSS after round 1: {first:.0f} MB, after round {args.repeat}: {last:.0f} MB "
              f"({(last - first) / first * 100:+.1f}%)")
    print(f"errors: {errors}")
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())

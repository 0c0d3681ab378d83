"""Reliability soak of `python -m serve` on loopback: mixed well-behaved, abandoning and hostile clients.

    python -m bench.soak [--model ~/.cache/xbit/runs/smollm2-xbit-gptq3] [--seconds 600] [--clients 8]

Starts the server (or uses --url), then --clients threads send requests for --seconds (at most --max-requests),
each request a kind drawn with a fixed seed: streaming and non-streaming completions, chat (both), echo with
logprobs, abandoned (a non-streaming client that gives up after 0.5 s, a stream closed after its first chunk),
oversized (a 5 MB body), malformed (bad JSON, wrong types, lone surrogates). Every answer is classed: ok, the
expected 4xx, unexpected 4xx, 5xx, hung (no answer within --hang-after seconds), connection error. At the end it
waits up to 5 s for the batch to empty and reads the slots still in use. Prints one table; exits 1 unless there
are zero 5xx, zero hung, zero unexpected answers, zero slots held, and RSS drift (after warm-up to end) < 5%.
"""

import argparse
import collections
import json
import random
import threading
import time
from pathlib import Path

import requests

from bench.serve import percentile, rss_mb, start_server

DEFAULT_MODEL = Path.home() / ".cache/xbit/runs/smollm2-xbit-gptq3"  # README's first command writes it
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are", "In 1969, the first humans", "Photosynthesis is the process"]
KINDS = {"stream": 3, "plain": 3, "chat": 2, "chat_stream": 2, "echo_logprobs": 2, "abandon_plain": 2,
         "abandon_stream": 2, "oversized": 1, "malformed": 2}  # relative frequency
MALFORMED = [b"{bad json", b'{"prompt": "a\\ud800", "max_tokens": 2}', b'{"prompt": 5}', b"[1, 2]",
             b'{"messages": []}', b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": "x", "stop": ["a"]' + b"]" * 3]


def _sse_ok(r) -> bool:
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    return bool(lines) and lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines[:-1])


def one(session: requests.Session, url: str, kind: str, rng: random.Random, hang: float) -> str:
    """Send one request of `kind`; its class."""
    prompt, n = rng.choice(PROMPTS), rng.randint(8, 64)
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n}
    post = lambda path, **kw: session.post(url + path, timeout=kw.pop("timeout", hang), **kw)  # noqa: E731
    if kind == "stream":
        with post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "stream": True}, stream=True) as r:
            return "ok" if r.status_code == 200 and _sse_ok(r) else f"bad {r.status_code}"
    if kind == "chat_stream":
        with post("/v1/chat/completions", json={**chat, "stream": True}, stream=True) as r:
            return "ok" if r.status_code == 200 and _sse_ok(r) else f"bad {r.status_code}"
    if kind == "plain":
        r = post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0.7, "seed": n})
    elif kind == "chat":
        r = post("/v1/chat/completions", json=chat)
    elif kind == "echo_logprobs":
        r = post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 3})
    elif kind == "abandon_plain":
        try:
            post("/v1/completions", json={"prompt": prompt, "max_tokens": 1000, "ignore_eos": True}, timeout=0.5)
        except requests.Timeout:
            return "ok"  # gave up, as intended
        return "ok"
    elif kind == "abandon_stream":
        body = {"prompt": prompt, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with post("/v1/completions", json=body, stream=True) as r:
            next(r.iter_lines(), None)
        return "ok" if r.status_code == 200 else f"bad {r.status_code}"
    elif kind == "oversized":
        r = post("/v1/completions", data=b'{"prompt": "' + b"x" * (5 << 20) + b'"}',
                 headers={"Content-Type": "application/json"})
        return "expected 4xx" if r.status_code == 413 else f"bad {r.status_code}"
    else:
        r = post(rng.choice(["/v1/completions", "/v1/chat/completions"]),  # each body is invalid for both
                 data=rng.choice(MALFORMED), headers={"Content-Type": "application/json"})
        ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
        return "expected 4xx" if ok else f"bad {r.status_code}"
    return "ok" if r.status_code == 200 else f"bad {r.status_code}"


def classify(outcome: str) -> str:
    if outcome.startswith("bad 5"):
        return "5xx"
    return "unexpected " + outcome[4:] if outcome.startswith("bad") else outcome


def client(url: str, seed: int, stop_at: float, budget: list, hang: float, out: list, lock: threading.Lock):
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    with requests.Session() as session:
        while time.monotonic() < stop_at:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            kind = rng.choices(kinds, weights)[0]
            t0 = time.perf_counter()
            try:
                outcome = classify(one(session, url, kind, rng, hang))
            except requests.Timeout:
                outcome = "hung"
            except requests.ConnectionError as e:
                outcome = f"connection error ({type(e).__name__})"
            with lock:
                out.append((kind, outcome, time.perf_counter() - t0))


def metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder to serve")
    p.add_argument("--url", default=None, help="soak a running server instead (RSS is then not read)")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--warmup", type=float, default=60, help="seconds of load before the starting RSS is read")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--hang-after", type=float, default=120, help="a request with no answer by then counts as hung")
    p.add_argument("--threads", type=int, default=None, help="server torch threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    proc = None
    if args.url:
        url = args.url
    else:
        if not Path(args.model).is_dir():
            raise SystemExit(f"error: --model {args.model} is not a folder (README's first command writes the default)")
        proc, url = start_server(args.model, 8, args.threads)
    pid = proc.pid if proc else None
    out, lock, budget = [], threading.Lock(), [args.max_requests]
    start = time.monotonic()
    rss = {"loaded": rss_mb(pid)}
    threads = [threading.Thread(target=client, args=(url, args.seed * 1000 + i, start + args.seconds, budget,
                                                     args.hang_after, out, lock)) for i in range(args.clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(min(args.warmup, args.seconds))
        rss["warm"] = rss_mb(pid)
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        deadline = time.monotonic() + 5  # an abandoned request frees its slot within one decode step
        while metric(url, "xbit_running_sequences") + metric(url, "xbit_queue_length") > 0 and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        slots = metric(url, "xbit_running_sequences") + metric(url, "xbit_queue_length")
        rss["end"] = rss_mb(pid)
        alive = requests.get(url + "/health", timeout=10).status_code == 200
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)
    return report(out, wall, rss, slots, alive, args)


def report(out: list, wall: float, rss: dict, slots: float, alive: bool, args) -> int:
    classes = collections.Counter(o for _, o, _ in out)
    sent, good = collections.Counter(k for k, _, _ in out), collections.defaultdict(list)
    for kind, outcome, s in out:
        if outcome in ("ok", "expected 4xx"):
            good[kind].append(s)
    answered = [s for kind, xs in good.items() if not kind.startswith("abandon") for s in xs]
    drift = (rss["end"] - rss["warm"]) / rss["warm"] * 100 if rss.get("warm") == rss.get("warm") else float("nan")
    print(f"soak: {len(out)} requests in {wall:.0f} s from {args.clients} clients (seed {args.seed})")
    print("| class | requests |\n|---|---:|")
    for c, k in sorted(classes.items()):
        print(f"| {c} | {k} |")
    print("\n| kind | sent | as expected | p50 s | p99 s |\n|---|---:|---:|---:|---:|")
    for kind in KINDS:
        xs = good.get(kind, [])
        print(f"| {kind} | {sent[kind]} | {len(xs)} | {percentile(xs, 50):.2f} | {percentile(xs, 99):.2f} |")
    print(f"| all but abandoned | {sum(v for k, v in sent.items() if not k.startswith('abandon'))} | "
          f"{len(answered)} | {percentile(answered, 50):.2f} | {percentile(answered, 99):.2f} |")
    print(f"\nserver RSS MB: loaded {rss['loaded']:.0f}, after {args.warmup:.0f} s warm-up {rss['warm']:.0f}, "
          f"end {rss['end']:.0f} (drift {drift:+.1f}%); slots in use at the end: {slots:.0f}; "
          f"/health after: {'ok' if alive else 'NOT OK'}")
    bad = sum(k for c, k in classes.items() if c not in ("ok", "expected 4xx"))
    passed = bad == 0 and slots == 0 and alive and not abs(drift) >= 5
    print("PASS" if passed else
          f"FAIL: {bad} requests 5xx/hung/unexpected, {slots:.0f} slots held, drift {drift:+.1f}%")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

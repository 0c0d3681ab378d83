"""Nothing lost, nothing hung: abandoned clients, engine failures, hostile strings, huge bodies, shutdown."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.serve.helpers import ROOT, InProcessServer, ServerProcess, error_envelope, free_port, wait_idle

LONG = 6000  # tokens: tens of seconds of decoding on one thread, so a slot held for nothing shows


@pytest.fixture(scope="module")
def long_dir(xbit_dir, tmp_path_factory):
    """The session checkpoint with an 8k context (RoPE takes any length): room for requests that run long."""
    d = tmp_path_factory.mktemp("long") / "tiny-long"
    shutil.copytree(xbit_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 8192
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_abandoned_non_streaming_request_frees_its_slot_and_shutdown_is_prompt(long_dir):
    srv = ServerProcess(long_dir, "--shutdown-timeout", "30")
    try:
        body = {"prompt": "The", "max_tokens": LONG, "ignore_eos": True}
        with pytest.raises(requests.Timeout):  # as `curl -m 1` does
            requests.post(srv.url + "/v1/completions", json=body, timeout=1)
        assert wait_idle(srv.url, seconds=3) == 0
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
        assert time.monotonic() - start < 5  # nothing left for the graceful shutdown to wait on
    finally:
        srv.stop()


def test_shutdown_timeout_ends_running_requests_with_an_answer(long_dir):
    srv = ServerProcess(long_dir, "--shutdown-timeout", "3")
    try:
        body = {"prompt": "The", "max_tokens": LONG, "ignore_eos": True}
        answers = {}

        def non_streaming():
            answers["plain"] = requests.post(srv.url + "/v1/completions", json=body, timeout=60)

        thread = threading.Thread(target=non_streaming)
        thread.start()
        with requests.post(srv.url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=60) as r:
            lines = r.iter_lines(decode_unicode=True)
            next(lines)
            start = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln]
        thread.join(60)
        assert time.monotonic() - start < 10
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "abort"
        assert error_envelope(answers["plain"], 503)["code"] == "aborted"
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        srv.stop()


@pytest.mark.parametrize("path,raw", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 2, "model": "\\ud800"}'),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 2, "stop": ["\\ud800"]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'),
    ("/tokenize", '{"prompt": "\\udc00"}'),
    ("/tokenize", '{"messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}'),
    ("/tokenize", '{"messages": []}'),
    ("/detokenize", '{"tokens": [1], "model": "\\ud800"}'),
])
def test_lone_surrogates_and_empty_messages_are_400(server, path, raw):
    r = requests.post(server.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=30)
    error_envelope(r, 400)


def test_stop_limits_count_strings_and_characters_separately(server):
    def ask(stop):
        return requests.post(server.url + "/v1/completions", json={"prompt": "The", "max_tokens": 2, "stop": stop},
                             timeout=30)

    assert ask("x" * 40).status_code == 200  # one long stop string is fine
    assert ask(["x" * 40] * 16).status_code == 200
    assert error_envelope(ask(["a"] * 17), 400)["param"] == "stop"
    assert error_envelope(ask("x" * 1025), 400)["param"] == "stop"


def test_body_limit_and_tokenization_off_the_event_loop(server):
    big = json.dumps({"prompt": "hello world " * 500_000, "max_tokens": 1})  # 6 MB
    start = time.monotonic()
    r = requests.post(server.url + "/v1/completions", data=big, headers={"Content-Type": "application/json"})
    assert error_envelope(r, 413)["code"] == "request_too_large" and time.monotonic() - start < 5

    def chunks():  # no content-length: the limit is enforced on the bytes as they arrive
        for _ in range(6):
            yield b" " * (1 << 20)
    r = requests.post(server.url + "/v1/completions", data=chunks(), headers={"Content-Type": "application/json"})
    error_envelope(r, 413)

    # A 3 MB prompt (under the limit) takes seconds to tokenize; meanwhile other clients are answered at once.
    took = {}

    def huge():
        t = time.monotonic()
        took["status"] = requests.post(server.url + "/v1/completions", timeout=120,
                                       json={"prompt": "hello world " * 250_000, "max_tokens": 1}).status_code
        took["huge"] = time.monotonic() - t

    thread = threading.Thread(target=huge)
    thread.start()
    time.sleep(0.3)
    latencies = []
    while thread.is_alive():
        t = time.monotonic()
        requests.get(server.url + "/v1/models", timeout=30)
        latencies.append(time.monotonic() - t)
        time.sleep(0.05)
    assert took["status"] == 400  # longer than the context, found once tokenized
    assert took["huge"] > 1.0 and len(latencies) >= 3 and max(latencies) < 0.5, (took, latencies)


def _poisoned(xbit_dir, poison: int, fail_at: int):
    """The checkpoint loaded in-process, its forward failing as a damaged model would: IndexError on a prefill
    that contains token `poison`, and on any decode step at position `fail_at`."""
    import torch

    import xbit

    torch.set_num_threads(1)
    model = xbit.load(xbit_dir, device="cpu")

    def hook(module, args, kwargs):
        ids, pos = kwargs["input_ids"], kwargs.get("position_ids")
        if (ids.shape[1] > 1 and (ids == poison).any()) or (pos is not None and (pos == fail_at).any()):
            raise IndexError("index out of range in self")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def test_engine_failures_fail_one_request_and_the_server_goes_on(xbit_dir):
    from transformers import AutoTokenizer

    from serve.app import create_app

    app = create_app(model=_poisoned(xbit_dir, poison=7, fail_at=12), tokenizer=AutoTokenizer.from_pretrained(xbit_dir),
                     max_seq_len=256)
    with InProcessServer(app) as url:
        def complete(prompt, max_tokens, **extra):
            return requests.post(url + "/v1/completions", timeout=30,
                                 json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **extra})

        for _ in range(2):
            assert error_envelope(complete([5, 7, 9], 3), 500)["code"] == "engine_error"  # prefill fails: no hang
            assert error_envelope(complete([5, 6, 9], 20), 500)["code"] == "engine_error"  # decode fails at 12
            r = complete([5, 6, 9], 20, stream=True)
            events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
            assert events[-1]["error"]["code"] == "error" and r.text.rstrip().endswith("data: [DONE]")
            assert complete([5, 6, 9], 4).json()["usage"]["completion_tokens"] == 4  # the next request is served
        assert requests.get(url + "/health", timeout=5).json() == {"status": "ok"}
        assert wait_idle(url, seconds=3) == 0  # the gauge is refreshed by the engine's next (idle) step
        app.state.serve.engine.stop()  # an engine that is gone is not healthy, and requests say so
        assert requests.get(url + "/health", timeout=5).status_code == 503
        error_envelope(complete([5, 6], 2), 503)


@pytest.mark.parametrize("env,args", [({}, ["--api-key", ""]), ({"XBIT_API_KEY": " "}, [])])
def test_empty_api_key_is_refused(xbit_dir, env, args):
    cmd = [sys.executable, "-m", "serve", "--model", str(xbit_dir), "--port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: the API key")
    assert len(proc.stderr.strip().splitlines()) == 1

"""Bad input never gives a 500 nor kills the server; API key; disconnects free slots; graceful shutdown."""

import json
import signal

import pytest
import requests

from tests.serve.helpers import ServerProcess, error_envelope, make_rtn_dir, wait_idle

BAD_BODIES = [
    {},  # missing prompt
    {"prompt": 5},
    {"prompt": "x", "max_tokens": -1},
    {"prompt": "x", "max_tokens": 10**12},
    {"prompt": "x", "max_tokens": "many"},
    {"prompt": ""},
    {"prompt": []},
    {"prompt": [[]]},
    {"prompt": [-1, 3]},
    {"prompt": [10**30]},
    {"prompt": "hello " * 400, "max_tokens": 1},  # longer than the context
    {"prompt": "x", "model": "no-such-model"},
    {"prompt": "x", "temperature": -1},
    {"prompt": "x", "top_p": 0},
    {"prompt": "x", "n": 0},
    {"prompt": "x", "n": 10**6},
    {"prompt": "x", "logprobs": 1000},
    {"prompt": "x", "stop": 3},
    {"prompt": "x", "seed": 2**70},
    {"prompt": "x", "stream": "yes please"},
    {"prompt": ["x"] * 200, "n": 16},
    [1, 2, 3],
    "just a string",
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_completion_bodies(server, body):
    r = requests.post(server.url + "/v1/completions", json=body, timeout=30)
    error_envelope(r, 404 if isinstance(body, dict) and body.get("model") == "no-such-model" else None)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 300}]}),
    ("/detokenize", {"tokens": [10**9]}),
    ("/tokenize", {}),
])
def test_bad_other_bodies(server, path, body):
    error_envelope(requests.post(server.url + path, json=body, timeout=30))


@pytest.mark.parametrize("raw", [b"{bad json", b'{"prompt": "\xff\xfe\xfd"}', b"", b"\x00" * 100, b"[" * 10000])
def test_malformed_bytes(server, raw):
    r = requests.post(server.url + "/v1/completions", data=raw, timeout=30,
                      headers={"Content-Type": "application/json"})
    error_envelope(r)


def test_unknown_route_and_method(server):
    error_envelope(requests.get(server.url + "/v1/nothing", timeout=5), 404)
    error_envelope(requests.get(server.url + "/v1/completions", timeout=5), 405)


@pytest.fixture(scope="module")
def keyed_server(xbit_dir):
    srv = ServerProcess(xbit_dir, "--api-key", "s3cret", "--max-batch", "4", "--max-seq-len", "256")
    yield srv
    srv.stop()


ENDPOINTS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
             ("POST", "/detokenize"), ("GET", "/v1/models"), ("GET", "/tokenizer_info"), ("GET", "/health"),
             ("GET", "/metrics"), ("POST", "/v1/models"), ("GET", "/v1/nothing")]


@pytest.mark.parametrize("keyed", [False, True], ids=["open", "keyed"])
def test_fuzz_every_endpoint(request, keyed):
    """Hypothesis-generated requests to every endpoint (valid field names, arbitrary JSON values, no key, a wrong
    key or the right one): never a 5xx, always the error envelope, and the server serves normally after."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    srv = request.getfixturevalue("keyed_server" if keyed else "server")
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 40),
                        st.floats(allow_nan=False), st.text(max_size=30),
                        st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e"]))  # lone surrogates too
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=3), max_leaves=8)
    fields = ["model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
              "stream_options", "logprobs", "echo", "messages", "ignore_eos", "tokens", "top_logprobs"]
    valid_prompt = st.one_of(st.text(max_size=40), st.lists(st.integers(0, 399), max_size=20))
    body = st.fixed_dictionaries({"prompt": valid_prompt, "max_tokens": st.integers(-2, 8)},
                                 optional={f: values for f in fields if f not in ("prompt", "max_tokens")})
    keys = st.sampled_from([None, "Bearer s3cret", "Bearer wrong", "s3cret", "Bearer "])
    seen = {"cases": 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(endpoint=st.sampled_from(ENDPOINTS), body=body | values, key=keys)
    def check(endpoint, body, key):
        seen["cases"] += 1
        method, path = endpoint
        headers = {"Content-Type": "application/json", **({"Authorization": key} if key else {})}
        r = requests.request(method, srv.url + path, data=json.dumps(body), headers=headers, timeout=60)
        assert r.status_code < 500, (method, path, body, key, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        if keyed and key != "Bearer s3cret" and path != "/health":
            assert r.status_code == 401

    check()
    print(f"\nfuzz: {seen['cases']} cases, no 5xx")
    assert seen["cases"] >= 200
    auth = {"Authorization": "Bearer s3cret"} if keyed else {}
    assert requests.get(srv.url + "/health", timeout=5).status_code == 200
    r = requests.post(srv.url + "/v1/completions", json={"prompt": "The", "max_tokens": 3}, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert wait_idle(srv.url, auth) == 0


def test_client_disconnect_frees_slot(server):
    body = {"prompt": "The", "max_tokens": 250, "stream": True, "ignore_eos": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=30) as r:
        next(r.iter_lines())  # generation is running
    assert wait_idle(server.url, {}) == 0


def test_api_key_and_graceful_shutdown(tmp_path):
    # on the rtn baseline's checkpoint (float embeddings and head), so that it is served end to end too
    srv = ServerProcess(make_rtn_dir(tmp_path / "tiny-rtn"), "--api-key", "s3cret", "--max-seq-len", "256",
                        "--shutdown-timeout", "5")
    try:
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200
        for path in ("/v1/models", "/metrics", "/tokenizer_info"):
            error_envelope(requests.get(srv.url + path, timeout=5), 401)
        error_envelope(requests.post(srv.url + "/v1/completions", json={"prompt": "x"}, timeout=5,
                                       headers={"Authorization": "Bearer wrong"}), 401)
        openai = pytest.importorskip("openai")
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny-rtn", prompt="The", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        # SIGTERM with a stream in flight: the stream ends cleanly ([DONE]) and the process exits 0.
        body = {"prompt": "The", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with requests.post(srv.url + "/v1/completions", json=body, stream=True, timeout=30,
                           headers={"Authorization": "Bearer s3cret"}) as r:
            lines = r.iter_lines(decode_unicode=True)
            next(lines)
            srv.proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        # uvicorn re-raises the caught SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit too.
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in srv.output()
    finally:
        srv.stop()

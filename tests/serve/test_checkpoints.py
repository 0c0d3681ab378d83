"""The server loads every checkpoint xbit writes, and a checkpoint that cannot load is reported instead of hanging."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from tests.serve.helpers import ROOT, ServerProcess, free_port, make_xbit_dir

PROMPT = "The quick brown fox"


def _check_serves(url: str, model_dir, head: str):
    """One greedy completion through the OpenAI client equals model.generate on the same checkpoint in-process,
    and the server's vocabulary is the model's."""
    import openai
    import xbit
    from transformers import AutoTokenizer

    model, tok = xbit.load(model_dir, device="cpu"), AutoTokenizer.from_pretrained(model_dir)
    assert type(model.get_output_embeddings()).__name__ == head  # the builder made the checkpoint we mean
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(ids):]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    vocab = model.config.vocab_size
    assert requests.get(url + "/tokenizer_info", timeout=5).json()["vocab_size"] == vocab
    assert requests.post(url + "/detokenize", json={"tokens": [vocab - 1]}, timeout=5).status_code == 200
    assert requests.post(url + "/detokenize", json={"tokens": [vocab]}, timeout=5).status_code == 400


def test_default_xbit_checkpoint_serves(server, xbit_dir):
    """The session checkpoint is xbit's default: embedding table quantized, the tied head reading it."""
    import xbit

    assert type(xbit.load(xbit_dir, device="cpu").get_input_embeddings()).__name__ == "XbitEmbedding"
    _check_serves(server.url, xbit_dir, "XbitTiedHead")


@pytest.mark.parametrize("kind,build,head", [
    ("untied", lambda d: make_xbit_dir(d, tie=False), "XbitLinear"),
    ("float-head", lambda d: make_xbit_dir(d, tie=False, quantize_embeddings=False), "Linear"),
])  # (an rtn checkpoint is served in test_errors.test_api_key_and_graceful_shutdown)
def test_other_checkpoints_serve(tmp_path, kind, build, head):
    model_dir = build(tmp_path / f"tiny-{kind}")
    srv = ServerProcess(model_dir, "--max-seq-len", "256")
    try:
        _check_serves(srv.url, model_dir, head)
    finally:
        srv.stop()


def _missing_layer(d):  # torch's get_submodule raises AttributeError, a type the loader did not expect before
    cfg = json.loads((d / "config.json").read_text())
    layers = cfg["quantization_config"]["layers"]
    layers["model.layers.7.mlp.down_proj"] = layers.pop("model.layers.1.mlp.down_proj")
    (d / "config.json").write_text(json.dumps(cfg))


def _group_size_zero(d):  # was a ZeroDivisionError in the layout arithmetic
    cfg = json.loads((d / "config.json").read_text())
    for spec in cfg["quantization_config"]["layers"].values():
        spec["group_size"] = 0
    (d / "config.json").write_text(json.dumps(cfg))


def _pickle_weights(d):  # a pickle instead of safetensors: refused, never unpickled
    import pickle

    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))


DAMAGES = {"missing_layer": _missing_layer, "group_size_zero": _group_size_zero, "pickle": _pickle_weights}


@pytest.fixture(params=list(DAMAGES))
def damaged_dir(request, xbit_dir, tmp_path):
    """The session checkpoint, damaged in one of the ways that used to leave /health at "loading" forever."""
    d = tmp_path / "damaged"
    shutil.copytree(xbit_dir, d)
    DAMAGES[request.param](d)
    return d


def test_python_m_serve_exits_nonzero_on_load_failure(damaged_dir):
    cmd = [sys.executable, "-m", "serve", "--model", str(damaged_dir), "--port", str(free_port()), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: could not load {damaged_dir}: "), lines[-1]
    reason = lines[-1].removeprefix(f"error: could not load {damaged_dir}: ")
    assert any("serve.app ERROR loading" in ln and reason in ln for ln in lines)  # logged as it happens


def test_health_reports_load_failure(damaged_dir, caplog):
    """With no on_load_error hook the server stays up: /health and the API answer 503 with the reason."""
    import uvicorn

    from serve.app import create_app

    reasons = []
    app = create_app(str(damaged_dir), device="cpu", on_load_error=reasons.append)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, health, body = time.monotonic() + 60, None, {"status": "loading"}
        while body["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                health = requests.get(url + "/health", timeout=5)
                body = health.json()
            except requests.ConnectionError:  # not listening yet
                pass
        assert health is not None and health.status_code == 503
        assert body["status"] == "failed" and body["error"] and "\n" not in body["error"]
        assert reasons == [body["error"]]
        r = requests.post(url + "/v1/completions", json={"prompt": "The", "max_tokens": 2}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["message"] == body["error"]
    finally:
        srv.should_exit = True
        thread.join(30)
    assert any(rec.name == "serve.app" and rec.levelname == "ERROR" and body["error"] in rec.getMessage()
               for rec in caplog.records)

"""Tiny offline model folders and a real server subprocess for the serve tests."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "To be or not to be, that is the question. All that glitters is not gold. Ünïcödé wörds ünd émojis 🙂 too. "
        "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: ; , . ! ? - ( ) [ ] { } \" ' / \\ @ # $ % ^ & * + =\n") * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROOT = Path(__file__).resolve().parents[2]


def tiny_tokenizer():
    """Byte-level BPE (lossless decode, multi-byte characters split across tokens) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(vocab_size: int, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)  # sharper logits than the 0.02-std init: greedy choices are not near-ties
        if tie:  # a tied head scores tokens against the input embeddings; stronger blocks stop it echoing its input
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(8.0)
                layer.mlp.down_proj.weight.mul_(8.0)
    return model


def make_xbit_dir(out_dir: Path, tie: bool = True, quantize_embeddings: bool = True) -> Path:
    """What `python -m xbit.quantize --method xbit` writes: by default the embedding table and the head are
    quantized too (tied: one table, the head an XbitTiedHead; untied: the head an XbitLinear). One round, no
    tuning, a few short calibration windows: about a second."""
    import xbit
    from xbit import checkpoint

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), tie=tie)
    # two texts: xbit holds the last one out for the cost, and each must be longer than seq_len tokens
    model, qconfig, report = xbit.quantize(model, tok, method="xbit", bits=4, group_size=32, calib=[TEXT, TEXT],
                                           calib_samples=8, seq_len=64, rounds=1, tune_epochs=0, progress=False,
                                           quantize_embeddings=quantize_embeddings)
    checkpoint.save(model, tok, out_dir, qconfig, report)
    return out_dir


def make_rtn_dir(out_dir: Path) -> Path:
    """The rtn 4-bit baseline: float embeddings and head, every decoder linear an XbitLinear."""
    import xbit
    from xbit import checkpoint

    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    model, qconfig, report = xbit.quantize(model, None, method="rtn", code_bits=4, group_size=32, progress=False)
    checkpoint.save(model, tok, out_dir, qconfig, report)
    return out_dir


def make_float_dir(out_dir: Path) -> Path:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=1)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def error_envelope(r, status: int | None = None) -> dict:
    """The OpenAI error body of response `r`, checked: status `status` (any 4xx if None), all four fields."""
    if status is None:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    else:
        assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def running(url: str, headers: dict | None = None) -> float:
    """The server's xbit_running_sequences gauge."""
    import requests

    for line in requests.get(url + "/metrics", headers=headers, timeout=5).text.splitlines():
        if line.startswith("xbit_running_sequences "):
            return float(line.split()[1])
    raise AssertionError("no xbit_running_sequences metric")


def wait_idle(url: str, headers: dict | None = None, seconds: float = 20) -> float:
    """The gauge once it reads 0, or after `seconds` (the engine refreshes it at its next, possibly idle, step)."""
    deadline = time.monotonic() + seconds
    while running(url, headers) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return running(url, headers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serve` on a free loopback port; `url` once /health answers 200."""

    def __init__(self, model_dir, *extra: str, env: dict | None = None, timeout: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--threads", "1", *extra]
        self.log = open(Path(model_dir).parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float):
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


class InProcessServer:
    """uvicorn serving `app` in a thread of this process (for apps built around an in-process model);
    `with InProcessServer(app) as url:`."""

    def __init__(self, app):
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import requests

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + "/health", timeout=2)
                return self.url
            except requests.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError(f"in-process server not listening at {self.url}")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

"""The lm-eval "xbit" model scores exactly like a direct forward pass of the same model."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from eval.lm_eval_model import XbitLM_cls, register  # noqa: E402
from tests.tiny import WORDS, tiny_llama, tiny_tokenizer  # noqa: E402

CASES = [("the of and", " to a in"), ("he was", " not"), ("i had been", " there with them when")]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _direct_loglikelihood(model, tok, context, continuation):
    ctx, full = _ids(tok, context), _ids(tok, context + continuation)
    assert full[: len(ctx)] == ctx
    logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
    pos = range(len(ctx), len(full))
    total = sum(logp[t - 1, full[t]].item() for t in pos)
    greedy = all(logp[t - 1].argmax().item() == full[t] for t in pos)
    return total, greedy


@torch.no_grad()
def _direct_rolling(model, seq, window):
    """Sum of log p(seq[t] | seq[max(0, b-window):t]) in blocks of `window` targets (lm-eval's rolling windows)."""
    total, n = 0.0, len(seq) - 1  # seq[0] is the prefix token, never a target
    for a in range(0, n, window):
        b = min(a + window, n)  # targets seq[a+1 .. b]
        s = max(0, b - window)
        logp = torch.log_softmax(model(torch.tensor([seq[s:b]])).logits[0].double(), -1)
        total += sum(logp[t - 1 - s, seq[t]].item() for t in range(a + 1, b + 1))
    return total


def _lm(model, tok, **kw):
    return XbitLM_cls()(pretrained=model, tokenizer=tok, batch_size=2, device="cpu", **kw)


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_matches_forward_pass():
    model, tok = tiny_llama(), tiny_tokenizer()
    lm = _lm(model, tok)
    got = lm.loglikelihood([_req("loglikelihood", c, i) for i, c in enumerate(CASES)])
    for (ll, greedy), (ctx, cont) in zip(got, CASES):
        want, want_greedy = _direct_loglikelihood(model, tok, ctx, cont)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_loglikelihood_rolling_matches_forward_pass():
    model, tok = tiny_llama(seed=1), tiny_tokenizer()
    text = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(40))
    for max_length in (None, 16):  # one window, then several
        lm = _lm(model, tok, **({"max_length": max_length} if max_length else {}))
        (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
        seq = [lm.prefix_token_id] + _ids(tok, text)
        want = _direct_rolling(model, seq, max_length or len(seq))
        assert got == pytest.approx(want, abs=1e-4)


@torch.no_grad()
def test_generate_until_is_greedy_decoding():
    model, tok = tiny_llama(seed=2), tiny_tokenizer()
    lm = _lm(model, tok)
    context = "the of and to"
    (got,) = lm.generate_until([_req("generate_until", (context, {"until": ["zzz"], "max_gen_toks": 6,
                                                                   "do_sample": False}))])
    ids = _ids(tok, context)
    out = []
    for _ in range(6):
        nxt = model(torch.tensor([ids + out])).logits[0, -1].argmax().item()
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    assert got == tok.decode(out)


def _save_default_xbit(out_dir):
    """A default xbit checkpoint (the embedding table and the tied head quantized too); returns its tokenizer."""
    import xbit
    from xbit import checkpoint

    model, tok = tiny_llama(seed=3), tiny_tokenizer()
    text = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(300))
    # two texts: xbit holds the last one out for its cost; each longer than seq_len tokens
    model, qconfig, report = xbit.quantize(model, tok, method="xbit", bits=4, group_size=32, calib=[text, text],
                                           calib_samples=8, seq_len=64, rounds=1, tune_epochs=0, progress=False)
    checkpoint.save(model, tok, out_dir, qconfig, report)
    return tok


def test_path_loads_xbit_checkpoint_and_registry(tmp_path):
    from lm_eval.api.registry import get_model

    tok = _save_default_xbit(tmp_path / "q")
    register()
    cls = get_model("xbit")
    assert cls is XbitLM_cls()
    lm = cls.create_from_arg_string(f"path={tmp_path / 'q'},device=cpu,batch_size=2")
    loaded = lm.model
    assert type(loaded.get_input_embeddings()).__name__ == "XbitEmbedding"
    assert type(loaded.get_output_embeddings()).__name__ == "XbitTiedHead"
    assert any(type(m).__name__ == "XbitLinear" for m in loaded.model.layers.modules())
    (ll, _), = lm.loglikelihood([_req("loglikelihood", CASES[0])])
    want, _ = _direct_loglikelihood(loaded, tok, *CASES[0])
    assert ll == pytest.approx(want, abs=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError):
        XbitLM_cls()()
    with pytest.raises(FileNotFoundError):
        XbitLM_cls()(path="/nonexistent/folder")


def test_cli_wrapper_adds_offline_tasks_path():
    from eval.lm_eval_model import tasks_dir
    from eval.lm_eval_run import _with_tasks_path

    argv = _with_tasks_path(["--model", "xbit", "--model_args", "path=D", "--tasks", "xbit_offline"])
    assert argv[-2:] == ["--include_path", str(tasks_dir())]
    mine = ["--model", "xbit", "--tasks", "t", "--include_path", "/my/tasks"]
    assert _with_tasks_path(mine) == mine


def _pth_installed() -> bool:
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return any((Path(d) / "xbit_lm_eval.pth").is_file() for d in dirs)


@pytest.mark.skipif(not _pth_installed(), reason="xbit is not pip-installed here (no xbit_lm_eval.pth)")
def test_plain_lm_eval_cli_knows_xbit(tmp_path):
    """`lm_eval --model xbit` in a fresh process, with no import of ours: the installed .pth hook registers it."""
    import json
    import shutil
    import subprocess
    import sys

    import xbit

    tok = _save_default_xbit(tmp_path / "q")
    rows = [{"context": c, "target": t} for c, t in CASES]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_ll.yaml").write_text(
        "task: tiny_ll\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    exe = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
    assert exe, "lm_eval console script not found"
    out = tmp_path / "res"
    proc = subprocess.run([exe, "--model", "xbit", "--model_args", f"path={tmp_path / 'q'}", "--device", "cpu",
                           "--tasks", "tiny_ll", "--include_path", str(tasks), "--output_path", str(out),
                           "--batch_size", "2", "--log_samples"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = [json.loads(line) for line in next(out.rglob("samples_tiny_ll_*.jsonl")).read_text().splitlines()]
    loaded = xbit.load(str(tmp_path / "q"), device="cpu")
    assert len(samples) == len(CASES)
    for s in samples:
        (ll, greedy), = s["filtered_resps"]
        want, want_greedy = _direct_loglikelihood(loaded, tok, s["doc"]["context"], s["doc"]["target"])
        assert float(ll) == pytest.approx(want, abs=1e-4) and str(greedy) == str(want_greedy)  # logged as strings

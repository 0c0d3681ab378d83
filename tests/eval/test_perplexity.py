"""Plain-protocol perplexity checked against a window-by-window manual loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from eval import perplexity as ppl_mod
from eval.perplexity import load_texts, perplexity, perplexity_ids

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (300,), generator=gen)


def manual(model, ids, ctx, bos_id=None, max_tokens=None):
    """Reference: one window at a time, cross entropy over every next-token target."""
    ids = ids[:max_tokens] if max_tokens is not None else ids
    stride = ctx - 1 if bos_id is not None else ctx
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ids) // stride):
            window = ids[i * stride:(i + 1) * stride]
            if bos_id is not None:
                window = torch.cat([torch.tensor([bos_id]), window])
            logits = model(window[None]).logits[0]
            total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += len(window) - 1
    return total / count, count, len(ids) // stride


@pytest.mark.parametrize("bos_id", [None, 5])
@pytest.mark.parametrize("max_tokens", [None, 200])
def test_matches_manual_loop(model, ids, bos_id, max_tokens):
    ctx = 32
    res = perplexity_ids(model, ids, ctx=ctx, bos_id=bos_id, max_tokens=max_tokens,
                         batch_size=3, progress=False)
    nll, count, windows = manual(model, ids, ctx, bos_id, max_tokens)
    assert res["tokens"] == count and res["windows"] == windows
    assert res["nll"] == pytest.approx(nll, abs=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert res["protocol"] == "plain"
    # a random model over 97 tokens is near-uniform, not trivially good or bad
    assert 30 < res["ppl"] < 400


def test_large_vocabularies_get_smaller_batches_with_the_same_result(model, ids, monkeypatch):
    """Windows per forward shrink to keep the logits under LOGITS_BUDGET; the sum over windows is unchanged."""
    seen = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    res = perplexity_ids(model, ids, ctx=32, batch_size=4, progress=False)
    assert max(seen) == 4
    seen.clear()
    monkeypatch.setattr(ppl_mod, "LOGITS_BUDGET", 12 * 32 * VOCAB * 2)  # two windows' logits
    small = perplexity_ids(model, ids, ctx=32, batch_size=4, progress=False)
    assert max(seen) == 2 and small["nll"] == pytest.approx(res["nll"], abs=1e-6)
    hook.remove()
    nll, _, _ = manual(model, ids, 32, None, None)
    assert small["nll"] == pytest.approx(nll, abs=1e-5)


class CharTokenizer:
    """Tokenizer stand-in: one id per character."""
    bos_token_id = 3

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def test_text_path_joins_and_uses_bos(model):
    texts = ["Call me Ishmael. Some years ago, never mind how long precisely.",
             "We the People of the United States, in Order to form a more perfect Union."]
    ids = CharTokenizer()("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    res = perplexity(model, CharTokenizer(), texts, ctx=16, bos=True, progress=False)
    ref = perplexity_ids(model, ids, ctx=16, bos_id=3, progress=False)
    assert res == ref and res["bos"] is True


def test_restores_training_mode(model, ids):
    model.train()
    perplexity_ids(model, ids, ctx=16, max_tokens=64, progress=False)
    assert model.training
    model.eval()


def test_bad_arguments(model, ids):
    with pytest.raises(ValueError):
        perplexity_ids(model, ids, ctx=1, progress=False)
    with pytest.raises(ValueError):
        perplexity_ids(model, ids, ctx=32, max_tokens=10, progress=False)
    tok = CharTokenizer()
    tok.bos_token_id = None
    with pytest.raises(ValueError):
        perplexity(model, tok, ["some text here"], ctx=4, bos=True, progress=False)


def test_load_texts_folder_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first é", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    single = tmp_path / "c.md"
    single.write_text("third", encoding="utf-8")
    assert load_texts([tmp_path, single]) == ["first é", "second", "third"]


@pytest.mark.parametrize("extra", [["--ctx", "1"], ["--text", "/nonexistent/file.txt"]])
def test_cli_errors_exit_2(tmp_path, capsys, extra):
    text = tmp_path / "t.txt"
    text.write_text("hello", encoding="utf-8")
    argv = ["--model", str(tmp_path), "--text", str(text)] + extra
    assert ppl_mod.main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_missing_model_dir(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello", encoding="utf-8")
    assert ppl_mod.main(["--model", str(tmp_path / "missing"), "--text", str(text)]) == 2
    assert "model folder not found" in capsys.readouterr().err

"""Embedding tables and output heads as xbit candidates (DESIGN regime a): lookups, tied heads, checkpoints."""

import copy

import pytest
import torch
from torch import nn

import xbit
from xbit.format import dequantize, reference_matmul
from xbit.learn import ErrorGates
from xbit.modules import XbitEmbedding, XbitTiedHead
from xbit.quantize import embedding_candidates, match_size
from xbit.rtn import quantize_weight_rtn
from tests.tiny import tiny_llama, tiny_tokenizer
from tests.xbit.test_allocate import texts


def _texts():
    return texts(n=8)


def _table(seed=0, vocab=300, dim=96, group_size=32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, dim, generator=g)
    bits = torch.randint(0, 9, (dim,), generator=g).to(torch.uint8)
    perm = torch.argsort(bits.long() * dim + torch.randperm(dim, generator=g), stable=True)
    return w, quantize_weight_rtn(w, bits, perm, group_size)


def test_lookup_and_tied_head_match_the_reference():
    w, t = _table()
    emb = XbitEmbedding.from_tensors(t, 32, dtype=torch.float32)
    table = dequantize(t["qweight"], t["scales"], t["zeros"], t["perm"], t["bits"], 32)
    ids = torch.tensor([[5, 0, 299, 5], [17, 17, 3, 250]])
    torch.testing.assert_close(emb(ids), table[ids])
    assert (emb(ids) - w[ids]).abs().mean() < w.abs().mean()  # a real quantization of w, not noise
    x = torch.randn(3, 96)
    want = reference_matmul(x, t["qweight"], t["scales"], t["zeros"], t["perm"], t["bits"], 32)
    got = XbitTiedHead(emb)(x)  # through dispatch: the CPU kernel's GEMV may round x to ~15 bits (1e-4, in norm)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert emb.half()(ids).dtype == torch.float16 and emb.scales.dtype == torch.float16


def test_candidates_tied_and_untied():
    cands, tied = embedding_candidates(tiny_llama(tie=True))
    assert list(cands) == ["model.embed_tokens"] and tied == {"lm_head": "model.embed_tokens"}
    cands, tied = embedding_candidates(tiny_llama(tie=False))
    assert list(cands) == ["model.embed_tokens", "lm_head"] and tied == {}


@pytest.mark.parametrize("tie", [True, False])
def test_xbit_quantizes_embeddings_stores_a_tied_table_once_and_reloads(tmp_path, tie):
    tok = tiny_tokenizer()
    size = match_size(tiny_llama(tie=tie), "gptq:4:32")
    model, qc, rep = xbit.quantize(tiny_llama(tie=tie), tok, method="xbit", size=size, group_size=32,
                                   calib=_texts(), calib_samples=6, seq_len=64, rounds=1, progress=False)
    assert rep["file_bytes"] <= size
    assert isinstance(model.model.embed_tokens, XbitEmbedding)
    assert isinstance(model.lm_head, XbitTiedHead if tie else xbit.XbitLinear)
    assert qc["layers"]["model.embed_tokens"]["kind"] == "embedding" and qc.get("tied", {}) == (
        {"lm_head": "model.embed_tokens"} if tie else {})
    written = xbit.checkpoint.save(model, tok, tmp_path / "q", qc, rep)
    assert written == rep["file_bytes"] == (tmp_path / "q" / "model.safetensors").stat().st_size
    names = xbit.checkpoint.read_header(tmp_path / "q" / "model.safetensors")
    assert any(n.startswith("lm_head.") for n in names) != tie  # a tied table is stored once
    loaded = xbit.load(tmp_path / "q", device="cpu", dtype=torch.float32)
    assert isinstance(loaded.lm_head, XbitTiedHead if tie else xbit.XbitLinear)
    if tie:
        assert loaded.lm_head.embedding is loaded.model.embed_tokens
    ids = torch.tensor([[3, 4, 5, 6, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        ref = tiny_llama(tie=tie)(ids).logits
        assert 0 < (loaded(ids).logits - ref).abs().mean() < ref.abs().mean()


def test_float_embeddings_keeps_them_float():
    model, qc, _ = xbit.quantize(tiny_llama(), tiny_tokenizer(), method="xbit", bits=4.0, group_size=32,
                                 calib=_texts(), calib_samples=4, seq_len=64, allocation="proxy", progress=False,
                                 quantize_embeddings=False)
    assert type(model.model.embed_tokens) is nn.Embedding and "tied" not in qc
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_error_gates_at_one_equal_the_quantized_table_in_both_roles():
    """Gate hooks on a tied table add (Q - W) to the lookup and to the head: at t = 1 the logits are those of the
    model whose shared table is Q."""
    model = tiny_llama(seed=2)
    emb = model.model.embed_tokens
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(emb.weight.shape, generator=g) * 0.05
    want_model = copy.deepcopy(model)
    want_model.model.embed_tokens.weight.data += delta  # tied: the head sees it too
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    name = "model.embed_tokens"
    gates = ErrorGates({name: emb}, {name: delta}, {name: model.lm_head})
    with torch.no_grad():
        got = model(ids).logits
    gates.remove()
    with torch.no_grad():
        torch.testing.assert_close(got, want_model(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(ids).logits, got, atol=1e-3)  # hooks removed: back to W

"""The block-at-a-time cost and gradient equal one autograd graph over the whole model (xbit.blockwise)."""

import pytest
import torch

from xbit.arch import adapter_for, block_linears, embedding_and_head
from xbit import blockwise
from xbit.blockwise import Teacher, cost
from xbit.learn import ErrorGates, ce_cost, kl_cost
from tests.families import family_model


def whole_model_cost_and_grad(model, ids, ref_model, cost_fn, gates, batch_size):
    total = 0.0
    with torch.enable_grad():
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i : i + batch_size]
            with torch.no_grad():
                ref = ref_model(batch, use_cache=False).logits
            loss = cost_fn(model(batch, use_cache=False).logits, ref, batch) * batch.shape[0] / ids.shape[0]
            loss.backward()
            total += loss.item()
    grad = gates.t.grad.clone()
    gates.t.grad = None
    return total, grad


@pytest.mark.parametrize("family,cost_fn,big_table", [("llama", kl_cost, None), ("gemma2", kl_cost, None),
                                                     ("qwen2", ce_cost, None), ("llama", kl_cost, 300),
                                                     ("gemma2", kl_cost, 300)])
def test_blockwise_cost_and_gate_gradients_match_one_graph(family, cost_fn, big_table, monkeypatch):
    """Gates on every block linear, the embedding and (tied or not) the head; Gemma-2 scales its embedding and
    soft-caps its logits. 7 sequences in batches of 3 (a partial last batch). With big_table, every layer is "big"
    in the blockwise cost (lookups make the rows they read, products go a few rows at a time, each chunk made
    again in the backward pass) and half the errors come as functions of the rows: the same cost and gradients
    as the whole model's graph with every error expanded."""
    model, ref_model = family_model(family), family_model(family)
    for p in [*model.parameters(), *ref_model.parameters()]:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (7, 24), generator=g)
    extra, tied = embedding_and_head(model)
    linears = {**block_linears(model), **extra}
    deltas = {n: torch.randn(m.weight.shape, generator=g) * 0.02 for n, m in linears.items()}
    tied_heads = {emb: model.get_submodule(head) for head, emb in tied.items()}
    gates = ErrorGates(linears, deltas, tied_heads, scale_of=adapter_for(model).scale_of)
    want_cost, want_grad = whole_model_cost_and_grad(model, ids, ref_model, cost_fn, gates, 3)
    if big_table:
        gates.remove()
        monkeypatch.setattr(blockwise, "BIG_TABLE", big_table)
        monkeypatch.setattr(blockwise, "CHUNK", big_table // 2)
        made = {n: (lambda rows, d=d: d[rows]) if k % 2 else d for k, (n, d) in enumerate(deltas.items())}
        gates = ErrorGates(linears, made, tied_heads, scale_of=adapter_for(model).scale_of)
    got_cost = cost(model, ids, Teacher(ref_model, ids, "cpu", batch_size=3), cost_fn, "cpu", batch_size=3)
    gates.remove()
    assert want_cost > 1e-4 and got_cost == pytest.approx(want_cost, rel=1e-4)
    assert want_grad.abs().min() > 0  # every gate matters, the embedding's included
    torch.testing.assert_close(gates.t.grad, want_grad, rtol=2e-3, atol=1e-4 * want_grad.abs().max().item())

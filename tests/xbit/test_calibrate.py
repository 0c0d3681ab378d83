"""Calibration statistics: block-by-block E[x x^T] equals the statistics of a plain forward pass."""

import torch
from torch import nn

from xbit.calibrate import head_hessian, run_blocks
from tests.tiny import tiny_llama


def _direct_statistics(model, ids):
    """E[x x^T] of every linear's input and of the head's input, from hooks on one whole-model forward."""
    sums, counts, handles = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, inp, out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.t() @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def test_block_statistics_and_head_statistics_match_a_plain_forward():
    model = tiny_llama(seed=4)
    ids = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    want = _direct_statistics(model, ids)
    got = {}

    def record(i, block, hessians):
        got.update({f"model.layers.{i}.{n}": h for n, h in hessians.items()})

    hidden = run_blocks(model, ids, "cpu", record, batch_size=2, progress=False)
    assert set(got) == {n for n in want if n != "lm_head"}
    for name, h in got.items():  # q/k/v and gate/up share one product: each must still be its own input's
        torch.testing.assert_close(h, want[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_hessian(model, hidden, "cpu"), want["lm_head"], rtol=1e-4, atol=1e-5)

    diag = {}
    run_blocks(model, ids, "cpu", lambda i, b, hs: diag.update({f"model.layers.{i}.{n}": h for n, h in hs.items()}),
               batch_size=3, progress=False, diag_only=True)
    for name, h in diag.items():
        torch.testing.assert_close(h, want[name].diagonal(), rtol=1e-4, atol=1e-5)
